"""Issue 6: bad input gets one clear message, hard data an honest fit or a warning.

One section per row of the issue's table, in its order:

1. formula errors                      ValueError naming the term (and close column names)
2. NaN / inf / null values             dropped and counted (warning) or ``missing="raise"``
3. empty / all dropped / one group     ValueError saying what is missing
4. rank-deficient fixed effects        aliased columns dropped with a warning, like lme4
5. unidentifiable random effects       fit completes, ``is_singular``, warning
6. constant response / zero variance   singular boundary fit, no NaN (lme4's Dyestuff2)
7. huge offsets and scales             same fit as the centred problem (internal scaling)
8. bad parquet files                   error naming the file, before any output
9. unseen group levels at predict      population-level predictions
10. optimiser out of iterations        ConvergenceWarning, ``converged`` False
11. the command line                   exit code 2, one line, no traceback unless --debug
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

import bigmixed as bm
from bigmixed.formula import parse_lmer, spec_from_lmer


def _data(G: int = 12, n: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), n)
    d = pd.DataFrame({
        "subject": np.array([f"s{i:02d}" for i in range(G)])[g],
        "time": rng.normal(size=G * n),
        "dose": rng.normal(size=G * n),
        "site": rng.choice(["north", "south", "east"], size=G * n),
    })
    d["weight"] = (1.0 + 2.0 * d.time - 0.5 * d.dose + rng.normal(size=G)[g]
                   + 0.5 * rng.normal(size=G)[g] * d.time + rng.normal(size=G * n))
    return d


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return _data()


def _quiet_fit(formula, data, **kw):
    """A fit whose warnings are recorded (returned) instead of shown."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = bm.lmer(formula, data, **kw)
    return res, rec


def _finite(res) -> None:
    """No NaN/inf anywhere in the headline numbers of a fit."""
    for v in (res.objective, res.llf, res.scale, res.sigma):
        assert np.isfinite(v)
    for arr in (res.fe_params, res.bse_fe, res.cov_re.to_numpy(), res.theta, res.VarCorr["vcov"]):
        assert np.all(np.isfinite(np.asarray(arr, dtype=float)))
    str(res), str(res.summary()), json.dumps(res.to_dict())  # rendering never fails either


# ------------------------------------------------------------------ 1. formula errors
@pytest.mark.parametrize("formula, term, close", [
    ("weight ~ tme + (1 | subject)", "tme", "time"),          # fixed effect
    ("wieght ~ time + (1 | subject)", "wieght", "weight"),    # response
    ("weight ~ time + (tim | subject)", "tim", "time"),       # random slope
    ("weight ~ time + (1 | subjct)", "subjct", "subject"),    # grouping column
    ("weight ~ np.log(dos) + (1 | subject)", "dos", "dose"),  # inside a function call
    ("weight ~ C(sit) + (1 | subject)", "sit", "site"),       # inside C()
])
def test_missing_column_names_term_and_close_columns(data, formula, term, close):
    with pytest.raises(ValueError) as exc:
        bm.lmer(formula, data)
    msg = str(exc.value)
    assert repr(term) in msg and repr(close) in msg
    assert "\n" not in msg


def test_missing_column_without_close_match_lists_the_columns(data):
    with pytest.raises(ValueError, match=r"'zzzz'.*'subject'.*'time'"):
        bm.lmer("weight ~ zzzz + (1 | subject)", data)


@pytest.mark.parametrize("formula, fn", [
    ("weight ~ foo(time) + (1 | subject)", "foo"),
    ("weight ~ np.fooo(time) + (1 | subject)", "np.fooo"),
    ("weight ~ time + (sqrtt(dose) | subject)", "sqrtt"),
])
def test_unknown_function(data, formula, fn):
    with pytest.raises(ValueError, match=f"unknown function '{fn}'"):
        bm.lmer(formula, data)


@pytest.mark.parametrize("formula, what", [
    ("weight ~ (time + (1 | subject)", "'(' at position 9 is never closed"),
    ("weight ~ time) + (1 | subject)", "unexpected ')' at position 13"),
    ("weight ~ time + (1 | subject", "never closed"),
    ("weight ~ np.log(time + (1 | subject)", "never closed"),
    ("weight ~ time + (1 | subject))", "unexpected ')'"),
    ("weight ~ time + [1 | subject)", "unexpected ')'"),
])
def test_unbalanced_parentheses(data, formula, what):
    for call in (lambda: parse_lmer(formula), lambda: bm.lmer(formula, data)):
        with pytest.raises(ValueError, match="unbalanced parentheses") as exc:
            call()
        assert what in str(exc.value)


