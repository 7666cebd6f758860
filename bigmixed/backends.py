"""Where the statistics live and how the factor is computed: one interface, three layouts.

Every backend answers the same calls (:class:`StatsBackend`), so :class:`~bigmixed.objective.Objective`,
the optimiser and the results never ask which one they have:

* :class:`LocalBackend` - one term: the closed-form per-level kernels (DESIGN.md sections 2-3, 7);
* :class:`NestedBackend` - nested terms: a two-level (or deeper) closed form per outer group;
* :class:`CrossedBackend` - crossed terms: the leading term in closed form, the rest dense (LAPACK);

and :class:`bigmixed.distributed.DistributedBackend` - statistics resident on Dask workers.

``evaluate`` returns the sums of the profiled deviance (logdet, and the corrections to X'X,
X'y, y'y) and, for the gradient, the per-term tensors of
:func:`bigmixed.objective.gradient_from_fused`; ``gradient`` contracts them on the workers'
side instead (many fixed effects); ``conditional_modes`` gives each term's BLUPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.linalg import lapack

from . import _kernels
from .start import moment_start
from .stats import Statistics, blas_threads, default_threads, faulted_zeros
from .terms import check_crossed_memory, crossed_lead

__all__ = ["Evaluation", "StatsBackend", "LocalBackend", "NestedBackend", "CrossedBackend", "make_backend",
           "subsample_backend", "NumericalError"]

# Work is split in at most this many chunks whatever the number of threads, so the sums (and
# the optimiser's path) are the same bits on any machine.
N_CHUNKS = 64
# A warm-start sample of nested terms keeps at least this many outer groups.
MIN_SAMPLE_UNITS = 32


class NumericalError(ArithmeticError):
    """The deviance cannot be evaluated at this theta (non-finite or indefinite linear algebra)."""


@dataclass
class Evaluation:
    """The deviance's sums at one theta, and (with ``grad``) its per-term gradient tensors."""

    logdet: float
    SF: np.ndarray  # sum of the corrections to X'X (p, p)
    Sg: np.ndarray  # ... to X'y (p,)
    Sh: float  # ... to y'y
    GA: list | None = None  # per term (q_k, q_k)
    S: list | None = None  # per term (q_k, q_k, p + 1, p + 1)


class StatsBackend(Protocol):
    """The calls the objective makes; every backend implements all of them."""

    p: int
    N: int
    n_groups: int  # sampling units of the warm start (the outermost term's levels)
    XtX: np.ndarray
    Xty: np.ndarray
    yty: float

    def evaluate(self, lams: list, grad: bool) -> Evaluation: ...

    def gradient(self, lams: list, beta: np.ndarray, Finv: np.ndarray, kappa: float, reml: bool) -> list: ...

    def conditional_modes(self, lams: list, beta: np.ndarray) -> list: ...

    def subsample(self, level: int) -> "StatsBackend | None": ...

    def transform_z(self, Ms: list) -> "StatsBackend": ...

    def moment_start(self, tmap) -> np.ndarray: ...


def _chunks(weights: np.ndarray, n: int) -> np.ndarray:
    """Boundaries of at most ``n`` contiguous chunks of about equal total ``weights``."""
    m = weights.shape[0]
    n = max(1, min(int(n), m))
    cum = np.concatenate(([0.0], np.cumsum(weights, dtype=float)))
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n) / n, side="left")
    return np.unique(np.concatenate(([0], np.clip(cuts, 0, m), [m]))).astype(np.int64)


