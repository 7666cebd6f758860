"""Several random-effects terms, nested and crossed, through the user API.

What lme4 itself says about these models (objective, fixed effects, theta, VarCorr, BLUPs and
condVar on Pastes, Penicillin, InstEval, ...) is checked in ``test_reference_fits.py``.  Here:

* the same fit whatever the route of the rows: shuffled parquet files (glob, LazyFrame, small
  chunks) == pandas in memory, to 1e-10 relative, REML and ML; composite keys ``(1 | a:b)`` of a
  string and an integer column too;
* the results API with K terms (``ranef``, ``random_effects``, ``conditional_variances``,
  ``VarCorr``, ``ngroups``, ``print``, ``summary``), and estimates, BLUPs, conditional variances and
  the criterion recomputed by hand from dense matrices (V = Z G Z' + sigma^2 I);
* ``predict`` with a level of one term unseen in the fit: that term contributes 0, the others keep
  their BLUPs;
* statsmodels' variance components (``vc_formula``) against statsmodels itself and against the
  equivalent ``lmer`` formula;
* the memory guard for crossed terms (``bigmixed.terms.check_crossed_memory``) directly and through
  ``lmer``; nested models are not subject to it;
* the command line with several terms (``fit.json``, one ``ranef-<term>.parquet`` per term);
* ``fit(reml=False)`` on the statistics of a REML model == ``lmer(..., REML=False)``.

All data are small (at most a few thousand rows); every fit takes milliseconds once the kernels
are compiled.
"""

from __future__ import annotations

import json
import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

import bigmixed as bm
import bigmixed.terms
from bigmixed.cli import main
from bigmixed.formula import spec_from_lmer
from bigmixed.simulate import simulate_crossed, simulate_nested

DATASETS = Path(__file__).parent / "data" / "datasets"
RTOL = 1e-10

PENICILLIN = "diameter ~ 1 + (1 | plate) + (1 | sample)"
PASTES = "strength ~ 1 + (1 | batch/cask)"
NESTED = "y ~ t + (t | child) + (t | school)"
CROSSED = "y ~ x + (1 | user) + (1 | item)"
COMPOSITE_NESTED = "y ~ x + (1 | site) + (1 | site:unit)"
COMPOSITE_CROSSED = "y ~ x + (1 | site:unit) + (1 | day)"


# ----------------------------------------------------------------------------------- data
def _composite(seed: int = 11, n: int = 600) -> pl.DataFrame:
    """Rows with a string key ``site``, integer keys ``unit`` (repeated across sites) and ``day``."""
    rng = np.random.default_rng(seed)
    sites = np.array(["north", "east", "south", "west", "centre", "zz"])
    si = rng.integers(0, sites.size, n)
    unit = rng.integers(0, 5, n)
    day = rng.integers(0, 10, n)
    x = rng.uniform(0.0, 10.0, n)
    y = (1.0 + 0.3 * x + rng.normal(0, 1.0, sites.size)[si] + rng.normal(0, 0.7, (sites.size, 5))[si, unit]
         + rng.normal(0, 0.5, 10)[day] + rng.normal(0, 1.0, n))
    return pl.DataFrame({"site": sites[si], "unit": unit, "day": day, "x": x, "y": y})


@lru_cache(maxsize=None)
def frame(name: str) -> pl.DataFrame:
    if name == "penicillin":
        return pl.read_csv(DATASETS / "Penicillin.csv")
    if name == "pastes":
        return pl.read_csv(DATASETS / "Pastes.csv")
    if name == "nested":  # 300 children in 12 schools, ~1,500 rows, intercepts and slopes
        return simulate_nested(300, 12, 5, seed=3)
    if name == "crossed":  # 400 users x 60 items, 4,000 rows, string keys
        return simulate_crossed(400, 60, 4000, seed=2, string_keys=True)
    if name == "composite":
        return _composite()
    raise KeyError(name)


# (case id, data, formula, layout the model must get)
CASES = [
    ("penicillin", "penicillin", PENICILLIN, "crossed"),
    ("pastes", "pastes", PASTES, "nested"),
    ("nested-slopes", "nested", NESTED, "nested"),
    ("users-items", "crossed", CROSSED, "crossed"),
    ("composite-nested", "composite", COMPOSITE_NESTED, "nested"),
    ("composite-crossed", "composite", COMPOSITE_CROSSED, "crossed"),
]


