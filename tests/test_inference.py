"""Satterthwaite and Kenward-Roger denominator df, contrasts, anova: against lmerTest, pbkrtest and lme4.

References (R 4.2.2, lme4 1.1-31, lmerTest 3.1-3, pbkrtest 0.5.2):

* ``tests/data/lme4_inference.json`` - the project's shared reference (``ref_inference.R``), lme4's
  default fits::

      mt <- as_lmerModLmerTest(lmer(Weight ~ Time + (Time | Pig), d))   # and 4 more fits
      summary(mt)$coefficients[, "df"]                                  # Satterthwaite
      summary(mt, ddf = "Kenward-Roger")$coefficients[, "df"]
      anova(lmer(Weight ~ Time + (1 | Pig), d), lmer(Weight ~ Time + (Time | Pig), d))

* ``tests/data/lme4/{single,multi,traps,statsmodels_lme,weights}.json`` (``scripts/ref_*.R``): the same
  lmerTest/pbkrtest numbers for every fit of the batteries (n <= 5000, KR n <= 2000), computed at
  lme4's optimum refitted with tight tolerances; ``multi.json``'s ``anova_pastes``.

Claims: Satterthwaite df within 1e-4 relative (p within 1e-3), Kenward-Roger df within 1e-3, the
anova table within 1e-6.  lme4's *default* fits stop ~1e-6 short of the optimum, which moves
lmerTest's df by up to 2e-4: the shared reference is compared at lme4's own estimates (``varpar``,
lmerTest's formula evaluated there) to 1e-4, and at bigmixed's optimum to 5e-4.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bigmixed as bm
from bigmixed import bootstrap, inference

DATA = Path(__file__).parent / "data"
SHARED = json.loads((DATA / "lme4_inference.json").read_text())
FILES = ("single.json", "multi.json", "traps.json", "statsmodels_lme.json", "weights.json")
BATTERY = {f: json.loads((DATA / "lme4" / f).read_text()) for f in FILES}
CASES = [(f, k) for f in FILES for k, r in BATTERY[f]["fits"].items() if r.get("satterthwaite_df")]
SHARED_FITS = ["dietox_slope", "sleep_slope", "dietox_factors", "dietox_weights", "dietox_offset_ml"]
CSV = {"dietox.csv": "dietox.csv", "sleepstudy.csv": "sleepstudy.csv", "dietox_w.csv": "dietox_w.csv"}


@lru_cache(maxsize=None)
def shared_fit(key: str):
    r = SHARED[key]
    d = pd.read_csv(DATA / CSV[r["data"]], dtype={"Pig": str, "Subject": str, "Evit": str, "Cu": str})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bm.lmer(r["formula"], d, REML=r["REML"], weights=r.get("weights"))


@lru_cache(maxsize=None)
def battery_fit(f: str, key: str):
    r = BATTERY[f]["fits"][key]
    d = pd.read_csv(DATA / r["data"], dtype={c: str for c in r["factors"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bm.lmer(r["bigmixed_formula"], d, REML=r["REML"], weights=r.get("weights"))


def _vec(d: dict, names) -> np.ndarray:
    return np.array([d[n] for n in names], dtype=float)


# ------------------------------------------------------------------------- the shared reference
@pytest.mark.parametrize("key", SHARED_FITS)
def test_satterthwaite_df_shared_reference(key):
    r = SHARED[key]
    m = shared_fit(key)
    names = list(m.fixef.index)
    ref = _vec(r["satterthwaite_df"], names)
    at_lme4 = inference.satterthwaite_df(m, varpar=list(r["theta"].values()) + [r["sigma"]])
    np.testing.assert_allclose(at_lme4, ref, rtol=1e-4)
    np.testing.assert_allclose(m.coef_table(ddf="Satterthwaite")["df"].to_numpy(), ref, rtol=5e-4)


KR_SHARED = [k for k in SHARED_FITS if SHARED[k]["kenward_roger_df"] and not SHARED[k].get("weights")]


@pytest.mark.parametrize("key", KR_SHARED)
def test_kenward_roger_df_shared_reference(key):
    r = SHARED[key]
    m = shared_fit(key)
    tab = m.coef_table(ddf="Kenward-Roger")
    np.testing.assert_allclose(tab["df"].to_numpy(), _vec(r["kenward_roger_df"], tab.index), rtol=1e-3)


def test_kenward_roger_ml_fit_is_refused():
    with pytest.raises(ValueError, match="only available for REML"):
        shared_fit("dietox_offset_ml").coef_table(ddf="Kenward-Roger")


def _dense_kr(Sigma: np.ndarray, G: list, X: np.ndarray, Phi: np.ndarray) -> np.ndarray:
    """pbkrtest's vcovAdj + Lb_ddf written out with dense n x n matrices (the twin of the kernels)."""
    Si = np.linalg.inv(Sigma)
    ng = len(G)
    TT, HH = Si @ X, [g @ Si for g in G]
    OO = [h @ X for h in HH]
    P = [-(o.T @ TT) for o in OO]
    Q = {(a, b): OO[a].T @ Si @ OO[b] for a in range(ng) for b in range(a, ng)}
    K = np.array([[np.sum(HH[a].T * HH[b]) for b in range(ng)] for a in range(ng)])
    IE = np.zeros((ng, ng))
    for a in range(ng):
        for b in range(a, ng):
            IE[a, b] = IE[b, a] = K[a, b] - 2 * np.sum(Phi * Q[(a, b)]) + np.sum((Phi @ P[a]) * (P[b] @ Phi))
    W = 2 * np.linalg.inv(IE)
    out = []
    for L in np.eye(X.shape[1]):
        L = L[None, :]
        Th = L.T @ np.linalg.solve(L @ Phi @ L.T, L)
        u = [Th @ Phi @ p @ Phi for p in P]
        pairs = [(a, b, 1 if a == b else 2) for a in range(ng) for b in range(a, ng)]
        A1 = sum(e * W[a, b] * np.trace(u[a]) * np.trace(u[b]) for a, b, e in pairs)
        A2 = sum(e * W[a, b] * np.sum(u[a] * u[b].T) for a, b, e in pairs)
        out.append(inference._kr_ddf(A1, A2, 1)[0])
    return np.array(out)


