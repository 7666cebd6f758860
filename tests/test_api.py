"""The user API on real data: statsmodels' and lme4's spellings, results, rendering."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import polars as pl
import pytest

import bigmixed as bm

DATA = __import__("pathlib").Path(__file__).parent / "data"

SM = json.loads((__import__("pathlib").Path(__file__).parent / "data" / "statsmodels_dietox.json").read_text())
# lme4 1.1-31 fits (scripts/ref_single.R; estimates refitted to lme4's optimum at tight tolerances)
LME4 = json.loads((__import__("pathlib").Path(__file__).parent / "data" / "lme4" / "single.json").read_text())["fits"]


@pytest.fixture(scope="module")
def dietox():
    return bm.datasets.dietox()


@pytest.fixture(scope="module")
def slope(dietox):
    return bm.mixedlm("Weight ~ Time", dietox, groups="Pig", re_formula="~Time")


def test_seed_example_statsmodels_spelling(dietox, slope):
    """The seed's three fits: all converge and reach lme4's optimum (statsmodels 0.15 does not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r1 = bm.mixedlm("Weight ~ Time", dietox, groups=dietox["Pig"]).fit()
        r2 = slope.fit()
        free = bm.MixedLMParams.from_components(np.ones(2), np.eye(2))
        r3 = slope.fit(free=free)
    assert r1.converged and r2.converged and r3.converged
    assert r1.llf == pytest.approx(LME4["dietox_intercept_reml"]["logLik"], rel=1e-8)
    # lme4: -2217.0475; statsmodels 0.15 stops at -2220.39 with Converged: No
    assert r2.llf == pytest.approx(-2217.0474591842, abs=1e-4)
    assert r2.llf > SM["slope_reml"]["llf"] + 3.0
    assert r3.llf == pytest.approx(LME4["dietox_slope_indep_reml"]["logLik"], abs=1e-4)
    assert r3.cov_re.iloc[0, 1] == 0.0
    for r in (r1, r2, r3):
        conv = [line for line in str(r.summary()).splitlines() if "Converged:" in line][0]
        assert conv.split()[-1] == "Yes"


def test_random_intercept_matches_statsmodels(dietox):
    """Where statsmodels converges, both give the same numbers."""
    r = bm.mixedlm("Weight ~ Time", dietox, groups="Pig").fit()
    ref = SM["intercept_reml"]
    for k, v in ref["fe_params"].items():
        assert r.fe_params[k] == pytest.approx(v, rel=1e-6)
        assert r.bse_fe[k] == pytest.approx(ref["bse_fe"][k], rel=1e-5)
    assert r.cov_re.iloc[0, 0] == pytest.approx(ref["cov_re"][0][0], rel=1e-5)
    assert r.scale == pytest.approx(ref["scale"], rel=1e-6)
    for g, d in ref["random_effects_first3"].items():
        # the reference passed groups=data["Pig"] (statsmodels' example), which statsmodels names
        # Group; groups="Pig" names the intercept Pig, in statsmodels and here
        assert r.random_effects[g]["Pig"] == pytest.approx(d["Group"], rel=1e-5)
    rml = bm.mixedlm("Weight ~ Time", dietox, groups="Pig").fit(reml=False)
    assert rml.llf == pytest.approx(SM["intercept_ml"]["llf"], rel=1e-8)


def test_summary_layout(slope):
    text = str(slope.fit().summary())
    lines = text.splitlines()
    assert "Mixed Linear Model Regression Results" in lines[0]
    for needle in ["Model:", "MixedLM", "Dependent Variable:", "Weight", "No. Observations:", "861",
                   "No. Groups:", "72", "Method:", "REML", "Scale:", "Log-Likelihood:", "-2217.0475",
                   "Min. group size:", "11", "Max. group size:", "12", "Mean group size:", "12.0",
                   "Coef.", "Std.Err.", "z", "P>|z|", "[0.025", "0.975]"]:
        assert needle in text, needle
    assert any(line.startswith("Pig Var") for line in lines)  # statsmodels' names for groups="Pig"
    assert any(line.startswith("Pig x Time Cov") for line in lines)
    assert any(line.startswith("Time Var") for line in lines)
    intercept = [line for line in lines if line.startswith("Intercept")][0].split()
    assert float(intercept[1]) == pytest.approx(15.739, abs=1e-3)
    assert float(intercept[2]) == pytest.approx(0.550, abs=1e-3)


def test_lme4_print(dietox):
    m = bm.lmer("Weight ~ Time + (Time | Pig)", dietox, REML=True)
    text = str(m)
    assert "REML criterion at convergence: 4434.0949" in text
    assert "Random effects:" in text and "Variance" in text and "Std.Dev." in text and "Corr" in text
    assert "(Intercept)" in text and "Residual" in text
    assert "Number of obs: 861, groups:  Pig, 72" in text
    assert "Fixed effects:" in text and "15.7387" in text
    ml = bm.lmer("Weight ~ Time + (Time | Pig)", dietox, REML=False)
    assert "logLik" in str(ml) and "deviance" in str(ml)


def test_results_attributes(dietox):
    m = bm.lmer("Weight ~ Time + (Time | Pig)", dietox)
    ref = LME4["dietox_slope_reml"]
    # Wald intervals and p-values from lme4's estimates and standard errors (not from this object)
    z = 1.959963984540054  # qnorm(0.975)
    for name, r_name in (("Intercept", "(Intercept)"), ("Time", "Time")):
        b, se = ref["fixef"][r_name], ref["se"][r_name]
        assert m.conf_int().loc[name, 0] == pytest.approx(b - z * se, rel=1e-5)
        assert m.conf_int(alpha=0.1).loc[name, 1] == pytest.approx(b + 1.6448536269514722 * se, rel=1e-5)
        assert m.tvalues[name] == pytest.approx(b / se, rel=1e-5)
        # tiny p-values: compare their logs (d log p / d t = -t amplifies the t's last digits)
        p_ref = math.erfc(abs(b / se) / math.sqrt(2))
        if p_ref == 0.0:  # below the smallest double (Time: t = 87)
            assert m.pvalues[name] == 0.0
        else:
            assert math.log(m.pvalues[name]) == pytest.approx(math.log(p_ref), rel=1e-5)
    flat = bm.lmer("Weight ~ Time + Feed + (1 | Pig)", dietox)  # a coefficient far from significant
    t = flat.tvalues["Feed"]
    assert flat.pvalues["Feed"] == pytest.approx(math.erfc(abs(t) / math.sqrt(2)), rel=1e-12)
    table = m.coef_table()
    assert list(table.columns) == ["Coef.", "Std.Err.", "z", "P>|z|", "[0.025", "0.975]"]
    assert m.aic == pytest.approx(ref["objective"] + 2 * 6, rel=1e-8)
    assert m.bic == pytest.approx(ref["objective"] + np.log(861) * 6, rel=1e-8)
    assert m.n_iter > 0 and m.converged
    assert list(m.cov_re.index) == ["Pig", "Time"]  # statsmodels' names (groups="Pig")
    assert list(m.random_effects["4601"].index) == ["Pig", "Time"]
    # BLUP covariances: symmetric positive definite, one per group
    cov = m.random_effects_cov["4601"]
    assert np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0)
    assert len(m.random_effects) == 72
    d = m.to_dict()
    json.dumps(d)
    assert d["objective"] == pytest.approx(ref["objective"], rel=1e-6)
    assert d["converged"] is True and d["nobs"] == 861
    # variance-component standard errors exist and are positive off the boundary
    assert np.all(m.bse_re.to_numpy() > 0)


