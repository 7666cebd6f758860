"""Observation (precision) weights and offsets, against lme4.

References: ``tests/data/lme4_inference.json`` (made by ``ref_inference.R`` in the project's shared
reference folder; lme4 1.1-31 with its default controls) and ``tests/data/lme4/weights.json``
(``scripts/ref_weights.R``: the same fits and more, refitted to lme4's optimum at tight tolerances,
which is what the estimates are compared with; ``tests/test_reference_fits.py`` checks all of it)::

    d <- read.csv("dietox_w.csv")   # dietox plus w ~ U(0.2, 3) and off = 0.1 * Feed (NA -> 0)
    lmer(Weight ~ Time + (Time | Pig), d, REML = TRUE, weights = w)          # dietox_weights
    lmer(Weight ~ Time + (Time | Pig) + offset(off), d, REML = FALSE)        # dietox_offset_ml

Tolerances as claimed: objective equal to lme4's or lower within 1e-8 relative (via logLik),
fixed effects and standard errors 1e-5, theta 1e-4.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

import bigmixed as bm

DATA = Path(__file__).parent / "data"
REF = json.loads((DATA / "lme4_inference.json").read_text())
TIGHT = json.loads((DATA / "lme4" / "weights.json").read_text())["fits"]


@pytest.fixture(scope="module")
def dietox_w():
    return pd.read_csv(DATA / "dietox_w.csv", dtype={"Pig": str, "Evit": str, "Cu": str})


def _check(res, ref):
    """Objective at lme4's (default controls) or better; estimates as lme4's tight refit."""
    assert res.llf >= ref["logLik"] - 1e-8 * abs(ref["logLik"])
    key = "dietox_weights" if ref.get("weights") else "dietox_offset_ml"
    ref = TIGHT[key]
    for name, v in ref["fixef"].items():
        assert res.fixef[name] == pytest.approx(v, rel=1e-5)
    se = dict(zip(res.fixef.index, res.bse_fe))
    for name, v in ref["se"].items():
        assert se[name] == pytest.approx(v, rel=1e-5)
    np.testing.assert_allclose(res.theta, list(ref["theta"].values()), rtol=1e-4, atol=1e-4)
    assert res.sigma == pytest.approx(ref["sigma"], rel=1e-5)


def test_weights_match_lme4(dietox_w):
    ref = REF["dietox_weights"]
    _check(bm.lmer(ref["formula"], dietox_w, weights="w"), ref)
    # the same through statsmodels' spelling, and with the weights as an array
    _check(bm.mixedlm("Weight ~ Time", dietox_w, groups="Pig", re_formula="~Time", weights="w").fit(), ref)
    _check(bm.lmer(ref["formula"], dietox_w, weights=dietox_w["w"].to_numpy()), ref)


def test_offset_matches_lme4(dietox_w):
    ref = REF["dietox_offset_ml"]
    res = bm.lmer(ref["formula"], dietox_w, REML=False)
    _check(res, ref)
    alt = bm.mixedlm("Weight ~ Time", dietox_w, groups="Pig", re_formula="~Time", offset="off").fit(reml=False)
    assert alt.objective == pytest.approx(res.objective, rel=1e-12)
    # fitted values and predictions include the offset (read from new data too)
    manual = (res.fe_params["Intercept"] + res.fe_params["Time"] * dietox_w["Time"] + dietox_w["off"]
              + np.array([res.random_effects[p]["Pig"] + res.random_effects[p]["Time"] * t
                          for p, t in zip(dietox_w["Pig"], dietox_w["Time"])]))
    np.testing.assert_allclose(res.fittedvalues, manual, rtol=1e-12)
    np.testing.assert_allclose(res.resid, dietox_w["Weight"] - manual, rtol=1e-9, atol=1e-9)
    new = dietox_w.head(5).assign(off=1000.0)
    np.testing.assert_allclose(res.predict(new) - res.predict(dietox_w.head(5)), 1000.0 - dietox_w["off"][:5])


def test_weights_streamed_equal_in_memory(dietox_w, tmp_path):
    rng = np.random.default_rng(4)
    shuffled = pl.from_pandas(dietox_w).sample(fraction=1.0, shuffle=True, seed=4)
    for k, part in enumerate(np.array_split(np.arange(shuffled.height), 3)):
        shuffled[part.tolist()].write_parquet(tmp_path / f"p{k}.parquet")
    f = "Weight ~ Time + (Time | Pig)"
    mem = bm.lmer(f, dietox_w, weights="w")
    streamed = bm.lmer(f, str(tmp_path / "*.parquet"), weights="w", chunk_rows=97)
    assert streamed.objective == pytest.approx(mem.objective, rel=1e-10)
    np.testing.assert_allclose(streamed.theta, mem.theta, rtol=1e-6)
    np.testing.assert_allclose(streamed.fe_params, mem.fe_params, rtol=1e-8)
    assert rng is not None


def test_weights_scale_invariance_and_unit_weights(dietox_w):
    """w = 1 is the unweighted fit; w -> c w (Var(e) = sigma^2 / w) is sigma^2 -> c sigma^2, same estimates."""
    f = "Weight ~ Time + (Time | Pig)"
    d = dietox_w.assign(one=1.0, w4=4.0 * dietox_w["w"])
    a, b = bm.lmer(f, d), bm.lmer(f, d, weights="one")
    assert b.objective == pytest.approx(a.objective, rel=1e-12)
    w1, w4 = bm.lmer(f, d, weights="w"), bm.lmer(f, d, weights="w4")
    np.testing.assert_allclose(w4.fe_params, w1.fe_params, rtol=1e-8)
    assert w4.scale == pytest.approx(4.0 * w1.scale, rel=1e-8)
    np.testing.assert_allclose(w4.theta, w1.theta / 2.0, rtol=1e-6)  # Psi unchanged, sigma doubles
    np.testing.assert_allclose(w4.cov_re, w1.cov_re, rtol=1e-6)


@pytest.mark.parametrize("value, missing, outcome", [
    (-1.0, "raise", "weights column 'w' holds 1 negative value"),
    (np.nan, "raise", "'w' hold null/NaN/inf"),
    (np.inf, "raise", "'w' hold null/NaN/inf"),
    (-1.0, "drop", "(negative weight)"),
    (np.nan, "drop", "'w'"),
    (0.0, "raise", "(zero weight)"),
    (0.0, "drop", "(zero weight)"),
])
def test_bad_weights(dietox_w, value, missing, outcome):
    """Negative, NaN and infinite weights: an error naming the column, or dropped and counted; zero drops the row."""
    d = dietox_w.copy()
    d.loc[[3], "w"] = value
    f = "Weight ~ Time + (Time | Pig)"
    if missing == "raise" and value != 0.0:
        with pytest.raises(ValueError, match=outcome.replace("(", r"\(").replace(")", r"\)")):
            bm.lmer(f, d, weights="w", missing="raise")
        return
    with pytest.warns(bm.DroppedRowsWarning, match=r"1 of 861 rows dropped.*" + outcome.replace("(", r"\(")
                      .replace(")", r"\)")):
        res = bm.lmer(f, d, weights="w", missing=missing)
    ref = bm.lmer(f, d.drop(index=3), weights="w")
    assert res.nobs == 860 and res.objective == pytest.approx(ref.objective, rel=1e-10)


def test_weights_from_the_command_line(dietox_w, tmp_path):
    from bigmixed.cli import main

    dietox_w.to_parquet(tmp_path / "d.parquet")
    out = tmp_path / "r"
    assert main(["fit", str(tmp_path / "d.parquet"), "-f", "Weight ~ Time + (Time | Pig)", "--weights", "w",
                 "--out", str(out), "--quiet"]) == 0
    rec = json.loads((out / "fit.json").read_text())
    assert rec["llf"] == pytest.approx(REF["dietox_weights"]["logLik"], rel=1e-8)
    assert rec["weights"] == "w" and rec["offset"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["fit", str(tmp_path / "d.parquet"), "-f", "Weight ~ Time + (Time | Pig)", "--weights", "nope",
                     "--quiet"]) == 2
