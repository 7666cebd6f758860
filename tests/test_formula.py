"""Tests for bigmixed.formula: lme4 / statsmodels formula parsing and the frozen Design."""
from __future__ import annotations

from pathlib import Path

import formulaic
import numpy as np
import pandas as pd
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigmixed.design import Design
from bigmixed.formula import (
    ModelSpec,
    RandomTerm,
    TermSpec,
    parse_lmer,
    spec_from_lmer,
    spec_from_statsmodels,
)

DATA = Path(__file__).parent / "data" / "dietox.csv"


@pytest.fixture(scope="module")
def dietox() -> pd.DataFrame:
    return pd.read_csv(DATA)


def _mm(rhs: str, df: pd.DataFrame) -> pd.DataFrame:
    return formulaic.model_matrix(rhs, df, na_action="ignore")


# ------------------------------------------------------------------------------------- parse_lmer
@pytest.mark.parametrize(
    "formula, expected",
    [
        ("Weight ~ Time + (Time | Pig)", ("Weight", "Time", (RandomTerm("Time", "Pig", False),))),
        ("y ~ 1 + (1|g)", ("y", "1", (RandomTerm("1", "g", False),))),
        ("y ~ x + (0 + x | g)", ("y", "x", (RandomTerm("0 + x", "g", False),))),
        ("y ~ x + (x || g)", ("y", "x", (RandomTerm("x", "g", True),))),
        ("y ~ x + (1|g) + (0+x|g)",
         ("y", "x", (RandomTerm("1", "g", False), RandomTerm("0+x", "g", False)))),
        ("np.log(y) ~ C(site) * x + I(x**2) + (x|g)",
         ("np.log(y)", "C(site) * x + I(x**2)", (RandomTerm("x", "g", False),))),
        ("y ~ 0 + x + (1|g)", ("y", "0 + x", (RandomTerm("1", "g", False),))),
        ("y ~ (1|g)", ("y", "1", (RandomTerm("1", "g", False),))),
        ("y ~ 0 + (1|g)", ("y", "0", (RandomTerm("1", "g", False),))),
        ("y ~ (1|g) + x", ("y", "x", (RandomTerm("1", "g", False),))),
        ("y ~ x + (1|g) - 1", ("y", "x - 1", (RandomTerm("1", "g", False),))),
        ("y ~ (x|g) + x + (1|h)",
         ("y", "x", (RandomTerm("x", "g", False), RandomTerm("1", "h", False)))),
        ("y ~ I(x - 1) + C(s, levels=['a|b', 'c']) + (x | g)",
         ("y", "I(x - 1) + C(s, levels=['a|b', 'c'])", (RandomTerm("x", "g", False),))),
        ("y ~ x + (1 + x + z | `my group`)", ("y", "x", (RandomTerm("1 + x + z", "my group", False),))),
        ("y ~ x + (log(x) | g.id)", ("y", "x", (RandomTerm("log(x)", "g.id", False),))),
    ],
)
def test_parse_lmer(formula, expected):
    assert parse_lmer(formula) == expected


@pytest.mark.parametrize(
    "formula",
    ["y~x+(x||g)", "  y ~ x + ( x || g )  ", "y\t~\tx +\n(x ||g)", "y ~x+(  x||  g)", "y ~ x + (x\n||\ng)"],
)
def test_parse_lmer_whitespace_variants(formula):
    assert parse_lmer(formula) == ("y", "x", (RandomTerm("x", "g", True),))


def test_parse_lmer_multiword_whitespace_is_normalised():
    assert parse_lmer("y ~  x  +   z  + ( 1  +  x |g)") == ("y", "x + z", (RandomTerm("1 + x", "g", False),))


