"""The numba kernels of models with several random-effects terms against plain-numpy dense twins.

Nested terms (``NestedBackend``: the generic K-term kernel and the specialised two-term one) and
crossed terms (``CrossedBackend``: closed-form leading term, dense LAPACK rest) on small random
problems with shuffled rows and single-row levels:

* the statistics of the pass (per-term records, nested pair blocks, crossed pair lists) equal
  the sums over the transformed rows, and do not depend on chunking, files or thread count;
* logdet, X'V^-1X, X'V^-1y, y'V^-1y and the profiled REML/ML deviance equal the dense
  ``V = I + Z Lambda Lambda' Z'`` ones, also on the user's scale (the objective's offset);
* the analytic gradient (fused tensors and the two-pass contraction) equals central differences;
* the conditional modes and covariances equal ``Lambda M^-1 Lambda' Z'(y - X beta)`` and
  ``Lambda M^-1 Lambda'`` with ``M = Lambda' Z'Z Lambda + I``;
* the two-term nested kernel equals the generic one; evaluations are the same bits on 1 or 2
  threads.
"""

from __future__ import annotations

import functools
import warnings

import numba
import numpy as np
import pandas as pd
import pytest
from scipy.linalg import block_diag

import bigmixed
from bigmixed import _kernels
from bigmixed.backends import NestedBackend, make_backend
from bigmixed.crossed_backend import CrossedBackend
from bigmixed.data import open_source
from bigmixed.formula import spec_from_lmer
from bigmixed.objective import Objective
from bigmixed.pipeline import build_statistics, prepare
from bigmixed.reduce import Reducer
from bigmixed.scaling import Scaling, same_scaling
from bigmixed.terms import ThetaMap

LOG2PI = np.log(2 * np.pi)


# ----------------------------------------------------------------------------------- data
def nested_frame(seed: int, n_outer: int = 7, n_inner: int = 30) -> pd.DataFrame:
    """Children in schools: single-row children, a school with a single row, shuffled rows."""
    rng = np.random.default_rng(seed)
    school_of = np.concatenate([np.arange(n_outer), rng.integers(1, n_outer, n_inner - n_outer)])
    sizes = rng.integers(1, 8, n_inner)
    sizes[:4] = 1  # child 0 is the only child (and row) of school 0
    child = np.repeat(np.arange(n_inner), sizes)
    school = school_of[child]
    N = child.size
    x = rng.normal(5.0, 3.0, N)
    z2 = rng.normal(-2.0, 0.5, N)
    y = (10.0 + 0.5 * x - z2 + rng.normal(size=n_inner)[child] * 2 + rng.normal(size=n_inner)[child] * x * 0.3
         + rng.normal(size=n_outer)[school] * 3 + rng.normal(size=n_outer)[school] * x * 0.2 + rng.normal(size=N))
    df = pd.DataFrame({"child": [f"c{c:02d}" for c in child], "school": school, "x": x, "z2": z2, "y": y,
                       "w": rng.uniform(0.5, 2.0, N)})
    return df.iloc[rng.permutation(N)].reset_index(drop=True)


def nested3_frame(seed: int) -> pd.DataFrame:
    """Three nested levels a / b / c, labels of b and c repeated across their parents (lme4's a/b/c)."""
    rng = np.random.default_rng(seed)
    rows = []
    for a in range(5):
        for b in range(int(rng.integers(1, 4))):
            for c in range(int(rng.integers(1, 4))):
                rows += [(a, b, c)] * int(rng.integers(1, 5))
    rows = np.array(rows)
    N = rows.shape[0]
    ka = rows[:, 0]
    kb = ka * 10 + rows[:, 1]
    kc = kb * 10 + rows[:, 2]
    x = rng.normal(2.0, 1.5, N)

    def eff(keys, s):
        u, inv = np.unique(keys, return_inverse=True)
        return rng.normal(size=u.size)[inv] * s

    y = 3.0 - x + eff(ka, 2.0) + eff(kb, 1.0) + eff(kc, 0.7) + eff(kc, 0.3) * x + rng.normal(size=N)
    df = pd.DataFrame({"a": rows[:, 0], "b": rows[:, 1], "c": rows[:, 2], "x": x, "y": y,
                       "w": rng.uniform(0.5, 2.0, N)})
    return df.iloc[rng.permutation(N)].reset_index(drop=True)


def crossed_frame(seed: int, n_user: int, n_item: int, n_site: int, N: int) -> pd.DataFrame:
    """Users x items x sites at random, plus three single-row users and one single-row item."""
    rng = np.random.default_rng(seed)
    user = np.concatenate([rng.integers(0, n_user, N), n_user + np.arange(3), [0]])
    item = np.concatenate([rng.integers(0, n_item, N), rng.integers(0, n_item, 3), [n_item]])
    site = rng.integers(0, n_site, user.size)
    M = user.size
    x = rng.normal(-4.0, 2.5, M)
    z2 = rng.normal(1.0, 0.3, M)
    y = (1.0 + 2.0 * x + z2 + rng.normal(size=n_user + 3)[user] * 1.5 + rng.normal(size=n_item + 1)[item]
         + rng.normal(size=n_item + 1)[item] * x * 0.4 + rng.normal(size=n_site)[site] + rng.normal(size=M))
    df = pd.DataFrame({"user": [f"u{u:02d}" for u in user], "item": item, "site": site, "x": x, "z2": z2, "y": y,
                       "w": rng.uniform(0.5, 2.0, M)})
    return df.iloc[rng.permutation(M)].reset_index(drop=True)