def test_kenward_roger_with_weights_pbkrtest_ignores_them():
    """pbkrtest builds V with the residual G = I of the unweighted rows (its Phi is lme4's weighted one).

    A dense twin of that reproduces the reference (78.26, 77.37); bigmixed gives the Kenward-Roger df
    of the weighted model, V = Z Psi Z' + sigma^2 W^-1, equal to the same twin with G = W^-1.
    """
    r = SHARED["dietox_weights"]
    m = shared_fit("dietox_weights")
    d = pd.read_csv(DATA / "dietox_w.csv", dtype={"Pig": str}).dropna(subset=["Weight", "Time", "w"])
    X = np.c_[np.ones(len(d)), d.Time.to_numpy()]
    code = pd.factorize(d.Pig, sort=True)[0]
    Zi = np.zeros((len(d), code.max() + 1))
    Zi[np.arange(len(d)), code] = 1.0
    Zs = Zi * d.Time.to_numpy()[:, None]
    Psi, s2, Phi = m.cov_re.to_numpy(), m.scale, m.cov_params().to_numpy()
    Gre = [Zi @ Zi.T, Zi @ Zs.T + Zs @ Zi.T, Zs @ Zs.T]
    gam = [Psi[0, 0], Psi[1, 0], Psi[1, 1]]

    def twin(resid_diag):
        G = Gre + [np.diag(resid_diag)]
        return _dense_kr(sum(g * G[i] for i, g in enumerate(gam)) + s2 * G[3], G, X, Phi)

    np.testing.assert_allclose(twin(np.ones(len(d))), list(r["kenward_roger_df"].values()), rtol=1e-3)
    np.testing.assert_allclose(inference.kenward_roger(m)[0], twin(1.0 / d.w.to_numpy()), rtol=1e-8)