@pytest.mark.parametrize("formula, term", [
    ("weight ~ time + 1 | subject", "1 | subject"),           # bar without parentheses
    ("weight ~ time + ( | subject)", "( | subject)"),         # nothing left of the bar
    ("weight ~ time + (1 | )", "(1 | )"),                     # no grouping column
    ("weight ~ time + (1 | log(subject))", "(1 | log(subject))"),  # a function of the grouping column
    ("weight ~ time + (1 | subject/site:plot)", "(1 | subject/site:plot)"),  # nesting and interaction mixed
    ("weight ~ time + (1 ||| subject)", "(1 ||| subject)"),   # three bars
    ("weight ~ time - (1 | subject)", "(1 | subject)"),       # subtracted
    ("weight ~ time + log(1 | subject)", "log(1 | subject)"),  # bar inside a function
    ("weight | subject ~ time + (1 | subject)", "contains '|'"),  # bar in the response
])
def test_bad_bar_term_names_the_term(data, formula, term):
    with pytest.raises(ValueError) as exc:
        bm.lmer(formula, data)
    assert term in str(exc.value)


def test_bar_term_errors_from_the_parser_itself():
    with pytest.raises(ValueError, match=r"needs a random-effect term"):
        spec_from_lmer("weight ~ time")
    with pytest.raises(ValueError, match=r"'\(0 \| subject\)' has no columns"):
        bm.lmer("weight ~ time + (0 | subject)", _data())
    with pytest.raises(ValueError, match="grouping column 'sight' names no column.*'site'"):
        bm.lmer("weight ~ time + (1 | subject) + (1 | sight)", _data())


def test_column_of_lists_is_a_clear_error():
    d = pl.from_pandas(_data()).with_columns(pl.col("time").map_elements(lambda v: [v], return_dtype=pl.List(pl.Float64)))
    with pytest.raises(ValueError, match=r"'time' \(List\(Float64\)\) hold lists"):
        bm.lmer("weight ~ time + (1 | subject)", d)


# ------------------------------------------------------------------ 2. missing values
def _holes(data: pd.DataFrame) -> pd.DataFrame:
    d = data.copy()
    d.loc[[0, 1], "weight"] = np.nan       # NaN response
    d.loc[2, "time"] = np.inf              # inf predictor
    d.loc[3, "dose"] = -np.inf
    d.loc[[4, 5, 6], "subject"] = None     # null group key
    d.loc[7, "site"] = None                # null categorical predictor
    return d


def test_missing_values_are_dropped_and_counted(data):
    d = _holes(data)
    with pytest.warns(bm.DroppedRowsWarning) as rec:
        res = bm.lmer("weight ~ time + dose + site + (time | subject)", d)
    msg = str(rec[0].message)
    assert "8 of 72 rows dropped" in msg
    for col, k in {"weight": 2, "time": 1, "dose": 1, "subject": 3, "site": 1}.items():
        assert f"'{col}': {k}" in msg
    assert "missing='raise'" in msg
    assert res.nobs == 64
    assert res.model.built.n_dropped == 8
    assert res.to_dict()["rows_dropped"] == 8
    # exactly the fit of the complete rows
    clean, _ = _quiet_fit("weight ~ time + dose + site + (time | subject)", d.iloc[8:])
    assert res.objective == pytest.approx(clean.objective, rel=1e-10)
    np.testing.assert_allclose(res.fe_params, clean.fe_params, rtol=1e-8)


def test_nan_and_inf_float_group_keys_are_missing_values(data, tmp_path):
    """polars keeps NaN apart from null; a NaN or inf key is still no group (and parquet keeps NaN)."""
    keys = np.repeat(np.arange(12.0), 6)
    keys[[0, 9]] = np.nan
    keys[[20, 30]] = np.inf
    d = pl.from_pandas(data).with_columns(pl.Series("subject", keys))
    d.write_parquet(tmp_path / "nan-keys.parquet")
    for src in (d, tmp_path / "nan-keys.parquet"):
        res, rec = _quiet_fit("weight ~ time + (1 | subject)", src)
        dropped = [str(w.message) for w in rec if w.category is bm.DroppedRowsWarning]
        assert len(dropped) == 1 and "4 of 72 rows" in dropped[0] and "'subject': 4" in dropped[0]
        assert res.nobs == 68 and res.n_groups == 12
        assert all(np.isfinite(res.group_labels))
    with pytest.raises(ValueError, match="'subject' hold null/NaN/inf"):
        bm.lmer("weight ~ time + (1 | subject)", d, missing="raise")


@pytest.mark.parametrize("col", ["weight", "time", "subject", "site"])
def test_missing_raise_names_the_column(data, col):
    d = data.copy()
    d.loc[5, col] = None
    with pytest.raises(ValueError, match=f"column\\(s\\) '{col}' hold null/NaN/inf values; use missing='drop'"):
        bm.lmer("weight ~ time + site + (1 | subject)", d, missing="raise")


