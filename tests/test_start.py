"""Moment starts of several terms (bigmixed.start): crossed terms take theta relative to the residual variance left."""

import numpy as np

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
    moments = [start.term_moments(t, beta) for t in be.stats.terms]
    inflated = [(Sbb * 100.0, SA, n) for Sbb, SA, n in moments]
    assert start._residual_variance(inflated, be.stats, s2) == start.RESIDUAL_SHARE_MIN * s2
    left = start._residual_variance(moments, be.stats, s2)
    assert start.RESIDUAL_SHARE_MIN * s2 < left < s2
