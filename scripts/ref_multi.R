# lme4 reference fits with SEVERAL random-effect terms (nested, crossed, partially crossed, and one
# grouping factor split into several terms).
# usage (from the repository root): Rscript scripts/ref_multi.R   (about 1-2 minutes; InstEval ~30 s)
# writes tests/data/datasets/<Name>.csv and tests/data/lme4/multi.json
source("scripts/lme4_record.R")
suppressMessages({library(nlme); library(mlmRev)})
ns <- function(pkg, name) get(name, envir = asNamespace(pkg))

pastes <- export_csv(ns("lme4", "Pastes")[, c("strength", "batch", "cask", "sample")], "Pastes")
penic  <- export_csv(ns("lme4", "Penicillin"), "Penicillin")
inst   <- export_csv(ns("lme4", "InstEval")[, c("y", "service", "s", "d", "dept")], "InstEval")
mach   <- export_csv(ns("nlme", "Machines")[, c("score", "Machine", "Worker")], "Machines")
oats   <- export_csv(ns("nlme", "Oats")[, c("yield", "nitro", "Block", "Variety")], "Oats")
sleep  <- export_csv(ns("lme4", "sleepstudy")[, c("Reaction", "Days", "Subject")], "sleepstudy")
pixel  <- export_csv(ns("nlme", "Pixel")[, c("pixel", "day", "Dog", "Side")], "Pixel")
oxide  <- export_csv(ns("nlme", "Oxide")[, c("Thickness", "Source", "Lot", "Wafer", "Site")], "Oxide")
egs    <- export_csv(ns("mlmRev", "egsingle")[, c("math", "year", "childid", "schoolid")], "egsingle")
scots  <- export_csv(ns("mlmRev", "ScotsSec")[, c("attain", "verbal", "sex", "primary", "second")], "ScotsSec")
ch <- ns("mlmRev", "Chem97")   # same CSV as ref_single.R writes (see the comment there)
ch$gcsecnt <- round(ch$gcsescore - round(mean(ch$gcsescore), 6), 6)
chem   <- export_csv(ch[, c("score", "gcsecnt", "gender", "age", "school", "lea")], "Chem97")
assay  <- export_csv(ns("nlme", "Assay")[, c("logDens", "sample", "dilut", "Block")], "Assay")

S <- function(data, formula, REML = TRUE, factors, ...) list(data_rel = data, formula = formula, REML = REML, factors = factors, ...)
specs <- list(
  pastes_nested_reml   = S(pastes, "strength ~ 1 + (1 | batch/cask)", TRUE, c("batch", "cask", "sample")),
  pastes_nested_ml     = S(pastes, "strength ~ 1 + (1 | batch/cask)", FALSE, c("batch", "cask", "sample")),
  pastes_batch_only    = S(pastes, "strength ~ 1 + (1 | batch)", TRUE, c("batch", "cask", "sample")),
  pastes_sample_batch  = S(pastes, "strength ~ 1 + (1 | sample) + (1 | batch)", TRUE, c("batch", "cask", "sample"),
                           note = "sample is the batch:cask label already in the data: the same model as pastes_nested_reml"),
  penicillin_reml      = S(penic, "diameter ~ 1 + (1 | plate) + (1 | sample)", TRUE, c("plate", "sample")),
  penicillin_ml        = S(penic, "diameter ~ 1 + (1 | plate) + (1 | sample)", FALSE, c("plate", "sample")),
  insteval_service     = S(inst, "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)", TRUE, c("service", "s", "d", "dept")),
  machines_interaction = S(mach, "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", TRUE, c("Machine", "Worker")),
  oats_nested          = S(oats, "yield ~ nitro + (1 | Block/Variety)", TRUE, c("Block", "Variety")),
  oats_nested_ml       = S(oats, "yield ~ nitro + (1 | Block/Variety)", FALSE, c("Block", "Variety")),
  sleepstudy_split     = S(sleep, "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", TRUE, "Subject",
                           note = "one grouping factor in two terms: identical to (Days || Subject)"),
  pixel_dog_side       = S(pixel, "pixel ~ day + I(day^2) + (day | Dog) + (1 | Dog:Side)", TRUE, c("Dog", "Side")),
  oxide_nested         = S(oxide, "Thickness ~ 1 + (1 | Lot/Wafer)", TRUE, c("Source", "Lot", "Wafer", "Site")),
  oxide_three_level    = S(oxide, "Thickness ~ 1 + (1 | Source/Lot/Wafer)", TRUE, c("Source", "Lot", "Wafer", "Site"),
                           note = "three nested random levels: Source, Lot:Source, Wafer:(Lot:Source)"),
  egsingle_slopes      = S(egs, "math ~ year + (year | childid) + (year | schoolid)", TRUE, c("childid", "schoolid")),
  scotssec_crossed     = S(scots, "attain ~ verbal + sex + (1 | primary) + (1 | second)", TRUE, c("sex", "primary", "second"),
                           note = "partially crossed; Kenward-Roger skipped (n > 2000: pbkrtest takes ~6 min)"),
  scotssec_slope_second = S(scots, "attain ~ verbal + sex + (1 | primary) + (verbal || second)", TRUE,
                            c("sex", "primary", "second"), note = "lmer's default stops short (max|grad| 0.03)"),
  scotssec_slope_primary_uncorr = S(scots, "attain ~ verbal + sex + (verbal || primary) + (1 | second)", TRUE,
                                    c("sex", "primary", "second"), note = "singular: no verbal slope variance across primary schools"),
  scotssec_slope_primary = S(scots, "attain ~ verbal + sex + (verbal | primary) + (1 | second)", TRUE,
                             c("sex", "primary", "second"), note = "singular: a correlation of -1"),
  scotssec_sex_second  = S(scots, "attain ~ verbal + (1 | primary) + (1 | second) + (1 | sex:second)", TRUE,
                           c("sex", "primary", "second"), note = "singular: no sex-by-school variance"),
  chem97_school_lea    = S(chem, "score ~ gcsecnt + (1 | school) + (1 | lea)", TRUE, c("school", "lea", "gender")),
  assay_partial        = S(assay, "logDens ~ sample * dilut + (1 | Block) + (1 | Block:sample) + (1 | Block:dilut)", TRUE,
                           c("sample", "dilut", "Block"), alt_optimizer = "bobyqa")
)
res <- run_fits(specs)
M <- res$models
res$fits$pastes_nested_reml$profile_ci <- profile_ci(M$pastes_nested_reml)
res$fits$penicillin_reml$profile_ci <- profile_ci(M$penicillin_reml)
a <- with_messages(anova(M$pastes_batch_only, M$pastes_nested_reml))   # refits both with ML, as lme4 does
av <- a$value
anova_pastes <- list(models = c("strength ~ 1 + (1 | batch)", "strength ~ 1 + (1 | batch/cask)"),
  call = "anova(m_batch_only, m_nested)", refit_ML = TRUE, npar = av$npar, AIC = av$AIC, BIC = av$BIC,
  logLik = av$logLik, deviance = av$deviance, Chisq = av$Chisq, Df = av$Df, p = av[["Pr(>Chisq)"]],
  messages = as.list(a$messages))
write_ref(c(ref_header("scripts/ref_multi.R"), list(fits = res$fits, anova_pastes = anova_pastes)), "lme4/multi.json")
