"""Property-based tests (hypothesis): what must not change a fit, and what must not crash.

* permuting rows, relabelling groups, and splitting the rows into arbitrary chunks (``chunk_rows``)
  or files leave the fit unchanged: objective and fixed effects to 1e-10 relative, variance
  components to 1e-8;
* multiplying y by c > 0 multiplies beta by c and the variances by c^2 (the deviance moves by
  dof * log c^2);
* any string fed to the formula parser or to ``bm.lmer`` gives a result or a clean
  ValueError / NotImplementedError, nothing else.

The data are small and max_examples modest so the module runs in well under a minute once the
numba kernels are cached (the very first fit of a session compiles them).
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import polars as pl
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import bigmixed as bm
from bigmixed.formula import parse_lmer, spec_from_lmer, spec_from_statsmodels

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODELS = [
    ("y ~ x + z + (1 | g)", True),
    ("y ~ x + site + (x | g)", True),
    ("y ~ x + (x || g)", False),
    ("y ~ x + z + (x | g)", False),
]


def _make(seed: int) -> pd.DataFrame:
    """Unbalanced groups (1 to 12 rows), a categorical predictor, random intercepts and slopes."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, size=18)
    g = np.repeat(np.arange(sizes.size), sizes)
    N = g.size
    x = rng.normal(size=N) + 1.0
    z = rng.normal(size=N)
    site = rng.choice(["a", "b", "c"], size=N)
    u = rng.normal(size=sizes.size)
    s = 0.6 * rng.normal(size=sizes.size)
    y = 2.0 + 0.8 * x - 0.4 * z + 0.3 * (site == "b") + u[g] + s[g] * x + 0.7 * rng.normal(size=N)
    return pd.DataFrame({"g": g, "x": x, "z": z, "site": site, "y": y})


DATA = {seed: _make(seed) for seed in range(3)}
_REF: dict = {}


def _fit(formula: str, data, reml: bool, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bm.SingularFitWarning)
        return bm.lmer(formula, data, REML=reml, **kw)


def _ref(seed: int, model: int):
    if (seed, model) not in _REF:
        formula, reml = MODELS[model]
        _REF[seed, model] = _fit(formula, DATA[seed], reml)
    return _REF[seed, model]


def assert_same_fit(res, ref, *, rel: float = 1e-10, rel_var: float = 1e-8) -> None:
    assert res.nobs == ref.nobs and res.n_groups == ref.n_groups
    assert res.objective == pytest.approx(ref.objective, rel=rel)
    b, b0 = res.fe_params.to_numpy(), ref.fe_params.to_numpy()
    np.testing.assert_allclose(b, b0, rtol=rel, atol=rel * np.max(np.abs(b0)))
    np.testing.assert_allclose(res.bse_fe.to_numpy(), ref.bse_fe.to_numpy(), rtol=rel_var)
    psi, psi0 = res.cov_re.to_numpy(), ref.cov_re.to_numpy()
    np.testing.assert_allclose(psi, psi0, rtol=rel_var, atol=rel_var * np.max(np.abs(psi0)))
    assert res.scale == pytest.approx(ref.scale, rel=rel_var)
    assert res.is_singular == ref.is_singular


case = st.tuples(st.integers(0, len(DATA) - 1), st.integers(0, len(MODELS) - 1))


# ------------------------------------------------------------------ invariances
@SETTINGS
@given(case, st.randoms(use_true_random=False))
def test_row_order_does_not_matter(c, rnd):
    seed, model = c
    d = DATA[seed]
    perm = list(range(len(d)))
    rnd.shuffle(perm)
    assert_same_fit(_fit(MODELS[model][0], d.iloc[perm], MODELS[model][1]), _ref(seed, model))


@SETTINGS
@given(case, st.randoms(use_true_random=False), st.sampled_from(["int", "str", "category", "polars categorical"]))
def test_group_labels_do_not_matter(c, rnd, kind):
    seed, model = c
    d = DATA[seed].copy()
    G = int(d.g.max()) + 1
    new = rnd.sample(range(-10_000, 10_000), G)  # any injective relabelling; codes follow sorted keys
    labels = np.asarray(new)[d.g.to_numpy()]
    if kind == "int":
        d["g"] = labels
    else:
        d["g"] = [f"k{v:+06d}" for v in labels]
        if kind == "category":
            d["g"] = d.g.astype("category")
    data = pl.from_pandas(d).with_columns(pl.col("g").cast(pl.Categorical)) if kind == "polars categorical" else d
    res = _fit(MODELS[model][0], data, MODELS[model][1])
    assert_same_fit(res, _ref(seed, model))
    # the BLUPs follow their groups through the relabelling
    ref_b = _ref(seed, model).ranef()
    for old, lab in zip(range(G), new):
        key = lab if kind == "int" else f"k{lab:+06d}"
        np.testing.assert_allclose(res.ranef().loc[key].to_numpy(), ref_b.loc[old].to_numpy(),
                                   rtol=1e-7, atol=1e-9 * np.max(np.abs(ref_b.to_numpy())))


@SETTINGS
@given(case, st.integers(1, 200))
def test_chunk_rows_do_not_matter(c, chunk_rows):
    seed, model = c
    res = _fit(MODELS[model][0], DATA[seed], MODELS[model][1], chunk_rows=chunk_rows)
    assert_same_fit(res, _ref(seed, model))


