# lme4 fits of statsmodels' published mixed-model test data (tests/data/statsmodels_lme/lme??.csv).
# usage (from the repository root): Rscript scripts/ref_statsmodels_lme.R
# writes tests/data/lme4/statsmodels_lme.json
# Models: endog ~ 0 + exog_fe_0 + ... + (0 + exog_re_0 [+ exog_re_1] | groups)       ("dep")
#         endog ~ 0 + exog_fe_0 + ... + (0 + exog_re_0 | groups) + (0 + exog_re_1 | groups)  ("ind", q = 2 only)
source("scripts/lme4_record.R")
fits <- list()
for (i in 0:11) {
  rel <- sprintf("statsmodels_lme/lme%02d.csv", i)
  cols <- names(read.csv(file.path(DATA_DIR, rel), nrows = 1))
  fe <- grep("^exog_fe_", cols, value = TRUE); re <- grep("^exog_re_", cols, value = TRUE)
  fixed <- paste(c("endog ~ 0", fe), collapse = " + ")
  forms <- list(dep = sprintf("%s + (%s | groups)", fixed, paste(c("0", re), collapse = " + ")))
  if (length(re) > 1)
    forms$ind <- paste(c(fixed, sprintf("(0 + %s | groups)", re)), collapse = " + ")
  for (kind in names(forms)) for (REML in c(TRUE, FALSE)) {
    key <- sprintf("lme%02d_%s_%s", i, kind, if (REML) "reml" else "ml")
    r <- fit_lmer(rel, forms[[kind]], REML, "groups")
    rr <- r$record
    cat(sprintf("%-18s %-70s obj=%.6f singular=%s %s\n", key, rr$formula, rr$objective, rr$singular,
                paste(unlist(rr$lme4_messages), collapse = "; ")))
    fits[[key]] <- rr
  }
}
write_ref(c(ref_header("scripts/ref_statsmodels_lme.R"),
            list(source = "statsmodels 0.15.0 regression/tests/results/lme??.csv (BSD-3-Clause), copied unchanged",
                 fits = fits)), "lme4/statsmodels_lme.json")