def test_fitted_resid_predict(dietox):
    m = bm.lmer("Weight ~ Time + (Time | Pig)", dietox)
    fitted = m.fittedvalues
    b = m.ranef()
    manual = (m.fe_params["Intercept"] + m.fe_params["Time"] * dietox["Time"]
              + b.loc[dietox["Pig"], "(Intercept)"].to_numpy() + b.loc[dietox["Pig"], "Time"].to_numpy()
              * dietox["Time"])
    np.testing.assert_allclose(fitted, manual, rtol=1e-12)
    np.testing.assert_allclose(m.resid, dietox["Weight"] - fitted, rtol=1e-12)
    np.testing.assert_allclose(m.predict(dietox.head(5)), fitted[:5])
    pop = m.predict(dietox.head(5), include_random=False)
    np.testing.assert_allclose(pop, m.fe_params["Intercept"] + m.fe_params["Time"] * dietox["Time"].head(5))
    new = dietox.head(3).copy()
    new["Pig"] = "never-seen"
    np.testing.assert_allclose(m.predict(new), pop[:3])
    # predict needs no response column
    np.testing.assert_allclose(m.predict(dietox[["Pig", "Time"]].head(5)), fitted[:5])


@pytest.mark.parametrize("kind", ["int", "str", "category", "polars", "array"])
def test_group_key_types_give_same_fit(dietox, kind):
    base = bm.lmer("Weight ~ Time + (1 | Pig)", dietox)
    df = dietox.copy()
    if kind == "int":
        df["Pig"] = df["Pig"].astype(int)
    elif kind == "category":
        df["Pig"] = df["Pig"].astype("category")
    if kind == "polars":
        r = bm.lmer("Weight ~ Time + (1 | Pig)", pl.from_pandas(df))
    elif kind == "array":
        r = bm.mixedlm("Weight ~ Time", df, groups=df["Pig"].to_numpy()).fit()
    else:
        r = bm.lmer("Weight ~ Time + (1 | Pig)", df)
    assert r.objective == pytest.approx(base.objective, rel=1e-12)
    np.testing.assert_allclose(r.fe_params, base.fe_params, rtol=1e-10)