# name -> (formula, frame maker, expected layout)
MODELS = {
    # two nested terms, (q_fine, q_coarse) = (1, 1): the specialised kernel
    "n11": ("y ~ x + z2 + (1 | child) + (1 | school)", lambda: nested_frame(1), "nested"),
    # (2, 2), coarse term written first (chain order != model order)
    "n22": ("y ~ x + z2 + (x | school) + (x | child)", lambda: nested_frame(2), "nested"),
    # (2, 2) with p + 1 = 3 columns (y ~ t): the kernel with the column count as a literal
    "n22t": ("y ~ x + (x | child) + (x | school)", lambda: nested_frame(2), "nested"),
    # (2, 1): generic kernel only
    "n21": ("y ~ x + z2 + (x | child) + (1 | school)", lambda: nested_frame(3), "nested"),
    # (1, 2): the school's slope is no column of the child term, so both terms read the rows
    "n12": ("y ~ x + z2 + (1 | child) + (x | school)", lambda: nested_frame(9), "nested"),
    # three nested levels
    "n3": ("y ~ x + (1 | a/b/c)", lambda: nested3_frame(4), "nested"),
    "n3q": ("y ~ x + (x | a) + (1 | a:b) + (x | a:b:c)", lambda: nested3_frame(5), "nested"),
    # crossed: lead (1 | user), rest (x | item)
    "c2": ("y ~ x + (1 | user) + (x | item)", lambda: crossed_frame(6, 25, 12, 4, 220), "crossed"),
    # crossed, three terms: lead (x | item), rest (1 | user) and (x | site) (mixed q, a rest-rest pair)
    "c3": ("y ~ x + z2 + (1 | user) + (x | item) + (x | site)", lambda: crossed_frame(7, 10, 20, 5, 260),
           "crossed"),
    # crossed, scalar terms only (the dense update's scalar path), a rest-rest pair
    "c1": ("y ~ x + (1 | user) + (1 | item) + (1 | site)", lambda: crossed_frame(8, 30, 12, 5, 240), "crossed"),
}
NESTED = ["n11", "n22", "n22t", "n21", "n12", "n3", "n3q"]
CROSSED = ["c2", "c3", "c1"]


@functools.lru_cache(maxsize=None)
def frame_of(name: str) -> pd.DataFrame:
    return MODELS[name][1]()


@functools.lru_cache(maxsize=None)
def built(name: str):
    formula, _, layout = MODELS[name]
    b = build_statistics(open_source(frame_of(name)), spec_from_lmer(formula))
    assert b.layout == layout
    return b


def tmap_of(b) -> ThetaMap:
    return ThetaMap([t.q for t in b.terms], [t.blocks for t in b.terms])


