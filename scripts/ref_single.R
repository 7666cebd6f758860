# lme4 reference fits with ONE grouping factor on data sets shipped with R packages.
# usage (from the repository root): Rscript scripts/ref_single.R
# writes tests/data/datasets/<Name>.csv (only the columns the fits use) and tests/data/lme4/single.json
source("scripts/lme4_record.R")
suppressMessages({library(nlme); library(mlmRev)})
ns <- function(pkg, name) get(name, envir = asNamespace(pkg))

# ---- export the data (then every fit reads its CSV back) ---------------------------------------
sleep  <- export_csv(ns("lme4", "sleepstudy")[, c("Reaction", "Days", "Subject")], "sleepstudy")
dye    <- export_csv(ns("lme4", "Dyestuff"), "Dyestuff")
dye2   <- export_csv(ns("lme4", "Dyestuff2"), "Dyestuff2")
cake   <- export_csv(ns("lme4", "cake")[, c("angle", "recipe", "temperature", "replicate")], "cake")
ortho  <- export_csv(ns("nlme", "Orthodont")[, c("distance", "age", "Subject", "Sex")], "Orthodont")
oxboys <- export_csv(ns("nlme", "Oxboys")[, c("height", "age", "Subject")], "Oxboys")
chick  <- export_csv(ns("datasets", "ChickWeight")[, c("weight", "Time", "Chick", "Diet")], "ChickWeight")
bodyw  <- export_csv(ns("nlme", "BodyWeight")[, c("weight", "Time", "Rat", "Diet")], "BodyWeight")
math   <- export_csv(ns("nlme", "MathAchieve")[, c("MathAch", "SES", "MEANSES", "Minority", "Sex", "School")], "MathAchieve")
ch <- ns("mlmRev", "Chem97")
# gcsecnt written as gcsescore minus its mean rounded to 6 decimals (mlmRev's column is centred at
# the unrounded mean; the 6-decimal version keeps the CSV small and is the same covariate up to a
# constant shift of < 5e-7)
ch$gcsecnt <- round(ch$gcsescore - round(mean(ch$gcsescore), 6), 6)
chem   <- export_csv(ch[, c("score", "gcsecnt", "gender", "age", "school", "lea")], "Chem97")
air    <- export_csv(ns("datasets", "airquality")[, c("Ozone", "Temp", "Month")], "airquality")
gcse   <- export_csv(ns("mlmRev", "Gcsemv")[, c("written", "course", "gender", "school")], "Gcsemv")
pixel  <- export_csv(ns("nlme", "Pixel")[, c("pixel", "day", "Dog", "Side")], "Pixel")
oats   <- export_csv(ns("nlme", "Oats")[, c("yield", "nitro", "Block", "Variety")], "Oats")
mach   <- export_csv(ns("nlme", "Machines")[, c("score", "Machine", "Worker")], "Machines")
ergo   <- export_csv(ns("nlme", "ergoStool")[, c("effort", "Type", "Subject")], "ergoStool")
milk   <- export_csv(ns("nlme", "Milk")[, c("protein", "Time", "Diet", "Cow")], "Milk")
spruce <- export_csv(ns("nlme", "Spruce")[, c("logSize", "days", "Tree")], "Spruce")