def test_fixed_effect_formulas(dietox):
    m = bm.lmer("Weight ~ Time + C(Cu) + Evit + np.log(Time) + Time:Evit + (1 | Pig)", dietox)
    names = list(m.fe_params.index)
    assert names[0] == "Intercept"
    assert any(n.startswith("C(Cu)") for n in names) and any("Evit" in n for n in names)
    assert "np.log(Time)" in names and any(":" in n for n in names)
    assert m.converged
    # statsmodels gives the same fixed effects for this model
    import statsmodels.formula.api as sm
    ref = sm.mixedlm("Weight ~ Time + C(Cu) + Evit + np.log(Time) + Time:Evit", dietox,
                     groups=dietox["Pig"]).fit()
    assert m.llf == pytest.approx(ref.llf, rel=1e-7)
    no_int = bm.lmer("Weight ~ 0 + Time + (1 | Pig)", dietox)
    assert list(no_int.fe_params.index) == ["Time"]
    no_int2 = bm.lmer("Weight ~ Time - 1 + (1 | Pig)", dietox)
    assert no_int2.objective == pytest.approx(no_int.objective, rel=1e-12)


def test_bar_spellings(dietox):
    a = bm.lmer("Weight ~ Time + (Time || Pig)", dietox)
    b = bm.lmer("Weight ~ Time + (1 | Pig) + (0 + Time | Pig)", dietox)
    assert a.objective == pytest.approx(b.objective, rel=1e-12)
    assert a.objective == pytest.approx(LME4["dietox_slope_indep_reml"]["objective"], rel=1e-8)
    c = bm.lmer("Weight ~ Time + (0 + Time | Pig)", dietox)
    assert list(c.cov_re.index) == ["Time"] and c.converged
    assert list(bm.lmer("Weight ~ Time + (1 | Pig)", dietox).cov_re.index) == ["Pig"]
    by_array = bm.mixedlm("Weight ~ Time", dietox, groups=dietox["Pig"]).fit()
    assert list(by_array.cov_re.index) == ["Group"]  # statsmodels' name when groups is an array


def test_two_grouping_factors(dietox):
    """Pigs within litters: two nested terms, each with its own levels and BLUPs."""
    m = bm.lmer("Weight ~ Time + (1 | Pig) + (1 | Litter)", dietox)
    assert m.converged and m.model.built.layout == "nested"
    assert m.ngroups == {"Pig": 72, "Litter": 21}
    assert set(m.ranef()) == {"Pig", "Litter"} and len(m.ranef("Litter")) == 21
    assert "Litter, 21" in str(m)


