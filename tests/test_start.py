"""Moment starts of several terms (bigmixed.start): crossed terms take theta relative to the residual variance left."""

import numpy as np
import pytest

import bigmixed as bm
from bigmixed import start
from bigmixed.simulate_multi import simulate_crossed, simulate_nested


def _fit(formula, df):
    res = bm.lmer(formula, df)
    return res, res.objective_fn.backend, res.objective_fn.map


def test_the_crossed_start_is_nearer_the_optimum():
    """Users crossed with items: the OLS residual variance holds both terms' variances, so the start
    relative to it is too small in every entry; relative to what the terms leave, it is near."""
    res, be, tmap = _fit("y ~ x + (1|user) + (1|item)", simulate_crossed(3_000, 120, 30_000, seed=5))
    plain = start.moment_start(be.stats, tmap)
    crossed = be.moment_start(tmap)
    np.testing.assert_array_equal(crossed, start.moment_start(be.stats, tmap, crossed=True))
    assert np.all(crossed > plain)
    err = lambda th: np.max(np.abs(th - res.theta) / res.theta)  # noqa: E731
    assert err(crossed) < 0.5 * err(plain) and err(crossed) < 0.2  # (0.14 against 0.40 here)


def test_nested_terms_keep_the_ols_residual_variance():
    """An inner level's mean also carries its outer level's effect: no subtraction for nested terms."""
    df = simulate_nested(300, 20, seed=1)
    _, be, tmap = _fit("y ~ t + (1 | child) + (1 | school)", df)
    np.testing.assert_array_equal(be.moment_start(tmap), start.moment_start(be.stats, tmap))


def test_the_residual_variance_keeps_a_share_of_the_ols_one():
    """Terms whose moments claim more than the OLS residual variance (tiny, noisy levels) leave
    RESIDUAL_SHARE_MIN of it, so theta stays finite."""
    _, be, tmap = _fit("y ~ x + (1|user) + (1|item)", simulate_crossed(3_000, 120, 30_000, seed=5))
    beta, s2 = start.ols_moments(be.stats.XtX, be.stats.Xty, be.stats.yty, be.stats.N)
    psis = [(Sbb - s2 * SA) / n for Sbb, SA, n in (start.term_moments(t, beta) for t in be.stats.terms)]
    assert start._residual_variance([p * 100.0 for p in psis], be.stats, s2) == start.RESIDUAL_SHARE_MIN * s2
    left = start._residual_variance(psis, be.stats, s2)
    assert start.RESIDUAL_SHARE_MIN * s2 < left < s2


def _sparse_slopes(users=20_000, rows=60_000, slope_sd=0.3, seed=7):
    """Users with 3 rows on average (many with 1 or 2), a slope each in uncentred x ~ U(0, 10)."""
    df = simulate_crossed(users, 300, rows, seed=seed)
    slope = np.random.default_rng(seed + 1).normal(0.0, slope_sd, users)
    return df.with_columns(y=df["y"] + slope[df["user"].to_numpy() % users] * df["x"])


@pytest.mark.parametrize("formula", ["y ~ x + (x | user) + (1|item)", "y ~ x + (x || user) + (1|item)"])
def test_a_slope_term_with_few_rows_per_level_starts_near_the_optimum(formula):
    """Per-level least squares of an intercept and a slope over 2-3 close x are nearly singular:
    the moments of those effects (term_moments) swing negative and floor every entry at 0.01.
    The crossed start weighs levels by A_l Psi A_l instead (no level's A inverted)."""
    res, be, tmap = _fit(formula, _sparse_slopes())
    beta, s2 = start.ols_moments(be.stats.XtX, be.stats.Xty, be.stats.yty, be.stats.N)
    plain = start.theta_from_moments([start.term_moments(t, beta) for t in be.stats.terms], s2, tmap)
    crossed = be.moment_start(tmap)
    user = slice(0, tmap.terms[0].size)
    diag = tmap.terms[0].is_diag
    assert np.all(plain[user][diag] == 0.01)  # what the levels' own effects give
    opt = res.objective_fn.map.rectify(res.optimizer.theta)
    np.testing.assert_allclose(crossed[user][diag], opt[user][diag], rtol=0.15)