def random_theta(tmap: ThetaMap, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    th = rng.normal(size=tmap.size) * 0.5
    th[tmap.is_diag] = rng.uniform(0.3, 1.3, int(tmap.is_diag.sum()))
    return th


def close(actual, expected, rtol, what=""):
    """assert_allclose with atol = rtol * max |expected| (entries that cancel to ~0 are not relative)."""
    expected = np.asarray(expected, dtype=float)
    atol = rtol * max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


# ----------------------------------------------------------------------------- dense twin
def transform_rows(y, X, Z, scaling: Scaling, w=None):
    """The rows the statistics hold: (x - shift) * (1 / scale), times sqrt(w)."""
    Xt = (X - scaling.x_shift) * (1.0 / scaling.x_scale)
    Zt = (Z - scaling.z_shift) * (1.0 / scaling.z_scale)
    yt = (y - scaling.y_shift) * (1.0 / scaling.y_scale)
    if w is not None:
        s = np.sqrt(w)
        Xt, Zt, yt = Xt * s[:, None], Zt * s[:, None], yt * s
    return yt, Xt, Zt


class Dense:
    """The model of a build as dense matrices: y, X, Z = [Z_1 | Z_2 | ...] (one column per level x effect)."""

    def __init__(self, b, frame, scaled: bool = True) -> None:
        pl_frame = open_source(frame).frame
        y, X, Z = b.design.matrices(pl_frame)
        X = X[:, b.kept_fe]
        if scaled:
            y, X, Z = transform_rows(y, X, Z, b.scaling)
        self.y, self.X = np.asarray(y), np.asarray(X)
        self.codes = [t.index.codes(pl_frame) for t in b.terms]
        self.Zs = [np.asarray(Z[:, t.offset:t.offset + t.q]) for t in b.terms]
        self.nlev = [t.n_levels for t in b.terms]
        self.qs = [t.q for t in b.terms]
        N = self.y.size
        blocks = []
        for c, Zk, G in zip(self.codes, self.Zs, self.nlev):
            assert c.min() >= 0
            q = Zk.shape[1]
            F = np.zeros((N, G * q))
            for a in range(q):
                F[np.arange(N), c * q + a] = Zk[:, a]
            blocks.append(F)
        self.Zf = np.hstack(blocks)
        self.starts = np.concatenate(([0], np.cumsum([G * q for G, q in zip(self.nlev, self.qs)])))

    def big_lambda(self, lams) -> np.ndarray:
        return block_diag(*[np.kron(np.eye(G), L) for G, L in zip(self.nlev, lams)])

    def parts(self, lams):
        """logdet V, F = X'V^-1X, g = X'V^-1y, h = y'V^-1y, V^-1 and Lambda, M^-1."""
        Lb = self.big_lambda(lams)
        ZL = self.Zf @ Lb
        N = self.y.size
        V = np.eye(N) + ZL @ ZL.T
        Vi = np.linalg.inv(V)
        M = ZL.T @ ZL + np.eye(ZL.shape[1])
        return (np.linalg.slogdet(V)[1], self.X.T @ Vi @ self.X, self.X.T @ Vi @ self.y, self.y @ Vi @ self.y,
                Vi, Lb, np.linalg.inv(M))

    def beta(self, lams) -> np.ndarray:
        _, F, g, *_ = self.parts(lams)
        return np.linalg.solve(F, g)

    def deviance(self, lams, reml: bool) -> float:
        ld, F, g, h, *_ = self.parts(lams)
        beta = np.linalg.solve(F, g)
        r2 = h - g @ beta
        N, p = self.X.shape
        if reml:
            return ld + np.linalg.slogdet(F)[1] + (N - p) * (1 + LOG2PI + np.log(r2 / (N - p)))
        return ld + N * (1 + LOG2PI + np.log(r2 / N))

    def modes(self, lams, beta) -> list:
        """Per term ``(b (G, q), cov (G, q, q))``: b = Lambda M^-1 Lambda' Z'(y - X beta), cov = Lambda M^-1 Lambda'."""
        *_, Lb, Mi = self.parts(lams)
        C = Lb @ Mi @ Lb.T
        bvec = C @ (self.Zf.T @ (self.y - self.X @ beta))
        out = []
        for k, (G, q) in enumerate(zip(self.nlev, self.qs)):
            s = self.starts[k]
            bk = bvec[s:s + G * q].reshape(G, q)
            ck = np.array([C[s + i * q:s + (i + 1) * q, s + i * q:s + (i + 1) * q] for i in range(G)])
            out.append((bk, ck))
        return out


def numpy_stats(codes, X, Zs, y, nlev):
    """Per-term (A, B, c, n) and the pair blocks {(k, j): (kcodes, jcodes, vals)} summed over the rows."""
    terms = []
    for c, Zk, G in zip(codes, Zs, nlev):
        q = Zk.shape[1]
        A, B, cc, n = np.zeros((G, q, q)), np.zeros((G, q, X.shape[1])), np.zeros((G, q)), np.zeros(G, np.int64)
        for g in range(G):
            m = c == g
            A[g], B[g], cc[g], n[g] = Zk[m].T @ Zk[m], Zk[m].T @ X[m], Zk[m].T @ y[m], m.sum()
        terms.append((A, B, cc, n))
    pairs = {}
    for k in range(len(codes)):
        for j in range(len(codes)):
            if j == k:
                continue
            keys = np.unique(codes[k] * nlev[j] + codes[j])  # sorted by (code in k, code in j)
            kc, jc = keys // nlev[j], keys % nlev[j]
            vals = np.zeros((keys.size, Zs[j].shape[1], Zs[k].shape[1]))
            for i, (a, bb) in enumerate(zip(kc, jc)):
                m = (codes[k] == a) & (codes[j] == bb)
                vals[i] = Zs[j][m].T @ Zs[k][m]
            pairs[(k, j)] = (kc, jc, vals)
    return terms, pairs


def check_stats(st, expect_terms, expect_pairs, X, y, rtol=1e-12):
    K = len(expect_terms)
    for k, (t, (A, B, c, n)) in enumerate(zip(st.terms, expect_terms)):
        close(t.A, A, rtol, f"A of term {k}")
        close(t.B, B, rtol, f"B of term {k}")
        close(t.c, c, rtol, f"c of term {k}")
        assert np.array_equal(t.n, n), f"n of term {k}"
    assert len(st.pairs) == K * (K - 1) // 2
    assert len({frozenset((pr.k, pr.j)) for pr in st.pairs}) == len(st.pairs)
    for pr in st.pairs:
        kc, jc, vals = expect_pairs[(pr.k, pr.j)]
        assert np.array_equal(pr.kcodes, kc) and np.array_equal(pr.jcodes, jc), (pr.k, pr.j)
        assert pr.vals.shape == vals.shape  # (npairs, q_j, q_k): Z_j' Z_k
        close(pr.vals, vals, rtol, f"pair blocks ({pr.k}, {pr.j})")
    close(st.XtX, X.T @ X, rtol, "X'X")
    close(st.Xty, X.T @ y, rtol, "X'y")
    close(st.yty, y @ y, rtol, "y'y")
    assert st.N == y.size


# ------------------------------------------------------------------------ 1. the statistics
@pytest.mark.parametrize("name", ["n22", "n12", "n3", "n3q", "c2", "c3"])
def test_built_statistics_match_numpy(name):
    """build_statistics (canonical transform included) == sums over the rows under the build's scaling."""
    b = built(name)
    d = Dense(b, frame_of(name))
    terms, pairs = numpy_stats(d.codes, d.X, d.Zs, d.y, d.nlev)
    check_stats(b.stats, terms, pairs, d.X, d.y)
    if b.layout == "nested":  # one block per level of the finer term: its parent in the coarser one
        for pr in b.stats.pairs:
            assert pr.nested(b.stats.terms[pr.k].n_groups)


def _sum_records_numpy(Rf, sf, pslot, src, dst, psrc, pdst, Rj, sj):
    """The plain-numpy twin of ``_kernels.sum_records``."""
    F, J = Rf.reshape(-1, sf), Rj.reshape(-1, sj)
    parent = F[:, pslot].astype(np.int64) - 1
    live = parent >= 0
    np.add.at(J, (parent[live][:, None], dst[None, :]), F[live][:, src])
    conflicts = 0
    for e in range(psrc.size):
        seen: dict = {}
        for h, v in zip(parent[live], F[live, psrc[e]]):
            if seen.setdefault(h, v) != v:
                conflicts += 1
            elif J[h, pdst[e]] == 0.0:
                J[h, pdst[e]] = v
    return conflicts


def test_sum_records_matches_numpy():
    rng = np.random.default_rng(4)
    G, sf, Gj, sj = 200, 16, 9, 8
    Rf = rng.normal(size=G * sf)
    F = Rf.reshape(G, sf)
    F[:, 15] = rng.integers(0, Gj + 1, G)  # parent + 1 (0: a record without rows)
    F[:, 14] = 1.0 + F[:, 15] % 3  # the parent's own parent + 1: the same for every record of a parent
    args = (15, np.array([0, 3, 4, 7, 2]), np.array([0, 1, 2, 3, 5]), np.array([14]), np.array([7]))
    got, want = np.zeros(Gj * sj), np.zeros(Gj * sj)
    assert _kernels.sum_records(Rf, sf, *args, got, sj) == 0
    assert _sum_records_numpy(Rf, sf, *args, want, sj) == 0
    np.testing.assert_allclose(got, want, rtol=1e-13)
    F[np.flatnonzero(F[:, 15] == 2)[1], 14] += 1.0  # two records of one parent disagree on its parent
    got[:], want[:] = 0.0, 0.0
    assert _kernels.sum_records(Rf, sf, *args, got, sj) == 1 == _sum_records_numpy(Rf, sf, *args, want, sj)


@pytest.mark.parametrize("name", NESTED)
def test_terms_of_the_finest_columns_take_no_pass_of_their_own(name, monkeypatch):
    """Coarser terms whose columns are all the finest term's are summed from its records: one pass over
    the rows (the statistics are checked against numpy above); n12's school slope needs its own pass."""
    passes = []
    real = _kernels.accumulate_records

    def counted(*a):
        passes.append(a[0].shape[0])
        return real(*a)

    monkeypatch.setattr(_kernels, "accumulate_records", counted)
    b = build_statistics(open_source(frame_of(name)), spec_from_lmer(MODELS[name][0]))
    assert b.layout == "nested"
    assert len(passes) == (2 if name == "n12" else 1)


def test_terms_crossed_above_the_finest_are_read_again_as_crossed():
    """c lies in one b and one a, but b spans two levels of a: summing c's records into b finds it,
    and the statistics are those of the crossed layout."""
    rng = np.random.default_rng(12)
    pairs = [(a, b) for a in range(3) for b in range(4) if (a + b) % 3]  # b = 1 lies in a = 0 and a = 2
    cells = np.repeat(np.arange(len(pairs)), rng.integers(2, 5, len(pairs)))
    ab = np.array(pairs)[cells]
    N = cells.size
    x = rng.normal(size=N)
    frame = pd.DataFrame({"a": ab[:, 0], "b": ab[:, 1], "c": cells, "x": x,
                          "y": x + rng.normal(size=3)[ab[:, 0]] + rng.normal(size=4)[ab[:, 1]] + rng.normal(size=N)})
    b = build_statistics(open_source(frame), spec_from_lmer("y ~ x + (1 | a) + (1 | b) + (1 | c)"))
    assert b.layout == "crossed"
    d = Dense(b, frame)
    terms, pairs_ = numpy_stats(d.codes, d.X, d.Zs, d.y, d.nlev)
    check_stats(b.stats, terms, pairs_, d.X, d.y)


def _custom_scaling(design) -> Scaling:
    """A transform with non-power-of-two scales and shifts everywhere but the intercepts."""
    p, q = design.p, design.q
    rng = np.random.default_rng(11)
    xs, xsc = rng.normal(size=p), rng.uniform(0.3, 3.0, p)
    zs, zsc = rng.normal(size=q), rng.uniform(0.3, 3.0, q)
    xi = design.fe_names.index("Intercept")
    xs[xi], xsc[xi] = 0.0, 1.0
    for a, nm in enumerate(design.re_names):
        if nm == "Intercept":
            zs[a], zsc[a] = 0.0, 1.0
    return Scaling(xs, xsc, zs, zsc, 0.37, 1.7, xi, -1)


@pytest.mark.parametrize("custom", [True, False], ids=["custom-transform", "own-transform"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", ["n21", "n3q", "c2", "c3"])
def test_reducer_statistics_match_numpy(name, weighted, custom):
    """The pass's kernels (accumulate_records with ancestors, pair_products, merge_pairs, sum_records) under
    a transform of our choosing or the build's own, with precision weights, in uneven chunks.  Under the
    build's transform the coarser nested terms are summed from the finest term's records; under ours
    (another scale for each column but the intercepts) only those on intercepts are."""
    formula, _, layout = MODELS[name]
    frame = frame_of(name)
    src = open_source(frame)
    spec = spec_from_lmer(formula, weights="w" if weighted else None)
    plan = prepare(src, spec, layout=layout)
    assert plan.layout == layout
    if custom:
        plan.scaling = _custom_scaling(plan.design)
    sc = plan.scaling
    red = Reducer(plan, 2)
    # our transform keeps intercepts as they are, so n21's school intercept is still the child's column;
    # n3q's coarsest term (x | a) is not (another scale for x), and nothing below it may be summed then
    summed = layout == "nested" and not (custom and name == "n3q")
    assert len(red._passes) == (1 if summed else len(plan.terms))
    df = src.frame
    H = df.height
    cuts = [0, 1, H // 3, H // 3 + 1, 2 * H // 3, H]  # uneven chunks, two of one row
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        red.add(df.slice(lo, hi - lo), "data")
    st = red.stats
    y, X, Z = plan.design.matrices(df)
    w = df["w"].to_numpy() if weighted else None
    yt, Xt, Zt = transform_rows(y, X, Z, sc, w)
    codes = [t.index.codes(df) for t in plan.terms]
    Zs = [Zt[:, t.offset:t.offset + t.q] for t in plan.terms]
    terms, pairs = numpy_stats(codes, Xt, Zs, yt, [t.n_levels for t in plan.terms])
    check_stats(st, terms, pairs, Xt, yt)
    if weighted:
        np.testing.assert_allclose(st.sum_log_w, np.log(w).sum(), rtol=1e-12)


def _assert_same_stats(a, b, rtol=1e-12):
    for k, (s, t) in enumerate(zip(a.terms, b.terms)):
        close(s.A, t.A, rtol, f"A {k}")
        close(s.B, t.B, rtol, f"B {k}")
        close(s.c, t.c, rtol, f"c {k}")
        assert np.array_equal(s.n, t.n)
    assert [(p.k, p.j) for p in a.pairs] == [(p.k, p.j) for p in b.pairs]
    for p, r in zip(a.pairs, b.pairs):
        assert np.array_equal(p.kcodes, r.kcodes) and np.array_equal(p.jcodes, r.jcodes)
        close(p.vals, r.vals, rtol, f"pair ({p.k}, {p.j})")
    close(a.XtX, b.XtX, rtol)
    close(a.Xty, b.Xty, rtol)
    close(a.yty, b.yty, rtol)
    assert a.N == b.N


@pytest.mark.parametrize("name", ["n22", "n3", "c3"])
def test_chunks_and_files_give_the_same_statistics(name, tmp_path):
    formula, _, layout = MODELS[name]
    spec = spec_from_lmer(formula)
    frame = frame_of(name)
    whole = built(name)
    chunked = build_statistics(open_source(frame), spec, chunk_rows=17)
    # three files, in another row order
    perm = np.random.default_rng(0).permutation(len(frame))
    paths = []
    for i, part in enumerate(np.array_split(perm, 3)):
        paths.append(tmp_path / f"part{i}.parquet")
        frame.iloc[part].reset_index(drop=True).to_parquet(paths[-1])
    files = build_statistics(open_source([str(p) for p in paths]), spec, chunk_rows=50)
    for other in (chunked, files):
        assert other.layout == layout
        assert same_scaling(other.scaling, whole.scaling)
        for t, u in zip(other.terms, whole.terms):
            assert t.index.frame().equals(u.index.frame())
        _assert_same_stats(other.stats, whole.stats)


@pytest.mark.parametrize("name", ["n3q", "c3"])
def test_statistics_do_not_depend_on_threads(name):
    """Every level's rows are added in row order by one thread: per-level and pair statistics are the
    same bits on 1, 2 or 3 threads (the global sums are per-thread partial sums: equal to round-off)."""
    formula = MODELS[name][0]
    runs = [build_statistics(open_source(frame_of(name)), spec_from_lmer(formula), nthreads=n, chunk_rows=64).stats
            for n in (1, 2, 3)]
    for st in runs[1:]:
        for s, t in zip(st.terms, runs[0].terms):
            assert np.array_equal(s.A, t.A) and np.array_equal(s.B, t.B) and np.array_equal(s.c, t.c)
            assert np.array_equal(s.n, t.n)
        for p, r in zip(st.pairs, runs[0].pairs):
            assert np.array_equal(p.vals, r.vals) and np.array_equal(p.kcodes, r.kcodes)
        close(st.XtX, runs[0].XtX, 1e-14)


# ---------------------------------------------------------------------- 2. the deviance
@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of the two nested kernels (to know which one a backend ran)."""
    calls = {"nested2": 0, "nested": 0}
    real2, real = _kernels.nested2_evaluate, _kernels.nested_evaluate

    def n2(*a):
        calls["nested2"] += 1
        return real2(*a)

    def n(*a):
        calls["nested"] += 1
        return real(*a)

    monkeypatch.setattr(_kernels, "nested2_evaluate", n2)
    monkeypatch.setattr(_kernels, "nested_evaluate", n)
    return calls


def backend_of(name: str, generic: bool = False, nthreads: int = 2):
    b = built(name)
    be = make_backend(b.stats, b.layout, b.chain, [t.name for t in b.terms], nthreads)
    assert isinstance(be, NestedBackend if b.layout == "nested" else CrossedBackend)
    if generic:
        be.generic = True
    return be


# (model, generic kernel?) - the two-term (1,1) and (2,2) models through both nested kernels
NESTED_CASES = [("n11", False), ("n11", True), ("n22", False), ("n22", True), ("n22t", False), ("n21", False),
                ("n12", False), ("n3", False), ("n3q", False)]
ALL_CASES = NESTED_CASES + [(c, False) for c in CROSSED] + [("c1", True)]


def _expected_kernel(name, generic):
    b = built(name)
    if b.layout != "nested":
        return None
    qs = tuple(b.terms[k].q for k in b.chain)
    return "nested2" if (len(qs) == 2 and not generic and qs in _kernels.NESTED2_SIZES) else "nested"


@pytest.mark.parametrize("name,generic", ALL_CASES)
def test_evaluate_matches_dense(name, generic, kernel_calls):
    b = built(name)
    be = backend_of(name, generic)
    d = Dense(b, frame_of(name))
    tmap = tmap_of(b)
    for seed in (0, 1):
        lams = tmap.lams(random_theta(tmap, 100 + seed))
        ev = be.evaluate(lams, False)
        ld, F, g, h, *_ = d.parts(lams)
        np.testing.assert_allclose(ev.logdet, ld, rtol=1e-10)
        close(be.XtX - ev.SF, F, 1e-9, "X'V^-1X")
        close(be.Xty - ev.Sg, g, 1e-9, "X'V^-1y")
        np.testing.assert_allclose(be.yty - ev.Sh, h, rtol=1e-9)
    kern = _expected_kernel(name, generic)
    if kern is not None:
        assert kernel_calls[kern] > 0 and kernel_calls[{"nested": "nested2", "nested2": "nested"}[kern]] == 0
    if name in ("n11", "n22"):
        assert (kern == "nested2") == (not generic)


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("name,generic", ALL_CASES)
def test_deviance_matches_dense(name, generic, reml):
    b = built(name)
    d = Dense(b, frame_of(name))
    tmap = tmap_of(b)
    obj = Objective(backend_of(name, generic), tmap, reml)
    for seed in (2, 3):
        th = random_theta(tmap, 200 + seed)
        np.testing.assert_allclose(obj.solve(th).deviance, d.deviance(tmap.lams(th), reml), rtol=1e-9)


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("name", ["n22", "c3"])
def test_user_scale_deviance_matches_dense(name, reml):
    """A fit's reported deviance (internal deviance + offset) is the dense deviance of the raw rows at the
    user-scale Lambda_k = S_k Lambda~_k (Z~_k = Z_k S_k): the offset constant is right."""
    formula = MODELS[name][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bigmixed.lmer(formula, frame_of(name), REML=reml)
    b = res.model.built
    sol = res.objective_fn.solve(res.optimizer.theta)
    lams_user = [b.scaling.term(t.offset, t.q).z_matrix() @ L for t, L in zip(b.terms, sol.lams)]
    raw = Dense(b, frame_of(name), scaled=False)
    np.testing.assert_allclose(res.objective, raw.deviance(lams_user, reml), rtol=1e-9)
    assert not same_scaling(b.scaling, Scaling.identity(b.stats.p, b.design.q))  # the check is not vacuous


# ---------------------------------------------------------------------- 3. the gradient
def _central_differences(obj, th, eps=1e-5):
    fd = np.empty_like(th)
    for i in range(th.size):
        e = np.zeros_like(th)
        e[i] = eps
        fd[i] = (obj.solve(th + e).deviance - obj.solve(th - e).deviance) / (2 * eps)
    return fd


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("name,generic", ALL_CASES)
def test_gradient_matches_central_differences(name, generic, reml, fused):
    """Fused: the evaluation's per-term tensors contracted by the objective; not fused: the backend's
    second pass (``gradient``, what models with many fixed effects use)."""
    b = built(name)
    tmap = tmap_of(b)
    obj = Objective(backend_of(name, generic), tmap, reml)
    assert obj._fused  # p <= FUSED_MAX_P here
    obj._fused = fused
    th = random_theta(tmap, 300 + len(name))
    _, grad = obj(th)
    fd = _central_differences(obj, th)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-5 * np.abs(fd).max())


# ---------------------------------------------------------------------- 4. conditional modes
@pytest.mark.parametrize("name,generic", ALL_CASES)
def test_conditional_modes_match_dense(name, generic):
    b = built(name)
    d = Dense(b, frame_of(name))
    tmap = tmap_of(b)
    be = backend_of(name, generic)
    lams = tmap.lams(random_theta(tmap, 400))
    for beta in (d.beta(lams), np.random.default_rng(5).normal(size=be.p)):
        got = be.conditional_modes(lams, beta)
        want = d.modes(lams, beta)
        assert len(got) == len(want) == len(b.terms)
        for k, ((bh, bc), (eb, ec)) in enumerate(zip(got, want)):
            assert bh.shape == eb.shape and bc.shape == ec.shape, k
            close(bh, eb, 1e-8, f"modes of term {k}")
            close(bc, ec, 1e-8, f"conditional covariances of term {k}")


# ---------------------------------------------------------------------- 5. nested2 == generic
def assert_backends_agree(be1, be2, lams, K: int, tol: float) -> None:
    """Two backends of one model give the same sums, gradient pieces, contracted gradient (REML and
    ML, never all zero) and modes at ``lams``."""
    e1, e2 = be1.evaluate(lams, True), be2.evaluate(lams, True)
    np.testing.assert_allclose(e1.logdet, e2.logdet, rtol=tol)
    close(e1.SF, e2.SF, tol)
    close(e1.Sg, e2.Sg, tol)
    np.testing.assert_allclose(e1.Sh, e2.Sh, rtol=tol)
    for k in range(K):
        close(e1.GA[k], e2.GA[k], tol, f"GA {k}")
        close(e1.S[k], e2.S[k], tol, f"S {k}")
    rng = np.random.default_rng(6)
    beta = rng.normal(size=be1.p)
    R = rng.normal(size=(be1.p, be1.p))
    Finv = R @ R.T + np.eye(be1.p)
    for reml in (True, False):
        g1, g2 = be1.gradient(lams, beta, Finv, 0.8, reml), be2.gradient(lams, beta, Finv, 0.8, reml)
        for k in range(K):
            close(g1[k], g2[k], tol, f"gradient {k}")
            assert np.any(g1[k] != 0.0)
    m1, m2 = be1.conditional_modes(lams, beta), be2.conditional_modes(lams, beta)
    for k in range(K):
        close(m1[k][0], m2[k][0], tol, f"modes {k}")
        close(m1[k][1], m2[k][1], tol, f"mode covariances {k}")


@pytest.mark.parametrize("name", ["n11", "n22", "n22t"])
def test_two_term_kernel_equals_generic(name, kernel_calls, monkeypatch):
    from bigmixed._kernels import _nested2

    literal = {"n": 0}
    real = _nested2.nested2_22p3

    def p3(*a):
        literal["n"] += 1
        return real(*a)

    monkeypatch.setattr(_nested2, "nested2_22p3", p3)
    b = built(name)
    tmap = tmap_of(b)
    special, generic = backend_of(name), backend_of(name, generic=True)
    lams = tmap.lams(random_theta(tmap, 500))
    assert_backends_agree(special, generic, lams, len(b.terms), 1e-12)
    assert kernel_calls["nested2"] > 0 and kernel_calls["nested"] > 0
    # (2, 2) with p + 1 = 3 runs the column-literal kernel, the other models never do
    assert (literal["n"] > 0) == (name == "n22t")


# ---------------------------------------------------------------------- 6. determinism
@pytest.mark.parametrize("name,generic", [("n22", False), ("n22", True), ("n22t", False), ("n3q", False), ("c2", False),
                                          ("c3", False), ("c1", False)])
def test_same_bits_on_one_or_two_threads(name, generic):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here")
    b = built(name)
    tmap = tmap_of(b)
    th = random_theta(tmap, 600)
    before = numba.get_num_threads()
    out = []
    try:
        for n in (1, 2, 2, 1):
            numba.set_num_threads(n)
            runs = []
            for fused in (True, False):
                obj = Objective(backend_of(name, generic, nthreads=n), tmap, True)
                obj._fused = fused
                dev, grad = obj(th)
                runs.append((dev, grad))
            modes = backend_of(name, generic, nthreads=n).conditional_modes(tmap.lams(th), obj.solve(th).beta)
            out.append((runs, modes))
    finally:
        numba.set_num_threads(before)
    ref_runs, ref_modes = out[0]
    for runs, modes in out[1:]:
        for (d, g), (rd, rg) in zip(runs, ref_runs):
            assert np.array_equal(np.float64(d), np.float64(rd))
            assert np.array_equal(g, rg)
        for (bh, bc), (rbh, rbc) in zip(modes, ref_modes):
            assert np.array_equal(bh, rbh) and np.array_equal(bc, rbc)


def _dense_rest(be) -> np.ndarray:
    """A_R of a crossed backend as one dense matrix (both triangles), from the statistics."""
    st = be.stats
    AR = np.zeros((be.m, be.m))
    for k in be.rest:
        idx = be._rows_of(k, np.arange(st.terms[k].n_groups))
        AR[idx[:, :, None], idx[:, None, :]] = st.terms[k].A
    for pr in st.pairs:
        if be.lead not in (pr.k, pr.j):
            rk, rj = be._rows_of(pr.k, pr.kcodes), be._rows_of(pr.j, pr.jcodes)
            AR[rj[:, :, None], rk[:, None, :]] += pr.vals
            AR[rk[:, :, None], rj[:, None, :]] += np.swapaxes(pr.vals, 1, 2)
    return AR


@pytest.mark.parametrize("name", CROSSED)
def test_rest_fill_matches_numpy(name):
    """The sparse rest blocks give Lambda_R' A_R Lambda_R + I (lower triangle) and Lambda_R' D_R, the
    buffer's old contents notwithstanding."""
    be = backend_of(name)
    tmap = tmap_of(built(name))
    lams = tmap.lams(random_theta(tmap, 700))
    lamR = be._lamR(lams)
    Lam = np.zeros((be.m, be.m))
    for bi in range(be.bstart.size):
        r, q = be.bstart[bi], be.bq[bi]
        Lam[r:r + q, r:r + q] = lamR[be.bterm[bi]][:q, :q]
    want = Lam.T @ _dense_rest(be) @ Lam + np.eye(be.m)
    Om = np.random.default_rng(1).normal(size=(be.m, be.m))
    OmD = np.full((be.m, be.p + 1), np.nan)
    _kernels.rest_fill(Om, OmD, be.arptr, be.arcol, be.arval, be.DR, be.bstart, be.bq, be.bterm, lamR, be.border,
                       be.rchunks)
    np.testing.assert_allclose(np.tril(Om), np.tril(want), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(OmD, Lam.T @ be.DR, rtol=1e-13, atol=1e-13)


def test_scalar_crossed_kernel_equals_block_kernel(monkeypatch):
    """Every term scalar: the scalar back-substitution (Sigma_R's lower triangle, pairs of pairs
    once) gives the block kernel's gradient pieces and modes to round-off."""
    calls = {"scalar": 0, "block": 0}
    real1, real = _kernels.crossed_backward1, _kernels.crossed_backward

    def count(kind, fn):
        def wrapped(*a):
            calls[kind] += 1
            return fn(*a)
        return wrapped

    monkeypatch.setattr(_kernels, "crossed_backward1", count("scalar", real1))
    monkeypatch.setattr(_kernels, "crossed_backward", count("block", real))
    b = built("c1")
    tmap = tmap_of(b)
    fast, block = backend_of("c1"), backend_of("c1", generic=True)
    assert fast.scalar
    lams = tmap.lams(random_theta(tmap, 800))
    assert_backends_agree(fast, block, lams, len(b.terms), 1e-12)
    assert calls == {"scalar": 4, "block": 4}


@pytest.mark.parametrize("name", CROSSED)
def test_dense_positions_follow_pair_counts(name):
    """Each rest term's levels take consecutive dense positions, the most shared level first."""
    be = backend_of(name)
    st = be.stats
    for k in be.rest:
        counts = np.zeros(st.terms[k].n_groups)
        for pr in st.pairs:
            if be.lead in (pr.k, pr.j):
                codes = pr.jcodes if pr.k == be.lead else pr.kcodes
                if k == (pr.j if pr.k == be.lead else pr.k):
                    counts += np.bincount(codes, minlength=counts.size)
        pos = be.pos[k]
        q = be.qs[k]
        assert np.array_equal(np.sort(pos), pos.min() + q * np.arange(pos.size))
        assert np.all(np.diff(counts[np.argsort(pos)]) <= 0)


def test_layout_kernels_match_numpy():
    """The nested layout's counting sort and block scatter against numpy's stable argsort and
    fancy-index assignment."""
    from bigmixed import _kernels

    rng = np.random.default_rng(4)
    key = rng.integers(0, 37, 5000)
    np.testing.assert_array_equal(_kernels.bucket_order(key, 37), np.argsort(key, kind="stable"))
    assert _kernels.bucket_order(key[:0], 37).shape == (0,)
    n, Q, W = 400, 3, 4
    rows = rng.permutation(n)[:250]
    for qa, qb, width, base in [(2, 2, Q, 0), (3, 1, W, 0), (2, 3, W, 1), (1, 3, Q, Q * Q)]:
        dst = rng.normal(size=(n, 2 * Q * W))
        want = dst.copy()
        src = rng.normal(size=(rows.size, qa, qb))
        for a in range(qa):
            want[rows, base + a * width: base + a * width + qb] = src[:, a, :]
        _kernels.scatter_blocks(dst, rows, src.reshape(rows.size, -1), qa, qb, width, base)
        np.testing.assert_array_equal(dst, want)


@pytest.mark.parametrize("nk, nj, m", [(1, 1, 50), (3, 1_000, 5_000), (2_000, 7, 20_000), (1, 5, 0), (500, 500, 1)])
def test_pair_order_is_a_stable_sort_of_the_keys(nk, nj, m):
    """The counting sort behind pair_products and merge_pairs against numpy's stable sort of
    ``ck * nj + cj`` (many equal keys: their order must stay the rows' order)."""
    rng = np.random.default_rng(nk + nj + m)
    ck = rng.integers(0, nk, m).astype(np.int64)
    cj = rng.integers(0, nj, m).astype(np.int64)
    order = _kernels.pair_order(ck, cj, nk, nj)
    np.testing.assert_array_equal(order, np.argsort(ck * nj + cj, kind="stable"))


def test_merge_pairs_sums_equal_keys_in_row_order():
    """merge_pairs against a numpy twin: sorted unique keys, blocks summed in the order given."""
    rng = np.random.default_rng(3)
    nj = 37
    keys = rng.integers(0, 50 * nj, 4_000).astype(np.int64)
    vals = rng.normal(size=(4_000, 2, 1))
    uk, out = _kernels.merge_pairs(keys, vals, nj)
    sums: dict[int, np.ndarray] = {}
    for i in np.argsort(keys, kind="stable"):  # one add at a time, in that order: the kernel's bits
        sums[int(keys[i])] = sums[int(keys[i])] + vals[i] if int(keys[i]) in sums else vals[i].copy()
    np.testing.assert_array_equal(uk, sorted(sums))
    np.testing.assert_array_equal(out, np.stack([sums[k] for k in sorted(sums)]))


@pytest.mark.parametrize("k", [1, 3])
def test_pair_sums_are_bincount_per_column(k):
    """pair_sums against its numpy twin, np.bincount of the gathered products per column: the
    same bits (both sum each entry's pairs in pair order), from strided views as the callers pass."""
    rng = np.random.default_rng(4)
    n, nrows, nlev = 50_000, 300, 2_000
    rows = rng.integers(0, nrows, n)
    lev = np.sort(rng.integers(0, nlev, n))  # pairs in level order, as the crossed layout holds them
    vals = rng.normal(size=(n, 1, 1))[:, 0, 0]  # a strided view
    X = rng.normal(size=(nlev, 1, k))[:, 0, :]
    got = _kernels.pair_sums(rows, lev, vals, X, nrows + 5)
    want = np.stack([np.bincount(rows, weights=vals * X[lev, c], minlength=nrows + 5) for c in range(k)], axis=1)
    np.testing.assert_array_equal(got, want)


def test_order_within_runs_is_the_stable_sort_of_level_then_key():
    """order_within_runs against its numpy twin, a stable argsort of ``level * K + key``, on pairs in
    level order: short runs (insertion sort), a long one (merge sort), empty levels, tied keys."""
    rng = np.random.default_rng(9)
    sizes = rng.integers(0, 12, 4_000)
    sizes[17] = 500  # a level with many pairs
    level = np.repeat(np.arange(sizes.size), sizes)
    keys = rng.integers(0, 40, level.size)  # many ties within a run
    ptr = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    got = _kernels.order_within_runs(ptr, keys)
    np.testing.assert_array_equal(got, np.argsort(level * 41 + keys, kind="stable"))