def test_start_params_and_method(slope):
    r = slope.fit()
    again = slope.fit(start_params=r.theta)
    assert again.objective == pytest.approx(r.objective, rel=1e-10)
    assert again.optimizer.n_evals <= r.optimizer.n_evals
    sp = bm.MixedLMParams.from_components(r.fe_params.to_numpy(), r.cov_re.to_numpy() / r.scale)
    assert slope.fit(start_params=sp).objective == pytest.approx(r.objective, rel=1e-10)
    with pytest.raises(ValueError, match="method"):
        slope.fit(method="magic")


def test_convergence_warning_when_maxiter_too_small(slope):
    with pytest.warns(bm.ConvergenceWarning, match="maxiter"):
        r = slope.fit(maxiter=1)
    assert not r.converged


def test_no_false_singular_warning_without_group_effects(dietox):
    """No group effect in truth, yet the REML optimum is interior (a small slope variance).

    lme4 1.1-31 (``lmer(y ~ Time + (Time | Pig))`` on these rows, written to CSV) reaches REML
    criterion 2425.33144950203 with theta (0.1432, -0.0245, 0.0136) and does not call it singular.
    """
    rng = np.random.default_rng(0)
    df = dietox[["Pig", "Time"]].copy()
    df["y"] = 3 + 0.5 * df["Time"] + rng.normal(size=len(df))
    with warnings.catch_warnings():
        warnings.simplefilter("error", bm.SingularFitWarning)
        m = bm.lmer("y ~ Time + (Time | Pig)", df)
    assert not m.is_singular and m.converged
    assert m.objective <= 2425.33144950203 * (1 + 1e-8)
    assert m.theta[2] == pytest.approx(0.0136, abs=2e-4)


def test_statistics_built_once_per_model(slope):
    built = slope.built
    slope.fit(reml=False)
    slope.fit()
    assert slope.built is built


def test_datasets():
    assert bm.datasets.dietox().shape == (861, 8)
    assert bm.datasets.sleepstudy().shape == (180, 3)
    assert bm.datasets.dyestuff().shape == (30, 2)
    assert isinstance(bm.datasets.dietox(), pd.DataFrame)


def test_variance_standard_errors_match_dense_hessian(dietox):
    """bse_re against a brute-force Hessian of the dense REML deviance in (Psi, sigma^2)."""
    m = bm.lmer("Weight ~ Time + (1 | Pig)", dietox)
    y = dietox["Weight"].to_numpy()
    X = np.column_stack([np.ones(len(y)), dietox["Time"].to_numpy()])
    codes = pd.factorize(dietox["Pig"])[0]
    ZZt = (codes[:, None] == codes[None, :]).astype(float)

    def reml_dev(psi, s2):
        V = psi * ZZt + s2 * np.eye(len(y))
        Vi = np.linalg.inv(V)
        F = X.T @ Vi @ X
        beta = np.linalg.solve(F, X.T @ Vi @ y)
        r = y - X @ beta
        return np.linalg.slogdet(V)[1] + np.linalg.slogdet(F)[1] + r @ Vi @ r

    x0 = np.array([m.cov_re.iloc[0, 0], m.scale])
    h = 1e-3 * x0
    H = np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            ei, ej = np.eye(2)[i] * h[i], np.eye(2)[j] * h[j]
            H[i, j] = (reml_dev(*(x0 + ei + ej)) - reml_dev(*(x0 + ei - ej))
                       - reml_dev(*(x0 - ei + ej)) + reml_dev(*(x0 - ei - ej))) / (4 * h[i] * h[j])
    se = np.sqrt(np.diag(2 * np.linalg.inv(H)))
    assert m.bse_re["Pig Var"] == pytest.approx(se[0], rel=1e-3)
    assert m.bse_scale == pytest.approx(se[1], rel=1e-3)