def test_missing_raise_names_the_file(data, tmp_path):
    d = pl.from_pandas(data)
    d[:36].write_parquet(tmp_path / "a.parquet")
    d[36:].with_columns(pl.when(pl.col("time") > 1).then(None).otherwise(pl.col("time")).alias("time")) \
        .write_parquet(tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"'time' hold null/NaN/inf values in file '.*b\.parquet'"):
        bm.lmer("weight ~ time + (1 | subject)", str(tmp_path / "*.parquet"), missing="raise")
    with pytest.warns(bm.DroppedRowsWarning, match=r"'time'"):
        bm.lmer("weight ~ time + (1 | subject)", str(tmp_path / "*.parquet"))


def test_non_finite_after_transformation(data):
    d = data.copy()
    d.loc[3, "dose"] = -1.0
    d["dose"] = d.dose.abs()
    d.loc[3, "dose"] = -1.0
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = bm.lmer("weight ~ np.log(dose) + (1 | subject)", d)
    # counted once, and no numpy RuntimeWarning leaks out of the formula evaluation
    assert [w.category for w in rec if w.category is not bm.SingularFitWarning] == [bm.DroppedRowsWarning]
    assert "1 of 72 rows" in str(rec[0].message) and res.nobs == 71
    with pytest.raises(ValueError, match=r"non-finite values after the formula's transformations \(in 'np.log\(dose\)'\)"):
        bm.lmer("weight ~ np.log(dose) + (1 | subject)", d, missing="raise")


@pytest.mark.parametrize("col", ["weight", "time"])
def test_values_too_large_to_square_are_named(data, col):
    """1e300 is finite (so not 'missing') but its square overflows float64: say which column."""
    d = data.copy()
    d.loc[4, col] = 1e300
    with pytest.raises(ValueError, match=f"'{col}' hold values too large for float64"):
        _quiet_fit("weight ~ time + (time | subject)", d)


# ------------------------------------------------------------------ 3. nothing (or too little) to fit
def test_empty_data(data, tmp_path):
    with pytest.raises(ValueError, match="the data has no rows"):
        bm.lmer("weight ~ time + (1 | subject)", data.iloc[:0])
    with pytest.raises(ValueError, match="the data has no rows"):
        bm.lmer("weight ~ time + (1 | subject)", pl.from_pandas(data).head(0))
    pl.from_pandas(data).head(0).write_parquet(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="the data has no rows"):
        bm.lmer("weight ~ time + (1 | subject)", tmp_path / "empty.parquet")


def test_all_rows_dropped(data):
    d = data.assign(weight=np.nan)
    with pytest.raises(ValueError, match=r"all 72 rows were dropped .*'weight': 72"):
        bm.lmer("weight ~ time + (1 | subject)", d)


def test_single_group(data):
    with pytest.raises(ValueError, match="'subject' has 1 level.*at least two levels"):
        bm.lmer("weight ~ time + (1 | subject)", data[data.subject == "s00"])
    d = data.copy()
    d.loc[d.subject != "s03", "time"] = np.nan  # only one group keeps complete rows
    with pytest.raises(ValueError, match="'subject' has 1 level"):
        _quiet_fit("weight ~ time + (1 | subject)", d)


def test_fewer_rows_than_fixed_effects(data):
    few = data.groupby("subject").head(1).iloc[:3]
    with pytest.raises(ValueError, match="3 usable rows for 3 fixed effects"):
        bm.lmer("weight ~ time + dose + (1 | subject)", few)


# ------------------------------------------------------------------ 4. rank-deficient fixed effects
@pytest.mark.parametrize("extra, make", [
    ("time2", lambda d: d.time),                       # duplicate column
    ("combo", lambda d: 2.0 * d.time - 3.0 * d.dose),  # collinear with earlier columns
    ("const", lambda d: 0.0 * d.time + 5.0),           # collinear with the intercept
])
def test_aliased_columns_dropped_like_lme4(data, extra, make):
    """lme4: 'fixed-effect model matrix is rank deficient so dropping 1 column / coefficient'."""
    d = data.assign(**{extra: make(data)})
    with pytest.warns(UserWarning, match=f"rank deficient so dropping 1 column\\(s\\): {extra}"):
        res = bm.lmer(f"weight ~ time + dose + {extra} + (time | subject)", d)
    ref, rec = _quiet_fit("weight ~ time + dose + (time | subject)", data)
    assert not rec
    assert list(res.fe_params.index) == ["Intercept", "time", "dose"]
    assert res.model.built.aliased == [extra]
    assert res.objective == pytest.approx(ref.objective, rel=1e-10)
    np.testing.assert_allclose(res.fe_params, ref.fe_params, rtol=1e-8)
    np.testing.assert_allclose(res.bse_fe, ref.bse_fe, rtol=1e-7)
    np.testing.assert_allclose(res.cov_re, ref.cov_re, rtol=1e-6)
    assert res.scale == pytest.approx(ref.scale, rel=1e-8)


