"""The optimiser's warm start: hash-sampled groups, exact sample sums, Newton polish.

For many groups :func:`bigmixed.optimize.minimize` fits a hash sample of the groups first
and polishes on all of them with Newton steps; these tests check each piece against a plain
numpy twin or a known answer, and that the route changes the cost, never the answer.
"""

import numpy as np
import polars as pl
import pytest

import bigmixed as bm
from bigmixed import _kernels
from bigmixed import optimize as opt
from bigmixed.keys import group_levels
from bigmixed.objective import LocalBackend, Objective, ThetaMap
from bigmixed.scaling import transform_statistics
from bigmixed.simulate import simulate, write_parquet
from bigmixed.scaling import Scaling
from bigmixed.stats import Statistics

FORMULA = "y ~ x + x2 + (x | subject)"


# ---------------------------------------------------------------------------
# sampling levels and the sample sums the statistics pass keeps
# ---------------------------------------------------------------------------


def test_group_levels_halve_per_level_and_depend_on_the_key_only():
    keys = pl.Series(np.arange(200_000))
    lv = group_levels(keys)
    for level in (1, 4, 8):
        share = np.mean(lv >= level)
        assert share == pytest.approx(2.0**-level, rel=0.1)
    # the same integer in any integer dtype, and any subset of the keys, has the same level
    small = pl.Series(np.arange(-40, 3000, dtype=np.int32))
    assert np.array_equal(group_levels(small), group_levels(small.cast(pl.Int64)))
    assert np.array_equal(group_levels(small.cast(pl.UInt32, strict=False).drop_nulls()), group_levels(small)[40:])
    assert np.array_equal(group_levels(keys.gather([5, 77, 123456])), lv[[5, 77, 123456]])
    strings = pl.Series([f"s{i:06d}" for i in range(5000)])
    assert np.array_equal(group_levels(strings), group_levels(strings.reverse()).copy()[::-1])
    assert group_levels(strings).dtype == np.int8


def _problem(G=3000, seed=3):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, G)
    codes = np.repeat(np.arange(G), sizes)
    N = codes.size
    X = np.column_stack([np.ones(N), rng.normal(size=N), rng.normal(size=N) * 3 + 1])
    Z = X[:, :2].copy()
    y = X @ [1.0, 2.0, -0.5] + rng.normal(size=G)[codes] + rng.normal(size=N)
    perm = rng.permutation(N)
    return codes[perm], np.asfortranarray(X[perm]), np.asfortranarray(Z[perm]), y[perm]


@pytest.mark.parametrize("nthreads", [1, 3])
def test_sample_sums_match_numpy(nthreads):
    codes, X, Z, y = _problem()
    G = int(codes.max()) + 1
    levels = group_levels(pl.Series(np.arange(G)))
    st = Statistics.empty(G, 3, 2, levels=levels)
    for chunk in np.array_split(np.arange(len(y)), 5):  # chunked, rows in any order
        st.add_rows(codes[chunk], X[chunk], Z[chunk], y[chunk], nthreads)
    for level in range(_kernels.LEVEL_MIN, _kernels.LEVEL_MAX + 1):
        rows = levels[codes] >= level
        XtX, Xty, yty, N = st.sample.at_least(level)
        np.testing.assert_allclose(XtX, X[rows].T @ X[rows], rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(Xty, X[rows].T @ y[rows], rtol=1e-12, atol=1e-9)
        assert yty == pytest.approx(float(y[rows] @ y[rows]), rel=1e-12)
        assert N == int(rows.sum())
    assert st.sample.at_least(_kernels.LEVEL_MIN)[3] > 0  # the sample is not empty
    with pytest.raises(ValueError, match="levels 4..12"):
        st.sample.at_least(_kernels.LEVEL_MIN - 1)  # not kept: no silent wrong sums
    # dropping columns keeps the sums of the others
    sub = st.subset_fixed(np.array([0, 2]))
    rows = levels[codes] >= 5
    np.testing.assert_allclose(sub.sample.at_least(5)[0], X[rows][:, [0, 2]].T @ X[rows][:, [0, 2]], rtol=1e-12)


def test_sample_sums_follow_the_row_transform_exactly():
    """transform_statistics maps the sample sums as it maps the global ones (same as transforming the rows)."""
    codes, X, Z, y = _problem(seed=4)
    G = int(codes.max()) + 1
    levels = group_levels(pl.Series(np.arange(G)))
    old = Scaling(np.array([0.0, 0.25, 1.0]), np.array([1.0, 2.0, 4.0]), np.array([0.0, 0.25]),
                  np.array([1.0, 2.0]), 0.5, 2.0, 0, 0)
    new = Scaling(np.array([0.0, 0.0, 1.0]), np.array([1.0, 1.0, 2.0]), np.array([0.0, 0.0]),
                  np.array([1.0, 1.0]), 1.0, 4.0, 0, 0)
    moved = Statistics.empty(G, 3, 2, levels=levels)
    moved.add_rows(codes, X, Z, y, 2, old)
    transform_statistics(moved, old, new)
    direct = Statistics.empty(G, 3, 2, levels=levels)
    direct.add_rows(codes, X, Z, y, 2, new)
    for level in (4, 6):
        for a, b in zip(moved.sample.at_least(level), direct.sample.at_least(level)):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-9)


