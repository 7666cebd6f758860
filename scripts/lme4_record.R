# Shared helpers for the lme4 reference scripts (source()d by ref_single.R, ref_multi.R,
# ref_traps.R, ref_statsmodels_lme.R). Run those scripts from the repository root.
#
# One fit -> one JSON record (see scripts/README.md for the field list). The data a fit uses is
# always read back from the CSV committed under tests/data/, so R fits exactly the text Python reads.
suppressMessages({
  library(lme4); library(lmerTest); library(Matrix); library(jsonlite)
})
invisible(Sys.setlocale("LC_COLLATE", "C"))   # factor levels sort by code point, like Python's sorted()
if (!file.exists("pyproject.toml") || !dir.exists("tests/data"))
  stop("run the reference scripts from the repository root (where pyproject.toml is)")
DATA_DIR <- "tests/data"
RANEF_CAP <- 3000L         # more levels than this: record the first RANEF_HEAD levels only
RANEF_HEAD <- 200L
LMERTEST_MAX_N <- 5000L    # Satterthwaite only for fits with at most this many rows
KR_MAX_N <- 2000L          # Kenward-Roger (pbkrtest, dense n x n algebra) only up to this many rows:
                           # ScotsSec (3435 rows, crossed) takes pbkrtest 343 s on this machine

ref_header <- function(script) {
  list(generated_by = script,
       session = paste(capture.output(sessionInfo())[1:3], collapse = " | "),
       R_version = R.version.string,
       lme4_version = as.character(packageVersion("lme4")),
       nlme_version = as.character(packageVersion("nlme")),
       lmerTest_version = as.character(packageVersion("lmerTest")),
       pbkrtest_version = as.character(packageVersion("pbkrtest")),
       Matrix_version = as.character(packageVersion("Matrix")),
       jsonlite_version = as.character(packageVersion("jsonlite")),
       collation = "C (factor levels sorted by code point)",
       lmer_call = "lmer(formula, data, REML = REML) with lme4's default control")
}

# Write a data frame to tests/data/<subdir>/<name>.csv (plain CSV, no row names, no quotes, NA as
# "NA", doubles with up to 15 significant digits: write.csv's default). Returns the path relative
# to tests/data.
export_csv <- function(df, name, subdir = "datasets") {
  df <- as.data.frame(df)
  for (nm in names(df)) {
    if (is.factor(df[[nm]])) df[[nm]] <- as.character(df[[nm]])
    if (is.character(df[[nm]]) && any(grepl("[,\"']", df[[nm]])))
      stop("column ", nm, " has a comma or quote; cannot write it unquoted")
  }
  rel <- file.path(subdir, paste0(name, ".csv"))
  write.csv(df, file.path(DATA_DIR, rel), row.names = FALSE, quote = FALSE)
  rel
}

# Read a committed CSV back; the `factors` columns are read as text (the literal CSV text is the
# level label) and converted with factor() (levels sorted in C collation).
load_csv <- function(rel, factors = character()) {
  cc <- setNames(rep("character", length(factors)), factors)
  d <- read.csv(file.path(DATA_DIR, rel), colClasses = cc, check.names = FALSE)
  for (f in factors) d[[f]] <- factor(d[[f]])
  d
}

named <- function(x, nm = names(x)) as.list(setNames(as.numeric(x), nm))

# Conditional covariance blocks Var(b_level | y) = sigma^2 [Lambda (Lambda'Z'Z Lambda + I)^-1 Lambda']
# restricted to the random effects of one level of grouping factor g (all terms of g together).
computed_condvar <- function(m, g) {
  cnms <- getME(m, "cnms"); Gp <- getME(m, "Gp")
  ks <- which(names(cnms) == g)
  nl <- (Gp[ks[1] + 1] - Gp[ks[1]]) / length(cnms[[ks[1]]])
  idx <- lapply(seq_len(nl), function(i) unlist(lapply(ks, function(k) {
    qk <- length(cnms[[k]]); Gp[k] + (i - 1) * qk + seq_len(qk)
  })))
  all <- unlist(idx)
  Lt <- t(getME(m, "Lambda"))
  R <- as.matrix(Lt[, all, drop = FALSE])
  X <- as.matrix(solve(getME(m, "L"), R, system = "A"))
  s2 <- sigma(m)^2
  pos <- 0
  lapply(idx, function(J) {
    jj <- pos + seq_along(J); pos <<- pos + length(J)
    s2 * crossprod(R[, jj, drop = FALSE], X[, jj, drop = FALSE])
  })
}