@SETTINGS
@given(case, st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4), st.integers(1, 64))
def test_splitting_into_files_does_not_matter(tmp_path_factory, c, cuts, chunk_rows):
    seed, model = c
    d = pl.from_pandas(DATA[seed])
    bounds = sorted({0, d.height, *(int(f * d.height) for f in cuts)})
    tmp = tmp_path_factory.mktemp("split")
    files = []
    for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if hi > lo:
            d[lo:hi].write_parquet(tmp / f"part-{k:02d}.parquet")
            files.append(tmp / f"part-{k:02d}.parquet")
    res = _fit(MODELS[model][0], files, MODELS[model][1], chunk_rows=chunk_rows)
    assert_same_fit(res, _ref(seed, model))


@SETTINGS
@given(case, st.floats(1e-3, 1e4))
def test_scaling_the_response(c, factor):
    seed, model = c
    formula, reml = MODELS[model]
    ref = _ref(seed, model)
    d = DATA[seed].assign(y=DATA[seed].y * factor)
    res = _fit(formula, d, reml)
    dof = ref.nobs - (len(ref.fe_params) if reml else 0)
    assert res.objective == pytest.approx(ref.objective + dof * np.log(factor**2), rel=1e-10)
    b0 = factor * ref.fe_params.to_numpy()
    np.testing.assert_allclose(res.fe_params.to_numpy(), b0, rtol=1e-10, atol=1e-10 * np.max(np.abs(b0)))
    np.testing.assert_allclose(res.bse_fe.to_numpy(), factor * ref.bse_fe.to_numpy(), rtol=1e-8)
    psi0 = factor**2 * ref.cov_re.to_numpy()
    np.testing.assert_allclose(res.cov_re.to_numpy(), psi0, rtol=1e-8, atol=1e-8 * np.max(np.abs(psi0)))
    assert res.scale == pytest.approx(factor**2 * ref.scale, rel=1e-8)
    np.testing.assert_allclose(res.theta, ref.theta, rtol=1e-7, atol=1e-9)  # theta is scale-free


# ------------------------------------------------------------------ nothing but clean errors
SMALL = DATA[0].iloc[:60]
ATOMS = ["y", "x", "z", "g", "site", "1", "0", "xx", "np.log(x)", "np.exp(z)", "I(x**2)", "C(site)", "C(g)",
         "log(x)", "center(x)", "scale(z)", "poly(x, 2)", "foo(x)", "np.foo(x)", "x:z", "x*z", "site:x", "(x+z)**2",
         "I(1/x)", "I(x/0)", "Q('x')", "Q('nope')", "`x`", "`a b`", "x.y", "np.log(-1 - x**2)", "I(x > 0)",
         "C(site, Sum)", "C(site, levels=['c'])", "x[0]", "x.mean()", "lambda: 1", "__import__('os')", "{}", "[]",
         "1e400", "np.nan", "np.inf", ".", "-1", "+", "~", "|", "||", "(", ")", "''", '"', "\\", "\n", "é", "\x00"]
terms = st.lists(st.sampled_from(ATOMS), min_size=0, max_size=4).map(" + ".join)
bars = st.builds(lambda lhs, bar, grp: f"({lhs} {bar} {grp})", terms, st.sampled_from(["|", "||", "|||", "", "/"]),
                 st.sampled_from(["g", "site", "x", "gg", "g:site", "g/site", "", "1", "(g)", "y", "`g`"]))
formulas = st.one_of(
    st.builds(lambda r, t, b: f"{r} ~ {t}" + "".join(" + " + x for x in b),
              st.sampled_from(["y", "np.log(y)", "yy", "site", "x", "", "y + x", "I(y*2)", "g", "C(site)", "(y"]),
              terms, st.lists(bars, max_size=2)),
    st.lists(st.sampled_from(ATOMS + ["(1|g)", "(x||g)", " ", "*", ":", "/", "^", "%", "=", ","]),
             max_size=12).map("".join),
    st.text(max_size=30),
)


def _clean(call) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except (ValueError, NotImplementedError) as exc:
        msg = str(exc)
        assert msg and "Traceback" not in msg


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(formulas)
def test_any_formula_gives_a_fit_or_a_clean_error(formula):
    _clean(lambda: parse_lmer(formula))
    _clean(lambda: spec_from_lmer(formula))
    _clean(lambda: bm.lmer(formula, SMALL))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(formulas, st.one_of(st.none(), terms, terms.map(lambda t: "~" + t)), st.sampled_from(["g", "site", "nope", ""]))
def test_any_statsmodels_spelling_gives_a_fit_or_a_clean_error(formula, re_formula, group):
    _clean(lambda: spec_from_statsmodels(formula, re_formula, group))
    _clean(lambda: bm.mixedlm(formula, SMALL, groups=group, re_formula=re_formula).fit())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from([np.nan, np.inf, -np.inf, None, 0.0, 1e300, -1e300, 1e-300]), min_size=1, max_size=6),
       st.lists(st.sampled_from(["y", "x", "z", "g", "site"]), min_size=1, max_size=6), st.integers(0, 59))
def test_poisoned_values_give_a_fit_or_a_clean_error(values, columns, start):
    """NaN/inf/null/huge values anywhere: dropped with a count, fitted (finite), or a clean error."""
    d = SMALL.copy().astype({"g": object, "site": object})
    for k, (v, col) in enumerate(zip(values, columns)):
        d.loc[(start + 7 * k) % len(d), col] = v
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bm.lmer("y ~ x + z + site + (x | g)", d)
    except (ValueError, NotImplementedError) as exc:
        assert str(exc)
        return
    assert np.isfinite(res.objective) and np.all(np.isfinite(res.fe_params))
    assert np.all(np.isfinite(res.cov_re.to_numpy())) and np.isfinite(res.scale)