def test_aliased_categorical_column(data):
    d = data.assign(site2=data.site)
    with pytest.warns(UserWarning, match=r"dropping 2 column\(s\): site2\[T.north\], site2\[T.south\]"):
        res = bm.lmer("weight ~ site + site2 + (1 | subject)", d)
    ref, _ = _quiet_fit("weight ~ site + (1 | subject)", data)
    assert res.objective == pytest.approx(ref.objective, rel=1e-10)
    np.testing.assert_allclose(res.fe_params, ref.fe_params, rtol=1e-8)


# ------------------------------------------------------------------ 5. random effects the data cannot identify
def _singular_warning(rec) -> str:
    msgs = [str(w.message) for w in rec if issubclass(w.category, bm.SingularFitWarning)]
    assert len(msgs) == 1, [str(w.message) for w in rec]
    return msgs[0]


def test_random_slope_with_groups_of_size_one():
    """lme4 stops: 'number of observations (=30) <= number of random effects (=60)'; we fit and flag it."""
    rng = np.random.default_rng(3)
    d = pd.DataFrame({"g": np.arange(30), "x": rng.normal(size=30)})
    d["y"] = d.x + rng.normal(size=30)
    for formula, n_re in [("y ~ x + (x | g)", 60), ("y ~ x + (1 | g)", 30), ("y ~ x + (x || g)", 60)]:
        res, rec = _quiet_fit(formula, d)
        assert res.is_singular
        msg = _singular_warning(rec)
        assert f"number of observations (30) <= number of random effects ({n_re})" in msg
        _finite(res)


def test_more_random_effects_than_a_group_can_identify():
    """Groups of two rows with three random effects each, and groups the random effects fit exactly."""
    rng = np.random.default_rng(4)
    d = pd.DataFrame({"g": np.repeat(np.arange(15), 2), "x": rng.normal(size=30), "z": rng.normal(size=30)})
    d["y"] = d.x - d.z + rng.normal(size=30)
    res, rec = _quiet_fit("y ~ x + z + (x + z | g)", d)
    assert res.is_singular and "<= number of random effects (45)" in _singular_warning(rec)
    _finite(res)
    # two groups of two rows, (x | g): the random effects reproduce y exactly, the likelihood is
    # unbounded as the residual variance goes to 0 (this used to crash inside scipy's cholesky)
    tiny = pd.DataFrame({"g": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0], "y": [1.0, 2.0, 3.0, 5.0]})
    res, rec = _quiet_fit("y ~ x + (x | g)", tiny)
    assert res.is_singular
    msg = _singular_warning(rec)
    assert "residual variance is 0" in msg and "number of random effects (4)" in msg
    assert res.scale < 1e-8 * np.var(tiny.y)
    _finite(res)


# ------------------------------------------------------------------ 6. a variance that is truly zero
# lme4's Dyestuff2 (Box & Tiao 1973), Yield by Batch.
DYESTUFF2 = {
    "A": [7.298, 3.846, 2.434, 9.566, 7.99], "B": [5.22, 6.556, 0.608, 11.788, -0.892],
    "C": [0.11, 10.386, 13.434, 5.51, 8.166], "D": [2.212, 4.852, 7.092, 9.288, 4.98],
    "E": [0.282, 9.014, 4.458, 9.446, 7.198], "F": [1.722, 4.782, 8.106, 0.758, 3.758],
}


def test_dyestuff2_matches_lme4():
    """Golden values from R, lme4 1.1-31:

        fit <- lmer(Yield ~ 1 + (1|Batch), Dyestuff2)   # REML
        getME(fit, "devcomp")$cmp[["REML"]]  # 161.8283
        fixef(fit)                            # 5.6656
        sqrt(diag(vcov(fit)))                 # 0.6784
        as.data.frame(VarCorr(fit))           # Batch 0 0; Residual 13.806 3.716
        isSingular(fit)                       # TRUE  ("boundary (singular) fit: see help('isSingular')")
    """
    d = pd.DataFrame([(b, v) for b, vs in DYESTUFF2.items() for v in vs], columns=["Batch", "Yield"])
    with pytest.warns(bm.SingularFitWarning, match="boundary"):
        res = bm.lmer("Yield ~ 1 + (1|Batch)", d)
    assert res.converged and res.is_singular
    assert res.objective == pytest.approx(161.8283, abs=1e-4)
    assert res.fixef["(Intercept)"] == pytest.approx(5.6656, abs=1e-4)
    assert res.bse_fe["Intercept"] == pytest.approx(0.6784, abs=1e-4)
    assert res.cov_re.iloc[0, 0] == 0.0 and res.theta[0] == 0.0
    assert res.scale == pytest.approx(13.806, abs=1e-3)
    assert res.sigma == pytest.approx(3.716, abs=1e-3)
    assert np.all(res.ranef().to_numpy() == 0.0)
    _finite(res)