def _write_shuffled(df: pl.DataFrame, directory: Path, n: int, seed: int) -> str:
    """The rows of ``df`` in a random order, split into ``n`` files of uneven size; returns the glob."""
    directory.mkdir(parents=True, exist_ok=True)
    df = df.sample(fraction=1.0, shuffle=True, seed=seed)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, df.height), n - 1, replace=False))
    bounds = [0, *cuts.tolist(), df.height]
    for i in range(n):
        df.slice(bounds[i], bounds[i + 1] - bounds[i]).write_parquet(directory / f"part-{i:03d}.parquet")
    return str(directory / "*.parquet")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Each data set as 5 shuffled parquet files: {data name: glob}."""
    root = tmp_path_factory.mktemp("multiterm")
    return {name: _write_shuffled(frame(name), root / name, 5, seed=i + 1)
            for i, name in enumerate(["penicillin", "pastes", "nested", "crossed", "composite"])}


@lru_cache(maxsize=None)
def in_memory(data: str, formula: str, reml: bool = True):
    return bm.lmer(formula, frame(data).to_pandas(), REML=reml)


def _rel(a, b) -> float:
    """Normwise relative difference (elementwise ratios are meaningless for values near 0)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def assert_same_fit(res, ref, rtol: float = RTOL) -> None:
    assert res.converged and ref.converged
    assert res.nobs == ref.nobs
    assert res.terms == ref.terms
    assert res.ngroups == ref.ngroups and list(res.ngroups) == list(ref.ngroups)
    assert _rel(res.objective, ref.objective) < rtol
    assert list(res.fixef.index) == list(ref.fixef.index)
    assert _rel(res.fixef, ref.fixef) < rtol
    assert _rel(res.bse_fe, ref.bse_fe) < rtol
    assert res.theta.shape == ref.theta.shape
    assert _rel(res.theta, ref.theta) < rtol
    assert res.sigma == pytest.approx(ref.sigma, rel=rtol)
    for term in ref.terms:
        a, b = res.ranef(term), ref.ranef(term)
        assert sorted(map(str, a.index)) == sorted(map(str, b.index)), term
        order = pd.Index(a.index).get_indexer(b.index)
        assert _rel(a.to_numpy()[order], b.to_numpy()) < rtol, term
        assert _rel(res.conditional_variances(term)[order], ref.conditional_variances(term)) < rtol, term


# ------------------------------------------------------------------ 1. streamed == in memory
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case, data, formula, layout", CASES, ids=[c[0] for c in CASES])
def test_streamed_files_equal_in_memory(parts, case, data, formula, layout, reml):
    ref = in_memory(data, formula, reml)
    assert ref.model.built.layout == layout
    assert len(ref.terms) == 2
    for how in ("glob", "lazyframe", "small-chunks"):
        if how == "glob":
            res = bm.lmer(formula, parts[data], REML=reml)
        elif how == "lazyframe":
            res = bm.lmer(formula, pl.scan_parquet(parts[data]), REML=reml)
        else:  # levels straddle chunks and files
            res = bm.lmer(formula, parts[data], REML=reml, chunk_rows=37)
        assert res.model.data.in_memory is False, how
        assert res.model.built.layout == layout, how
        assert_same_fit(res, ref)


def test_crossing_seen_in_the_first_chunk_costs_no_second_pass(monkeypatch, parts):
    """Terms are first taken as nested; crossed ones seen in the first chunk switch the reducer to the
    crossed layout there and then (one pass over the rows); seen later, the rows are read again."""
    import bigmixed.pipeline as pipeline

    passes = []
    reduce_source = pipeline.reduce_source
    monkeypatch.setattr(pipeline, "reduce_source", lambda *a, **k: passes.append(1) or reduce_source(*a, **k))
    for name, formula, data, chunk_rows, n in (("crossed", CROSSED, frame("crossed"), None, 1),
                                               ("crossed", CROSSED, parts["crossed"], None, 1),
                                               ("penicillin", PENICILLIN, parts["penicillin"], 1, 2)):
        passes.clear()
        res = bm.lmer(formula, data, chunk_rows=chunk_rows)
        assert res.model.built.layout == "crossed" and len(passes) == n, (name, chunk_rows, passes)
        assert_same_fit(res, in_memory(name, formula))
    passes.clear()
    assert bm.lmer(NESTED, frame("nested")).model.built.layout == "nested" and len(passes) == 1


def test_streamed_statsmodels_variance_components_equal_in_memory(parts):
    df = frame("composite")
    kw = dict(groups="site", re_formula="1", vc_formula={"unit": "0 + C(unit)"})
    ref = bm.mixedlm("y ~ x", df.to_pandas(), **kw).fit()
    res = bm.mixedlm("y ~ x", pl.scan_parquet(parts["composite"]), chunk_rows=41, **kw).fit()
    assert_same_fit(res, ref)
    # and the same as its lme4 spelling, (1 | site) + (1 | site:unit)
    lm = in_memory("composite", COMPOSITE_NESTED)
    assert res.objective == pytest.approx(lm.objective, rel=RTOL)
    assert _rel(res.theta, lm.theta) < RTOL