# ---------------------------------------------------------------------------
# Newton steps
# ---------------------------------------------------------------------------


def _quadratic(center, A, f0=100.0):
    calls = []

    def fg(th):
        d = th - center
        calls.append(th.copy())
        return f0 + 0.5 * d @ A @ d, A @ d

    return fg, calls


def test_newton_converges_with_a_rough_hessian():
    A = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])
    center = np.array([1.0, 0.3, 0.5])
    fg, calls = _quadratic(center, A)
    ok, theta, it = opt._newton(fg, center + 0.05, 1.4 * A + 0.1 * np.eye(3), np.array([0.0, -np.inf, 0.0]), 20)
    assert ok
    np.testing.assert_allclose(theta, center, atol=1e-6)
    assert it == len(calls) - 1 and it <= 8  # BFGS updates repair the Hessian quickly


def test_newton_stops_below_ftol_once_a_step_confirmed_the_model():
    """A predicted gain below FTOL |f| ends the steps only after a full step gained what the model
    predicted (to a factor 2); an unconfirmed model takes the step (every one is a pass over the data)."""
    A, center, lower = np.eye(2), np.zeros(2), np.full(2, -np.inf)
    f0 = 1e6  # FTOL |f| = 1e-6
    # H = 1.5 A: the first step gains 4/3 of its prediction; the next would gain 5.6e-7 < 1e-6
    fg, calls = _quadratic(center, A, f0)
    d0 = np.full(2, np.sqrt(0.5e-5))
    ok, theta, it = opt._newton(fg, d0, 1.5 * A, lower, 20)
    assert ok and len(calls) == 2 and it == 1
    np.testing.assert_allclose(theta, d0 / 3, rtol=1e-12)
    # H = 0.6 A: the first step overshoots and gains a third of its prediction, so the next
    # step is taken although its predicted gain (4.4e-7) is below 1e-6; it lands on the optimum
    fg, calls = _quadratic(center, A, f0)
    ok, theta, it = opt._newton(fg, np.full(2, 1e-3), 0.6 * A, lower, 20)
    assert ok and len(calls) == 3 and it == 2
    np.testing.assert_allclose(theta, center, atol=1e-12)


def test_newton_gives_up_at_a_bound_and_when_it_cannot_descend():
    A = np.eye(2)
    fg, _ = _quadratic(np.array([-1.0, 0.5]), A)  # optimum outside theta_0 >= 0
    ok, theta, _ = opt._newton(fg, np.array([0.5, 0.5]), A, np.array([0.0, -np.inf]), 20)
    assert not ok and np.all(theta >= 0)

    def rising(th):  # the gradient points the wrong way: no step descends
        return float(th @ th), -2.0 * th

    ok, _, _ = opt._newton(rising, np.array([1.0, 1.0]), A, np.array([-np.inf, -np.inf]), 20)
    assert not ok


