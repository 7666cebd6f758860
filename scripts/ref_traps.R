# lme4 fits of the synthetic trap cases (scripts/make_traps.py), REML and ML, merged with what
# bigmixed 0.1.0 found on them (tests/data/traps/bigmixed_0_1.json, scripts/bigmixed_traps.py).
# usage (from the repository root): python scripts/make_traps.py && python scripts/bigmixed_traps.py ... &&
#                                   Rscript scripts/ref_traps.R
# writes tests/data/lme4/traps.json
source("scripts/lme4_record.R")
cases <- fromJSON(file.path(DATA_DIR, "traps", "cases.json"), simplifyVector = FALSE)$cases
bmf <- file.path(DATA_DIR, "traps", "bigmixed_0_1.json")
bmj <- if (file.exists(bmf)) fromJSON(bmf, simplifyVector = FALSE) else NULL
GAP_TOL <- 1e-3

crit <- function(m) as.numeric(if (isREML(m)) REMLcrit(m) else deviance(m))

# The best optimum we can find for the same model: lme4's default fit, bobyqa, Nelder_Mead and, for
# the uncentred case, the centred reparametrisation (x - 105 in the random term spans the same Z
# columns, so its optimum is the same model's optimum; theta is mapped back to the (1, x) basis).
reference_optimum <- function(m0, d, formula, REML, name) {
  cands <- list(default = m0)
  for (opt in c("bobyqa", "Nelder_Mead")) {
    f <- as.formula(formula); environment(f) <- environment()
    cands[[opt]] <- suppressMessages(suppressWarnings(eval(bquote(
      lmer(.(f), data = d, REML = .(REML), control = lmerControl(optimizer = .(opt)))))))
  }
  shift <- NULL
  if (name == "uncentred") {
    shift <- 105; d$xc <- d$x - shift
    cands$centred <- suppressMessages(suppressWarnings(lmer(y ~ x + (xc | g), data = d, REML = REML)))
  }
  obj <- sapply(cands, crit); best <- names(which.min(obj)); mb <- cands[[best]]
  th <- getME(mb, "theta")
  if (best == "centred") {   # b_(1,x) = A b_(1,xc), A = [[1, -shift], [0, 1]]
    Lc <- matrix(c(th[1], th[2], 0, th[3]), 2); A <- matrix(c(1, 0, -shift, 1), 2)
    S <- A %*% Lc %*% t(Lc) %*% t(A)
    l11 <- sqrt(S[1, 1]); l21 <- S[2, 1] / l11; l22 <- sqrt(max(S[2, 2] - l21^2, 0))
    th <- setNames(c(l11, l21, l22), names(getME(m0, "theta")))
  }
  list(method = best, candidates = as.list(obj), objective = obj[[best]], logLik = as.numeric(logLik(mb)),
       theta = named(th), sigma = sigma(mb), fixef = named(fixef(mb)), singular = isSingular(mb),
       note = if (!is.null(shift)) "candidate 'centred' is lmer(y ~ x + (xc | g)) with xc = x - 105: the same model (same Z column span); its theta is mapped back to the (Intercept), x basis" else NULL)
}

fits <- list()
for (name in names(cases)) {
  c <- cases[[name]]
  for (REML in c(TRUE, FALSE)) {
    key <- if (REML) name else paste0(name, "_ml")
    r <- fit_lmer(c$data, c$formula, REML, unlist(c$factors), c$bigmixed_formula)
    rec <- r$record
    d <- load_csv(c$data, unlist(c$factors))
    ref <- reference_optimum(r$model, d, c$formula, REML, name)
    rec$truth <- c$truth; rec$generator <- c$generator; rec$seed <- c$seed; rec$params <- c$params
    rec$description <- c$description
    rec$reference_optimum <- ref
    b <- if (!is.null(bmj)) bmj$fits[[key]] else NULL
    if (!is.null(b) && !is.null(b$llf)) {
      gap <- ref$logLik - b$llf
      rec$bigmixed_0_1 <- list(commit = bmj$commit, llf = b$llf, theta = b$theta, singular = b$singular,
                               llf_gap_to_reference = gap, llf_gap_to_lme4_default = rec$logLik - b$llf)
      rec$traps_bigmixed_0_1 <- (gap > GAP_TOL) || (isTRUE(b$singular) && !ref$singular)
    } else {
      rec$bigmixed_0_1 <- if (is.null(b)) NULL else list(error = b$error)
      rec$traps_bigmixed_0_1 <- NULL
    }
    cat(sprintf("%-20s lme4 ll=%.6f sing=%s ref=%s ll=%.6f sing=%s | bigmixed ll=%s sing=%s traps=%s\n", key,
                rec$logLik, rec$singular, ref$method, ref$logLik, ref$singular, format(b$llf), format(b$singular),
                format(rec$traps_bigmixed_0_1)))
    fits[[key]] <- rec
  }
}
write_ref(c(ref_header("scripts/ref_traps.R"),
            list(trap_rule = sprintf("traps_bigmixed_0_1 = (reference logLik - bigmixed llf > %g) or (bigmixed singular and reference interior); reference = best of lme4 default / bobyqa / Nelder_Mead (/ centred reparametrisation)", GAP_TOL),
                 bigmixed_source = if (is.null(bmj)) NULL else bmj[c("bigmixed_version", "commit", "call")],
                 fits = fits)), "lme4/traps.json")