S <- function(data, formula, REML = TRUE, factors, ...) list(data_rel = data, formula = formula, REML = REML, factors = factors, ...)
specs <- list(
  sleepstudy_slope_reml   = S(sleep, "Reaction ~ Days + (Days | Subject)", TRUE, "Subject"),
  sleepstudy_slope_ml     = S(sleep, "Reaction ~ Days + (Days | Subject)", FALSE, "Subject"),
  sleepstudy_indep_reml   = S(sleep, "Reaction ~ Days + (Days || Subject)", TRUE, "Subject"),
  sleepstudy_intercept_ml = S(sleep, "Reaction ~ Days + (1 | Subject)", FALSE, "Subject"),
  sleepstudy_slopeonly    = S(sleep, "Reaction ~ Days + (0 + Days | Subject)", TRUE, "Subject"),
  sleepstudy_minus1       = S(sleep, "Reaction ~ Days - 1 + (1 | Subject)", TRUE, "Subject"),
  dyestuff_reml           = S(dye, "Yield ~ 1 + (1 | Batch)", TRUE, "Batch"),
  dyestuff_ml             = S(dye, "Yield ~ 1 + (1 | Batch)", FALSE, "Batch"),
  dyestuff2_reml          = S(dye2, "Yield ~ 1 + (1 | Batch)", TRUE, "Batch",
                              note = "Dyestuff2: the Batch variance is 0 at the optimum (true boundary, singular)"),
  cake_composite          = S(cake, "angle ~ recipe * temperature + (1 | recipe:replicate)", TRUE, c("recipe", "temperature", "replicate")),
  orthodont_sex           = S(ortho, "distance ~ age + Sex + (age | Subject)", TRUE, c("Subject", "Sex")),
  orthodont_sex_ml        = S(ortho, "distance ~ age + Sex + (age | Subject)", FALSE, c("Subject", "Sex")),
  orthodont_quad          = S(ortho, "distance ~ I(age^2) + age + (age | Subject)", TRUE, c("Subject", "Sex")),
  orthodont_factor_age    = S(ortho, "distance ~ factor(age) + (1 | Subject)", TRUE, c("Subject", "Sex")),
  orthodont_nointercept   = S(ortho, "distance ~ 0 + Sex + age + (age | Subject)", TRUE, c("Subject", "Sex")),
  orthodont_indep_ml      = S(ortho, "distance ~ age + (age || Subject)", FALSE, c("Subject", "Sex")),
  oxboys_quad             = S(oxboys, "height ~ age + I(age^2) + (age | Subject)", TRUE, "Subject"),
  oxboys_scale            = S(oxboys, "height ~ scale(age) + (1 | Subject)", TRUE, "Subject"),
  chickweight_slope       = S(chick, "weight ~ Time + (Time | Chick)", TRUE, c("Chick", "Diet")),
  chickweight_poly        = S(chick, "weight ~ poly(Time, 2) + (Time | Chick)", TRUE, c("Chick", "Diet")),
  bodyweight_log          = S(bodyw, "weight ~ log(Time) + Diet + (1 | Rat)", TRUE, c("Rat", "Diet")),
  mathach_reml            = S(math, "MathAch ~ SES * MEANSES + Minority + (SES | School)", TRUE, c("School", "Minority", "Sex")),
  mathach_ml              = S(math, "MathAch ~ SES * MEANSES + Minority + (SES | School)", FALSE, c("School", "Minority", "Sex")),
  mathach_sex_ml          = S(math, "MathAch ~ SES + Sex + Minority + (SES | School)", FALSE, c("School", "Minority", "Sex")),
  chem97_slope            = S(chem, "score ~ gcsecnt * gender + age + (gcsecnt | school)", TRUE, c("school", "lea", "gender")),
  airquality_na           = S(air, "Ozone ~ Temp + (1 | Month)", TRUE, "Month"),
  gcsemv_na               = S(gcse, "written ~ gender + (1 | school)", TRUE, c("school", "gender")),
  pixel_composite_slope   = S(pixel, "pixel ~ day + I(day^2) + (day | Dog:Side)", TRUE, c("Dog", "Side")),
  oats_composite_slope    = S(oats, "yield ~ nitro + (nitro | Block:Variety)", TRUE, c("Block", "Variety"),
                              note = "singular: the slope-variance direction is at the boundary (theta[3] ~ 2e-5; lme4 also warns of a negative Hessian eigenvalue)"),
  machines_worker         = S(mach, "score ~ Machine + (1 | Worker)", TRUE, c("Machine", "Worker")),
  # lme4 splits '||' by the terms of its left-hand side, not by columns: a factor's dummies stay one
  # correlated block ((0 + Machine || Worker) is (0 + Machine | Worker), six thetas)
  machines_dblbar_factor  = S(mach, "score ~ Machine + (0 + Machine || Worker)", TRUE, c("Machine", "Worker")),
  machines_dblbar_intercept = S(mach, "score ~ Machine + (Machine || Worker)", TRUE, c("Machine", "Worker"),
                              extra = list(identified = FALSE),
                              note = "(1 | Worker) + (0 + Machine | Worker): the intercept is the sum of the three dummies, so theta (and the BLUPs per column) are not identified; the criterion, fixed effects, their SEs and sigma are"),
  ergostool_type          = S(ergo, "effort ~ Type + (1 | Subject)", TRUE, c("Type", "Subject")),
  milk_diet_slope         = S(milk, "protein ~ Time + Diet + (Time | Cow)", TRUE, c("Diet", "Cow"), alt_optimizer = "bobyqa",
                              note = "lme4 warns max|grad| 0.005 > 0.002; bobyqa reaches the same optimum within 3e-7"),
  spruce_uncentred        = S(spruce, "logSize ~ days + (days | Tree)", TRUE, "Tree", alt_optimizer = "Nelder_Mead",
                              note = "days is uncentred (152..674): lme4's default optimizer stops 0.78 above the optimum of the REML criterion (it warns); alt_fit (Nelder_Mead) is within ~1e-5 of it. Compare a better optimiser with alt_fit, not with the default fit"),
  # statsmodels' MixedLM examples on the pig-growth data (tests/data/dietox.csv, from R package geepack)
  dietox_intercept_reml   = S("dietox.csv", "Weight ~ Time + (1 | Pig)", TRUE, c("Pig", "Cu", "Evit")),
  dietox_intercept_ml     = S("dietox.csv", "Weight ~ Time + (1 | Pig)", FALSE, c("Pig", "Cu", "Evit")),
  dietox_slope_reml       = S("dietox.csv", "Weight ~ Time + (Time | Pig)", TRUE, c("Pig", "Cu", "Evit")),
  dietox_slope_ml         = S("dietox.csv", "Weight ~ Time + (Time | Pig)", FALSE, c("Pig", "Cu", "Evit")),
  dietox_slope_indep_reml = S("dietox.csv", "Weight ~ Time + (Time || Pig)", TRUE, c("Pig", "Cu", "Evit")),
  dietox_factors          = S("dietox.csv", "Weight ~ Time + Evit + Cu + (1 | Pig)", TRUE, c("Pig", "Cu", "Evit"))
)
res <- run_fits(specs)
write_ref(c(ref_header("scripts/ref_single.R"), list(fits = res$fits)), "lme4/single.json")