def test_composite_key_of_string_and_integer_columns(parts):
    """``(1 | site:unit)``: unit 3 of 'north' and unit 3 of 'east' are different levels."""
    res = bm.lmer(COMPOSITE_CROSSED, parts["composite"])
    df = frame("composite")
    n_pairs = df.select(pl.struct("site", "unit").n_unique()).item()
    assert n_pairs == 30 and df["unit"].n_unique() == 5
    assert res.ngroups == {"site:unit": n_pairs, "day": 10}
    re_su = res.ranef("site:unit")
    assert re_su.index.name == "site:unit"
    assert set(re_su.index) == {f"{s}:{u}" for s, u in df.select("site", "unit").unique().iter_rows()}
    keys = res.random_effects_frame(term="site:unit")
    assert list(keys.columns) == ["site", "unit", "Intercept"]
    assert keys["unit"].dtype.kind == "i"  # the integer key stays an integer
    np.testing.assert_array_equal(
        keys["Intercept"].to_numpy(),
        re_su.loc[[f"{s}:{u}" for s, u in zip(keys["site"], keys["unit"])], "(Intercept)"].to_numpy())
    # the integer column alone is another model (5 levels): the key really is the pair
    alone = bm.lmer("y ~ x + (1 | unit) + (1 | day)", frame("composite").to_pandas())
    assert alone.ngroups["unit"] == 5 and alone.objective != pytest.approx(res.objective, rel=1e-6)


# ------------------------------------------------------------------------- 2. results API
@pytest.mark.parametrize("data, formula", [("penicillin", PENICILLIN), ("pastes", PASTES), ("nested", NESTED)],
                         ids=["crossed", "nested", "nested-slopes"])
def test_results_api_has_every_term(data, formula):
    res = in_memory(data, formula)
    df = frame(data).to_pandas()
    assert len(res.terms) == 2
    ranef = res.ranef()
    assert isinstance(ranef, dict) and list(ranef) == res.terms
    vc = res.VarCorr
    for k, term in enumerate(res.terms):
        r = ranef[term]
        assert isinstance(r, pd.DataFrame) and r.index.name == term
        assert len(r) == res.ngroups[term] == len(set(r.index))
        assert list(r.columns) == ["(Intercept)"] + (["t"] if data == "nested" else [])
        pd.testing.assert_frame_equal(res.ranef(term), r)
        pd.testing.assert_frame_equal(res.ranef(k), r)
        # the frame with key columns holds the same BLUPs
        fr = res.random_effects_frame(term=term)
        factors = term.split(":")
        assert list(fr.columns[:len(factors)]) == factors
        labels = fr[factors[0]] if len(factors) == 1 else fr[factors].astype(str).agg(":".join, axis=1)
        np.testing.assert_array_equal(fr[res.re_names(term)].to_numpy(), r.loc[labels].to_numpy())
        # conditional variances: one positive definite q x q matrix per level
        K = res.conditional_variances(term)
        q = r.shape[1]
        assert K.shape == (len(r), q, q)
        np.testing.assert_allclose(K, np.swapaxes(K, 1, 2), rtol=1e-12, atol=0)
        assert np.all(np.linalg.eigvalsh(K) > 0)
        # shrinkage: a level's conditional variance is below the term's variance
        psi = res.cov_re_terms[term].to_numpy()
        assert np.all(K[:, 0, 0] < psi[0, 0])
        # VarCorr: a row per variance (and correlation) of the term, matching cov_re_terms
        rows = vc[vc.grp == term]
        assert len(rows) == q * (q + 1) // 2
        np.testing.assert_allclose(rows[rows.var2.isna()].vcov.to_numpy(), np.diag(psi), rtol=1e-12)
    assert list(vc.grp) == [g for g in res.ngroups for _ in range(len(vc[vc.grp == g]))] + ["Residual"]
    assert vc.vcov.iloc[-1] == pytest.approx(res.scale, rel=1e-12)
    # statsmodels' random_effects: {level of the first term: its BLUPs}
    first = res.terms[0]
    assert len(res.random_effects) == res.ngroups[first]
    for level, blup in list(res.random_effects.items())[:5]:
        np.testing.assert_array_equal(blup.to_numpy(), ranef[first].loc[level].to_numpy())
    # the group sizes add up to the rows, for every term
    for term in res.terms:
        assert res.group_sizes(term).sum() == len(df)
    with pytest.raises(KeyError, match="no random-effects term"):
        res.ranef("nonesuch")


def test_ngroups_and_theta_in_lme4_order():
    """lme4 sorts the terms by their number of levels: the formula's order does not matter."""
    df = frame("penicillin").to_pandas()
    a = in_memory("penicillin", PENICILLIN)
    b = bm.lmer("diameter ~ 1 + (1 | sample) + (1 | plate)", df)
    assert a.terms == ["plate", "sample"] and b.terms == ["sample", "plate"]
    assert list(a.ngroups.items()) == list(b.ngroups.items()) == [("plate", 24), ("sample", 6)]
    assert b.objective == pytest.approx(a.objective, rel=1e-12)
    np.testing.assert_allclose(b.theta, a.theta, rtol=1e-8)  # both (plate, sample)
    assert list(b.VarCorr.grp) == ["plate", "sample", "Residual"]
    # nested: the inner term has more levels and comes first
    p = in_memory("pastes", PASTES)
    assert p.terms == ["batch", "cask:batch"]
    assert list(p.ngroups.items()) == [("cask:batch", 30), ("batch", 10)]
    assert list(p.VarCorr.grp) == ["cask:batch", "batch", "Residual"]
    ps = p.cov_re_terms
    assert p.theta == pytest.approx([np.sqrt(ps["cask:batch"].iloc[0, 0] / p.scale),
                                     np.sqrt(ps["batch"].iloc[0, 0] / p.scale)], rel=1e-10)