def test_statsmodels_array_form_and_from_formula():
    """statsmodels' ``MixedLM(endog, exog, groups, exog_re)``: no intercept added, names kept.

    lme4 (tests/data/lme4/statsmodels_lme.json, lme06_dep_reml):
    ``lmer(endog ~ 0 + exog_fe_0 + (0 + exog_re_0 + exog_re_1 | groups), lme06.csv)``.
    """
    ref = json.loads((DATA / "lme4" / "statsmodels_lme.json").read_text())["fits"]["lme06_dep_reml"]
    d = pd.read_csv(DATA / "statsmodels_lme" / "lme06.csv")
    res = bm.MixedLM(d.endog, d.filter(like="exog_fe"), d.groups, d.filter(like="exog_re")).fit()
    assert res.exog_names == ["exog_fe_0"] and res.exog_re_names == ["exog_re_0", "exog_re_1"]
    assert res.objective <= ref["objective"] * (1 + 1e-8)
    assert res.fe_params["exog_fe_0"] == pytest.approx(ref["fixef"]["exog_fe_0"], rel=1e-5)
    kw = bm.MixedLM(endog=d.endog.to_numpy(), exog=d.filter(like="exog_fe").to_numpy(), groups=d.groups.to_numpy(),
                    exog_re=d.filter(like="exog_re").to_numpy()).fit()
    assert kw.exog_names == ["x1"] and kw.exog_re_names == ["x_re1", "x_re2"]  # statsmodels' default names
    assert kw.objective == pytest.approx(res.objective, rel=1e-12)
    ff = bm.MixedLM.from_formula("endog ~ 0 + exog_fe_0", d, re_formula="0 + exog_re_0 + exog_re_1",
                                 groups="groups").fit()
    assert ff.objective == pytest.approx(res.objective, rel=1e-12)
    # a random intercept only (exog_re=None), and a constant exog column named as statsmodels does
    X = np.column_stack([np.ones(len(d)), d.exog_fe_0])
    ri = bm.MixedLM(d.endog.to_numpy(), X, d.groups.to_numpy()).fit()
    assert ri.exog_names == ["const", "x1"] and ri.converged


def test_free_holds_a_variance_at_its_start_value():
    """statsmodels' ``free``: a zero diagonal holds that variance at its start value (relative to scale).

    statsmodels 0.15 on these data (free = diag(1, 0), start cov_re = diag(1, 0.5)) reaches
    log-likelihood -430.13021 with the free variance at 0.00062 relative; the optimum is 0.
    """
    d = pd.read_csv(DATA / "statsmodels_lme" / "lme06.csv")
    md = bm.MixedLM(d.endog, d.filter(like="exog_fe"), d.groups, d.filter(like="exog_re"))
    free = bm.MixedLMParams.from_components(np.ones(1), np.diag([1.0, 0.0]))
    start = bm.MixedLMParams.from_components(np.zeros(1), np.diag([1.0, 0.5]))
    with pytest.warns(bm.SingularFitWarning):
        res = md.fit(free=free, start_params=start)
    rel = res.cov_re.to_numpy() / res.scale
    assert rel[1, 1] == pytest.approx(0.5, rel=1e-12) and rel[0, 1] == 0.0
    assert res.llf >= -430.13021243041317
    # holding a variance that covaries with another one is refused, not silently changed
    with pytest.raises(NotImplementedError, match="covaries"):
        md.fit(free=bm.MixedLMParams.from_components(np.ones(1), np.array([[1.0, 1.0], [1.0, 0.0]])),
               start_params=start)


# lme4's names of interaction columns: R orders an interaction's factors by where their variables
# first appear in the formula (terms()), formulaic by the term as written.  The expected names
# are what lme4 1.1-31 prints for these fits of Orthodont (checked with Rscript).
@pytest.mark.parametrize("fixed, names", [
    ("Sex + age:Sex", ["(Intercept)", "SexMale", "SexFemale:age", "SexMale:age"]),
    ("age:Sex + Sex", ["(Intercept)", "SexMale", "age:SexFemale", "age:SexMale"]),
    ("Sex*age + I(age^2):Sex", ["(Intercept)", "SexMale", "age", "SexMale:age", "SexFemale:I(age^2)",
                                "SexMale:I(age^2)"]),
])
def test_interaction_names_in_r_order(fixed, names):
    df = pd.read_csv(DATA / "datasets" / "Orthodont.csv", dtype={"Subject": str})
    res = bm.lmer(f"distance ~ {fixed} + (1 | Subject)", df)
    assert res.fixef.index.tolist() == names
    assert res.lme4_names() == names


