"""The average-information matrix of crossed fits (bigmixed.information) and the Newton route that uses it."""

import warnings

import numpy as np
import pytest

import bigmixed as bm
from bigmixed import information, optimize
from bigmixed.crossed_backend import CrossedBackend
from bigmixed.simulate_multi import simulate_crossed
from bigmixed.terms import ThetaMap

SCALAR = "y ~ x + (1|user) + (1|item)"
SLOPE = "y ~ x + (x|user) + (1|item)"


@pytest.fixture(scope="module")
def crossed():
    """Users crossed with items, each user with a slope in x too (so SLOPE is not singular)."""
    df = simulate_crossed(3_000, 120, 30_000, seed=5)
    slope = np.random.default_rng(6).normal(0.0, 0.3, 3_000)
    return df.with_columns(y=df["y"] + slope[df["user"].to_numpy() % 3_000] * df["x"])


@pytest.fixture(scope="module", params=[SCALAR, SLOPE])
def fit(request, crossed):
    return bm.lmer(request.param, crossed)


def test_schur_columns_of_the_data_columns_are_the_evaluation_s(fit):
    """Given [y X]'s own per-level sums as the extra columns, schur_columns must return the
    evaluation's corrections for them (the same factor, the same algebra)."""
    obj = fit.objective_fn
    be = obj.backend
    lams = obj.map.lams(fit.optimizer.theta * 1.1)  # anywhere, not only at the optimum
    ev = be.evaluate(lams, False)
    ext = [np.concatenate([t.c[:, :, None], t.B], axis=2) for t in be.stats.terms]
    SWW, SWD = be.schur_columns(lams, ext)
    SFD = np.block([[np.array([[ev.Sh]]), ev.Sg[None, :]], [ev.Sg[:, None], ev.SF]])
    np.testing.assert_allclose(SWW, SFD, rtol=1e-10, atol=1e-10 * np.abs(SFD).max())
    np.testing.assert_allclose(SWD, SFD, rtol=1e-10, atol=1e-10 * np.abs(SFD).max())


def test_residual_sums_from_the_modes_equal_those_from_z_z(fit):
    """``Z_k'r = Lambda_k^-T u_k`` (the mixed-model equations) against ``Z_k'y - Z_k'X beta - sum_j
    Z_k'Z_j b_j`` from the statistics (pair blocks included), for scalar and slope terms."""
    obj, be = fit.objective_fn, fit.objective_fn.backend
    sol = obj.solve(fit.optimizer.theta)
    u = be.spherical_modes(sol.lams, sol.beta)
    b = [uk @ lam.T for uk, lam in zip(u, sol.lams)]
    sums = information._residual_sums(sol.lams, u)
    for k, t in enumerate(be.stats.terms):
        ref = t.c - np.einsum("gap,p->ga", t.B, sol.beta)
        for j in range(len(be.stats.terms)):
            ref = ref - information.zz_times(be.stats, k, j, b[j])
        np.testing.assert_allclose(sums[k], ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())


def test_a_variance_at_zero_has_no_information_in_its_entry_alone(fit):
    """A scalar term's theta at 0 (the Newton route holds it there): its row and column of the
    information are 0.  A correlated term's Lambda singular otherwise takes Z'r from the
    statistics.  Either way the information is the limit from theta -> 0."""
    obj = fit.objective_fn
    theta = fit.optimizer.theta.copy()
    k = 0 if fit.model.formula == SCALAR else 2  # (1|user)'s theta; (x|user)'s last diagonal
    theta[k] = 0.0
    H0 = obj.information(theta)
    assert np.all(H0[k] == 0.0) and np.all(H0[:, k] == 0.0)
    theta[k] = 1e-7
    near = obj.information(theta)
    rest = np.arange(theta.size) != k
    np.testing.assert_allclose(H0[np.ix_(rest, rest)], near[np.ix_(rest, rest)], rtol=1e-5)


def test_information_is_close_to_the_hessian_at_the_optimum(fit):
    """AI is the mean of the observed and expected information: at the optimum of a well
    identified model it is within a few % of the Hessian (a wrong factor or a missing profiling
    term would be off by far more)."""
    obj = fit.objective_fn
    theta = fit.optimizer.theta
    H = optimize.hessian(obj, theta)
    A = obj.information(theta)
    assert A.shape == H.shape
    assert np.all(np.linalg.eigvalsh(A) > 0)
    np.testing.assert_allclose(np.diag(A), np.diag(H), rtol=0.1)
    assert np.linalg.norm(A - H) <= 0.1 * np.linalg.norm(H)


def test_spherical_modes_are_the_conditional_modes(fit):
    """Lambda u by two solves equals the back-substitution kernels' modes (which also give covariances)."""
    obj = fit.objective_fn
    for theta in (fit.optimizer.theta, fit.optimizer.theta * 0.7 + 0.05):
        sol = obj.solve(theta)
        fast = obj.backend.spherical_modes(sol.lams, sol.beta)
        full = obj.backend.conditional_modes(sol.lams, sol.beta)
        for u, lam, (bh, _) in zip(fast, sol.lams, full):
            np.testing.assert_allclose(u @ lam.T, bh, rtol=1e-9, atol=1e-12 * np.abs(bh).max())


def test_information_is_only_for_crossed_backends(crossed):
    one = bm.lmer("y ~ x + (1|user)", crossed)
    assert not one.objective_fn.backend.information
    assert one.objective_fn.information(one.optimizer.theta) is None