@pytest.mark.parametrize("data, formula, groups, names", [
    ("penicillin", PENICILLIN, "plate, 24; sample, 6", ["plate Var", "sample Var"]),
    ("pastes", PASTES, "cask:batch, 30; batch, 10", ["batch Var", "cask:batch Var"]),
    ("nested", NESTED, "child, 300; school, 12",
     ["child Var", "child x t Cov", "t Var", "school Var", "school x t Cov", "school t Var"]),
], ids=["crossed", "nested", "nested-slopes"])
def test_printed_layouts_name_every_term(data, formula, groups, names):
    """lme4's print: ``Number of obs: N, groups:  a, n_a; b, n_b``; statsmodels' summary: a row per
    variance component (the first term's named as statsmodels names its group, the others by term)."""
    res = in_memory(data, formula)
    text = str(res)
    assert res.nobs == frame(data).height
    assert f"Number of obs: {res.nobs}, groups:  {groups}" in text.splitlines()
    # lme4's random-effects block: one block per term, then the residual
    block = text.split("Random effects:\n")[1].split("Number of obs")[0].splitlines()
    starts = [ln.split()[0] for ln in block[1:] if ln[:2] != "  "]
    assert starts == list(res.ngroups) + ["Residual"]
    # statsmodels' summary: a row per variance component, with the estimates
    smry = res.summary()
    vt = res.variance_table()
    assert list(vt.name) == names
    assert list(dict.fromkeys(vt.term)) == res.terms
    text = str(smry)
    for name, est in zip(vt.name, vt.estimate):
        line = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
        assert len(line) == 1, name
        assert float(line[0][len(name):].split()[0]) == pytest.approx(est, abs=6e-4)
    header = ", ".join(f"{k} {v}" for k, v in res.ngroups.items())
    assert re.search(rf"^No\. Groups:\s+{re.escape(header)}\s", text, re.M)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_estimates_and_blups_by_hand_from_dense_matrices(reml):
    """At the reported variances, beta, its SEs, the BLUPs, their conditional covariances, the
    fitted values and the criterion are what the textbook formulas give (V = Z G Z' + s2 I)."""
    res = in_memory("nested", NESTED, reml)
    df = frame("nested").to_pandas()
    n = len(df)
    X = np.column_stack([np.ones(n), df["t"].to_numpy()])
    y = df["y"].to_numpy()
    blocks, Gs, cols = [], [], []
    for term in res.terms:
        levels = res.ranef(term).index
        code = pd.Index(levels).get_indexer(df[term])
        assert np.all(code >= 0)
        Zk = np.zeros((n, 2 * len(levels)))
        Zk[np.arange(n), 2 * code] = 1.0
        Zk[np.arange(n), 2 * code + 1] = df["t"].to_numpy()
        blocks.append(Zk)
        Gs.append(np.kron(np.eye(len(levels)), res.cov_re_terms[term].to_numpy()))
        cols.append(len(levels))
    Z = np.hstack(blocks)
    G = np.zeros((Z.shape[1], Z.shape[1]))
    o = 0
    for Gk in Gs:
        G[o:o + Gk.shape[0], o:o + Gk.shape[0]] = Gk
        o += Gk.shape[0]
    V = Z @ G @ Z.T + res.scale * np.eye(n)
    Vi_X = np.linalg.solve(V, X)
    XtViX = X.T @ Vi_X
    beta = np.linalg.solve(XtViX, Vi_X.T @ y)
    np.testing.assert_allclose(res.fe_params.to_numpy(), beta, rtol=1e-9)
    np.testing.assert_allclose(res.bse_fe.to_numpy(), np.sqrt(np.diag(np.linalg.inv(XtViX))), rtol=1e-7)
    r = y - X @ beta
    GZt = G @ Z.T
    b = GZt @ np.linalg.solve(V, r)
    C = G - GZt @ np.linalg.solve(V, GZt.T)  # Cov(b | y), beta at its estimate (lme4's condVar)
    o = 0
    for term, L in zip(res.terms, cols):
        bk = b[o:o + 2 * L].reshape(L, 2)
        np.testing.assert_allclose(res.ranef(term).to_numpy(), bk, rtol=1e-7, atol=1e-9 * np.abs(bk).max())
        Ck = np.stack([C[o + 2 * i:o + 2 * i + 2, o + 2 * i:o + 2 * i + 2] for i in range(L)])
        np.testing.assert_allclose(res.conditional_variances(term), Ck, rtol=1e-7, atol=1e-10)
        o += 2 * L
    np.testing.assert_allclose(res.fittedvalues, X @ beta + Z @ b, rtol=1e-9)
    # REML criterion: log|V| + log|X'V^-1 X| + r'V^-1 r + (n - p) log(2 pi); ML deviance: the same
    # without log|X'V^-1 X| and with n log(2 pi)
    quad = np.linalg.slogdet(V)[1] + r @ np.linalg.solve(V, r)
    crit = quad + np.linalg.slogdet(XtViX)[1] + (n - 2) * np.log(2 * np.pi) if reml else quad + n * np.log(2 * np.pi)
    assert res.objective == pytest.approx(crit, rel=1e-9)