@pytest.mark.parametrize("formula", ["y ~ x + (1 | g)", "y ~ 1 + (1 | g)", "y ~ x + (x | g)", "y ~ 0 + x + (1 | g)"])
def test_constant_response(data, formula):
    d = pd.DataFrame({"g": data.subject, "x": data.time, "y": 3.0})
    res, rec = _quiet_fit(formula, d)
    assert res.is_singular
    assert "residual variance is 0" in _singular_warning(rec)
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]
    if "Intercept" in res.fe_params.index:
        assert res.fe_params["Intercept"] == pytest.approx(3.0, rel=1e-12)
        assert np.all(res.cov_re.to_numpy() <= 1e-12)
    assert res.scale <= 1e-8 * 9.0  # below 1e-8 of y^2: zero to working precision
    _finite(res)


def test_response_constant_within_groups():
    """Residual variance 0, group variance not: a boundary in sigma^2 that lme4's theta test misses."""
    rng = np.random.default_rng(5)
    means = rng.normal(size=8)
    d = pd.DataFrame({"g": np.repeat(np.arange(8), 4), "y": np.repeat(means, 4)})
    res, rec = _quiet_fit("y ~ 1 + (1 | g)", d)
    assert res.is_singular and "residual variance is 0" in _singular_warning(rec)
    assert res.scale < 1e-8 * np.var(means)
    # (the variance estimates are flagged as not meaningful: the likelihood has no maximum)
    # beta survives, to the ~1e-6 the degenerate end point allows (see objective.R2_FLOOR)
    assert res.fe_params["Intercept"] == pytest.approx(means.mean(), rel=1e-5)
    _finite(res)


# ------------------------------------------------------------------ 7. huge offsets and scales
def _offset_data():
    rng = np.random.default_rng(6)
    G, n = 30, 8
    g = np.repeat(np.arange(G), n)
    # multiples of 2^-10 / 2^-20: 1e9 + x and 5e4 + z * 2^-10 are then exact in float64, so the
    # shifted data are exactly the same problem and any difference is the fit's own round-off
    x = np.round(rng.normal(size=G * n) * 1024) / 1024
    z = np.round(rng.normal(size=G * n) * 2**20) / 2**20
    y = 0.5 + 1.5 * x - 0.7 * z + rng.normal(size=G)[g] + 0.5 * rng.normal(size=G)[g] * x + rng.normal(size=G * n)
    small = pd.DataFrame({"g": g, "x": x, "z": z, "y": y})
    big = pd.DataFrame({"g": g, "x": 1e9 + x, "z": 5e4 + z * 2**-10, "y": 1e6 * y})
    return small, big


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("formula", ["y ~ x + z + (1 | g)", "y ~ x + z + (x | g)"])
def test_huge_offsets_and_scales(formula, reml):
    small, big = _offset_data()
    a, _ = _quiet_fit(formula, small, REML=reml)
    b, _ = _quiet_fit(formula, big, REML=reml)
    assert a.converged and b.converged
    N, p, cy, cz = len(small), 3, 1e6, 2.0**-10
    # deviance of y*cy: + dof*log(cy^2); REML also + log|M'M| for X_big = X_small M (det M = cz)
    offset = (N - p if reml else N) * np.log(cy**2) + (2 * np.log(cz) if reml else 0.0)
    assert b.objective == pytest.approx(a.objective + offset, rel=1e-8)
    # fixed effects: slopes scale with y (and 1/cz for z); the intercept moves with the shifts
    beta_a, beta_b = a.fe_params.to_numpy(), b.fe_params.to_numpy()
    assert beta_b[1] == pytest.approx(cy * beta_a[1], rel=1e-7)
    assert beta_b[2] == pytest.approx(cy * beta_a[2] / cz, rel=1e-7)
    assert beta_b[0] == pytest.approx(cy * (beta_a[0] - 1e9 * beta_a[1] - 5e4 / cz * beta_a[2]), rel=1e-7)
    assert b.scale == pytest.approx(cy**2 * a.scale, rel=1e-7)
    # Psi maps with the shift of x: Z_big = Z_small A, so Psi_big = cy^2 A^-1 Psi_small A^-T
    q = a.cov_re.shape[0]
    Ainv = np.eye(q)
    if q == 2:
        Ainv[0, 1] = -1e9
    np.testing.assert_allclose(b.cov_re.to_numpy(), cy**2 * Ainv @ a.cov_re.to_numpy() @ Ainv.T, rtol=1e-6)
    np.testing.assert_allclose(b.bse_fe.to_numpy()[1:], cy * a.bse_fe.to_numpy()[1:] / [1, cz], rtol=1e-6)


# ------------------------------------------------------------------ 8. bad parquet files
@pytest.fixture
def parquet_dir(tmp_path, data):
    d = pl.from_pandas(data)
    d[:36].write_parquet(tmp_path / "part-0.parquet")
    d[36:].write_parquet(tmp_path / "part-1.parquet")
    return tmp_path


