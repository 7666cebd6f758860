"""Golden values from R's lme4 1.1-31 (tests/data/lme4_reference.json).

Each entry was produced in R by (grouping columns read as factors)::

    library(lme4)
    dietox <- read.csv("dietox.csv"); dietox$Pig <- factor(dietox$Pig)
    fit <- lmer(Weight ~ Time + (1|Pig),      data = dietox, REML = TRUE)   # dietox_intercept_reml
    fit <- lmer(Weight ~ Time + (1|Pig),      data = dietox, REML = FALSE)  # dietox_intercept_ml
    fit <- lmer(Weight ~ Time + (Time|Pig),   data = dietox, REML = TRUE)   # dietox_slope_reml
    fit <- lmer(Weight ~ Time + (Time|Pig),   data = dietox, REML = FALSE)  # dietox_slope_ml
    fit <- lmer(Weight ~ Time + (Time||Pig),  data = dietox, REML = TRUE)   # dietox_slope_independent_reml
    fit <- lmer(Reaction ~ Days + (Days|Subject), data = sleepstudy, REML = TRUE)   # sleepstudy_slope_reml
    fit <- lmer(Reaction ~ Days + (Days|Subject), data = sleepstudy, REML = FALSE)  # sleepstudy_slope_ml
    fit <- lmer(Yield ~ 1 + (1|Batch), data = Dyestuff, REML = TRUE)                # dyestuff_reml
    # recorded: logLik(fit), getME(fit, "devcomp")$cmp[["REML" or "dev"]] (objective), fixef(fit),
    # sqrt(diag(vcov(fit))), as.data.frame(VarCorr(fit)), getME(fit, "theta"), sigma(fit),
    # isSingular(fit), head(ranef(fit)[[1]], 3)

Tolerances (issue 2): objective equal or lower within 1e-6 relative, fixed effects
and SEs 1e-4 relative, variance components 1e-3 relative, first BLUPs 1e-3.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bigmixed as bm

DATA = Path(__file__).parent / "data"
REF = json.loads((DATA / "lme4_reference.json").read_text())
KEYS = {"dietox.csv": "Pig", "sleepstudy.csv": "Subject", "dyestuff.csv": "Batch"}


def load(name):
    return pd.read_csv(DATA / name, dtype={KEYS[name]: str})


@pytest.fixture(scope="module")
def fits():
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these fits may warn
        for key, ref in REF.items():
            out[key] = bm.lmer(ref["formula"], load(ref["data"]), REML=ref["REML"])
    return out


@pytest.mark.parametrize("key", sorted(REF))
def test_objective_reaches_lme4(fits, key):
    res, ref = fits[key], REF[key]
    assert res.converged
    assert res.objective <= ref["objective"] * (1 + 1e-6)
    assert res.objective == pytest.approx(ref["objective"], rel=1e-6)
    assert res.llf == pytest.approx(ref["logLik"], rel=1e-6)
    assert res.nobs == ref["nobs"]
    assert res.n_groups == list(ref["ngroups"].values())[0]
    assert res.is_singular == ref["singular"]


@pytest.mark.parametrize("key", sorted(REF))
def test_fixed_effects_and_se(fits, key):
    res, ref = fits[key], REF[key]
    for name, val in ref["fixef"].items():
        assert res.fixef[name] == pytest.approx(val, rel=1e-4)
    bse = dict(zip(res.fixef.index, res.bse_fe))
    for name, val in ref["se"].items():
        assert bse[name] == pytest.approx(val, rel=1e-4)


@pytest.mark.parametrize("key", sorted(REF))
def test_variance_components(fits, key):
    res, ref = fits[key], REF[key]
    vc = res.VarCorr
    for row in ref["varcorr"]:
        if row["grp"] == "Residual":
            assert res.scale == pytest.approx(row["vcov"], rel=1e-3)
            continue
        var2 = row.get("var2")
        if var2 is None:
            mine = vc[(vc.var1 == row["var1"]) & vc.var2.isna()]
        else:
            mine = vc[(vc.var1 == row["var1"]) & (vc.var2 == var2)]
        assert len(mine) == 1, row
        assert mine.vcov.iloc[0] == pytest.approx(row["vcov"], rel=1e-3, abs=1e-8)
        assert mine.sdcor.iloc[0] == pytest.approx(row["sdcor"], rel=1e-3, abs=1e-6)
    assert res.sigma == pytest.approx(ref["sigma"], rel=1e-3)
    np.testing.assert_allclose(res.theta, list(ref["theta"].values()), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("key", sorted(REF))
def test_first_blups(fits, key):
    res, ref = fits[key], REF[key]
    ranef = res.ranef()
    for row in list(ref["ranef_head"].values())[0]:
        level = row["level"]
        for name, val in row.items():
            if name in ("level", "_row"):
                continue
            assert ranef.loc[level, name] == pytest.approx(val, rel=1e-3, abs=1e-4)