ranef_record <- function(m) {
  re <- ranef(m, condVar = TRUE)
  out <- list(ranef = list(), condvar = list(), condvar_source = list(), ranef_truncated = FALSE)
  for (g in names(re)) {
    r <- re[[g]]; pv <- attr(r, "postVar")
    nl <- nrow(r); keep <- if (nl > RANEF_CAP) seq_len(RANEF_HEAD) else seq_len(nl)
    if (nl > RANEF_CAP) out$ranef_truncated <- TRUE
    rows <- data.frame(level = rownames(r)[keep], r[keep, , drop = FALSE], check.names = FALSE,
                       stringsAsFactors = FALSE)
    rownames(rows) <- NULL
    out$ranef[[g]] <- rows
    if (is.list(pv)) {
      # several terms share grouping factor g, e.g. (1|g) + (0+x|g) or (x||g): lme4 gives one
      # array per term (the diagonal blocks only). Compute the full q x q blocks and check that
      # their diagonal blocks equal lme4's arrays.
      full <- computed_condvar(m, g)
      off <- 0
      for (a in pv) {
        qa <- dim(a)[1]; jj <- off + seq_len(qa); off <- off + qa
        d <- max(abs(sapply(seq_len(nl), function(i) max(abs(full[[i]][jj, jj, drop = FALSE] - a[, , i])))))
        if (d > 1e-8 * max(1, max(abs(a)))) stop("computed condvar disagrees with lme4 postVar for ", g, ": ", d)
      }
      out$condvar[[g]] <- lapply(keep, function(i) unname(full[[i]]))
      out$condvar_source[[g]] <- "computed: full q x q block of sigma^2 Lambda (Lambda'Z'Z Lambda + I)^-1 Lambda' (lme4's postVar is a list of per-term diagonal blocks here; they agree)"
    } else {
      q <- dim(pv)[1]
      out$condvar[[g]] <- lapply(keep, function(i) matrix(unname(pv[, , i]), q, q))
      out$condvar_source[[g]] <- "lme4: attr(ranef(m, condVar = TRUE)[[g]], 'postVar')[, , i]"
    }
  }
  out
}

with_messages <- function(expr) {
  msgs <- character()
  val <- withCallingHandlers(expr,
    warning = function(w) { msgs <<- c(msgs, paste("warning:", conditionMessage(w))); invokeRestart("muffleWarning") },
    message = function(mm) { msgs <<- c(msgs, paste("message:", trimws(conditionMessage(mm)))); invokeRestart("muffleMessage") })
  list(value = val, messages = unique(msgs))
}

lmertest_record <- function(m) {
  w <- with_messages({
    mt <- as_lmerModLmerTest(m)
    co <- summary(mt)$coefficients
    kr <- if (nobs(m) <= KR_MAX_N) tryCatch(summary(mt, ddf = "Kenward-Roger")$coefficients, error = function(e) NULL)
    list(co = co, kr = kr)
  })
  co <- w$value$co; kr <- w$value$kr
  nm <- rownames(co)
  list(lmertest_messages = as.list(w$messages),
       satterthwaite_df = named(co[, "df"], nm), satterthwaite_p = named(co[, "Pr(>|t|)"], nm),
       kenward_roger_df = if (is.null(kr)) NULL else named(kr[, "df"], nm),
       kenward_roger_p = if (is.null(kr)) NULL else named(kr[, "Pr(>|t|)"], nm))
}