# --------------------------------------------------------------- 3. predict with unseen levels
def test_predict_unseen_level_of_one_term_keeps_the_others_crossed():
    res = in_memory("crossed", CROSSED)
    b = res.fixef
    ru, ri = res.ranef("user")["(Intercept)"], res.ranef("item")["(Intercept)"]
    u, i = ru.index[5], ri.index[7]
    new = pd.DataFrame({"user": [u, "new-user", u, "new-user"], "item": [i, i, "new-item", "new-item"],
                        "x": [1.0, 2.0, 3.0, 4.0]})
    lin = b["(Intercept)"] + b["x"] * new["x"].to_numpy()
    expected = lin + np.array([ru[u] + ri[i], ri[i], ru[u], 0.0])
    np.testing.assert_allclose(res.predict(new), expected, rtol=1e-12)
    np.testing.assert_allclose(res.predict(pl.from_pandas(new)), expected, rtol=1e-12)
    np.testing.assert_allclose(res.predict(new, include_random=False), lin, rtol=1e-12)
    # without a term's key column that term is at the population level too
    np.testing.assert_allclose(res.predict(new.drop(columns="item")), lin + np.array([ru[u], 0.0, ru[u], 0.0]),
                               rtol=1e-12)
    # the rows of the fit: X beta + both terms
    df = frame("crossed").to_pandas()
    np.testing.assert_allclose(res.fittedvalues, b["(Intercept)"] + b["x"] * df.x.to_numpy()
                               + ru[df.user].to_numpy() + ri[df["item"]].to_numpy(), rtol=1e-12)


def test_predict_unseen_levels_with_random_slopes():
    res = in_memory("nested", NESTED)
    beta = res.fixef
    rc, rs = res.ranef("child"), res.ranef("school")
    child, school = rc.index[7], rs.index[3]
    new = pd.DataFrame({"child": [int(child), 10**6, int(child), 10**6],
                        "school": [int(school), int(school), 999, 999], "t": [2.5, 4.0, 1.0, 7.0]})
    t = new["t"].to_numpy()
    lin = beta["(Intercept)"] + beta["t"] * t
    c = rc.loc[child].to_numpy()
    s = rs.loc[school].to_numpy()
    expected = lin + np.array([c[0] + c[1] * t[0] + s[0] + s[1] * t[0], s[0] + s[1] * t[1], c[0] + c[1] * t[2], 0.0])
    np.testing.assert_allclose(res.predict(new), expected, rtol=1e-12)


@pytest.mark.parametrize("case", ["crossed", "nested"])
def test_predict_intercept_only_models(case):
    if case == "crossed":
        res = in_memory("penicillin", PENICILLIN)
        ra, rb = res.ranef("plate")["(Intercept)"], res.ranef("sample")["(Intercept)"]
        new = pd.DataFrame({"plate": ["a", "zz", "a", "zz"], "sample": ["A", "A", "Q", "Q"]})
        add = [ra["a"] + rb["A"], rb["A"], ra["a"], 0.0]
    else:
        res = in_memory("pastes", PASTES)
        ra, rb = res.ranef("batch")["(Intercept)"], res.ranef("cask:batch")["(Intercept)"]
        new = pd.DataFrame({"batch": ["A", "A", "Q", "B"], "cask": ["a", "z", "a", "c"]})
        add = [ra["A"] + rb["a:A"], ra["A"], 0.0, ra["B"] + rb["c:B"]]
    np.testing.assert_allclose(res.predict(new), res.fixef["(Intercept)"] + np.array(add), rtol=1e-12)


def test_predict_unseen_composite_key():
    res = in_memory("composite", COMPOSITE_NESTED)
    new = pd.DataFrame({"site": ["north", "north", "nowhere"], "unit": [3, 99, 3], "x": [1.0, 2.0, 3.0]})
    b = res.fixef
    lin = b["(Intercept)"] + b["x"] * new["x"].to_numpy()
    rs, ru = res.ranef("site")["(Intercept)"], res.ranef("site:unit")["(Intercept)"]
    expected = lin + np.array([rs["north"] + ru["north:3"], rs["north"], 0.0])
    np.testing.assert_allclose(res.predict(new), expected, rtol=1e-12)


