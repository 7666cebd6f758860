# Child runner for bench/compare.py and bench/multiterm.py: fit one model with lme4.
#
# Usage: Rscript bench/_lme4.R <data.csv> <out.json> <REML: TRUE|FALSE> [formula] [factor columns]
#
#   formula         lme4 formula (default "y ~ x + x2 + (x | subject)")
#   factor columns  comma-separated columns converted with factor() after reading
#                   (default "subject"; e.g. "s,d,dept,service" for InstEval)
#
# Runs in its own process so the parent can measure peak RSS and kill it on
# budget overrun.  Fit time is measured around lmer() only; read time is
# reported separately.  R has no parquet reader here (no arrow package), so
# the parent writes the same data as CSV as well.
args <- commandArgs(trailingOnly = TRUE)
stopifnot(length(args) >= 3)
csv <- args[[1]]
out <- args[[2]]
reml <- as.logical(args[[3]])
form <- if (length(args) >= 4) args[[4]] else "y ~ x + x2 + (x | subject)"
factors <- if (length(args) >= 5) strsplit(args[[5]], ",", fixed = TRUE)[[1]] else "subject"

suppressPackageStartupMessages(library(lme4))

t0 <- Sys.time()
if (requireNamespace("data.table", quietly = TRUE)) {
  # fread is multithreaded and ~10x faster than read.csv on 1e7 rows
  d <- data.table::fread(csv, data.table = FALSE)
} else {
  d <- read.csv(csv)
}
for (f in factors) d[[f]] <- factor(d[[f]])
read_s <- as.numeric(difftime(Sys.time(), t0, units = "secs"))

t1 <- Sys.time()
fm <- lmer(as.formula(form), data = d, REML = reml)
fit_s <- as.numeric(difftime(Sys.time(), t1, units = "secs"))

conv <- fm@optinfo$conv
msgs <- c(unlist(conv$lme4$messages), unlist(fm@optinfo$warnings))
# converged = optimizer reported success and lme4's post-fit checks raised nothing
converged <- isTRUE(conv$opt == 0) && length(msgs) == 0

res <- list(
  library = "lme4",
  version = as.character(packageVersion("lme4")),
  r_version = R.version.string,
  formula = form,
  nobs = nobs(fm),
  ngroups = as.list(ngrps(fm)),
  read_s = read_s,
  fit_s = fit_s,
  criterion = if (reml) REMLcrit(fm) else deviance(fm),
  loglik = as.numeric(logLik(fm)),
  converged = converged,
  messages = as.list(msgs),
  theta = unname(getME(fm, "theta")),
  fixef = unname(fixef(fm))
)
tmp <- paste0(out, ".tmp")
writeLines(jsonlite::toJSON(res, auto_unbox = TRUE, digits = NA), tmp)
file.rename(tmp, out)
