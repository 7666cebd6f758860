"""Where the statistics live and how the factor is computed: one interface, three layouts.

Every backend answers the same calls (:class:`StatsBackend`), so :class:`~bigmixed.objective.Objective`,
the optimiser and the results never ask which one they have:

* :class:`LocalBackend` - one term: the closed-form per-level kernels (DESIGN.md sections 2-3, 7);
* :class:`NestedBackend` - nested terms: a two-level (or deeper) closed form per outer group;
* :class:`bigmixed.crossed_backend.CrossedBackend` - crossed terms: the leading term in closed form, the
  rest dense (LAPACK);

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

from . import _kernels
from .start import moment_start
from .stats import Statistics, default_threads, faulted_zeros

__all__ = ["Evaluation", "StatsBackend", "LocalBackend", "NestedBackend", "make_backend", "subsample_backend",
           "NumericalError"]

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
    """The calls the objective makes; every backend implements all of them, and the two of the
    average-information route (:mod:`bigmixed.information`) where ``information`` is True."""

    p: int
    N: int
    n_groups: int  # sampling units of the warm start (the outermost term's levels)
    information: bool  # spherical_modes and schur_columns answer: the average-information route (crossed terms)
    XtX: np.ndarray
    Xty: np.ndarray
    yty: float

    def evaluate(self, lams: list, grad: bool) -> Evaluation: ...

    def gradient(self, lams: list, beta: np.ndarray, Finv: np.ndarray, kappa: float, reml: bool) -> list: ...

    def conditional_modes(self, lams: list, beta: np.ndarray) -> list: ...

    def subsample(self, level: int) -> "StatsBackend | None": ...

    def transform_z(self, Ms: list) -> "StatsBackend": ...

    def moment_start(self, tmap) -> np.ndarray: ...

    # -- only where ``information``
    def spherical_modes(self, lams: list, beta: np.ndarray) -> list:
        """Each term's spherical conditional modes ``u (levels, q)``, ``b = Lambda u`` (no covariances)."""
        ...

    def schur_columns(self, lams: list, ext: list) -> tuple[np.ndarray, np.ndarray]:
        """Corrections for extra columns beside ``[y X]`` from the factor at ``lams``."""
        ...


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

    information = False  # the subsample warm start and Newton steps serve instead

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
    information = False  # the subsample warm start and Newton steps serve instead

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


def make_backend(stats: Statistics, layout: str, chain: list[int] | None = None, names: list[str] | None = None,
                 nthreads: int | None = None):
    """The backend for statistics of the given layout (``"single"``, ``"nested"``, ``"crossed"``)."""
    if layout == "single":
        return LocalBackend(stats, nthreads)
    if layout == "nested":
        return NestedBackend(stats, chain, nthreads)
    if layout == "crossed":
        from .crossed_backend import CrossedBackend

        return CrossedBackend(stats, names, nthreads)
    raise ValueError(f"unknown layout {layout!r}")