# -------------------------------------------------- 4. statsmodels' variance components (vc_formula)
def _pupils(seed: int = 7) -> pd.DataFrame:
    """Pupils in classes in schools: 15 schools x 4 classes x 3-8 pupils (~340 rows), class labels 0-3
    repeated in every school (statsmodels' variance components are within the group)."""
    rng = np.random.default_rng(seed)
    n_school, n_class = 15, 4
    school_eff = rng.normal(0, 1.0, n_school)
    class_eff = rng.normal(0, 0.7, (n_school, n_class))
    rows = []
    for s in range(n_school):
        for c in range(n_class):
            m = int(rng.integers(3, 9))
            x = rng.normal(size=m)
            y = 2.0 + 0.5 * x + school_eff[s] + class_eff[s, c] + rng.normal(0, 1.0, m)
            rows += [(f"s{s:02d}", c, xi, yi) for xi, yi in zip(x, y)]
    df = pd.DataFrame(rows, columns=["school", "cls", "x", "y"])
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_variance_components_equal_statsmodels(reml):
    import statsmodels.formula.api as smf

    df = _pupils()
    vcf = {"cls": "0 + C(cls)"}
    res = bm.mixedlm("y ~ x", df, groups="school", re_formula="1", vc_formula=vcf).fit(reml=reml)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence chatter
        sm = smf.mixedlm("y ~ x", df, groups="school", re_formula="1", vc_formula=vcf).fit(reml=reml)
    assert res.converged
    assert res.llf >= sm.llf - 1e-6 * abs(sm.llf)
    assert res.llf == pytest.approx(sm.llf, rel=1e-6)  # and not far above: the same model
    np.testing.assert_allclose(res.fe_params.to_numpy(), sm.fe_params.to_numpy(), rtol=1e-4)
    assert list(res.fe_params.index) == list(sm.fe_params.index)
    assert res.cov_re.iloc[0, 0] == pytest.approx(sm.cov_re.iloc[0, 0], rel=1e-3)
    assert res.cov_re_terms["cls"].iloc[0, 0] == pytest.approx(sm.vcomp[0], rel=1e-3)
    assert res.scale == pytest.approx(sm.scale, rel=1e-3)
    assert res.nobs == sm.nobs and res.n_groups == len(sm.model.group_labels) == 15
    assert res.ngroups == {"cls": 60, "school": 15}
    assert list(res.variance_table(se=False).name) == ["school Var", "cls Var"]
    assert list(sm.params.index[-2:]) == ["school Var", "cls Var"]  # statsmodels' own names


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_variance_components_alone_equal_statsmodels(reml):
    """vc_formula without re_formula: statsmodels gives the groups no random effect of their own
    (neither does re_formula='0'), so the model is the components alone, lme4's (1 | school:cls)."""
    import statsmodels.formula.api as smf

    df = _pupils()
    vcf = {"cls": "0 + C(cls)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence chatter
        sm = smf.mixedlm("y ~ x", df, groups="school", vc_formula=vcf).fit(reml=reml)
    assert sm.cov_re.shape == (0, 0)  # what statsmodels fits
    for re in (None, "0", "~0"):
        res = bm.mixedlm("y ~ x", df, groups="school", re_formula=re, vc_formula=vcf).fit(reml=reml)
        assert res.converged and res.terms == ["cls"] and res.cov_re.shape == (0, 0)
        assert res.llf >= sm.llf - 1e-8 * abs(sm.llf)
        assert res.llf == pytest.approx(sm.llf, rel=1e-6)
        np.testing.assert_allclose(res.fe_params.to_numpy(), sm.fe_params.to_numpy(), rtol=1e-4)
        assert res.cov_re_terms["cls"].iloc[0, 0] == pytest.approx(sm.vcomp[0], rel=1e-3)
        assert res.n_groups == 15 and sorted(res.random_effects) == sorted(sm.random_effects)
        assert res.group_sizes().sum() == len(df) and res.group_sizes().size == 15
        assert list(res.variance_table(se=False).name) == ["cls Var"]
    lm = bm.lmer("y ~ x + (1 | school:cls)", df, REML=reml)
    assert res.objective == pytest.approx(lm.objective, rel=RTOL)


def test_crossed_variance_components_in_one_group_equal_statsmodels():
    """statsmodels' spelling of crossed effects: one group holding everything, a variance component
    per crossed factor (Penicillin: plate x sample), is lme4's (1 | plate) + (1 | sample)."""
    import statsmodels.formula.api as smf

    p = pd.read_csv(DATASETS / "Penicillin.csv", dtype={"plate": str, "sample": str}).assign(one="1")
    vcf = {"plate": "0 + C(plate)", "sample": "0 + C(sample)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = smf.mixedlm("diameter ~ 1", p, groups="one", re_formula="0", vc_formula=vcf).fit()
    res = bm.mixedlm("diameter ~ 1", p, groups="one", re_formula="0", vc_formula=vcf).fit()
    lm = bm.lmer("diameter ~ 1 + (1 | plate) + (1 | sample)", p)
    assert res.model.built.layout == "crossed" and res.n_groups == 1
    assert res.llf >= sm.llf - 1e-8 * abs(sm.llf)
    assert res.objective == pytest.approx(lm.objective, rel=RTOL)


def test_no_random_effects_at_all_is_a_clear_error():
    df = _pupils()
    with pytest.raises(ValueError, match="leaves no random effects"):
        bm.mixedlm("y ~ x", df, groups="school", re_formula="0")
    m = bm.mixedlm("y ~ x", df, groups="school", vc_formula={"cls": "0 + C(cls)"})
    with pytest.raises(ValueError, match="has none"):
        m.fit(free=bm.MixedLMParams.from_components(np.ones(1), np.eye(1)))


def test_variance_components_equal_lmer_nested_term():
    df = _pupils()
    vc = bm.mixedlm("y ~ x", df, groups="school", re_formula="1", vc_formula={"cls": "0 + C(cls)"}).fit()
    lm = bm.lmer("y ~ x + (1 | school) + (1 | school:cls)", df)
    assert vc.terms == ["school", "cls"] and lm.terms == ["school", "school:cls"]
    assert vc.objective == pytest.approx(lm.objective, rel=RTOL)
    assert _rel(vc.fe_params, lm.fe_params) < RTOL
    assert _rel(vc.theta, lm.theta) < RTOL
    assert vc.scale == pytest.approx(lm.scale, rel=RTOL)
    a, b = vc.ranef("cls"), lm.ranef("school:cls")
    assert list(a.index) == list(b.index) and a.index[0] == "s00:0"
    assert _rel(a.to_numpy(), b.to_numpy()) < RTOL
    # ML refits from the same statistics agree as well
    assert vc.model.fit(reml=False).objective == pytest.approx(
        bm.lmer("y ~ x + (1 | school) + (1 | school:cls)", df, REML=False).objective, rel=RTOL)


# ------------------------------------------------------------------------- 5. memory guard
def test_check_crossed_memory_names_the_dense_terms():
    check = bigmixed.terms.check_crossed_memory
    # 'user' (50,000 x 2 = 100,000 effects) is fitted in closed form; 'item' and 'shop' form the block
    lq = [(50_000, 2), (20_000, 1), (500, 2)]
    m = 20_000 + 1_000
    need = 8 * m * m
    with pytest.raises(MemoryError) as exc:
        check(lq, ["user", "item", "shop"], limit=2**30)
    msg = str(exc.value)
    assert "'item' (20,000 levels x 1)" in msg and "'shop' (500 levels x 2)" in msg
    assert "'user'" not in msg
    assert f"({m:,})^2" in msg
    assert f"({need / 2**30:.1f} GB)" in msg and "(3.3 GB)" in msg
    assert "(1.0 GB)" in msg
    check(lq, ["user", "item", "shop"], limit=need)  # exactly enough: no error
    with pytest.raises(MemoryError):
        check(lq, ["user", "item", "shop"], limit=need - 1)
    # the lead is the term with the most random effects (levels x q), not the most levels
    with pytest.raises(MemoryError, match=r"'many' \(2,500 levels x 1\)"):
        check([(1_000, 3), (2_500, 1)], ["wide", "many"], limit=1)
    # the default limit is a share of the machine's memory: a small block passes
    check([(1_000, 1), (100, 1)], ["a", "b"])


def test_memory_guard_through_lmer(monkeypatch, parts):
    df = frame("penicillin").to_pandas()
    ok = in_memory("penicillin", PENICILLIN)
    need = 8 * 6**2  # 'sample' (6 levels) is the dense block; 'plate' (24) is in closed form
    monkeypatch.setattr(bigmixed.terms, "memory_limit", lambda: need - 1)
    for data in (df, parts["penicillin"]):
        with pytest.raises(MemoryError, match=r"'sample' \(6 levels x 1\)") as exc:
            bm.lmer(PENICILLIN, data)
        assert "'plate'" not in str(exc.value) and "(288 bytes)" in str(exc.value)
    monkeypatch.setattr(bigmixed.terms, "memory_limit", lambda: need)
    assert bm.lmer(PENICILLIN, df).objective == pytest.approx(ok.objective, rel=RTOL)
    # users x items: the 60 items form the block (3 x 60^2 x 8 = 86,400 bytes)
    monkeypatch.setattr(bigmixed.terms, "memory_limit", lambda: 10_000)
    with pytest.raises(MemoryError, match=r"'item' \(60 levels x 1\)"):
        bm.lmer(CROSSED, frame("crossed"))
    with pytest.raises(MemoryError, match=r"'item' \(60 levels x 1\)"):
        bm.lmer(CROSSED, parts["crossed"])


@pytest.mark.parametrize("data, formula", [("pastes", PASTES), ("nested", NESTED), ("composite", COMPOSITE_NESTED)])
def test_memory_guard_does_not_touch_nested_models(monkeypatch, data, formula):
    ref = in_memory(data, formula)
    monkeypatch.setattr(bigmixed.terms, "memory_limit", lambda: 1)
    res = bm.lmer(formula, frame(data).to_pandas())
    assert res.model.built.layout == "nested"
    assert res.objective == pytest.approx(ref.objective, rel=RTOL)


# --------------------------------------------------------------------------- 6. command line
@pytest.mark.parametrize("data, formula, files", [
    ("penicillin", PENICILLIN, ["ranef-plate.parquet", "ranef-sample.parquet"]),
    ("pastes", PASTES, ["ranef-batch.parquet", "ranef-cask_batch.parquet"]),
], ids=["crossed", "nested"])
def test_cli_fit_writes_every_term(parts, tmp_path, capsys, data, formula, files):
    out = tmp_path / "out"
    rc = main(["fit", parts[data], "-f", formula, "--out", str(out), "--quiet"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert stdout == ""
    assert sorted(p.name for p in out.iterdir()) == sorted(["fit.json"] + files)
    rec = json.loads((out / "fit.json").read_text())
    ref = in_memory(data, formula)
    assert rec["objective"] == pytest.approx(ref.objective, rel=RTOL)
    assert rec["theta"] == pytest.approx(list(ref.theta), rel=1e-9)
    assert rec["ngroups"] == ref.ngroups and list(rec["ngroups"]) == list(ref.ngroups)
    assert [t["name"] for t in rec["terms"]] == ref.terms
    for t in rec["terms"]:
        assert t["levels"] == ref.ngroups[t["name"]]
        np.testing.assert_allclose(t["cov_re"], ref.cov_re_terms[t["name"]].to_numpy(), rtol=1e-9)
    assert {r["grp"] for r in rec["varcorr"]} == set(ref.terms) | {"Residual"}
    assert rec["layout"] == ref.model.built.layout
    for fname, term in zip(files, ref.terms):
        blup = pl.read_parquet(out / fname)
        factors = term.split(":")
        assert blup.columns == factors + ["Intercept"]
        assert blup.height == ref.ngroups[term]
        labels = [":".join(str(v) for v in row) for row in blup.select(factors).iter_rows()]
        np.testing.assert_allclose(blup["Intercept"].to_numpy(),
                                   ref.ranef(term).loc[labels, "(Intercept)"].to_numpy(), rtol=1e-8, atol=1e-12)
    assert sorted(Path(p).name for p in rec["outputs"]) == sorted(["fit.json"] + files)


def test_cli_memory_guard_is_a_user_error(parts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bigmixed.terms, "memory_limit", lambda: 100)
    rc = main(["fit", parts["penicillin"], "-f", PENICILLIN, "--out", str(tmp_path / "out"), "--quiet"])
    _, err = capsys.readouterr()
    assert not (tmp_path / "out").exists()
    assert "'sample' (6 levels x 1)" in err
    assert rc == 2 and err.startswith("bigmixed: error: crossed random effects")


# ------------------------------------------------------------------- 7. ML, REML, refits
@pytest.mark.parametrize("data, formula", [("penicillin", PENICILLIN), ("crossed", CROSSED), ("pastes", PASTES),
                                           ("nested", NESTED)], ids=["penicillin", "users-items", "pastes", "nested"])
def test_ml_refit_reuses_statistics(data, formula):
    df = frame(data).to_pandas()
    model = bm.MixedLM(formula, df, spec=spec_from_lmer(formula))
    reml = model.fit()
    ml = model.fit(reml=False)
    again = model.fit()
    ref_ml = in_memory(data, formula, False)
    ref_reml = in_memory(data, formula, True)
    assert ml.method == "ML" and reml.method == "REML"
    assert_same_fit(ml, ref_ml)
    assert_same_fit(reml, ref_reml)
    assert_same_fit(again, reml)  # a REML fit after the ML one: the statistics are unchanged
    # two different optima: the deviance and the REML criterion are different numbers
    assert ml.objective != pytest.approx(reml.objective, rel=1e-4)
    assert _rel(ml.theta, reml.theta) > 1e-4
    lines = str(ml).splitlines()
    assert lines[0].startswith("Linear mixed model fit by maximum likelihood")
    assert f"{ml.objective:8.1f}" in lines[3]
    assert str(reml).splitlines()[2] == f"REML criterion at convergence: {reml.objective:.4f}"
    # AIC/BIC count every term's theta
    assert ml.df_modelwc == len(ml.fixef) + len(ml.theta) + 1
    assert ml.aic == pytest.approx(ml.objective + 2 * ml.df_modelwc, rel=1e-14)


def test_lbfgsb_stops_when_only_round_off_is_left(monkeypatch):
    """Started at a crossed fit's optimum, only round-off is left: the stall stop ends the run
    there (never later than L-BFGS-B's own test), at the same optimum.  (Crossed fits take Newton
    steps with the average information first: held off here, so L-BFGS-B runs.)"""
    from bigmixed import optimize as opt
    from bigmixed.crossed_backend import CrossedBackend
    from bigmixed.simulate_multi import simulate_crossed

    monkeypatch.setattr(CrossedBackend, "information", False)

    df = simulate_crossed(20_000, 500, 200_000, seed=3)
    formula = "y ~ x + (1|user) + (1|item)"
    at = np.asarray(bm.lmer(formula, df).theta)
    stopped = bm.lmer(formula, df, start=at)
    monkeypatch.setattr(opt, "STALL_EVALS", 10**6)
    full = bm.lmer(formula, df, start=at)
    assert stopped.converged and full.converged
    assert stopped.optimizer.message.startswith("stopped")
    assert stopped.optimizer.n_evals <= full.optimizer.n_evals
    assert stopped.optimizer.fun <= full.optimizer.fun + 1e-12 * abs(full.optimizer.fun)
    np.testing.assert_allclose(stopped.theta, full.theta, rtol=1e-5)