# Fit lmer(formula, d, REML) and return list(model = m, record = <JSON record>).
fit_lmer <- function(data_rel, formula, REML = TRUE, factors = character(), bigmixed_formula = formula,
                     d = NULL, lmertest = NULL, extra = list(), alt_optimizer = NULL, note = NULL, weights = NULL) {
  if (is.null(d)) d <- load_csv(data_rel, factors)
  msgs <- character()
  f <- as.formula(formula)
  environment(f) <- environment()   # update() (lmerTest, profile, anova) finds `d` here
  cl <- if (is.null(weights)) bquote(lmer(.(f), data = d, REML = .(REML))) else
    bquote(lmer(.(f), data = d, REML = .(REML), weights = .(as.name(weights))))
  tm <- system.time(w <- with_messages(eval(cl)))
  m0 <- w$value; msgs <- w$messages
  # lme4's default stopping rules leave theta good to ~1e-5 (and worse where it stops short):
  # the recorded estimates come from a refit from there with bobyqa's trust region shrunk to
  # 1e-10, so tests can hold bigmixed to 1e-4 in theta; `default` keeps what lmer() gave.
  oi0 <- m0@optinfo
  cmp0 <- getME(m0, "devcomp")$cmp
  default <- list(objective = as.numeric(if (REML) cmp0[["REML"]] else cmp0[["dev"]]),
                  logLik = as.numeric(logLik(m0)), theta = named(getME(m0, "theta")), fixef = named(fixef(m0)),
                  sigma = sigma(m0), singular = isSingular(m0), optimizer = oi0$optimizer, feval = oi0$feval)
  th0 <- getME(m0, "theta")
  cl_t <- cl
  cl_t$start <- list(theta = th0)
  cl_t$control <- quote(lmerControl(optimizer = "bobyqa", calc.derivs = FALSE,
                                    optCtrl = list(rhobeg = 1e-3, rhoend = 1e-10, maxfun = 1e5)))
  wt <- with_messages(eval(cl_t))
  m <- if (as.numeric(if (REML) getME(wt$value, "devcomp")$cmp[["REML"]] else getME(wt$value, "devcomp")$cmp[["dev"]])
           <= default$objective) wt$value else m0
  oi <- oi0
  tag <- function(prefix, x) if (length(x)) paste(prefix, x) else character()
  msgs <- unique(c(msgs, tag("optinfo$conv$lme4:", unlist(oi$conv$lme4$messages)),
                   tag("optinfo$warnings:", unlist(oi$warnings))))
  cmp <- getME(m, "devcomp")$cmp
  V <- as.matrix(vcov(m))
  rec <- list(data = data_rel, formula = formula, REML = REML, factors = as.list(factors), weights = weights,
              bigmixed_formula = bigmixed_formula,
              objective = as.numeric(if (REML) cmp[["REML"]] else cmp[["dev"]]),
              logLik = as.numeric(logLik(m)), nobs = nobs(m), nrow_csv = nrow(d),
              ngroups = as.list(ngrps(m)), fixef = named(fixef(m)),
              se = named(sqrt(diag(V)), names(fixef(m))), vcov_fixef = unname(V),
              varcorr = as.data.frame(VarCorr(m), stringsAsFactors = FALSE),
              theta = named(getME(m, "theta")), sigma = sigma(m), singular = isSingular(m),
              optimizer = oi$optimizer, optimizer_conv = oi$conv$opt, feval = oi$feval,
              lme4_messages = as.list(msgs), seconds = tm[["elapsed"]], default = default,
              estimates_from = if (identical(m, m0)) "default lmer()" else "bobyqa refit, rhoend = 1e-10")
  rec <- c(rec, ranef_record(m))
  use_lt <- if (is.null(lmertest)) nobs(m) <= LMERTEST_MAX_N else lmertest
  if (use_lt) rec <- c(rec, lmertest_record(m))
  else rec <- c(rec, list(lmertest_messages = list(), satterthwaite_df = NULL, satterthwaite_p = NULL, kenward_roger_df = NULL,
                          kenward_roger_p = NULL))
  if (!is.null(alt_optimizer)) {
    # the same model refitted with another optimizer (lme4's default stops short on some data)
    cl2 <- bquote(lmer(.(f), data = d, REML = .(REML), control = lmerControl(optimizer = .(alt_optimizer))))
    w2 <- with_messages(eval(cl2)); m2 <- w2$value; cmp2 <- getME(m2, "devcomp")$cmp
    rec$alt_fit <- list(control = sprintf("lmerControl(optimizer = \"%s\")", alt_optimizer),
      objective = as.numeric(if (REML) cmp2[["REML"]] else cmp2[["dev"]]), logLik = as.numeric(logLik(m2)),
      fixef = named(fixef(m2)), theta = named(getME(m2, "theta")), sigma = sigma(m2),
      singular = isSingular(m2), lme4_messages = as.list(w2$messages))
  }
  if (!is.null(note)) rec$note <- note
  list(model = m, record = c(rec, extra))
}

profile_ci <- function(m) {
  msgs <- character()
  pr <- withCallingHandlers(confint(m, method = "profile", oldNames = FALSE),
    warning = function(w) { msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning") },
    message = function(mm) { msgs <<- c(msgs, trimws(conditionMessage(mm))); invokeRestart("muffleMessage") })
  list(call = "confint(m, method = 'profile', oldNames = FALSE)", names = rownames(pr),
       lower = unname(pr[, 1]), upper = unname(pr[, 2]), messages = as.list(unique(msgs)))
}

write_ref <- function(obj, rel) {
  txt <- toJSON(obj, auto_unbox = TRUE, digits = NA, null = "null", na = "null", dataframe = "rows")
  writeLines(txt, file.path(DATA_DIR, rel))
  cat("wrote", file.path(DATA_DIR, rel), "(", file.size(file.path(DATA_DIR, rel)), "bytes )\n")
}

# Run a list of fits, printing one line per fit; returns list(fits = records, models = models).
run_fits <- function(specs) {
  fits <- list(); models <- list()
  for (key in names(specs)) {
    s <- specs[[key]]
    r <- do.call(fit_lmer, s)
    rr <- r$record
    cat(sprintf("%-28s n=%-6d obj=%.6f singular=%s %.2fs %s\n", key, rr$nobs, rr$objective, rr$singular,
                rr$seconds, paste(unlist(rr$lme4_messages), collapse = "; ")))
    fits[[key]] <- rr; models[[key]] <- r$model
  }
  list(fits = fits, models = models)
}