@pytest.mark.parametrize(
    "formula, match",
    [
        ("y x + (1|g)", "no '~'"),
        ("y ~ x ~ z + (1|g)", "more than one '~'"),
        (" ~ x + (1|g)", "empty response"),
        ("y ~ ", "no terms"),
        ("y ~ x + (1|g", "unbalanced parentheses"),
        ("y ~ x) + (1|g)", "unbalanced parentheses"),
        ("y ~ C(s] + (1|g)", "unbalanced parentheses"),
        ("y ~ x + ( | g)", "nothing left of the bar"),
        ("y ~ x + (x | )", "no grouping column"),
        ("y ~ x + (x || )", "no grouping column"),
        ("y ~ x + (1 | (x | g))", "nested bars"),
        ("y ~ x + (1 | a | b)", "nested bars"),
        ("y ~ x + (1|log(g))", "is not a column name, an interaction"),
        ("y ~ x + (1|a:b/c)", "is not a column name, an interaction"),
        ("y ~ x + 1 | g", "must be in parentheses"),
        ("y ~ x * (1|g)", r"separate '\+ \(expr \| group\)' terms"),
        ("y ~ x - (1|g)", "subtracted"),
        ("y ~ x + (1|g) +", r"ends with '\+'"),
        ("y ~ x + C(s, levels=['a) + (1|g)", "unterminated"),
    ],
)
def test_parse_lmer_errors(formula, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_lmer(formula)
    assert "\n" not in str(info.value)


def test_parse_lmer_error_names_offending_term():
    with pytest.raises(ValueError, match=r"'\(1\|log\(plot\)\)'"):
        parse_lmer("y ~ x + (1|log(plot))")


def test_grouping_interactions_and_nesting():
    assert parse_lmer("y ~ x + (1 | a : b)")[2] == (RandomTerm("1", "a:b", False),)
    s = spec_from_lmer("y ~ 1 + (1 | batch/cask)")
    # lme4 expands (1 | a/b) to (1 | a) + (1 | b:a) and names the inner factor b:a
    assert [t.factors for t in s.terms] == [("batch",), ("cask", "batch")]
    assert [t.name for t in s.terms] == ["batch", "cask:batch"]
    s = spec_from_lmer("y ~ 1 + (1 | a/b/c)")
    assert [t.name for t in s.terms] == ["a", "b:a", "c:(b:a)"]
    s = spec_from_lmer("y ~ x + (x | `my g`:h)")
    assert s.terms[0].factors == ("my g", "h") and s.key_columns == ("my g", "h")


def test_r_spellings_become_formulaic():
    s = spec_from_lmer("y ~ I(x^2) + log(x^2) + factor(k) + (x^2 | g)")
    assert s.fixed == "I(x**2) + log(x**2) + C(k)"
    assert s.terms[0].exprs == ("x^2",)  # top level: R's (and formulaic's) interaction power
    assert spec_from_lmer("y ~ (a + b)^2 + (1 | g)").fixed == "(a + b)^2"


def test_offsets_leave_the_fixed_part():
    s = spec_from_lmer("y ~ x + offset(log(n)) + (1 | g)")
    assert s.fixed == "x" and s.offset == ("log(n)",)
    assert spec_from_lmer("y ~ offset(o) + (1 | g)").fixed == "1"
    assert spec_from_lmer("y ~ offset(o) - 1 + (1 | g)").fixed == "1 - 1"
    with pytest.raises(ValueError, match="subtracted"):
        spec_from_lmer("y ~ x - offset(o) + (1 | g)")


# ------------------------------------------------------------------------------------ ModelSpecs
def test_spec_from_lmer():
    s = spec_from_lmer("y ~ x + (x || g)")
    assert s == ModelSpec("y", "x", (TermSpec(("g",), ("x",), (True,), "g"),))
    s = spec_from_lmer("y ~ x + (1|g) + (0 + x|g)")
    assert s.random == ("1", "0 + x") and s.independent == (False, False) and s.group == "g"
    assert "(1 | g)" in s.lmer_formula()


def test_spec_from_lmer_several_grouping_factors():
    s = spec_from_lmer("y ~ x + (1|a) + (x|b) + (0 + z|a)")
    assert [t.factors for t in s.terms] == [("a",), ("b",)]
    assert s.terms[0].exprs == ("1", "0 + z") and s.terms[1].exprs == ("x",)
    with pytest.raises(AttributeError, match="no single grouping column"):
        s.group


def test_spec_from_lmer_needs_a_bar():
    with pytest.raises(ValueError, match=r"needs a random-effect term '\(expr \| group\)'"):
        spec_from_lmer("y ~ x")


@pytest.mark.parametrize(
    "re_formula, expected",
    [(None, "1"), ("~Time", "Time"), ("Time", "Time"), ("~ 0 + Time", "0 + Time"), ("~1", "1")],
)
def test_spec_from_statsmodels(re_formula, expected):
    s = spec_from_statsmodels("Weight ~ Time", re_formula, "Pig")
    assert s == ModelSpec("Weight", "Time", (TermSpec(("Pig",), (expected,), (False,), "Pig"),))


def test_statsmodels_variance_components():
    s = spec_from_statsmodels("y ~ x", "~x", "school", {"cls": "0 + C(cls)", "sl": "0 + C(cls):x"})
    assert len(s.terms) == 3 and s.terms[0].factors == ("school",)
    assert s.terms[1] == TermSpec(("school", "cls"), ("1",), (False,), "cls")
    assert s.terms[2] == TermSpec(("school", "cls"), ("0 + x",), (False,), "sl")
    with pytest.raises(NotImplementedError, match="vc_formula"):
        spec_from_statsmodels("y ~ x", None, "school", {"v": "0 + x + z"})


@pytest.mark.parametrize(
    "formula, re_formula, match",
    [
        ("y ~ x + (1|g)", None, "bm.lmer"),
        ("y x", None, "no '~'"),
        ("y ~ x", "~ x | g", "re_formula"),
        ("y ~ x", "", "re_formula"),
        ("y ~ x", "y ~ x", "re_formula"),
    ],
)
def test_spec_from_statsmodels_errors(formula, re_formula, match):
    with pytest.raises(ValueError, match=match):
        spec_from_statsmodels(formula, re_formula, "g")


def test_statsmodels_and_lmer_spellings_give_same_design(dietox):
    a = Design(spec_from_statsmodels("Weight ~ Time", "~Time", "Pig"), dietox)
    b = Design(spec_from_lmer("Weight ~ Time + (Time | Pig)"), dietox)
    for u, v in zip(a.matrices(dietox), b.matrices(dietox)):
        np.testing.assert_array_equal(u, v)
    assert a.blocks == b.blocks == ((0, 1),)


# ----------------------------------------------------------------------------------------- Design
FORMULA = "Weight ~ Time + C(Cu) + Evit + (Time|Pig)"


def _check_arrays(y, X, Z, n):
    for a in (y, X, Z):
        assert a.dtype == np.float64 and (a.flags.c_contiguous or a.flags.f_contiguous) and a.shape[0] == n


def test_design_matches_formulaic(dietox):
    d = Design(spec_from_lmer(FORMULA), dietox)
    y, X, Z = d.matrices(dietox)
    _check_arrays(y, X, Z, len(dietox))
    ref = formulaic.model_matrix("Time + C(Cu) + Evit", dietox)
    assert d.fe_names == list(ref.columns)
    np.testing.assert_array_equal(X, ref.to_numpy(dtype=float))
    np.testing.assert_array_equal(y, dietox["Weight"].to_numpy(float))
    np.testing.assert_array_equal(Z, _mm("Time", dietox).to_numpy(dtype=float))
    assert d.re_names == ["Intercept", "Time"] and d.blocks == ((0, 1),)
    assert d.categorical == {"Cu": ["Cu000", "Cu035", "Cu175"], "Evit": ["Evit000", "Evit100", "Evit200"]}
    assert set(d.columns) == {"Weight", "Time", "Cu", "Evit", "Pig"} and d.response_name == "Weight"
    assert not d.fast_path
    assert d.key_columns == ("Pig",) and [t.name for t in d.terms] == ["Pig"]


def test_design_polars_matches_pandas(dietox):
    pdl = pl.from_pandas(dietox)
    d_pd = Design(spec_from_lmer(FORMULA), dietox)
    d_pl = Design(spec_from_lmer(FORMULA), pdl)
    assert d_pl.fe_names == d_pd.fe_names and d_pl.categorical == d_pd.categorical
    for a, b in zip(d_pd.matrices(dietox), d_pl.matrices(pdl)):
        np.testing.assert_array_equal(a, b)
    # a design built on pandas also encodes polars chunks (and vice versa)
    for a, b in zip(d_pd.matrices(pdl), d_pl.matrices(dietox)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("polars", [False, True])
def test_design_chunks_concatenate_to_whole(dietox, polars):
    data = pl.from_pandas(dietox) if polars else dietox
    d = Design(spec_from_lmer(FORMULA), data)
    whole = d.matrices(data)
    bounds = np.linspace(0, len(dietox), 6).astype(int)
    parts = [d.matrices(data[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_chunk_lacking_a_level_keeps_columns(dietox):
    d = Design(spec_from_lmer(FORMULA), dietox)
    _, X_all, _ = d.matrices(dietox)
    mask = (dietox["Cu"] == "Cu000").to_numpy()  # chunk with only the reference level of Cu
    _, X, _ = d.matrices(dietox[mask])
    assert X.shape[1] == len(d.fe_names)
    np.testing.assert_array_equal(X, X_all[mask])
    mask = (dietox["Evit"] == "Evit200").to_numpy()  # only a non-reference level of Evit
    _, X, _ = d.matrices(pl.from_pandas(dietox[mask]))
    np.testing.assert_array_equal(X, X_all[mask])


def test_prototype_lacking_a_level_uses_given_levels(dietox):
    sample = dietox[dietox["Cu"] != "Cu175"]
    d = Design(spec_from_lmer(FORMULA), sample, levels={"Cu": ["Cu175", "Cu035", "Cu000"]})
    full = Design(spec_from_lmer(FORMULA), dietox)
    assert d.fe_names == full.fe_names
    assert d.categorical["Cu"] == ["Cu000", "Cu035", "Cu175"]
    np.testing.assert_array_equal(d.matrices(dietox)[1], full.matrices(dietox)[1])
    # without the levels the unseen level is an error naming column and level
    d_sample = Design(spec_from_lmer(FORMULA), sample)
    with pytest.raises(ValueError, match="column 'Cu' has level 'Cu175'"):
        d_sample.matrices(dietox)


def test_given_levels_make_a_column_categorical(dietox):
    # e.g. the streaming reader found these levels; an all-missing prototype column still encodes
    proto = dietox.assign(Evit=np.nan)
    d = Design(spec_from_lmer("Weight ~ Evit + (1|Pig)"), proto, levels={"Evit": ["Evit200", "Evit000", "Evit100"]})
    assert d.categorical == {"Evit": ["Evit000", "Evit100", "Evit200"]}
    assert d.fe_names == ["Intercept", "Evit[T.Evit100]", "Evit[T.Evit200]"]
    _, X, _ = d.matrices(dietox)
    np.testing.assert_array_equal(X, formulaic.model_matrix("Evit", dietox).to_numpy(float))
    _, X, _ = d.matrices(proto[:5])
    assert np.isnan(X).all()


def test_levels_do_not_depend_on_row_order(dietox):
    shuffled = dietox.sample(frac=1.0, random_state=1)
    a, b = Design(spec_from_lmer(FORMULA), dietox), Design(spec_from_lmer(FORMULA), shuffled)
    assert a.categorical == b.categorical and a.fe_names == b.fe_names


def test_fast_path_avoids_formulaic(dietox, monkeypatch):
    expected_X = _mm("Time", dietox).to_numpy(dtype=float)

    def boom(*args, **kwargs):
        raise AssertionError("formulaic materialisation called on the fast path")

    monkeypatch.setattr(formulaic, "model_matrix", boom)
    monkeypatch.setattr(formulaic.ModelSpec, "get_model_matrix", boom)
    monkeypatch.setattr(formulaic.materializers.base.FormulaMaterializer, "get_model_matrix", boom)
    for data in (dietox, pl.from_pandas(dietox)):
        d = Design(spec_from_lmer("Weight ~ Time + (Time|Pig)"), data)
        assert d.fast_path
        y, X, Z = d.matrices(data)
        _check_arrays(y, X, Z, len(dietox))
        assert d.fe_names == d.re_names == ["Intercept", "Time"]
        np.testing.assert_array_equal(X, expected_X)
        np.testing.assert_array_equal(Z, expected_X)
        np.testing.assert_array_equal(y, dietox["Weight"].to_numpy(float))


def test_fast_path_equals_formulaic_column_order(dietox):
    # formulaic orders terms by degree (intercept first); the fast path must reproduce that order
    d = Design(spec_from_lmer("Weight ~ Start + Time + 1 + (0 + Time + Start | Pig)"), dietox)
    assert d.fast_path
    _, X, Z = d.matrices(dietox)
    ref = formulaic.model_matrix("Start + Time + 1", dietox)
    assert d.fe_names == list(ref.columns)
    np.testing.assert_array_equal(X, ref.to_numpy(float))
    np.testing.assert_array_equal(Z, _mm("0 + Time + Start", dietox).to_numpy(float))
    assert d.re_names == ["Time", "Start"]


@pytest.mark.parametrize("rhs", ["Time + Evit", "Evit + Time + Cu", "1 + Cu", "Cu + Evit - Time + Time",
                                 "Time + flag", "Time + Evit_cat"])
@pytest.mark.parametrize("backend", ["pandas", "polars"])
def test_categorical_main_effects_on_the_fast_path_equal_formulaic(dietox, rhs, backend, monkeypatch):
    """A categorical column beside the intercept is coded from its level codes, with formulaic's
    names, order and values (string, bool and polars Categorical columns); formulaic is asked
    only for the names, on the first rows."""
    df = dietox.assign(flag=dietox["Litter"] % 3 == 0)
    data = pl.from_pandas(df).with_columns(Evit_cat=pl.col("Evit").cast(pl.Categorical)) if backend == "polars" \
        else df.assign(Evit_cat=df["Evit"].astype("category"))
    ref = _mm(rhs, df.assign(Evit_cat=df["Evit"], flag=df["flag"].astype("category")))  # bool: a factor
    calls = []
    real = formulaic.ModelSpec.get_model_matrix
    monkeypatch.setattr(formulaic.ModelSpec, "get_model_matrix", lambda *a, **k: calls.append(1) or real(*a, **k))
    d = Design(spec_from_lmer(f"Weight ~ {rhs} + (1|Pig)"), data)
    assert d.fast_path
    calls.clear()  # the names were checked on the first rows; the chunks need no formulaic
    _, X, _ = d.matrices(data)
    assert not calls
    assert d.fe_names == list(ref.columns)
    np.testing.assert_array_equal(X, ref.to_numpy(float))


def test_categorical_fast_path_missing_and_unknown_levels(dietox):
    df = dietox.copy()
    df.loc[[3, 10], "Evit"] = None
    d = Design(spec_from_lmer("Weight ~ Time + Evit + (1|Pig)"), df)
    assert d.fast_path
    _, X, _ = d.matrices(df)
    assert np.isnan(X[[3, 10]]).all() and not np.isnan(np.delete(X, [3, 10], axis=0)).any()
    _, Xp, _ = d.matrices(pl.from_pandas(df))
    np.testing.assert_array_equal(Xp, X)
    for bad in (df.assign(Evit="Evit999"), pl.from_pandas(df.assign(Evit="Evit999"))):
        with pytest.raises(ValueError, match="column 'Evit' has level 'Evit999' that is not among the levels"):
            d.matrices(bad)


@pytest.mark.parametrize("rhs, fast", [
    ("0 + Evit + Time", True),  # no intercept: a dummy per level for the first factor
    ("Time * Evit", True),  # Time + Evit + Time:Evit, the interaction with treatment coding
    ("Time:Evit", True),  # no main effect of Time: a dummy per level inside the interaction
    ("Evit:Time + Start", True),
    ("Time * Start + Cu", True),  # numeric interaction
    ("Time * Evit + Start:Cu", True),
    ("0 + Time:Evit", True),
    ("Evit:Cu", False),  # two categorical columns in a term: formulaic
    ("Time + C(Evit)", False),  # a function call: formulaic
])
def test_interactions_on_the_fast_path_equal_formulaic(dietox, rhs, fast):
    for data in (dietox, pl.from_pandas(dietox)):
        d = Design(spec_from_lmer(f"Weight ~ {rhs} + (1|Pig)"), data)
        assert d.fast_path == fast
        _, X, _ = d.matrices(data)
        ref = _mm(rhs, dietox)
        assert d.fe_names == list(ref.columns)
        np.testing.assert_allclose(X, ref.to_numpy(float), rtol=1e-15, atol=0)


def test_interaction_in_the_random_part_and_missing_values(dietox):
    df = dietox.copy()
    df.loc[[5, 9], "Evit"] = None
    df.loc[[7], "Time"] = np.nan
    d = Design(spec_from_lmer("Weight ~ Time * Evit + (Time * Evit | Pig)"), df)
    assert d.fast_path
    _, X, Z = d.matrices(df)
    ref = _mm("Time * Evit", df.dropna(subset=["Evit", "Time"]))
    keep = np.ones(len(df), bool)
    keep[[5, 7, 9]] = False
    np.testing.assert_allclose(X[keep], ref.to_numpy(float), rtol=1e-15)
    np.testing.assert_array_equal(Z[keep], X[keep])
    assert np.isnan(X[[5, 9]]).all() and np.isnan(X[7, [1, 4, 5]]).all()


def test_fast_path_keeps_nan_rows(dietox):
    d = Design(spec_from_lmer("Weight ~ Feed + (1|Pig)"), dietox)
    assert d.fast_path
    y, X, Z = d.matrices(dietox)
    assert X.shape == (len(dietox), 2)
    np.testing.assert_array_equal(np.isnan(X[:, 1]), dietox["Feed"].isna().to_numpy())
    assert np.isnan(X[:, 1]).sum() == 72


def test_slow_path_keeps_nan_rows_and_missing_categorical_is_nan(dietox):
    df = dietox.copy()
    df.loc[[3, 10], "Evit"] = None
    d = Design(spec_from_lmer("Weight ~ Feed + Evit + (1|Pig)"), df)
    y, X, Z = d.matrices(df)
    assert X.shape[0] == len(df)
    bad = np.isnan(X).any(axis=1)
    assert set(np.flatnonzero(bad)) == set(np.flatnonzero(df["Feed"].isna())) | {3, 10}
    assert np.isnan(X[3]).all() and not np.isnan(Z).any()


def test_independent_blocks(dietox):
    d = Design(spec_from_lmer("Weight ~ Time + (Time||Pig)"), dietox)
    assert d.blocks == ((0,), (1,)) and d.re_names == ["Intercept", "Time"]
    d = Design(spec_from_lmer("Weight ~ Time + (1|Pig) + (0 + Time + Feed|Pig)"), dietox)
    assert d.blocks == ((0,), (1, 2)) and d.re_names == ["Intercept", "Time", "Feed"]


def test_response_expression_and_transforms(dietox):
    d = Design(spec_from_lmer("np.log(Weight) ~ I(Time**2) + center(Time) + (Time|Pig)"), dietox)
    assert d.response_name == "np.log(Weight)" and not d.fast_path
    y, X, _ = d.matrices(dietox)
    np.testing.assert_allclose(y, np.log(dietox["Weight"].to_numpy()))
    np.testing.assert_allclose(X[:, 1], dietox["Time"].to_numpy(float) ** 2)
    # center() state is frozen on the prototype: a chunk is centred with the whole-data mean
    _, X_chunk, _ = d.matrices(dietox[:100])
    np.testing.assert_allclose(X_chunk, X[:100])
    np.testing.assert_allclose(X[:, 2].mean(), 0.0, atol=1e-12)


def test_numeric_column_wrapped_in_C_and_boolean_column(dietox):
    df = dietox.assign(heavy=dietox["Start"] > 30)
    d = Design(spec_from_lmer("Weight ~ C(Litter) + heavy + (1|Pig)"), df)
    assert d.categorical["Litter"] == sorted(df["Litter"].unique().tolist())
    assert d.categorical["heavy"] == [False, True] and "heavy[T.True]" in d.fe_names
    ref = formulaic.model_matrix("C(Litter)", df)
    _, X, _ = d.matrices(pl.from_pandas(df))
    np.testing.assert_array_equal(X[:, : ref.shape[1]], ref.to_numpy(float))
    np.testing.assert_array_equal(X[:, -1], df["heavy"].to_numpy(float))


def test_categorical_random_effect(dietox):
    d = Design(spec_from_lmer("Weight ~ Time + (0 + Evit | Pig)"), dietox)
    assert d.re_names == ["Evit[Evit000]", "Evit[Evit100]", "Evit[Evit200]"]
    _, _, Z = d.matrices(dietox)
    np.testing.assert_array_equal(Z.sum(axis=1), np.ones(len(dietox)))


@pytest.mark.parametrize(
    "formula, match",
    [
        ("Weight ~ Tme + (Time|Pig)", "formula term 'Tme' names no column of the data; close matches: 'Time'"),
        ("Weight ~ Time + (Tim|Pig)", "formula term 'Tim' names no column of the data; close matches: 'Time'"),
        ("Wieght ~ Time + (1|Pig)", "'Wieght' names no column.*'Weight'"),
        ("Weight ~ C(Cuu) + (1|Pig)", "'Cuu' names no column.*'Cu'"),
        ("Weight ~ Time + (1|Pgi)", "grouping column 'Pgi'.*'Pig'"),
        ("Weight ~ zzz + (1|Pig)", "'zzz' names no column of the data; the data has columns: 'Pig'"),
        ("Weight ~ foo(Time) + (1|Pig)", "unknown function 'foo'"),
        ("Weight ~ np.nosuch(Time) + (1|Pig)", "unknown function 'np.nosuch'"),
        ("Weight ~ . + (1|Pig)", "'.' .*not supported"),
        ("Weight ~ Time + (0|Pig)", "has no columns"),
        ("Weight ~ Time + (1|Pig) + (1|Pig)", "more than one"),
        ("Evit ~ Time + (1|Pig)", "response column 'Evit' is not numeric"),
        ("Weight + Feed ~ Time + (1|Pig)", "response 'Weight \\+ Feed' must be one column"),
        ("Weight ~ I(Time +) + (1|Pig)", "cannot parse fixed effects"),
        ("Weight ~ I(1/Evit) + (1|Pig)", "cannot evaluate formula"),
    ],
)
def test_design_errors(dietox, formula, match):
    with pytest.raises(ValueError, match=match) as info:
        Design(spec_from_lmer(formula), dietox)
    assert "\n" not in str(info.value)
    assert info.value.__suppress_context__ or info.value.__cause__ is None


def test_matrices_rejects_chunk_missing_columns(dietox):
    d = Design(spec_from_lmer(FORMULA), dietox)
    with pytest.raises(ValueError, match="lacks column"):
        d.matrices(dietox.drop(columns="Evit"))


# ------------------------------------------------------------------------------------- hypothesis
TOKENS = [
    "Weight", "Time", "Pig", "Evit", "Cu", "Feed", "Litter", "Start", "Tme", "x", "1", "0",
    "~", "+", "-", "*", ":", "/", "|", "||", "(", ")", "C(Cu)", "C(Litter)", "I(", "np.log(",
    "log(", "center(", "foo(", ",", "**2", " ", "`", "'", "[", "]", ".", "%in%", "\n",
]
soup = st.lists(st.sampled_from(TOKENS), max_size=16).map("".join)
PIECES = ["Time", "Feed", "Evit", "C(Cu)", "Litter", "I(Time**2)", "np.log(Feed)", "0", "1", "Tme", "Time:Evit"]
well_formed = st.builds(
    lambda resp, fx, re, bar, grp: f"{resp} ~ {' + '.join(fx) or '1'} + ({' + '.join(re) or '1'} {bar} {grp})",
    st.sampled_from(["Weight", "np.log(Weight)", "Feed", "Evit", "Wt"]),
    st.lists(st.sampled_from(PIECES), max_size=3),
    st.lists(st.sampled_from(PIECES), max_size=2),
    st.sampled_from(["|", "||"]),
    st.sampled_from(["Pig", "Cu", "Pg", "Pig:Cu"]),
)


def _exercise(formula: str, df: pd.DataFrame) -> None:
    try:
        parse_lmer(formula)
        d = Design(spec_from_lmer(formula), df)
        y, X, Z = d.matrices(df.iloc[:50])
    except (ValueError, NotImplementedError) as e:
        assert str(e) and "\n" not in str(e), repr(e)
        return
    assert X.shape == (50, len(d.fe_names)) and Z.shape == (50, len(d.re_names)) and y.shape == (50,)
    assert sorted(i for b in d.blocks for i in b) == list(range(len(d.re_names)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=40), soup))
def test_random_text_only_raises_value_errors(dietox, formula):
    _exercise(formula, dietox)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(well_formed)
def test_formula_like_input_only_raises_value_errors(dietox, formula):
    _exercise(formula, dietox)


# A right-hand side of bare column names, 0 and 1 is parsed without formulaic (its import is most
# of a small job's start-up): the terms must be formulaic's, in formulaic's order.
BARE_TOKENS = ["Time", "Feed", "Evit", "Cu", "Litter", "0", "1", "Wt", "x1", "lambda", "Time2", "C"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(BARE_TOKENS), min_size=1, max_size=7),
       st.lists(st.sampled_from(["+", " + ", "+ ", "  +"]), min_size=6, max_size=6))
def test_bare_names_parse_as_formulaic(tokens, seps):
    from bigmixed.rhs import bare_terms as _bare_terms

    columns = {"Time", "Feed", "Evit", "Cu", "Litter", "Time2", "C"}
    text = tokens[0] + "".join(s + t for s, t in zip(seps, tokens[1:]))
    ours = _bare_terms(text, columns)
    if any(t not in columns and t not in ("0", "1") for t in tokens):
        assert ours is None  # a name that is not a column ('Wt', 'x1') or a keyword: formulaic's job
        return
    theirs = [tuple((f.eval_method.value, f.expr) for f in term.factors) for term in formulaic.Formula(text)]
    assert [tuple((f.kind, f.expr) for f in term) for term in ours] == theirs


@pytest.mark.parametrize("rhs", ["x + -1", "x - 1", "x*z", "x:z", "C(x)", "np.log(x)", "x +", "", "`x`", "x.y"])
def test_anything_but_bare_names_goes_to_formulaic(rhs):
    from bigmixed.rhs import bare_terms as _bare_terms

    assert _bare_terms(rhs, {"x", "z", "x.y"}) is None


def test_plain_numeric_design_equals_formulaics(dietox):
    """The bare-name path builds the same columns formulaic does (names, order, values)."""
    d = Design(spec_from_lmer("Weight ~ Feed + Time + 0 + 1 + Time + (Time | Pig)"), dietox)
    ref = _mm("Feed + Time + 0 + 1 + Time", dietox)
    assert d.fe_names == list(ref.columns)
    y, X, Z = d.matrices(dietox)
    ok = np.isfinite(X).all(axis=1)
    np.testing.assert_array_equal(X[ok], ref.to_numpy()[ok])
    np.testing.assert_array_equal(Z, _mm("Time", dietox).to_numpy())


@pytest.mark.parametrize("bar, names, blocks", [
    ("(Time || Pig)", ["Intercept", "Time"], ((0,), (1,))),
    ("(Time + Feed || Pig)", ["Intercept", "Time", "Feed"], ((0,), (1,), (2,))),
    # lme4 splits '||' by terms: a factor's dummies (full coding without the intercept) are one block
    ("(Cu || Pig)", ["Intercept", "Cu[Cu000]", "Cu[Cu035]", "Cu[Cu175]"], ((0,), (1, 2, 3))),
    ("(0 + Cu || Pig)", ["Cu[Cu000]", "Cu[Cu035]", "Cu[Cu175]"], ((0, 1, 2),)),
    ("(Time + Cu || Pig)", ["Intercept", "Time", "Cu[Cu000]", "Cu[Cu035]", "Cu[Cu175]"], ((0,), (1,), (2, 3, 4))),
    ("(poly(Time, 2) || Pig)", ["Intercept", "poly(Time, 2)[1]", "poly(Time, 2)[2]"], ((0,), (1, 2))),
])
def test_double_bar_splits_terms_not_columns(dietox, bar, names, blocks):
    d = Design(spec_from_lmer(f"Weight ~ Time + {bar}"), dietox)
    assert d.terms[0].re_names == names
    assert d.terms[0].blocks == blocks
    assert d.terms[0].bar_of == tuple(b for b, blk in enumerate(blocks) for _ in blk)  # a bar per block
