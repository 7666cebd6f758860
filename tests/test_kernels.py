"""Every numba kernel against a plain-numpy dense twin (V = Z Psi Z' + sigma^2 I).

Small random problems, groups of size 1 included, q from 1 to 4, shuffled rows.
"""

import numpy as np
import pytest

from bigmixed import _kernels
from bigmixed.objective import LocalBackend, Objective, ThetaMap
from bigmixed.stats import Statistics, aliased_columns

LOG2PI = np.log(2 * np.pi)


def make_problem(seed, G, q, p, max_size=5):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, G)
    sizes[0] = 1  # always a singleton group
    N = int(sizes.sum())
    codes = np.repeat(np.arange(G), sizes)
    X = np.column_stack([np.ones(N)] + [rng.normal(size=N) for _ in range(p - 1)])
    Z = np.column_stack([np.ones(N)] + [rng.normal(size=N) for _ in range(q - 1)])
    y = X @ rng.normal(size=p) + rng.normal(size=N) * 2 + rng.normal(size=G)[codes]
    perm = rng.permutation(N)
    return codes[perm], X[perm], Z[perm], y[perm]


def dense_parts(codes, X, Z, y, lam):
    """Dense twin: V/sigma^2 = I + Z_full (I kron Lambda Lambda') Z_full'."""
    N = len(y)
    G = codes.max() + 1
    q = Z.shape[1]
    Zf = np.zeros((N, G * q))
    for j in range(N):
        Zf[j, codes[j] * q:(codes[j] + 1) * q] = Z[j]
    Lb = np.kron(np.eye(G), lam)
    V = np.eye(N) + Zf @ Lb @ Lb.T @ Zf.T
    Vi = np.linalg.inv(V)
    F = X.T @ Vi @ X
    g = X.T @ Vi @ y
    h = y @ Vi @ y
    return np.linalg.slogdet(V)[1], F, g, h, Zf, Lb, Vi


def dense_deviance(codes, X, Z, y, lam, reml):
    ld, F, g, h, *_ = dense_parts(codes, X, Z, y, lam)
    beta = np.linalg.solve(F, g)
    r2 = h - g @ beta
    N, p = X.shape
    if reml:
        return ld + np.linalg.slogdet(F)[1] + (N - p) * (1 + LOG2PI + np.log(r2 / (N - p)))
    return ld + N * (1 + LOG2PI + np.log(r2 / N))


def build(codes, X, Z, y, nthreads=2):
    st = Statistics.empty(int(codes.max()) + 1, X.shape[1], Z.shape[1])
    st.add_rows(codes, X, Z, y, nthreads)
    return st


def random_theta(tmap, rng):
    th = rng.normal(size=tmap.size) * 0.7
    th[tmap.is_diag] = np.abs(th[tmap.is_diag]) + 0.1
    return th


# every p the kernels specialise (2, 3, 4) and one each side of them
@pytest.mark.parametrize("q", [1, 2, 3, 4])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("nthreads", [1, 3])
def test_accumulate_stats_matches_numpy(q, p, nthreads):
    codes, X, Z, y = make_problem(q + 10 * p, 23, q, p)
    st = build(codes, X, Z, y, nthreads)
    for g in range(23):
        m = codes == g
        np.testing.assert_allclose(st.A[g], Z[m].T @ Z[m], atol=1e-12)
        np.testing.assert_allclose(st.B[g], Z[m].T @ X[m], atol=1e-12)
        np.testing.assert_allclose(st.c[g], Z[m].T @ y[m], atol=1e-12)
        assert st.n[g] == m.sum()
    np.testing.assert_allclose(st.XtX, X.T @ X)
    assert st.N == len(y)