def _split(SFD: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    return np.ascontiguousarray(SFD[1:, 1:]), np.ascontiguousarray(SFD[1:, 0]), float(SFD[0, 0])


def _lower_factor(Finv: np.ndarray) -> np.ndarray:
    if not Finv.size:
        return np.zeros((0, 0))
    try:
        return np.linalg.cholesky(Finv)
    except np.linalg.LinAlgError:
        raise NumericalError("F^-1 is not positive definite") from None


# ---------------------------------------------------------------------------------- one term
class LocalBackend:
    """One term, statistics held in this process as contiguous numpy arrays."""

    def __init__(self, stats: Statistics, nthreads: int | None = None) -> None:
        self.stats = stats
        self.p, self.q, self.n_groups = stats.p, stats.q, stats.n_groups
        self.XtX, self.Xty, self.yty, self.N = stats.XtX, stats.Xty, stats.yty, stats.N
        nthreads = nthreads or default_threads()
        self.nthreads = nthreads
        # A few chunks per thread balance uneven ranges; never more chunks than groups.
        self.nchunks = max(1, min(self.n_groups, 4 * nthreads))

    def evaluate(self, lams, grad: bool) -> Evaluation:
        s = self.stats
        lam = np.ascontiguousarray(lams[0], dtype=float)
        ld, SF, Sg, Sh, GA, S = _kernels.objective_fused(s.A, s.B, s.c, lam, self.nchunks, bool(grad))
        if not grad:
            return Evaluation(float(ld.sum()), SF.sum(axis=0), Sg.sum(axis=0), float(Sh.sum()))
        return Evaluation(float(ld.sum()), SF.sum(axis=0), Sg.sum(axis=0), float(Sh.sum()),
                          [GA.sum(axis=0)], [S.sum(axis=0)])

    def gradient(self, lams, beta, Finv, kappa, reml) -> list:
        s = self.stats
        out = _kernels.objective_pass2(s.A, s.B, s.c, np.ascontiguousarray(lams[0], dtype=float), beta, Finv,
                                       float(kappa), bool(reml), self.nchunks)
        return [out.sum(axis=0)]

    def conditional_modes(self, lams, beta) -> list:
        s = self.stats
        return [_kernels.conditional_modes(s.A, s.B, s.c, np.ascontiguousarray(lams[0], dtype=float),
                                           np.ascontiguousarray(beta, dtype=float), self.nchunks)]

    def subsample(self, level: int) -> "LocalBackend | None":
        """The groups of sampling level >= ``level`` (~G / 2^level), or None if not kept.

        See :class:`bigmixed.stats.SampleSums`: their per-group and global sums are exact.
        """
        s = self.stats
        if s.levels is None or s.sample is None:
            return None
        return subsample_backend(s.subset_groups(np.flatnonzero(s.levels >= level)), s.sample, level,
                                 self.nthreads)

    def transform_z(self, Ms) -> "LocalBackend":
        """Backend for the random-effects design Z M (statistics transformed exactly)."""
        return LocalBackend(self.stats.transform_z(Ms), self.nthreads)

    def moment_start(self, tmap) -> np.ndarray:
        """theta from moments of the statistics (:func:`bigmixed.start.moment_start`)."""
        return moment_start(self.stats, tmap)


def subsample_backend(sub: Statistics, sample, level: int, nthreads: int | None):
    """A backend for the sampled levels: their statistics ``sub`` and their rows' sums from ``sample``."""
    XtX, Xty, yty, N = sample.at_least(level)
    st = Statistics(sub.terms, XtX, Xty, yty, N, sub.pairs, None, sub.sample_term)
    if len(st.terms) == 1:
        return LocalBackend(st, nthreads)
    return NestedBackend(st, _chain_of(st), nthreads)


def _chain_of(stats: Statistics) -> list[int]:
    """Finest to coarsest, from the nested pairs (k finer than j): the finest is finer than all others."""
    K = len(stats.terms)
    return sorted(range(K), key=lambda k: sum(1 for pr in stats.pairs if pr.k == k), reverse=True)


# ---------------------------------------------------------------------------------- nested
class NestedBackend:
    """Nested terms: the factor block diagonal by outer groups (:mod:`bigmixed._kernels._nested`).

    ``chain`` lists the model's terms from finest to coarsest; ``stats.pairs`` holds one
    block per level of the finer term of every pair of the chain (its parent in the other).
    The levels are laid out once as nodes grouped by outer group.
    """

    # True: always the generic K-term kernel (tests compare the two)
    generic = False

    def __init__(self, stats: Statistics, chain: list[int], nthreads: int | None = None) -> None:
        self.stats, self.chain = stats, list(chain)
        self.nthreads = nthreads or default_threads()
        self.p, self.N = stats.p, stats.N
        self.XtX, self.Xty, self.yty = stats.XtX, stats.Xty, stats.yty
        self.qs = [t.q for t in stats.terms]
        self._layout()

    def _layout(self) -> None:
        st, ch = self.stats, self.chain
        K = len(ch)
        root = ch[-1]
        pair = {(pr.k, pr.j): pr for pr in st.pairs}
        # the warm start's size is counted in levels of the finest term (what an evaluation costs);
        # it samples whole outer groups (their hash level), so it stays an exact sub-data set
        self.n_groups = st.terms[ch[0]].n_groups
        self.n_units = st.terms[root].n_groups
        # the root (outer group) of every level of every term
        roots_of = [pair[(k, root)].jcodes if k != root else np.arange(st.terms[k].n_groups) for k in ch]
        counts = [st.terms[k].n_groups for k in ch]
        term = np.concatenate([np.full(n, e, dtype=np.int64) for e, n in enumerate(counts)])
        rootk = np.concatenate(roots_of).astype(np.int64)
        # by root, then term (finest first), then level: levels are already in order within a term
        order = _kernels.bucket_order(rootk * K + term, self.n_units * K)
        n = order.size
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)
        starts = np.concatenate(([0], np.cumsum(counts)))
        self.pos = [pos[starts[e]:starts[e + 1]] for e in range(K)]  # node of (chain term e, level)
        Q = max(self.qs)
        p1 = self.p + 1
        self.term = np.ascontiguousarray(term[order])
        A, D, up = faulted_zeros((n, Q, Q)), faulted_zeros((n, Q, p1)), faulted_zeros((n, max(K - 1, 1), Q, Q))
        anc = np.full((n, max(K - 1, 1)), -1, dtype=np.int64)
        # whole blocks into each level's node (numpy's scatters into strided slices cost far more)
        A2, D2, up2 = A.reshape(n, Q * Q), D.reshape(n, Q * p1), up.reshape(n, -1)
        for e, k in enumerate(ch):
            t, q, ps = st.terms[k], st.terms[k].q, self.pos[e]
            _kernels.scatter_blocks(A2, ps, _flat(t.A), q, q, Q, 0)
            _kernels.scatter_blocks(D2, ps, _flat(t.c), q, 1, p1, 0)
            _kernels.scatter_blocks(D2, ps, _flat(t.B), q, self.p, p1, 1)
            for s in range(K - 1 - e):
                e2 = e + 1 + s
                pr, qa = pair[(k, ch[e2])], st.terms[ch[e2]].q
                _kernels.scatter_blocks(up2, ps, _flat(pr.vals), qa, q, Q, s * Q * Q)
                anc[ps, s] = self.pos[e2][pr.jcodes]
        self.A, self.D, self.up, self.anc = A, D, up, anc
        self.qv = np.array([self.qs[k] for k in ch], dtype=np.int64)
        rc = np.bincount(rootk, minlength=self.n_units)
        self.roots = np.concatenate(([0], np.cumsum(rc))).astype(np.int64)
        self.chunks = _chunks(rc.astype(float), N_CHUNKS)
        self.maxlen = int(rc.max()) if rc.size else 0
        self.Q = Q

    def _lams(self, lams) -> np.ndarray:
        out = np.zeros((len(self.chain), self.Q, self.Q))
        for e, k in enumerate(self.chain):
            q = self.qs[k]
            out[e, :q, :q] = lams[k]
        return out

    def _run(self, lams, grad, modes, g=None, cf=None, kappa=0.0, reml=False):
        g = np.zeros(self.p + 1) if g is None else np.ascontiguousarray(g, dtype=float)
        cf = np.zeros((0, 0)) if cf is None else np.ascontiguousarray(cf, dtype=float)
        if len(self.chain) == 2 and not self.generic and tuple(int(q) for q in self.qv) in _kernels.NESTED2_SIZES:
            out = _kernels.nested2_evaluate(int(self.qv[0]), int(self.qv[1]), self.A, self.D, self.up, self.roots,
                                            self.chunks, self._lams(lams), self.maxlen, bool(grad), bool(modes), g,
                                            cf, float(kappa), bool(reml))
        else:
            out = _kernels.nested_evaluate(self.term, self.qv, self.A, self.D, self.up, self.anc, self.roots,
                                           self.chunks, self._lams(lams), self.maxlen, bool(grad), bool(modes), g,
                                           cf, float(kappa), bool(reml))
        if not out[5].all():
            raise NumericalError("a block of Lambda' Z'Z Lambda + I is not positive definite")
        return out

    def _per_term(self, arr: np.ndarray) -> list:
        """Chain-ordered (K, Q, Q, ...) sums -> the model's term order, each cut to its q."""
        res = [None] * len(self.chain)
        for e, k in enumerate(self.chain):
            q = self.qs[k]
            res[k] = np.ascontiguousarray(arr[e, :q, :q])
        return res

    def evaluate(self, lams, grad: bool) -> Evaluation:
        ld, SFD, GA, S, _, _, _, _ = self._run(lams, grad, False)
        SF, Sg, Sh = _split(SFD.sum(axis=0))
        if not grad:
            return Evaluation(float(ld.sum()), SF, Sg, Sh)
        return Evaluation(float(ld.sum()), SF, Sg, Sh, self._per_term(GA.sum(axis=0)),
                          self._per_term(S.sum(axis=0)))

    def gradient(self, lams, beta, Finv, kappa, reml) -> list:
        g = np.concatenate(([1.0], -np.asarray(beta, dtype=float)))
        out = self._run(lams, True, False, g, _lower_factor(Finv), kappa, reml)
        return self._per_term(out[4].sum(axis=0))

    def conditional_modes(self, lams, beta) -> list:
        g = np.concatenate(([1.0], -np.asarray(beta, dtype=float)))
        *_, bhat, bcov = self._run(lams, False, True, g)
        res = [None] * len(self.chain)
        for e, k in enumerate(self.chain):
            q, ps = self.qs[k], self.pos[e]
            res[k] = (np.ascontiguousarray(bhat[ps, :q]), np.ascontiguousarray(bcov[ps, :q, :q]))
        return res

    def subsample(self, level: int) -> "NestedBackend | None":
        st = self.stats
        root = self.chain[-1]
        lv = st.terms[root].levels
        if lv is None or st.sample is None:
            return None
        keep_root = lv >= level
        if int(keep_root.sum()) < MIN_SAMPLE_UNITS:
            return None  # too few outer groups to stand for the others
        pair = {(pr.k, pr.j): pr for pr in st.pairs}
        keeps = []
        for k in range(len(st.terms)):
            keeps.append(keep_root if k == root else keep_root[pair[(k, root)].jcodes])
        sub = st.subset_levels(keeps)
        return subsample_backend(sub, st.sample, level, self.nthreads)

    def transform_z(self, Ms) -> "NestedBackend":
        return NestedBackend(self.stats.transform_z(Ms), self.chain, self.nthreads)

    def moment_start(self, tmap) -> np.ndarray:
        return moment_start(self.stats, tmap)