def _clobber_page(src: Path, dst: Path, column: str) -> None:
    """Copy ``src`` with the first data page header of ``column`` overwritten (footer intact)."""
    meta = pq.ParquetFile(src).metadata.row_group(0)
    cols = [meta.column(i).path_in_schema for i in range(meta.num_columns)]
    start = meta.column(cols.index(column)).data_page_offset
    raw = bytearray(src.read_bytes())
    raw[start:start + 12] = b"\xff" * 12
    dst.write_bytes(bytes(raw))


def _bad_files(kind: str, tmp: Path, data: pd.DataFrame) -> Path:
    bad = tmp / "part-2.parquet"
    good = tmp / "part-1.parquet"
    d = pl.from_pandas(data)[:20]
    if kind == "missing":
        return tmp / "nope.parquet"
    if kind == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "corrupt":
        bad.write_bytes(b"PAR1" + bytes(range(256)) * 3 + b"PAR1")
    elif kind == "empty file":
        bad.write_bytes(b"")
    elif kind == "not parquet":
        bad.write_text("subject,time,weight\ns1,1,2\n")
    elif kind == "other type":
        d.with_columns(pl.col("time").cast(pl.String)).write_parquet(bad)
    elif kind == "lacks a column":
        d.drop("dose").write_parquet(bad)
    elif kind == "key type":
        d.with_columns(pl.lit(1).alias("subject")).write_parquet(bad)
    elif kind.startswith("bad page "):
        d.write_parquet(tmp / "src.parquet", compression="uncompressed", statistics=False)
        _clobber_page(tmp / "src.parquet", bad, kind.split()[-1])
        (tmp / "src.parquet").unlink()
    return bad


@pytest.mark.parametrize("kind, problem", [
    ("missing", "does not exist"),
    ("truncated", "not a readable parquet file"),
    ("corrupt", "not a readable parquet file"),
    ("empty file", "not a readable parquet file"),
    ("not parquet", "not a readable parquet file"),
    ("other type", "column 'time' is String"),
    ("lacks a column", "lacks column(s) ['dose']"),
    ("key type", "column 'subject' is Int32"),
    ("bad page time", "cannot read"),
    ("bad page weight", "cannot read"),
    ("bad page subject", "cannot read column(s) ['subject']"),  # one term: keys read with the values
    ("bad page site", "cannot read the categorical column(s) ['site']"),
])
def test_bad_parquet_file_is_named(parquet_dir, data, kind, problem):
    bad = _bad_files(kind, parquet_dir, data)
    files = [parquet_dir / "part-0.parquet", parquet_dir / "part-1.parquet", bad]
    before = sorted(os.listdir(parquet_dir))
    with pytest.raises(ValueError) as exc:
        bm.lmer("weight ~ time + dose + site + (1 | subject)", files)
    msg = str(exc.value)
    assert problem in msg, msg
    assert bad.name in msg, msg
    assert "\n" not in msg
    assert sorted(os.listdir(parquet_dir)) == before  # nothing written next to the data


def test_bad_file_in_a_glob_or_directory_is_named(parquet_dir, data):
    _bad_files("truncated", parquet_dir, data)
    for src in (str(parquet_dir / "*.parquet"), parquet_dir):
        with pytest.raises(ValueError, match="part-2.parquet' is not a readable parquet file"):
            bm.lmer("weight ~ time + (1 | subject)", src)
    with pytest.raises(ValueError, match="no file matches the pattern"):
        bm.lmer("weight ~ time + (1 | subject)", str(parquet_dir / "*.parq"))


# ------------------------------------------------------------------ 9. unseen group levels at predict time
@pytest.mark.parametrize("kind", ["str", "pandas category", "polars categorical", "int"])
def test_unseen_group_levels_get_population_predictions(data, kind):
    d = data.copy()
    new = pd.DataFrame({"subject": ["s01", "never-seen", None, "s02"], "time": [0.5, 0.5, 0.5, -1.0],
                        "dose": [1.0, 1.0, 1.0, 0.0]})
    if kind == "int":
        d["subject"] = d.subject.str[1:].astype(int) * 10
        new["subject"] = pd.array([10, 999, None, 20], dtype="Int64")
    res, _ = _quiet_fit("weight ~ time + dose + (time | subject)", _as(d, kind))
    pred = res.predict(_as(new, kind))
    b = res.fe_params.to_numpy()
    pop = b[0] + b[1] * new.time + b[2] * new.dose
    re = res.ranef()
    k1, k2 = (10, 20) if kind == "int" else ("s01", "s02")
    assert pred[0] == pytest.approx(pop[0] + re.loc[k1, "(Intercept)"] + 0.5 * re.loc[k1, "time"], rel=1e-12)
    assert pred[3] == pytest.approx(pop[3] + re.loc[k2, "(Intercept)"] - 1.0 * re.loc[k2, "time"], rel=1e-12)
    np.testing.assert_allclose(pred[1:3], pop[1:3], rtol=1e-12)  # unseen and missing keys
    np.testing.assert_allclose(res.predict(_as(new, kind), include_random=False), pop, rtol=1e-12)
    np.testing.assert_allclose(res.predict(new.drop(columns="subject")), pop, rtol=1e-12)  # no key column