@pytest.mark.parametrize("name,key", [("anova_dietox", None), ("anova_pastes", "multi.json")])
def test_anova_matches_lme4(name, key):
    if key is None:
        ref = SHARED[name]
        d = pd.read_csv(DATA / "dietox.csv", dtype={"Pig": str})
    else:
        ref = BATTERY[key][name]
        rec = BATTERY[key]["fits"]["pastes_nested_reml"]
        d = pd.read_csv(DATA / rec["data"], dtype={c: str for c in rec["factors"]})
    fits = [bm.lmer(f, d) for f in ref["models"]]
    a = bm.anova(*fits[::-1])  # any order: sorted by npar, REML fits refitted with ML
    assert list(a.index) == ref["models"]
    for col, k in [("npar", "npar"), ("AIC", "AIC"), ("BIC", "BIC"), ("logLik", "logLik"), ("deviance", "deviance"),
                   ("Chisq", "Chisq"), ("Df", "Df"), ("Pr(>Chisq)", "p")]:
        want = np.array([np.nan if v in (None, "NA") else float(v) for v in ref[k]])
        np.testing.assert_allclose(a[col].to_numpy(dtype=float), want, rtol=1e-6, equal_nan=True, err_msg=col)


def test_anova_errors():
    m = shared_fit("dietox_slope")
    with pytest.raises(ValueError, match="two or more"):
        bm.anova(m)
    with pytest.raises(ValueError, match="different numbers of observations"):
        bm.anova(m, shared_fit("sleep_slope"))


# ------------------------------------------------------------------------- the batteries
def _lmertest_hessian_failed(r) -> bool:
    """lmerTest warned that its numerical Hessian has negative eigenvalues: its df are then not meaningful."""
    return any("negative eigenvalue" in m for m in (r.get("lmertest_messages") or []))


@pytest.mark.parametrize("case", CASES, ids=[k for _, k in CASES])
def test_satterthwaite_and_kenward_roger_battery(case):
    r = BATTERY[case[0]]["fits"][case[1]]
    m = battery_fit(*case)
    names = list(m.fixef.index)
    tab = m.coef_table(ddf="Satterthwaite")
    if _lmertest_hessian_failed(r):
        # bigmixed's Hessian (central differences of the analytic gradient) is positive definite there
        assert np.all(np.linalg.eigvalsh(inference._satterthwaite(m).hessian) > 0)
    else:
        np.testing.assert_allclose(tab["df"].to_numpy(), _vec(r["satterthwaite_df"], names), rtol=1e-4)
        np.testing.assert_allclose(tab["Pr(>|t|)"].to_numpy(), _vec(r["satterthwaite_p"], names), rtol=1e-3,
                                   atol=1e-300)
    if r.get("kenward_roger_df") and not r.get("weights"):
        kr = m.coef_table(ddf="Kenward-Roger")
        np.testing.assert_allclose(kr["df"].to_numpy(), _vec(r["kenward_roger_df"], names), rtol=1e-3)
        np.testing.assert_allclose(kr["Pr(>|t|)"].to_numpy(), _vec(r["kenward_roger_p"], names), rtol=1e-3,
                                   atol=1e-300)


# ------------------------------------------------------------------------- the mathematics
@pytest.mark.parametrize("case", [("single.json", "dietox_slope_reml"), ("multi.json", "pixel_dog_side"),
                                  ("multi.json", "penicillin_reml"), ("weights.json", "dietox_both")])
def test_cov_beta_jacobian_is_the_derivative(case):
    """The analytic d Cov(beta) / d(theta, sigma) (gradient tensors of the backend) against differences."""
    m = battery_fit(*case)
    sa = inference._satterthwaite(m)
    u0 = np.append(m.theta, m.sigma)
    obj = m.objective_fn

    def cov(u):
        ph = inference._phi(m, u)
        s = obj.solve(ph[:-1])
        return ph[-1] * np.linalg.inv(s.F)

    for j in range(u0.size):
        h = 1e-6 * max(abs(u0[j]), 1e-2)
        e = np.zeros(u0.size)
        e[j] = h
        fd = (cov(u0 + e) - cov(u0 - e)) / (2 * h)
        # atol: the differences' rounding error, eps |C| / h, is about 1e-8 of the largest entry
        np.testing.assert_allclose(sa.jac[j], fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())
    obj.solve(m._sol.theta)