def test_r_order_splits_only_top_level_colons():
    from bigmixed.names import r_order

    assert r_order("a:b[T.x]", "b + a:b") == "b[T.x]:a"
    assert r_order("poly(x, 2)[1]:f[T.B]", "f + poly(x, 2):f") == "f[T.B]:poly(x, 2)[1]"
    assert r_order("x", "x") == "x"
    assert r_order("u:v", "z") == "u:v"  # variables not found keep the written order


@pytest.mark.parametrize("kw", [dict(re_formula="~age"), dict(), dict(vc_formula={"age_f": "0 + C(age_f)"})],
                         ids=["slope", "intercept", "variance-component"])
def test_params_and_counts_as_statsmodels(kw):
    """statsmodels' packed ``params`` (fixed effects, then Psi / sigma^2 by name) and its counts."""
    import statsmodels.formula.api as smf

    df = pd.read_csv(DATA / "datasets" / "Orthodont.csv", dtype={"Subject": str}).assign(
        age_f=lambda d: np.where(d["age"] > 10, "late", "early"))  # two visits a level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = smf.mixedlm("distance ~ age", df, groups="Subject", **kw).fit()
    res = bm.mixedlm("distance ~ age", df, groups="Subject", **kw).fit()
    assert res.llf >= sm.llf - 1e-8 * abs(sm.llf)
    assert list(res.params.index) == list(sm.params.index)
    np.testing.assert_allclose(res.params.to_numpy(), sm.params.to_numpy(), rtol=1e-4, atol=1e-5)
    assert (res.k_fe, res.k_re, res.k_re2, res.k_vc, res.df_resid) == \
        (sm.k_fe, sm.k_re, sm.k_re2, sm.k_vc, int(sm.df_resid))
    np.testing.assert_allclose(res.vcomp, sm.vcomp, rtol=1e-3)


def test_fitted_values_are_nan_for_rows_the_fit_dropped():
    """A missing response or grouping key: the row is not in the fit, so no fitted value or residual
    (R's na.exclude); the other rows are unchanged."""
    sl = pd.read_csv(DATA / "datasets" / "sleepstudy.csv", dtype={"Subject": str})
    sl.loc[4, "Reaction"] = np.nan
    sl.loc[120, "Subject"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bm.DroppedRowsWarning)
        res = bm.lmer("Reaction ~ Days + (Days | Subject)", sl)
    fitted, resid = res.fittedvalues, res.resid
    assert res.nobs == 178 and np.isnan(fitted).sum() == 2 and np.isnan(resid).sum() == 2
    assert np.isnan(fitted[[4, 120]]).all() and np.isnan(resid[[4, 120]]).all()
    ok = np.isfinite(fitted)
    np.testing.assert_allclose(fitted[ok], res.predict(sl)[ok], rtol=1e-14)


def test_predict_matches_keys_across_types():
    """Keys fitted as strings match integer keys in new data (as R matches factor levels)."""
    res = bm.lmer("Reaction ~ Days + (Days | Subject)",
                  pd.read_csv(DATA / "datasets" / "sleepstudy.csv", dtype={"Subject": str}))
    as_str = res.predict(pd.DataFrame({"Days": [0, 1], "Subject": ["308", "309"]}))
    np.testing.assert_array_equal(res.predict(pd.DataFrame({"Days": [0, 1], "Subject": [308, 309]})), as_str)
    np.testing.assert_allclose(as_str, [253.66367, 212.85411], rtol=1e-6)  # lme4's predict()
    pop = res.predict(pd.DataFrame({"Days": [0, 1]}), include_random=False)
    np.testing.assert_allclose(pop, res.fe_params["Intercept"] + res.fe_params["Days"] * np.array([0, 1]))