def _as(d: pd.DataFrame, kind: str):
    if kind == "pandas category":
        return d.assign(subject=d.subject.astype("category"))
    if kind == "polars categorical":
        return pl.from_pandas(d).with_columns(pl.col("subject").cast(pl.Categorical))
    return d


# ------------------------------------------------------------------ 10. optimiser out of iterations
def test_maxiter_gives_convergence_warning(data):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = bm.lmer("weight ~ time + (time | subject)", data, maxiter=1)
    assert not res.converged
    conv = [str(w.message) for w in rec if issubclass(w.category, bm.ConvergenceWarning)]
    assert len(conv) == 1
    assert "iteration limit reached (1)" in conv[0]
    assert f"largest gradient {res.optimizer.projected_grad_norm:.3g}" in conv[0]
    assert "larger maxiter" in conv[0]
    assert res.to_dict()["converged"] is False
    _finite(res)
    ok, rec = _quiet_fit("weight ~ time + (time | subject)", data)
    assert ok.converged and not rec
    assert ok.objective < res.objective
    with pytest.raises(ValueError, match="maxiter must be a positive"):
        bm.lmer("weight ~ time + (time | subject)", data, maxiter=0)


def test_start_values_cannot_derail_the_fit(data):
    ref, _ = _quiet_fit("weight ~ time + (time | subject)", data)
    with pytest.raises(ValueError, match="start_params must be finite"):
        bm.lmer("weight ~ time + (time | subject)", data, start=[np.nan, 0.0, 1.0])
    # theta = 0 is a stationary point of the deviance: a zero start must not stop the optimiser there
    for start in ([0.0, 0.0, 0.0], [1e300, 0.0, 1.0]):
        res, _ = _quiet_fit("weight ~ time + (time | subject)", data, start=start)
        assert res.converged
        assert res.objective == pytest.approx(ref.objective, rel=1e-9)


# ------------------------------------------------------------------ 11. the command line
CLI = Path(bm.__file__).with_name("cli.py")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigmixed.cli", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _cli_cases(tmp: Path, data: pd.DataFrame) -> list[tuple[str, list, list[str]]]:
    d = pl.from_pandas(data)
    good = tmp / "good.parquet"
    d.write_parquet(good)
    holes = tmp / "holes.parquet"
    pl.from_pandas(_holes(data)).write_parquet(holes)
    one = tmp / "one.parquet"
    d.filter(pl.col("subject") == "s00").write_parquet(one)
    nan = tmp / "nan.parquet"
    d.with_columns(pl.lit(None, pl.Float64).alias("weight")).write_parquet(nan)
    empty = tmp / "empty.parquet"
    d.head(0).write_parquet(empty)
    few = tmp / "few.parquet"
    d.group_by("subject", maintain_order=True).head(1).head(3).write_parquet(few)
    trunc = tmp / "trunc.parquet"
    trunc.write_bytes(good.read_bytes()[:100])
    other = tmp / "other.parquet"
    d.with_columns(pl.col("time").cast(pl.String)).write_parquet(other)
    garbage = tmp / "garbage.parquet"
    garbage.write_bytes(b"PAR1" + bytes(range(256)) * 3 + b"PAR1")
    d.write_parquet(tmp / "plain.parquet", compression="uncompressed", statistics=False)
    page = tmp / "page.parquet"
    _clobber_page(tmp / "plain.parquet", page, "subject")
    lacks = tmp / "lacks.parquet"
    d.drop("dose").write_parquet(lacks)
    f = "weight ~ time + (1 | subject)"
    return [
        ("missing column", [good, "-f", "weight ~ tme + (1 | subject)"], ["'tme'", "'time'"]),
        ("unknown function", [good, "-f", "weight ~ foo(time) + (1 | subject)"], ["'foo'"]),
        ("unbalanced", [good, "-f", "weight ~ (time + (1 | subject)"], ["unbalanced parentheses"]),
        ("bad bar", [good, "-f", "weight ~ time + (1 | log(subject))"], ["(1 | log(subject))"]),
        ("missing raise", [holes, "-f", f, "--missing", "raise"], ["'weight'", "holes.parquet"]),
        ("empty", [empty, "-f", f], ["no rows"]),
        ("all dropped", [nan, "-f", f], ["all 72 rows were dropped"]),
        ("single group", [one, "-f", f], ["1 level"]),
        ("few rows", [few, "-f", "weight ~ time + dose + (1 | subject)"], ["3 usable rows for 3 fixed effects"]),
        ("missing file", [good, tmp / "nope.parquet", "-f", f], ["nope.parquet", "does not exist"]),
        ("truncated", [good, trunc, "-f", f], ["trunc.parquet", "not a readable parquet file"]),
        ("schema", [good, other, "-f", f], ["other.parquet", "String"]),
        # (a file may lack a column the model does not use: test_files_may_differ_in_columns...)
        ("lacks column", [good, lacks, "-f", "weight ~ time + dose + (1 | subject)"],
         ["lacks.parquet", "lacks column(s) ['dose']"]),
        ("corrupt", [good, garbage, "-f", f], ["garbage.parquet", "not a readable parquet file"]),
        ("corrupt page", [good, page, "-f", f], ["page.parquet", "cannot read column(s) ['subject']"]),
    ]