# ---------------------------------------------------------------------------
# the route on real fits
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_groups():
    """100k groups (the default threshold is 80k), 1-3 rows each."""
    return simulate(100_000, 2, seed=21)


def _objective(model):
    b = model.built
    tmap = ThetaMap(model.k_re)
    return Objective(LocalBackend(b.stats, 2), tmap, True), tmap


def test_warm_start_reaches_the_cold_start_optimum_in_fewer_evaluations(many_groups):
    res = bm.lmer(FORMULA, many_groups)
    assert res.converged and "Newton" in res.optimizer.message
    obj_w, tmap = _objective(res.model)
    warm = opt.minimize(obj_w, tmap.start())
    obj_c, _ = _objective(res.model)
    cold = opt.minimize(obj_c, tmap.start(), warm_start=False)
    assert "Newton" not in cold.message and cold.converged and warm.converged
    # the same optimum: never worse than L-BFGS-B's beyond round-off, theta to its precision
    assert warm.fun <= cold.fun + 1e-11 * abs(cold.fun)
    np.testing.assert_allclose(warm.theta, cold.theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.theta, bm.lmer(FORMULA, many_groups, start=res.theta).theta, rtol=1e-5)
    # passes over all groups (the subsample's are ~1/32 as costly, counted on its own objective)
    assert obj_w.n_evals <= 8 < obj_c.n_evals


def test_warm_start_near_a_boundary_reaches_the_cold_optimum():
    """No random slope in truth: the optimum is on the boundary (last diagonal 0) on both routes."""
    df = simulate(90_000, 2, seed=5, sd_slope=0.0, corr=0.0)
    model = bm.MixedLM.from_formula("y ~ x + x2", df, re_formula="~x", groups="subject")
    obj_w, tmap = _objective(model)
    warm = opt.minimize(obj_w, tmap.start())
    obj_c, _ = _objective(model)
    cold = opt.minimize(obj_c, tmap.start(), warm_start=False)
    assert warm.converged and cold.converged
    assert warm.theta[2] == 0.0 and cold.theta[2] == 0.0  # snapped to the boundary on both routes
    assert warm.fun <= cold.fun + 1e-11 * abs(cold.fun)
    np.testing.assert_allclose(warm.theta, cold.theta, rtol=1e-5, atol=1e-6)


def test_small_data_never_take_the_warm_route():
    res = bm.lmer(FORMULA, simulate(2000, 5, seed=2))
    assert "Newton" not in res.optimizer.message
    obj, tmap = _objective(res.model)
    assert obj.subsample(opt.WARM_GROUPS_MIN) is None


def test_streamed_shuffled_files_take_the_same_route(many_groups, tmp_path):
    """The sample is chosen by key, so files, row order and chunking do not change the fit."""
    mem = bm.lmer(FORMULA, many_groups)
    shuffled = many_groups.sample(fraction=1.0, shuffle=True, seed=3)
    files = write_parquet(shuffled, tmp_path / "parts", files=4)
    streamed = bm.lmer(FORMULA, [str(f) for f in files], chunk_rows=37_000)
    assert "Newton" in streamed.optimizer.message
    assert streamed.objective == pytest.approx(mem.objective, rel=1e-12)
    np.testing.assert_allclose(streamed.theta, mem.theta, rtol=1e-8)
    np.testing.assert_allclose(streamed.fe_params, mem.fe_params, rtol=1e-8)