def test_kr_blocks_nested_equal_one_dense_block():
    """Kenward-Roger per outer group (padded blocks) equals the same sums over one dense block."""
    m = battery_fit("multi.json", "pixel_dog_side")
    per_group = inference.kenward_roger(m)
    st = m.objective_fn.backend.stats
    dense = bootstrap._build_blocks(st, [np.zeros(t.n_groups, dtype=np.int64) for t in st.terms])
    assert dense.A.shape[0] == 1 and bootstrap.design_blocks(m).A.shape[0] == 10  # Dog: 10 outer levels
    m.__dict__.pop("_inference_cache")
    orig = bootstrap.design_blocks
    try:
        bootstrap.design_blocks = lambda res: dense
        one_block = inference.kenward_roger(m)
    finally:
        bootstrap.design_blocks = orig
        m.__dict__.pop("_inference_cache")
    np.testing.assert_allclose(one_block[0], per_group[0], rtol=1e-10)
    np.testing.assert_allclose(one_block[1], per_group[1], rtol=1e-10)


def test_contrasts():
    m = battery_fit("single.json", "dietox_factors")
    L = np.zeros((2, len(m.fixef)))
    L[0, 2] = L[1, 3] = 1.0
    one = m.contest(L[0])  # one row: F = t^2 with the same df
    t = m.coef_table(ddf="Satterthwaite").iloc[2]
    assert one["NumDF"].iloc[0] == 1
    assert one["DenDF"].iloc[0] == pytest.approx(t["df"], rel=1e-12)
    assert one["F value"].iloc[0] == pytest.approx(t["t value"] ** 2, rel=1e-10)
    rows = m.contest(L, joint=False)
    np.testing.assert_allclose(rows["df"].to_numpy(), m.coef_table(ddf="Satterthwaite")["df"].to_numpy()[2:4])
    F = m.contest(L)
    R = np.array([[1.0, 1.0], [1.0, -2.0]])  # the same hypothesis written with other rows
    F2 = m.contest(R @ L)
    for col in ("F value", "DenDF", "Pr(>F)"):
        assert F2[col].iloc[0] == pytest.approx(F[col].iloc[0], rel=1e-8)
    kr = m.contest(L, ddf="Kenward-Roger")
    assert kr["NumDF"].iloc[0] == 2 and 60 < kr["DenDF"].iloc[0] < 70
    k1 = m.contest(L[0], ddf="Kenward-Roger")  # one row: pbkrtest's F = t^2 with the adjusted SE
    tk = m.coef_table(ddf="Kenward-Roger").iloc[2]
    assert k1["DenDF"].iloc[0] == pytest.approx(tk["df"], rel=1e-10)
    assert k1["F value"].iloc[0] == pytest.approx(tk["t value"] ** 2, rel=1e-6)
    shifted = m.contest(L, rhs=L @ m.fixef.to_numpy())  # the hypothesis the estimates satisfy
    assert shifted["F value"].iloc[0] == pytest.approx(0.0, abs=1e-12)


def test_errors_are_one_clear_message(monkeypatch):
    m = battery_fit("single.json", "dietox_factors")
    with pytest.raises(ValueError, match="unknown ddf method"):
        m.coef_table(ddf="Wald")
    with pytest.raises(ValueError, match="one column per fixed effect"):
        m.contest([1.0, 0.0])
    pen = battery_fit("multi.json", "penicillin_reml")
    monkeypatch.setattr(inference, "KR_MAX_DENSE", 10)
    pen.__dict__.pop("_inference_cache", None)
    with pytest.raises(NotImplementedError, match="30 random effects"):
        pen.coef_table(ddf="Kenward-Roger")
    assert np.all(pen.coef_table(ddf="Satterthwaite")["df"] > 0)  # any size


def test_summary_layout():
    m = shared_fit("dietox_slope")
    text = str(m.summary(ddf="Satterthwaite"))
    assert "t-tests use Satterthwaite's method" in text
    assert "Estimate Std. Error    df t value Pr(>|t|)" in text
    assert "71.04" in text and "< 2e-16 ***" in text
    assert "Kenward-Roger's method" in str(m.summary(ddf="Kenward-Roger"))
    assert "Coef." in str(m.summary())  # statsmodels' layout unchanged
    tab = m.coef_table(ddf="Satterthwaite")
    assert list(tab.columns) == ["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]
    assert list(tab.index) == ["(Intercept)", "Time"]
