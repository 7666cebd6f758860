"""The parametric bootstrap from the statistics: the simulated statistics have the exact law, refits are exact.

The checks do not use lme4: the y-dependent statistics a replicate draws (``Z'y``, ``X'y``, ``y'y``)
must have the mean and covariance of those of responses simulated row by row from the fitted model,
``y ~ N(X beta, sigma^2 (Z Lambda Lambda' Z' + I))``, computed here with dense matrices built from
the CSV (the plain-numpy twin); each replicate's Newton refit must land on the optimum a full
L-BFGS-B fit of the same statistics finds.
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
from bigmixed import bootstrap as boot
from bigmixed import inference
from bigmixed.objective import Objective
from bigmixed.optimize import minimize
from bigmixed.profile import boot_percentile, param_names

DATA = Path(__file__).parent / "data"
MULTI = json.loads((DATA / "lme4" / "multi.json").read_text())["fits"]


def _quiet_fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bm.lmer(*args, **kwargs)


@pytest.fixture(scope="module")
def weighted():
    d = pd.read_csv(DATA / "dietox_w.csv", dtype={"Pig": str, "Evit": str, "Cu": str})
    return d, _quiet_fit("Weight ~ Time + (Time | Pig)", d, weights="w")


@pytest.fixture(scope="module")
def pastes():
    rec = MULTI["pastes_nested_reml"]
    d = pd.read_csv(DATA / rec["data"], dtype={c: str for c in rec["factors"]})
    return d, _quiet_fit(rec["formula"], d)


def _draws(res, R: int, seed: int = 0) -> np.ndarray:
    """R draws of (c of every term, X'y, y'y) by the bootstrap's sampler."""
    st = res.objective_fn.backend.stats
    d = boot._design(res)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(R):
        cs, Xty, yty = boot._simulate(d, st, rng)
        out.append(np.concatenate([c.ravel() for c in cs] + [Xty, [yty]]))
    return np.array(out)


def _theory(Xs, Zs, beta, Psi_rel, s2):
    """Mean and covariance of (Z'y, X'y, y'y) for y ~ N(X beta, s2 (Z Psi_rel Z' + I))."""
    mu = Xs @ beta
    V = s2 * (Zs @ Psi_rel @ Zs.T + np.eye(len(mu)))
    M = np.hstack([Zs, Xs])
    mean = np.concatenate([M.T @ mu, [mu @ mu + np.trace(V)]])
    cov_lin = M.T @ V @ M
    cross = 2.0 * M.T @ V @ mu  # Cov(M'y, y'y)
    var_q = 2.0 * np.sum(V * V) + 4.0 * mu @ V @ mu
    k = M.shape[1]
    cov = np.zeros((k + 1, k + 1))
    cov[:k, :k] = cov_lin
    cov[:k, k] = cov[k, :k] = cross
    cov[k, k] = var_q
    return mean, cov


def _compare(draws, mean, cov):
    R = draws.shape[0]
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(draws.mean(axis=0) - mean) <= 5.0 * sd / np.sqrt(R) + 1e-9 * np.abs(mean))
    C = np.cov(draws, rowvar=False)
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / R)
    assert np.all(np.abs(C - cov) <= 6.0 * se + 1e-9 * np.abs(cov).max())


def test_simulated_statistics_have_the_exact_law_weighted(weighted):
    """One term, weighted rows (the statistics are of sqrt(w) times the transformed rows)."""
    d, m = weighted
    d = d.dropna(subset=["Weight", "Time", "w"])
    sol = m._sol
    T, S = m._T, m._S[0]
    X = np.c_[np.ones(len(d)), d.Time.to_numpy()]
    code = pd.factorize(d.Pig, sort=True)[0]
    G = code.max() + 1
    sw = np.sqrt(d.w.to_numpy())[:, None]
    Xs = sw * (X @ T)
    Zrow = sw * (X @ S)  # Z = [1, Time] per row, transformed
    Zs = np.zeros((len(d), 2 * G))
    for j in range(2):
        Zs[np.arange(len(d)), 2 * code + j] = Zrow[:, j]
    st = m.objective_fn.backend.stats
    np.testing.assert_allclose(Zs.T @ Zs, np.kron(np.eye(G), np.ones((2, 2))) * (Zs.T @ Zs), atol=1e-9)
    np.testing.assert_allclose(Xs.T @ Xs, st.XtX, rtol=1e-10)  # the twin is the statistics' design
    lam = sol.lams[0]
    Psi_rel = np.kron(np.eye(G), lam @ lam.T)
    mean, cov = _theory(Xs, Zs, sol.beta, Psi_rel, sol.sigma2)
    _compare(_draws(m, 6000), mean, cov)


