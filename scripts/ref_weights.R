# lme4 reference fits with observation weights and offsets -> tests/data/lme4/weights.json
# usage (from the repository root): Rscript scripts/ref_weights.R
# Data: tests/data/dietox_w.csv (dietox plus w ~ U(0.2, 3) and off = 0.1 * Feed, made by the project's
# shared ref_inference.R) and the nested / crossed data sets of ref_multi.R with a weight column added here.
source("scripts/lme4_record.R")
pastes <- load_csv("datasets/Pastes.csv", c("batch", "cask", "sample"))
set.seed(20261203)
pastes$w <- round(runif(nrow(pastes), 0.3, 2), 3)
pastes$off <- round(rnorm(nrow(pastes), 0, 0.5), 4)
export_csv(pastes, "Pastes_w")
pen <- load_csv("datasets/Penicillin.csv", c("plate", "sample"))
pen$w <- round(runif(nrow(pen), 0.3, 2), 3)
export_csv(pen, "Penicillin_w")
dx <- c("Pig", "Evit", "Cu")
S <- function(data, formula, REML = TRUE, factors, ...) list(data_rel = data, formula = formula, REML = REML, factors = factors, ...)
specs <- list(
  dietox_weights     = S("dietox_w.csv", "Weight ~ Time + (Time | Pig)", TRUE, dx, weights = "w"),
  dietox_weights_ml  = S("dietox_w.csv", "Weight ~ Time + (Time | Pig)", FALSE, dx, weights = "w"),
  dietox_offset_ml   = S("dietox_w.csv", "Weight ~ Time + (Time | Pig) + offset(off)", FALSE, dx),
  dietox_offset_reml = S("dietox_w.csv", "Weight ~ Time + (1 | Pig) + offset(off)", TRUE, dx),
  dietox_both        = S("dietox_w.csv", "Weight ~ Time + Cu + (Time | Pig) + offset(off)", TRUE, dx, weights = "w"),
  pastes_weights     = S("datasets/Pastes_w.csv", "strength ~ 1 + (1 | batch/cask) + offset(off)", TRUE,
                         c("batch", "cask", "sample"), weights = "w"),
  penicillin_weights = S("datasets/Penicillin_w.csv", "diameter ~ 1 + (1 | plate) + (1 | sample)", TRUE,
                         c("plate", "sample"), weights = "w")
)
res <- run_fits(specs)
write_ref(c(ref_header("scripts/ref_weights.R"), list(fits = res$fits)), "lme4/weights.json")
