"""Profile-likelihood and Wald intervals against lme4's ``confint.merMod``.

References: ``tests/data/lme4_inference.json`` (shared ``ref_inference.R``) and ``multi.json``
(``scripts/ref_multi.R``)::

    confint(lmer(Weight ~ Time + (Time | Pig), d), method = "profile", oldNames = FALSE)
    confint(lmer(Reaction ~ Days + (Days | Subject), s), method = "profile", oldNames = FALSE)
    confint(lmer(strength ~ 1 + (1 | batch/cask), Pastes), method = "profile", oldNames = FALSE)
    confint(lmer(diameter ~ 1 + (1 | plate) + (1 | sample), Penicillin), method = "profile", oldNames = FALSE)

Claim: every endpoint within 1e-3 relative (lme4 interpolates zeta with a spline through points
~0.5 apart; bigmixed solves for the crossing itself: they agree to ~5e-5).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special

import bigmixed as bm

DATA = Path(__file__).parent / "data"
SHARED = json.loads((DATA / "lme4_inference.json").read_text())
MULTI = json.loads((DATA / "lme4" / "multi.json").read_text())["fits"]


def _fit(formula, path, dtype, reml=True):
    d = pd.read_csv(DATA / path, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bm.lmer(formula, d, REML=reml)


CASES = {
    "dietox_slope": (SHARED["dietox_slope"], "dietox.csv", {"Pig": str}),
    "sleep_slope": (SHARED["sleep_slope"], "sleepstudy.csv", {"Subject": str}),
    "pastes_nested_reml": (MULTI["pastes_nested_reml"], MULTI["pastes_nested_reml"]["data"],
                           {c: str for c in MULTI["pastes_nested_reml"]["factors"]}),
    "penicillin_reml": (MULTI["penicillin_reml"], MULTI["penicillin_reml"]["data"],
                        {c: str for c in MULTI["penicillin_reml"]["factors"]}),
}


@pytest.mark.parametrize("key", list(CASES))
def test_profile_intervals_match_lme4(key):
    ref, path, dtype = CASES[key]
    m = _fit(ref["formula"], path, dtype)
    ci = m.confint(method="profile")
    pc = ref["profile_ci"]
    assert list(ci.index) == pc["names"]
    assert list(ci.columns) == ["2.5 %", "97.5 %"]
    for col, want in ((0, pc["lower"]), (1, pc["upper"])):
        want = np.asarray(want, dtype=float)
        got = ci.iloc[:, col].to_numpy()
        zero = want == 0.0  # a standard deviation whose profile stays within the cutoff down to 0
        assert np.all(got[zero] == 0.0)
        np.testing.assert_allclose(got[~zero], want[~zero], rtol=1e-3)


def test_profile_endpoints_are_where_zeta_crosses():
    """At each endpoint the constrained ML deviance is the cutoff above the ML optimum (independent check)."""
    ref, path, dtype = CASES["dietox_slope"]
    m = _fit(ref["formula"], path, dtype)
    ci = m.confint(parm=["sigma", "Time"], level=0.9)
    assert list(ci.columns) == ["5 %", "95 %"]
    ml = _fit(ref["formula"], path, dtype, reml=False)
    z = special.ndtri(0.95)
    lo, hi = ci.loc["Time"]
    # beta held at lo: refit the other parameters by shifting the response (offset), as lme4 does
    d = pd.read_csv(DATA / path, dtype=dtype)
    for v in (lo, hi):
        d2 = d.assign(off=v * d["Time"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = bm.lmer("Weight ~ 1 + (Time | Pig) + offset(off)", d2, REML=False)
        assert -2 * f.llf - (-2 * ml.llf) == pytest.approx(z * z, rel=1e-6)


def test_wald_and_selection():
    ref, path, dtype = CASES["sleep_slope"]
    m = _fit(ref["formula"], path, dtype)
    w = m.confint(method="Wald")
    assert list(w.index) == ref["profile_ci"]["names"]
    assert w.iloc[:4].isna().all().all()  # lme4: NA for the variance parameters
    z = special.ndtri(0.975)
    for name in ("(Intercept)", "Days"):
        b, se = ref["fixef"][name], ref["se"][name]
        np.testing.assert_allclose(w.loc[name].to_numpy(), [b - z * se, b + z * se], rtol=1e-6)
    assert list(m.confint(parm="beta_", method="Wald").index) == ["(Intercept)", "Days"]
    assert list(m.confint(parm="theta_", method="Wald").index) == ref["profile_ci"]["names"][:4]
    with pytest.raises(ValueError, match="no parameter"):
        m.confint(parm="sd_x|y")
    with pytest.raises(ValueError, match="unknown method"):
        m.confint(method="bayes")


def test_profile_of_an_ml_fit_and_a_boundary():
    """An ML fit is profiled as it is; a random intercept whose SD profile reaches 0 gets the bound 0."""
    rec = MULTI["pastes_nested_ml"]
    m = _fit(rec["formula"], rec["data"], {c: str for c in rec["factors"]}, reml=False)
    ci = m.confint(parm=["sd_(Intercept)|batch", "sigma"])
    assert ci.loc["sd_(Intercept)|batch", "2.5 %"] == 0.0
    assert 0 < ci.loc["sd_(Intercept)|batch", "97.5 %"] < 10
    lo, hi = ci.loc["sigma"]
    assert lo < m.sigma < hi


def test_singular_fit_profile_leaves_the_zero_variance():
    """Dyestuff2 (REML optimum at sd 0): the intercept's profile refits get a positive SD.

    theta = 0 is stationary for any data, so a refit that stays there overstates zeta (too narrow an
    interval); each endpoint is checked by an independent ML fit with the intercept as an offset.
    lme4 (``confint(m, oldNames = FALSE)``) gives 4.3121 and 7.0191, from its spline through a kinked profile.
    """
    single = json.loads((DATA / "lme4" / "single.json").read_text())["fits"]
    rec = single["dyestuff2_reml"]
    d = pd.read_csv(DATA / rec["data"], dtype={c: str for c in rec["factors"]})
    m = _fit(rec["formula"], rec["data"], {c: str for c in rec["factors"]})
    ci = m.confint()
    assert ci.loc["sd_(Intercept)|Batch", "2.5 %"] == 0.0
    ml = _fit(rec["formula"], rec["data"], {c: str for c in rec["factors"]}, reml=False)
    for v in ci.loc["(Intercept)"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = bm.lmer("Yield ~ 0 + (1 | Batch) + offset(o)", d.assign(o=v), REML=False)
        assert f.theta[0] > 0.05
        assert np.sqrt(2 * (ml.llf - f.llf)) == pytest.approx(special.ndtri(0.975), rel=1e-6)
    np.testing.assert_allclose(ci.loc["(Intercept)"].to_numpy(), [4.3121, 7.0191], rtol=3e-4)