@pytest.mark.parametrize("G", [37, 9000])
def test_pass_skips_unknown_and_non_finite_rows_on_any_thread_count(G):
    """Each thread lists its own rows, a block of rows at a time (one thread reads them all
    directly): unknown codes and non-finite rows are skipped and counted once, and every level's
    sums are the same bits on 1, 2 or 3 threads (a level's rows are added in row order by one
    thread).  9,000 levels: about 27,000 rows, several of the pass's blocks."""
    from bigmixed._kernels._pass import OWN_BLOCK

    codes, X, Z, y = make_problem(5, G, 2, 3)
    assert G < 100 or codes.size > 2 * OWN_BLOCK
    codes = codes.copy()
    y = y.copy()
    codes[::11] = -1
    y[5::13] = np.nan
    y[5::13][codes[5::13] < 0] = 0.0  # keep the two kinds of skipped row apart
    n_skip = int(np.sum(codes < 0) + np.sum(np.isnan(y) & (codes >= 0)))
    ok = (codes >= 0) & np.isfinite(y)
    runs = []
    for nthreads in (1, 2, 3):
        st = Statistics.empty(G, 3, 2)
        assert st.add_rows(codes, X, Z, y, nthreads) == n_skip
        runs.append(st)
    for g in range(0, G, max(1, G // 40)):
        m = ok & (codes == g)
        np.testing.assert_allclose(runs[0].A[g], Z[m].T @ Z[m], atol=1e-12)
        np.testing.assert_allclose(runs[0].c[g], Z[m].T @ y[m], atol=1e-12)
    for st in runs[1:]:
        for f in ("A", "B", "c", "n"):
            assert np.array_equal(getattr(st, f), getattr(runs[0], f)), f
        # per-thread partial sums, added in thread order: round-off only (entries that cancel to ~0)
        np.testing.assert_allclose(st.XtX, runs[0].XtX, rtol=1e-12, atol=1e-12 * np.abs(runs[0].XtX).max())
        assert st.N == runs[0].N == int(ok.sum())


def test_statistics_of_chunks_add_up():
    codes, X, Z, y = make_problem(7, 40, 2, 3)
    whole = build(codes, X, Z, y)
    parts = Statistics.empty(40, 3, 2)
    for chunk in np.array_split(np.arange(len(y)), 7):
        parts.add_rows(codes[chunk], X[chunk], Z[chunk], y[chunk], 2)
    half1, half2 = Statistics.empty(40, 3, 2), Statistics.empty(40, 3, 2)
    half1.add_rows(codes[::2], X[::2], Z[::2], y[::2], 1)
    half2.add_rows(codes[1::2], X[1::2], Z[1::2], y[1::2], 2)
    merged = half1.merge(half2)
    for other in (parts, merged):
        for a, b in [(whole.A, other.A), (whole.B, other.B), (whole.c, other.c), (whole.XtX, other.XtX)]:
            np.testing.assert_allclose(a, b, atol=1e-12)
        assert other.N == whole.N and np.array_equal(other.n, whole.n)


def test_transform_z_is_exact():
    codes, X, Z, y = make_problem(8, 20, 2, 2)
    M = np.array([[1.0, -0.3], [0.0, 2.0]])
    direct = build(codes, X, Z @ M, y)
    moved = build(codes, X, Z, y).transform_z(M)
    np.testing.assert_allclose(moved.A, direct.A, atol=1e-12)
    np.testing.assert_allclose(moved.B, direct.B, atol=1e-12)
    np.testing.assert_allclose(moved.c, direct.c, atol=1e-12)


@pytest.mark.parametrize("q", [1, 2, 3, 4])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_pass1_matches_dense(q, p):
    codes, X, Z, y = make_problem(10 + q + 10 * p, 17, q, p)
    st = build(codes, X, Z, y)
    rng = np.random.default_rng(q)
    tmap = ThetaMap(q)
    lam = tmap.lam(random_theta(tmap, rng))
    ev = LocalBackend(st, 2).evaluate([lam], False)
    ld, SF, Sg, Sh = ev.logdet, ev.SF, ev.Sg, ev.Sh
    dld, F, g, h, *_ = dense_parts(codes, X, Z, y, lam)
    np.testing.assert_allclose(ld, dld, rtol=1e-10)
    np.testing.assert_allclose(st.XtX - SF, F, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(st.Xty - Sg, g, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(st.yty - Sh, h, rtol=1e-9)


@pytest.mark.parametrize("q", [1, 2, 3, 4])
@pytest.mark.parametrize("reml", [False, True])
def test_deviance_matches_dense(q, reml):
    codes, X, Z, y = make_problem(20 + q, 15, q, 3)
    st = build(codes, X, Z, y)
    tmap = ThetaMap(q)
    th = random_theta(tmap, np.random.default_rng(q + 5))
    obj = Objective(LocalBackend(st, 2), tmap, reml)
    d, _ = obj(th)
    np.testing.assert_allclose(d, dense_deviance(codes, X, Z, y, tmap.lam(th), reml), rtol=1e-11)


@pytest.mark.parametrize("q", [1, 2, 3, 4])
@pytest.mark.parametrize("reml", [False, True])
@pytest.mark.parametrize("blocks", ["full", "diag"])
def test_gradient_matches_central_differences(q, reml, blocks):
    codes, X, Z, y = make_problem(30 + q, 12, q, 2)
    st = build(codes, X, Z, y)
    tmap = ThetaMap(q, None if blocks == "full" else tuple((j,) for j in range(q)))
    th = random_theta(tmap, np.random.default_rng(q))
    obj = Objective(LocalBackend(st, 2), tmap, reml)
    _, grad = obj(th)
    eps = 1e-6
    fd = np.empty_like(th)
    for k in range(th.size):
        e = np.zeros_like(th)
        e[k] = eps
        fd[k] = (dense_deviance(codes, X, Z, y, tmap.lam(th + e), reml)
                 - dense_deviance(codes, X, Z, y, tmap.lam(th - e), reml)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-5)


def test_gradient_at_boundary_is_finite():
    codes, X, Z, y = make_problem(3, 10, 2, 2)
    st = build(codes, X, Z, y)
    tmap = ThetaMap(2)
    obj = Objective(LocalBackend(st, 2), tmap, True)
    d, g = obj(np.array([0.0, 0.0, 0.0]))
    assert np.isfinite(d) and np.all(np.isfinite(g))


@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_conditional_modes_match_dense(q):
    codes, X, Z, y = make_problem(40 + q, 11, q, 2)
    st = build(codes, X, Z, y)
    tmap = ThetaMap(q)
    lam = tmap.lam(random_theta(tmap, np.random.default_rng(q)))
    _, F, g, _, Zf, Lb, Vi = dense_parts(codes, X, Z, y, lam)
    beta = np.linalg.solve(F, g)
    bhat, K = _kernels.conditional_modes(st.A, st.B, st.c, lam, beta, 3)
    # dense BLUP (sigma^2 = 1 units): b = Lb Lb' Zf' V^-1 (y - X beta)
    b_dense = (Lb @ Lb.T @ Zf.T @ Vi @ (y - X @ beta)).reshape(-1, q)
    np.testing.assert_allclose(bhat, b_dense, rtol=1e-8, atol=1e-10)
    # conditional covariance (sigma^2 units, beta known): (Psi_i^-1 + A_i)^-1 = K_i
    Psi = Lb @ Lb.T
    for i in range(3):
        sl = slice(i * q, (i + 1) * q)
        Pi = Psi[sl, sl]
        Ai = Zf[:, sl].T @ Zf[:, sl]
        Kd = np.linalg.inv(np.linalg.inv(Pi) + Ai)
        np.testing.assert_allclose(K[i], Kd, rtol=1e-8, atol=1e-10)


def test_linear_predictor_matches_numpy():
    rng = np.random.default_rng(0)
    X, Z = rng.normal(size=(50, 3)), rng.normal(size=(50, 2))
    beta, b = rng.normal(size=3), rng.normal(size=(5, 2))
    codes = rng.integers(-1, 5, 50)
    out = _kernels.linear_predictor(X, Z, beta, b, codes, 2)
    expect = X @ beta + np.where(codes[:, None] >= 0, Z * b[np.maximum(codes, 0)], 0).sum(1)
    np.testing.assert_allclose(out, expect)


def _hash_find_numpy(h, hashes, order, start, shift):
    """Plain-numpy twin of ``hash_find``: vectorised rounds over the rows still searching."""
    out = np.full(h.shape[0], -1, dtype=np.int64)
    b = (h >> shift).astype(np.intp)
    pos, end = start[b].astype(np.intp), start[b + 1].astype(np.intp)
    rows = np.flatnonzero(pos < end)
    pos, end, h = pos[rows], end[rows], h[rows]
    while rows.size:
        cand = hashes[pos]
        hit = cand == h
        out[rows[hit]] = order[pos[hit]]
        more = (~hit) & (cand < h) & (pos + 1 < end)
        rows, pos, end, h = rows[more], pos[more] + 1, end[more], h[more]
    return out


@pytest.mark.parametrize("G, bits, nthreads", [(1, 1, 1), (50, 3, 2), (5000, 12, 2), (5000, 4, 3)])
def test_hash_find_matches_numpy(G, bits, nthreads):
    from bigmixed.keys import _HashTable

    rng = np.random.default_rng(G)
    keys = rng.integers(0, 2**64, G, dtype=np.uint64)
    order = np.argsort(keys).astype(np.int32)
    hashes = keys[order]
    shift = np.uint64(64 - bits)  # few bits: buckets of many hashes, scanned in order
    counts = np.bincount((hashes >> shift).astype(np.intp), minlength=1 << bits)
    start = np.concatenate(([0], np.cumsum(counts))).astype(np.int32)
    h = np.concatenate([keys[rng.integers(0, G, 300)], rng.integers(0, 2**64, 300, dtype=np.uint64)])
    rng.shuffle(h)
    got = _kernels.hash_find(h, hashes, order, start, shift, nthreads)
    np.testing.assert_array_equal(got, _hash_find_numpy(h, hashes, order, start, shift))
    hit = got >= 0
    np.testing.assert_array_equal(keys[got[hit]], h[hit])
    table = _HashTable(hashes, order, start, shift, 0, True)
    np.testing.assert_array_equal(table.find(h), got)


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_key_codes_match_numpy(nthreads):
    """dense_codes through a table, and without one for keys filling their range, against numpy."""
    rng = np.random.default_rng(nthreads)
    lo, span = -40, 300
    table = np.full(span, -1, dtype=np.int64)
    present = np.sort(rng.choice(span, 120, replace=False))
    table[present] = np.arange(present.size)
    v = rng.integers(lo - 20, lo + span + 20, 1001)
    inside = (v >= lo) & (v < lo + span)
    want = np.where(inside, table[np.clip(v - lo, 0, span - 1)], -1)
    np.testing.assert_array_equal(_kernels.dense_codes(v, lo, table, 120, nthreads), want)
    ident = _kernels.dense_codes(v, lo, np.zeros(0, np.int64), span, nthreads)
    np.testing.assert_array_equal(ident, np.where(inside, v - lo, -1))
    assert _kernels.dense_codes(v[:0], lo, table, 120, nthreads).shape == (0,)


@pytest.mark.parametrize("q, p", [(1, 1), (2, 3), (3, 2)])
def test_split_records_scatters_by_rank(q, p):
    from bigmixed._kernels import record_layout

    rng = np.random.default_rng(q * 10 + p)
    G = 37
    stride = record_layout(q, p)[0]
    R = rng.normal(size=G * stride)
    off = q * q + q * p + q
    R.reshape(G, stride)[:, off] = rng.integers(1, 9, G)  # n
    rank = rng.permutation(G).astype(np.int64)
    A, B, c, n = np.empty((G, q, q)), np.empty((G, q, p)), np.empty((G, q)), np.empty(G, np.int64)
    _kernels.split_records(R, stride, _kernels.record_maps(q, p), A, B, c, n, rank, 3)
    rec = R.reshape(G, stride)
    for g in range(G):  # the plain-numpy reading of record g, at level rank[g]
        d = rank[g]
        np.testing.assert_array_equal(A[d], rec[g, :q * q].reshape(q, q))
        np.testing.assert_array_equal(B[d], rec[g, q * q:q * q + q * p].reshape(q, p))
        np.testing.assert_array_equal(c[d], rec[g, q * q + q * p:off])
        assert n[d] == rec[g, off]
    A2, B2, c2, n2 = np.empty_like(A), np.empty_like(B), np.empty_like(c), np.empty_like(n)
    _kernels.split_records(R, stride, _kernels.record_maps(q, p), A2, B2, c2, n2, np.zeros(0, np.int64), 2)
    np.testing.assert_array_equal(A[rank], A2)
    np.testing.assert_array_equal(n[rank], n2)


def _first_seen_numpy(v, valid):
    """Plain-numpy twin of the one-pass coder: codes by first appearance among the valid rows."""
    vv = v[valid]
    uniq, first, inv = np.unique(vv, return_index=True, return_inverse=True)
    code_of_sorted = np.empty(uniq.size, np.int64)
    code_of_sorted[np.argsort(first, kind="stable")] = np.arange(uniq.size)
    out = np.full(v.shape[0], -1, np.int64)
    out[valid] = code_of_sorted[inv]
    return out, vv[np.sort(first)]


@pytest.mark.parametrize("distinct, capacity", [(1, 1), (40, 2), (3000, 16), (3000, 1 << 14)])
def test_code_first_seen_matches_numpy(distinct, capacity):
    import polars as pl

    from bigmixed.keys import KeyCoder

    rng = np.random.default_rng(distinct)
    pool = rng.integers(-(2**62), 2**62, distinct)
    coder = KeyCoder("g", pl.Int64, capacity=capacity)  # small: the table and arrays grow mid-chunk
    chunks = [rng.choice(pool, size) for size in (500, 1, 4000, 0, 2500)]
    got, want = [], []
    for ch in chunks:
        s = pl.Series("g", ch).scatter(list(range(0, len(ch), 7)), None) if len(ch) else pl.Series("g", ch)
        got.append(coder.codes(s.to_frame()))
        want.append(s.to_numpy() if not s.null_count() else s.fill_null(0).to_numpy())
    v = np.concatenate([w for w in want]).astype(np.int64)
    valid = np.concatenate([c >= 0 for c in got])
    expect, first_keys = _first_seen_numpy(v, valid)
    np.testing.assert_array_equal(np.concatenate(got), expect)
    assert coder.G == first_keys.size
    np.testing.assert_array_equal(coder.keys[:coder.G].view(np.int64), first_keys)
    index, rank, levels = coder.finish()
    np.testing.assert_array_equal(index.keys.to_numpy(), np.sort(first_keys))
    np.testing.assert_array_equal(index.keys.to_numpy()[rank], first_keys)
    from bigmixed.keys import group_levels

    np.testing.assert_array_equal(levels, group_levels(index.keys))


def test_aliased_columns_found_in_order():
    rng = np.random.default_rng(1)
    x = rng.normal(size=100)
    X = np.column_stack([np.ones(100), x, 2 * x + 1, rng.normal(size=100), x])
    assert aliased_columns(X.T @ X).tolist() == [2, 4]


@pytest.mark.parametrize("q", [1, 2, 3, 4])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("reml", [False, True])
def test_fused_pass_gradient_equals_two_pass(q, p, reml):
    """The one-pass gradient (tensor contraction) equals pass 2's (another kernel) on the lower
    triangle, where theta lives (the fused kernel leaves the rest 0)."""
    from bigmixed.objective import gradient_from_fused

    codes, X, Z, y = make_problem(50 + q + 10 * p, 14, q, p)
    st = build(codes, X, Z, y)
    tmap = ThetaMap(q)
    lam = tmap.lam(random_theta(tmap, np.random.default_rng(q + 9)))
    be = LocalBackend(st, 2)
    ev = be.evaluate([lam], True)
    beta = np.random.default_rng(1).normal(size=p)
    Finv = np.linalg.inv(st.XtX - ev.SF + np.eye(p))
    two = be.gradient([lam], beta, Finv, 0.7, reml)[0]
    one = gradient_from_fused(ev.GA[0], ev.S[0], beta, Finv, 0.7, reml)
    lower = np.tril(np.ones((q, q), dtype=bool))
    np.testing.assert_allclose(one[lower], two[lower], rtol=1e-9, atol=1e-9)
    assert np.all(one[~lower] == 0.0)


def _records_pass(codes, X, Z, y, w, stride, packed, nthreads):
    from bigmixed.stats import NO_ANCESTORS

    G = int(codes.max()) + 1
    R = np.zeros(G * stride)
    tr = (np.zeros(X.shape[1]), np.ones(X.shape[1]), np.zeros(Z.shape[1]), np.ones(Z.shape[1]), 0.0, 1.0)
    out = _kernels.accumulate_records(np.ascontiguousarray(codes), np.ascontiguousarray(X.T), np.ascontiguousarray(Z.T),
                                      np.ascontiguousarray(y), w, tr, R, stride, np.zeros(0, np.int8), -1, NO_ANCESTORS,
                                      True, nthreads, packed)
    return R, out


@pytest.mark.parametrize("q, p", [(1, 1), (1, 3), (2, 2), (2, 3), (3, 3), (2, 5)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_packed_records_equal_full_records_bit_for_bit(q, p, weighted, nthreads):
    """Z = X's first q columns: the packed record keeps each distinct product once, and split back
    into (A, B, c, n) it gives the full record's bits (the same products, summed in row order),
    also with weights, unknown codes and non-finite rows; the global sums are the same too."""
    codes, X, _, y = make_problem(3 * q + p, 41, 1, p)
    codes, y = codes.copy(), y.copy()
    codes[::17] = -1
    y[3::19] = np.inf
    Z = np.asfortranarray(X[:, :q])
    w = np.random.default_rng(q).uniform(0.2, 3.0, y.size) if weighted else np.zeros(0)
    G = int(codes.max()) + 1
    full = _kernels.record_layout(q, p)[0]
    stride, maps = _kernels.packed_layout(q, p)
    Rf, of = _records_pass(codes, X, Z, y, w, full, False, nthreads)
    Rp, op = _records_pass(codes, X, Z, y, w, stride, True, nthreads)
    arrays = []
    for R, st, mp in ((Rf, full, _kernels.record_maps(q, p)), (Rp, stride, maps)):
        A, B, c, n = np.zeros((G, q, q)), np.zeros((G, q, p)), np.zeros((G, q)), np.zeros(G, np.int64)
        _kernels.split_records(R, st, mp, A, B, c, n, np.zeros(0, np.int64), 2)
        arrays.append((A, B, c, n))
    for a, b, name in zip(arrays[0], arrays[1], "ABcn"):
        assert np.array_equal(a, b), name
    for a, b in zip(of, op):
        assert np.array_equal(a, b)
    ok = (codes >= 0) & np.isfinite(y)
    sw = np.sqrt(w) if weighted else np.ones(y.size)
    m = ok & (codes == 4)
    Xw, yw = X[m] * sw[m, None], y[m] * sw[m]
    np.testing.assert_allclose(arrays[1][1][4], Xw[:, :q].T @ Xw, atol=1e-12)
    np.testing.assert_allclose(arrays[1][2][4], Xw[:, :q].T @ yw, atol=1e-12)
    assert arrays[1][3][4] == m.sum()
    # packed only where it saves a cache line: y ~ x + x2 + (x | g) goes from 16 doubles to 8
    assert (stride, full) == (8, 16) if (q, p) == (2, 3) else stride <= full