@pytest.mark.parametrize("formula, reml", [(SCALAR, True), (SLOPE, True), (SCALAR, False)])
def test_newton_with_information_reaches_lbfgsb_s_optimum_in_fewer_evaluations(crossed, formula, reml, monkeypatch):
    ai = bm.lmer(formula, crossed, REML=reml)
    assert ai.converged and ai.optimizer.message.startswith("Newton steps with the average information")
    monkeypatch.setattr(CrossedBackend, "information", False)
    lb = bm.lmer(formula, crossed, REML=reml)
    assert lb.converged and not lb.optimizer.message.startswith("Newton")
    assert ai.optimizer.n_evals < lb.optimizer.n_evals
    # the same optimum: AI's is no worse, and theta agrees
    assert ai.objective <= lb.objective + 1e-10 * abs(lb.objective)
    np.testing.assert_allclose(ai.theta, lb.theta, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ai.fe_params, lb.fe_params, rtol=1e-6)


def test_a_failing_information_hands_over_to_lbfgsb(crossed, monkeypatch):
    """No information (None) at the start: the fit is L-BFGS-B's, converged as before."""
    monkeypatch.setattr(information, "average_information", lambda objective, theta: None)
    res = bm.lmer(SCALAR, crossed)
    assert res.converged and not res.optimizer.message.startswith("Newton")


def _held_fits(formula, df, monkeypatch):
    """The fit by the Newton route, then by L-BFGS-B alone: both singular; the Newton route's by it."""
    with pytest.warns(bm.SingularFitWarning):
        ai = bm.lmer(formula, df)
    monkeypatch.setattr(CrossedBackend, "information", False)
    with pytest.warns(bm.SingularFitWarning):
        lb = bm.lmer(formula, df)
    assert ai.converged and lb.converged
    assert ai.optimizer.message.startswith("Newton steps with the average information")
    return ai, lb


@pytest.mark.parametrize("seed", [1, 4])
def test_a_variance_at_zero_is_held_there(seed, monkeypatch):
    """Five items with no item effect: the optimum has theta_item = 0, where the information is
    singular in that entry.  A step through 0 from near it holds the entry at 0 while the
    other converges (no creeping towards 0, no hand-over to L-BFGS-B); the boundary probes
    confirm it.  The same boundary optimum as L-BFGS-B, in fewer evaluations."""
    df = simulate_crossed(3_000, 5, 20_000, seed=seed, sd_item=0.0, min_rows_per_item=1)
    ai, lb = _held_fits(SCALAR, df, monkeypatch)
    assert ai.theta[1] == 0.0 == lb.theta[1]
    assert ai.optimizer.n_evals < lb.optimizer.n_evals
    assert ai.objective == pytest.approx(lb.objective, rel=1e-12)


@pytest.mark.parametrize("formula, k", [("y ~ x + (x || user) + (1|item)", 1), ("y ~ x + (x | user) + (1|item)", 2)])
def test_a_slope_at_zero_is_held_there(formula, k, monkeypatch):
    """The data have no slope variance.  ``(x || user)``: the deviance is even in each entry, so the
    slope's theta is held at 0 like a scalar term's.  ``(x | user)``: the same for Lambda's last
    diagonal (alone in its column), a correlation of +-1, where Z'r comes from the statistics.
    L-BFGS-B's optimum, in fewer evaluations."""
    df = simulate_crossed(3_000, 60, 30_000, seed=3)
    ai, lb = _held_fits(formula, df, monkeypatch)
    assert ai.theta[k] == 0.0 == lb.theta[k]
    assert ai.optimizer.n_evals < lb.optimizer.n_evals
    assert ai.objective <= lb.objective + 1e-12 * abs(lb.objective)
    np.testing.assert_allclose(ai.theta, lb.theta, rtol=1e-5, atol=1e-7)


def test_even_entries_are_the_diagonals_alone_in_their_column():
    tmap = ThetaMap([1, 2, 2], [None, ((0,), (1,)), None], [(), (), ()], [None, None, None])
    # (1|g): its entry; (x||g): both diagonals; (x|g): Lambda's (0,0) shares its column with (1,0)
    np.testing.assert_array_equal(optimize._even_thetas(tmap), [True, True, True, False, False, True])


@pytest.mark.parametrize("formula", [SCALAR, "y ~ x + (x || user) + (1|item)", SLOPE])
@pytest.mark.parametrize("sd_item, seed", [(0.0, 0), (0.0, 2), (0.03, 0), (0.1, 1)])
def test_holding_at_zero_never_ends_above_lbfgsb(formula, sd_item, seed, monkeypatch):
    """Eight items with little or no item variance and users with 7-8 rows: optima at 0, or just off
    it (theta_item ~ 0.01, where a hold is wrong and the probes must release it), from moment starts
    that can be far off.  Whatever the route takes, it ends at L-BFGS-B's optimum or lower."""
    df = simulate_crossed(2_000, 8, 15_000, seed=seed, sd_item=sd_item, min_rows_per_item=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bm.SingularFitWarning)
        ai = bm.lmer(formula, df)
        monkeypatch.setattr(CrossedBackend, "information", False)
        lb = bm.lmer(formula, df)
    assert ai.converged and lb.converged
    assert ai.objective <= lb.objective + 1e-10 * abs(lb.objective)
    assert ai.is_singular == lb.is_singular