def test_cli_errors_exit_2_with_one_line(tmp_path, data):
    for name, args, needles in _cli_cases(tmp_path, data):
        out_dir = tmp_path / f"out-{name.replace(' ', '-')}"
        out = _cli("fit", *args, "--out", out_dir, cwd=tmp_path)
        _one_line_error(out, *needles)
        # no output (not even a partial one) for a run that failed
        assert not out_dir.exists() or not [p for p in out_dir.iterdir() if not p.name.startswith(".")], name


def test_cli_debug_shows_the_traceback(tmp_path, data):
    pl.from_pandas(data).write_parquet(tmp_path / "good.parquet")
    out = _cli("fit", tmp_path / "good.parquet", "-f", "weight ~ tme + (1 | subject)", "--out", tmp_path / "o",
               "--debug", cwd=tmp_path)
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "'tme'" in out.stderr


def test_cli_hard_data_fits_with_warnings(tmp_path, data):
    """Rows of the table that are not errors: the CLI completes (exit 0) and reports the warning."""
    d = pl.from_pandas(_holes(data))
    d.write_parquet(tmp_path / "holes.parquet")
    out = _cli("fit", tmp_path / "holes.parquet", "-f", "weight ~ time + (1 | subject)", "--out", tmp_path / "o",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "bigmixed: warning: 6 of 72 rows dropped" in out.stderr
    assert json.loads((tmp_path / "o" / "fit.json").read_text())["rows_dropped"] == 6
    # a singular fit (lme4's Dyestuff2) and an optimiser out of iterations: fitted, flagged, exit 0
    dy = pd.DataFrame([(b, v) for b, vs in DYESTUFF2.items() for v in vs], columns=["Batch", "Yield"])
    pl.from_pandas(dy).write_parquet(tmp_path / "dy2.parquet")
    out = _cli("fit", tmp_path / "dy2.parquet", "-f", "Yield ~ 1 + (1 | Batch)", "--out", tmp_path / "o2",
               "--quiet", cwd=tmp_path)
    assert out.returncode == 0 and "bigmixed: warning: boundary (singular) fit" in out.stderr, out.stderr
    fit = json.loads((tmp_path / "o2" / "fit.json").read_text())
    assert fit["singular"] is True and fit["objective"] == pytest.approx(161.8283, abs=1e-4)
    pl.from_pandas(data).write_parquet(tmp_path / "good.parquet")
    out = _cli("fit", tmp_path / "good.parquet", "-f", "weight ~ time + (time | subject)", "--maxiter", "1",
               "--out", tmp_path / "o3", "--quiet", cwd=tmp_path)
    assert out.returncode == 0 and "bigmixed: warning: the optimiser did not converge" in out.stderr, out.stderr
    assert json.loads((tmp_path / "o3" / "fit.json").read_text())["converged"] is False


@pytest.mark.parametrize("frame", [pl.DataFrame, pd.DataFrame])
def test_predict_with_text_in_a_numeric_column_names_the_column(frame):
    from bigmixed.simulate import simulate

    res = bm.lmer("y ~ x + x2 + (x | subject)", simulate(100, 5, seed=1))
    new = frame({"x": ["a", "b"], "x2": [1.0, 2.0], "subject": [1, 2]})
    with pytest.raises(ValueError, match="column 'x' is used as a number by the model"):
        res.predict(new)


def test_files_may_differ_in_columns_the_model_does_not_use(tmp_path):
    """A column added to newer files is fine until the model uses it; then the lacking file is named."""
    from bigmixed.simulate import simulate

    d = simulate(300, 5, seed=3)
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    d.slice(0, 700).write_parquet(a)
    d.slice(700, 800).with_columns(extra=pl.lit(1.0)).write_parquet(b)
    d.slice(1500).write_parquet(c)
    res = bm.lmer("y ~ x + x2 + (x | subject)", [str(b), str(a), str(c)])  # b first: its extra column
    assert res.objective == pytest.approx(bm.lmer("y ~ x + x2 + (x | subject)", d).objective, rel=1e-10)
    for order in ([a, b, c], [b, a, c]):
        with pytest.raises(ValueError, match=r"file '.*a\.parquet' lacks column\(s\) \['extra'\] that '.*b\.parquet'"):
            bm.lmer("y ~ x + extra + (x | subject)", [str(f) for f in order])