def test_simulated_statistics_have_the_exact_law_nested(pastes):
    """Nested terms: every level's Z'y of both terms, drawn per outer group."""
    d, m = pastes
    sol = m._sol
    st = m.objective_fn.backend.stats
    cols = []
    for t in m.model.built.terms:
        codes = t.index.codes(__import__("polars").from_pandas(d))
        Z = np.zeros((len(d), t.n_levels))
        Z[np.arange(len(d)), codes] = 1.0
        cols.append(Z)
    Zs = np.hstack(cols)
    Xs = np.ones((len(d), 1)) @ m._T
    np.testing.assert_allclose(Zs.T @ Zs, np.diag(np.concatenate([t.A[:, 0, 0] for t in st.terms])) +
                               (Zs.T @ Zs - np.diag(np.diag(Zs.T @ Zs))), atol=1e-12)
    Psi_rel = np.diag(np.concatenate([np.full(t.n_groups, L[0, 0] ** 2) for t, L in zip(st.terms, sol.lams)]))
    mean, cov = _theory(Xs, Zs, sol.beta, Psi_rel, sol.sigma2)
    _compare(_draws(m, 6000, seed=1), mean, cov)


def test_replicates_are_exact_refits(weighted):
    """The Newton refit from the fit's theta lands on the optimum of a full L-BFGS-B fit of the same draw."""
    _, m = weighted
    b = m.bootstrap(6, seed=11, threads=1)
    st = m.objective_fn.backend.stats
    d = boot._design(m)
    streams = np.random.SeedSequence(11).spawn(6)
    se = b.std().to_numpy()
    for r in range(6):
        cs, Xty, yty = boot._simulate(d, st, np.random.Generator(np.random.PCG64(streams[r])))
        obj = Objective(boot._replicate_backend(m, st, cs, Xty, yty), m.tmap, m.reml, 0.0)
        theta = minimize(obj, m._sol.theta, warm_start=False, gtol=1e-9).theta
        sol = obj.solve(theta)
        full = boot_values(m, sol)
        assert np.all(np.abs(b.iloc[r].to_numpy() - full) <= 1e-3 * se), (r, b.iloc[r].to_numpy() - full)


def boot_values(m, sol):
    from bigmixed.profile import _params, sdcor_values

    vp = [p for p in _params(m) if p.kind != "beta"]
    beta = m.scaling.y_scale * m._T @ sol.beta
    beta[m.scaling.x_intercept] += m.scaling.y_shift
    return np.concatenate([sdcor_values(m, vp, sol.theta, sol.sigma2), beta])


def test_reproducible_whatever_the_threads(weighted):
    _, m = weighted
    a = m.bootstrap(24, seed=3, threads=1)
    b = m.bootstrap(24, seed=3, threads=2)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == param_names(m)
    assert a.attrs["n_failed"] == 0
    c = m.bootstrap(24, seed=4, threads=2)
    assert not np.allclose(a.to_numpy(), c.to_numpy())
    # estimates scatter around the fit's values
    t0 = pd.Series(a.attrs["t0"])
    z = (a.mean() - t0) / (a.std() / np.sqrt(len(a)))
    assert np.all(np.abs(z) < 6)


def test_nested_and_crossed(pastes, monkeypatch):
    _, m = pastes
    b = m.bootstrap(30, seed=1)
    assert b.attrs["n_failed"] == 0 and list(b.columns) == param_names(m)
    rec = MULTI["penicillin_reml"]
    pen = _quiet_fit(rec["formula"], pd.read_csv(DATA / rec["data"], dtype={c: str for c in rec["factors"]}))
    bp = pen.bootstrap(20, seed=2)
    assert bp.attrs["n_failed"] == 0 and np.all(bp["sigma"] > 0)
    monkeypatch.setattr(inference, "KR_MAX_DENSE", 10)
    with pytest.raises(NotImplementedError, match="random effects"):
        pen.bootstrap(2)
    with pytest.raises(ValueError, match="positive number"):
        m.bootstrap(0)


def test_boot_confint_and_percentiles(pastes):
    _, m = pastes
    ci = m.confint(method="boot", nsim=40, seed=5)
    assert list(ci.index) == param_names(m) and list(ci.columns) == ["2.5 %", "97.5 %"]
    assert np.all(ci.iloc[:, 0] <= ci.iloc[:, 1])
    t = np.arange(1.0, 100.0)  # boot's norm.inter: R = 99, (R + 1) * 0.025 = 2.5 -> between t[2] and t[3]
    z1, z2, z3 = special.ndtri(0.025), special.ndtri(2 / 100), special.ndtri(3 / 100)
    assert boot_percentile(t, [0.025])[0] == pytest.approx(2 + (z1 - z2) / (z3 - z2))
    assert boot_percentile(np.arange(1.0, 200.0), [0.025, 0.975]).tolist() == [5.0, 195.0]


def test_singular_fit_replicates_leave_zero():
    """Dyestuff2's REML optimum has sd 0 (theta = 0, stationary for any data): replicates are refitted
    with the optimiser's boundary probes, and those whose optimum is interior get a positive SD."""
    single = json.loads((DATA / "lme4" / "single.json").read_text())["fits"]
    rec = single["dyestuff2_reml"]
    m = _quiet_fit(rec["formula"], pd.read_csv(DATA / rec["data"], dtype={c: str for c in rec["factors"]}))
    b = m.bootstrap(40, seed=1)
    sd = b["sd_(Intercept)|Batch"]
    assert b.attrs["n_failed"] == 0 and (sd == 0).any() and (sd > 0.1).any()