@pytest.mark.parametrize(
    "formula, reml",
    [
        ("y ~ x + x2 + (1 | subject)", True),  # q = 1
        ("y ~ x + x2 + (x | subject)", False),  # ML
        ("y ~ x + x2 + (x || subject)", True),  # independent effects: Z uncentred, blocks
        ("y ~ x + x2 + x3 + x4 + x5 + x6 + x7 + (x | subject)", True),  # p = 8: two passes per evaluation
    ],
)
def test_warm_route_agrees_with_lbfgsb_for_other_models(many_groups, formula, reml, monkeypatch):
    rng = np.random.default_rng(8)
    df = many_groups.with_columns(*(pl.Series(f"x{k}", rng.normal(size=many_groups.height)) for k in range(3, 8)))
    warm = bm.lmer(formula, df, REML=reml)
    monkeypatch.setattr(opt, "WARM_GROUPS_MIN", 10**9)  # no sample can be that large: L-BFGS-B alone
    cold = bm.lmer(formula, df, REML=reml)
    assert "Newton" in warm.optimizer.message and "Newton" not in cold.optimizer.message
    assert warm.converged and cold.converged
    assert warm.objective <= cold.objective + 1e-11 * abs(cold.objective)
    np.testing.assert_allclose(warm.theta, cold.theta, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(warm.fe_params, cold.fe_params, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("q", [1, 2, 3])
def test_psd_pinv_matches_numpy(q):
    """The start's batched pseudo-inverse (closed forms for q <= 2) equals numpy's, singular blocks included."""
    from bigmixed.start import psd_pinv

    rng = np.random.default_rng(q)
    Zs = rng.normal(size=(60, 5, q))
    A = np.einsum("gra,grb->gab", Zs, Zs)
    A[:10] = np.einsum("gr,gs->grs", Zs[:10, 0], Zs[:10, 0]) if q > 1 else A[:10]  # rank one
    A[10:12] = 0.0  # a level with no information
    if q > 1:
        A[12] = np.outer(np.ones(q), np.ones(q)) * 1e-300  # tiny, rank one
    np.testing.assert_allclose(psd_pinv(A), np.linalg.pinv(A, hermitian=True), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("q", [1, 2])
def test_moment_sums_kernel_matches_numpy(q):
    """The start's moment sums in one kernel pass equal the numpy route (psd_pinv and einsums),
    with rank-one, empty and tiny blocks among the levels."""
    from bigmixed import _kernels
    from bigmixed.start import _RCOND, psd_pinv

    rng = np.random.default_rng(10 + q)
    G, p = 300, 3
    Zs = rng.normal(size=(G, 5, q))
    A = np.einsum("gra,grb->gab", Zs, Zs)
    if q > 1:
        A[:10] = np.einsum("gr,gs->grs", Zs[:10, 0], Zs[:10, 0])  # rank one
        A[12] = np.outer(np.ones(q), np.ones(q)) * 1e-300
    A[10:12] = 0.0
    B = rng.normal(size=(G, q, p))
    c = rng.normal(size=(G, q))
    n = rng.integers(1, 9, G)
    beta = rng.normal(size=p)
    Ainv = psd_pinv(A)
    b = np.einsum("gab,gb->ga", Ainv, c - np.einsum("gqp,p->gq", B, beta))
    w = n.astype(float)
    e = c - np.einsum("gqp,p->gq", B, beta)
    # q = 2: 287 full blocks, 10 rank-one, 2 empty, 1 tiny rank-one; q = 1: all but the 2 empty
    rank = 2 * (G - 13) + 10 + 1 if q > 1 else G - 2
    for nchunks in (1, 7):
        bb, ai, sn, eb, rk = _kernels.moment_sums(A, B, c, n, beta, _RCOND, nchunks)
        np.testing.assert_allclose(bb.sum(axis=0), np.einsum("g,ga,gb->ab", w, b, b), rtol=1e-12)
        np.testing.assert_allclose(ai.sum(axis=0), np.einsum("g,gab->ab", w, Ainv), rtol=1e-12)
        assert sn.sum() == w.sum()
        np.testing.assert_allclose(eb.sum(), np.sum(e * b), rtol=1e-12)
        assert rk.sum() == rank