def _flat(blocks: np.ndarray) -> np.ndarray:
    """(G, a, b) or (G, a) blocks as a contiguous (G, a * b) array of doubles."""
    return np.ascontiguousarray(blocks, dtype=np.float64).reshape(blocks.shape[0], -1)


# ---------------------------------------------------------------------------------- crossed
class CrossedBackend:
    """Crossed terms: leading term in closed form, the others in one dense block (:mod:`._crossed`).

    ``lead`` is the term with the most random effects (levels x q); the rest are laid out as
    ``m`` scalar random effects, term by term, level by level.
    """

    # True: the block kernel even when every term is scalar (tests compare the two)
    generic = False

    def __init__(self, stats: Statistics, names: list[str] | None = None, nthreads: int | None = None) -> None:
        self.stats = stats
        self.names = names or [f"term {k}" for k in range(len(stats.terms))]
        self.nthreads = nthreads or default_threads()
        self.p, self.N = stats.p, stats.N
        self.XtX, self.Xty, self.yty = stats.XtX, stats.Xty, stats.yty
        self.qs = [t.q for t in stats.terms]
        self.n_groups = 0  # no warm-start sample
        K = len(stats.terms)
        levels_q = [(stats.terms[k].n_groups, self.qs[k]) for k in range(K)]
        check_crossed_memory(levels_q, self.names)
        self.lead = crossed_lead(levels_q)
        self.rest = [k for k in range(K) if k != self.lead]
        self._layout()
        self._cache = None
        self._om = self._sig = None

    def _layout(self) -> None:
        st = self.stats
        lead = self.lead
        q0 = self.qs[lead]
        t0 = st.terms[lead]
        self.A0 = np.ascontiguousarray(t0.A)
        self.D0 = np.ascontiguousarray(np.concatenate([t0.c[:, :, None], t0.B], axis=2))
        self.pos = self._positions()
        self.Qr = int(self.qR.max())
        self._rest_blocks()
        self._lead_pairs(q0)
        self.scalar = q0 == 1 and self.Qr == 1
        per_level = np.diff(self.ptr).astype(float)
        self.chunks = _chunks(per_level + 1.0, N_CHUNKS)
        self._row_owners(self._row_chunks())

    def _positions(self) -> dict:
        """Dense-block position of each rest level: its term's levels by falling pair count.

        Block ``b`` (term by term, level by level) starts at ``bstart[b]``.  Ordering each term's
        levels by how many leading levels they share keeps the busiest rows and columns of the
        dense block together (Zipf-like popularity: a few items in most users' rows), so the
        per-level updates and Sigma gathers touch a cache-sized corner most of the time.  The
        factorisation does not depend on the order; results are reported per level as before.
        """
        st, lead = self.stats, self.lead
        counts = {k: np.zeros(st.terms[k].n_groups) for k in self.rest}
        for pr in st.pairs:
            if lead == pr.k:
                counts[pr.j] += np.bincount(pr.jcodes, minlength=counts[pr.j].size)
            elif lead == pr.j:
                counts[pr.k] += np.bincount(pr.kcodes, minlength=counts[pr.k].size)
        pos, bstart, bq, bterm, off = {}, [], [], [], 0
        for r, k in enumerate(self.rest):
            n, q = st.terms[k].n_groups, self.qs[k]
            rank = np.empty(n, dtype=np.int64)
            rank[np.argsort(-counts[k], kind="stable")] = np.arange(n)
            pos[k] = off + rank * q
            bstart.append(pos[k])
            bq.append(np.full(n, q))
            bterm.append(np.full(n, r))
            off += n * q
        self.m = off
        self.bstart = np.concatenate(bstart).astype(np.int64)
        self.bq = np.concatenate(bq).astype(np.int64)
        self.bterm = np.concatenate(bterm).astype(np.int64)
        self.qR = np.array([self.qs[k] for k in self.rest], dtype=np.int64)
        return pos

    def _rows_of(self, k: int, codes: np.ndarray) -> np.ndarray:
        """Dense-block rows ``(n, q_k)`` of levels ``codes`` of rest term ``k``."""
        return self.pos[k][codes][:, None] + np.arange(self.qs[k])[None, :]

    def _rest_blocks(self) -> None:
        """``A_R`` by block rows (both triangles, pairs between rest terms included) and ``D_R``.

        Block ``b`` is rest level ``b - boff[r]`` of rest term ``r``.  Only the blocks with
        entries are kept: each row has one level per term, so ``A_R`` is the rest terms'
        diagonal blocks and their pairs, however dense the factor of the update becomes.
        """
        st, Qr = self.stats, self.Qr
        boff = np.concatenate(([0], np.cumsum([st.terms[k].n_groups for k in self.rest])))
        bidx = {k: boff[r] for r, k in enumerate(self.rest)}
        rows, cols, vals = [], [], []

        def put(bi, bj, v):  # v (n, q_i, q_j), padded to (Qr, Qr)
            w = np.zeros((bi.size, Qr, Qr))
            w[:, :v.shape[1], :v.shape[2]] = v
            rows.append(bi)
            cols.append(bj)
            vals.append(w)

        self.DR = np.zeros((self.m, self.p + 1))
        for k in self.rest:
            t = st.terms[k]
            b = bidx[k] + np.arange(t.n_groups)
            put(b, b, t.A)
            idx = self._rows_of(k, np.arange(t.n_groups))
            self.DR[idx, 0] = t.c
            self.DR[idx, 1:] = t.B
        for pr in st.pairs:
            if self.lead not in (pr.k, pr.j):
                bk, bj = bidx[pr.k] + pr.kcodes, bidx[pr.j] + pr.jcodes
                put(bj, bk, pr.vals)
                put(bk, bj, np.swapaxes(pr.vals, 1, 2))
        bi, bj, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        nb = int(boff[-1])
        order = np.argsort(bi * nb + bj, kind="stable")
        bi, bj, v = bi[order], bj[order], v[order]
        first = np.ones(bi.size, dtype=bool)  # the same block twice (never from one pass) is summed
        first[1:] = (bi[1:] != bi[:-1]) | (bj[1:] != bj[:-1])
        starts = np.flatnonzero(first)
        self.arval = np.ascontiguousarray(np.add.reduceat(v, starts, axis=0))
        self.arcol = np.ascontiguousarray(bj[starts]).astype(np.int64)
        self.arptr = np.concatenate(([0], np.cumsum(np.bincount(bi[starts], minlength=nb)))).astype(np.int64)
        self.border = np.argsort(self.bstart, kind="stable").astype(np.int64)
        # clearing a row costs its position, writing it its blocks
        work = (self.bstart[self.border] + 1.0) * self.bq[self.border] + np.diff(self.arptr)[self.border]
        self.rchunks = _chunks(work.astype(float), N_CHUNKS)

    def _lead_pairs(self, q0: int) -> None:
        """The sparse L_21 pattern: pairs (leading level, rest level), sorted by level then row."""
        st, lead, Qr = self.stats, self.lead, self.Qr
        keys, cols, terms_, vals = [], [], [], []
        for pr in st.pairs:
            if lead not in (pr.k, pr.j):
                continue
            if pr.k == lead:
                lc, oc, v, other = pr.kcodes, pr.jcodes, pr.vals, pr.j
            else:
                lc, oc, v, other = pr.jcodes, pr.kcodes, np.swapaxes(pr.vals, 1, 2), pr.k
            W = np.zeros((lc.size, Qr, q0))
            W[:, :self.qs[other], :] = v
            keys.append(lc)
            cols.append(self.pos[other][oc])
            terms_.append(np.full(lc.size, self.rest.index(other)))
            vals.append(W)
        lc = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        pc = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        # rows ascending within a level (crossed_update writes below the diagonal); one int64 key
        # (level, row) sorts faster than a two-key lexsort
        order = np.argsort(lc.astype(np.int64) * (self.m + 1) + pc, kind="stable")
        self.pcol = np.ascontiguousarray(pc[order]).astype(np.int64)
        self.pterm = np.ascontiguousarray(np.concatenate(terms_)[order]).astype(np.int64) if terms_ \
            else np.zeros(0, np.int64)
        self.W = np.ascontiguousarray(np.concatenate(vals)[order]) if vals else np.zeros((0, Qr, q0))
        self.ptr = np.concatenate(([0], np.cumsum(np.bincount(lc, minlength=st.terms[lead].n_groups)))).astype(np.int64)

    def _row_chunks(self) -> np.ndarray:
        """Row ranges of the dense update, whole blocks each, balancing the (pairs in level)^2 work."""
        rank = np.arange(self.pcol.size) - np.repeat(self.ptr[:-1], np.diff(self.ptr))
        work = np.bincount(self.pcol, weights=rank + 1.0, minlength=self.m + 1)
        starts = np.sort(self.bstart)
        cut = _chunks(work[starts] + 1e-9, N_CHUNKS)
        return np.concatenate((starts[cut[:-1]], [self.m])).astype(np.int64)

    def _row_owners(self, row_chunks: np.ndarray) -> None:
        """Each row range's pairs, in level order, so a thread visits only the pairs it writes."""
        self.plev = np.repeat(np.arange(self.ptr.size - 1), np.diff(self.ptr)).astype(np.int64)
        owner = np.searchsorted(row_chunks, self.pcol, side="right") - 1
        self.eorder = np.argsort(owner, kind="stable").astype(np.int64)
        counts = np.bincount(owner, minlength=row_chunks.size - 1)
        self.eptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)

    def _blas(self):
        """All threads for LAPACK on a large dense block (the fit otherwise runs BLAS single-threaded)."""
        import contextlib

        return blas_threads(self.nthreads) if self.m >= 256 else contextlib.nullcontext()

    def _lamR(self, lams) -> np.ndarray:
        out = np.zeros((len(self.rest), self.Qr, self.Qr))
        for r, k in enumerate(self.rest):
            q = self.qs[k]
            out[r, :q, :q] = lams[k]
        return out

    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """The dense block and its inverse: two ``(m, m)`` C-ordered arrays reused by every evaluation.

        LAPACK works on their transposes (Fortran-ordered views, upper triangle), so nothing is
        copied and no fresh memory is touched per evaluation.
        """
        if self._om is None:
            self._om = np.zeros((self.m, self.m))
            self._sig = np.zeros((self.m, self.m))
        return self._om, self._sig

    def _forward(self, lams):
        key = tuple(np.asarray(L).tobytes() for L in lams)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self._cache = None  # the buffer is about to change
        lam0 = np.ascontiguousarray(lams[self.lead], dtype=float)
        lamR = self._lamR(lams)
        ld, SFD, L, P, V, ok = _kernels.crossed_forward(self.A0, self.D0, lam0, self.ptr, self.pterm, self.W, lamR,
                                                        self.qR, self.chunks)
        if not ok.all():
            raise NumericalError("a block of Lambda' Z'Z Lambda + I is not positive definite")
        Om, _ = self._buffers()
        OmD = np.empty((self.m, self.p + 1))
        _kernels.rest_fill(Om, OmD, self.arptr, self.arcol, self.arval, self.DR, self.bstart, self.bq, self.bterm,
                           lamR, self.border, self.rchunks)
        _kernels.crossed_update(self.ptr, self.pcol, self.pterm, self.qR, V, P, self.plev, self.eorder, self.eptr,
                                Om, OmD)
        with self._blas():
            # Om's lower triangle is the upper one of its Fortran-ordered transpose: U'U = Omega, U = L'
            U, info = lapack.dpotrf(Om.T, lower=0, clean=0, overwrite_a=1)
            if info != 0:
                raise NumericalError("the dense block of the crossed terms is not positive definite")
            E, info = lapack.dtrtrs(U, OmD, lower=0, trans=1)
        logdet = float(ld.sum()) + 2.0 * float(np.sum(np.log(np.diag(U))))
        SFD = SFD.sum(axis=0) + E.T @ E
        res = (logdet, SFD, L, P, V, U, E, lam0, lamR)
        self._cache = (key, res)
        return res

    def _inverse(self, U: np.ndarray) -> np.ndarray:
        """Sigma_R = Omega^-1 from its factor, C-ordered with the lower triangle set (dpotri's upper, transposed)."""
        _, sig = self._buffers()
        np.copyto(sig.T, U)  # the factor stays for later solves at this theta
        with self._blas():
            inv, info = lapack.dpotri(sig.T, lower=0, overwrite_c=1)
        if info != 0:
            raise NumericalError("the dense block of the crossed terms is singular")
        return inv.T

    def _backward(self, lams, grad, modes, g, cf, kappa, reml):
        logdet, SFD, L, P, V, U, E, lam0, lamR = self._forward(lams)
        with self._blas():
            RR, info = lapack.dtrtrs(U, E, lower=0, trans=0)
        RR = np.ascontiguousarray(RR)
        Sig = self._inverse(U)
        if self.scalar and not self.generic:
            GA0, S0, GC0, TR, GR, bh0, bc0 = _kernels.crossed_backward1(
                self.A0, self.D0, lam0, self.ptr, self.pcol, self.pterm, self.W, lamR, L, P, V, RR, Sig,
                self.chunks, bool(grad), bool(modes), g, cf, float(kappa), bool(reml), self.m)
        else:
            GA0, S0, GC0, TR, GR, bh0, bc0 = _kernels.crossed_backward(
                self.A0, self.D0, lam0, self.ptr, self.pcol, self.pterm, self.W, lamR, self.qR, L, P, V, RR, Sig,
                self.chunks, bool(grad), bool(modes), g, cf, float(kappa), bool(reml), self.m)
        GAr, Sr, GCr, bhr, bcr = _kernels.rest_pieces(
            self.arptr, self.arcol, self.arval, self.DR, RR, Sig,
            TR.sum(axis=0) if grad else np.zeros((self.m, 1)), GR.sum(axis=0) if grad else np.zeros((self.m, 1)),
            self.bstart, self.bq, self.bterm, lamR, len(self.rest), bool(grad), bool(modes), g, cf, float(kappa),
            bool(reml))
        return (GA0, S0, GC0, bh0, bc0), (GAr, Sr, GCr, bhr, bcr)

    def _assemble(self, lead_part, rest_parts) -> list:
        out = [None] * len(self.qs)
        out[self.lead] = lead_part
        for r, k in enumerate(self.rest):
            q = self.qs[k]
            out[k] = np.ascontiguousarray(rest_parts[r][:q, :q])
        return out

    def evaluate(self, lams, grad: bool) -> Evaluation:
        logdet, SFD, *_ = self._forward(lams)
        SF, Sg, Sh = _split(SFD)
        if not grad:
            return Evaluation(logdet, SF, Sg, Sh)
        g = np.zeros(self.p + 1)
        (GA0, S0, *_), (GAr, Sr, *_) = self._backward(lams, True, False, g, np.zeros((0, 0)), 0.0, False)
        return Evaluation(logdet, SF, Sg, Sh, self._assemble(GA0.sum(axis=0), GAr),
                          self._assemble(S0.sum(axis=0), Sr))

    def gradient(self, lams, beta, Finv, kappa, reml) -> list:
        g = np.concatenate(([1.0], -np.asarray(beta, dtype=float)))
        cf = _lower_factor(Finv)
        (_, _, GC0, *_), (_, _, GCr, *_) = self._backward(lams, True, False, g, cf, kappa, reml)
        return self._assemble(GC0.sum(axis=0), GCr)

    def conditional_modes(self, lams, beta) -> list:
        g = np.concatenate(([1.0], -np.asarray(beta, dtype=float)))
        (_, _, _, bh0, bc0), (_, _, _, bhr, bcr) = self._backward(lams, False, True, g, np.zeros((0, 0)), 0.0,
                                                                  False)
        out = [None] * len(self.qs)
        out[self.lead] = (bh0, bc0)
        start = 0
        for r, k in enumerate(self.rest):
            n, q = self.stats.terms[k].n_groups, self.qs[k]
            out[k] = (np.ascontiguousarray(bhr[start:start + n, :q]), np.ascontiguousarray(bcr[start:start + n, :q, :q]))
            start += n
        return out

    def subsample(self, level: int) -> None:
        return None  # crossed levels cannot be sampled independently

    def transform_z(self, Ms) -> "CrossedBackend":
        return CrossedBackend(self.stats.transform_z(Ms), self.names, self.nthreads)

    def moment_start(self, tmap) -> np.ndarray:
        return moment_start(self.stats, tmap)


def make_backend(stats: Statistics, layout: str, chain: list[int] | None = None, names: list[str] | None = None,
                 nthreads: int | None = None):
    """The backend for statistics of the given layout (``"single"``, ``"nested"``, ``"crossed"``)."""
    if layout == "single":
        return LocalBackend(stats, nthreads)
    if layout == "nested":
        return NestedBackend(stats, chain, nthreads)
    if layout == "crossed":
        return CrossedBackend(stats, names, nthreads)
    raise ValueError(f"unknown layout {layout!r}")
