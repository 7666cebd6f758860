"""Sufficient statistics: the only thing the fit ever looks at.

One pass over the rows reduces every group to ``A_i = Z_i'Z_i``,
``B_i = Z_i'X_i``, ``c_i = Z_i'y_i`` and ``n_i`` (plus the global ``X'X``,
``X'y``, ``y'y`` and ``N``).  Statistics of disjoint row sets of the same
group add up, which is what makes chunked, out-of-core and distributed fits
exact (DESIGN.md section 2).

Rows are transformed before they are reduced (:class:`Scaling`): predictors
are centred and scaled and the response is centred and scaled, so that data
such as ``x ~ 1e9 + noise`` or ``y ~ 1e6`` do not lose their digits in the
cancellations ``X'X - sum B'KB`` and ``y'y - sum c'Kc``.  The transforms
are linear and the fit is mapped back exactly (see :mod:`bigmixed.results`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numba
import numpy as np

from . import _kernels

__all__ = ["Statistics", "TermStats", "PairStats", "SampleSums", "aliased_columns"]


_BLAS_CONTROLLER = None


def one_blas_thread(fn):
    """Decorator: run ``fn`` with BLAS limited to one thread.

    bigmixed's BLAS calls are all p x p or smaller, so BLAS threads buy nothing; but
    OpenBLAS's idle threads spin after a call and take a core from the numba kernels
    (measured on 2 cores: a 1e4-group fit 0.105 s -> 0.045 s with one BLAS thread).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _BLAS_CONTROLLER
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - a declared dependency
            return fn(*args, **kwargs)
        if _BLAS_CONTROLLER is None:
            _BLAS_CONTROLLER = ThreadpoolController()
        with _BLAS_CONTROLLER.limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


def blas_threads(n: int):
    """Context manager: BLAS with ``n`` threads (inside :func:`one_blas_thread`, for the large dense
    factorisations of crossed terms, where LAPACK's threads pay)."""
    global _BLAS_CONTROLLER
    from threadpoolctl import ThreadpoolController

    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=int(n), user_api="blas")


def faulted_zeros(shape, dtype=np.float64) -> np.ndarray:
    """Zeros whose pages are faulted in here, by one sequential fill: a parallel kernel writing a
    fresh array takes those faults on all its threads at once, several times more slowly."""
    out = np.empty(shape, dtype=dtype)
    out.fill(0)
    return out


def default_threads() -> int:
    """Threads the kernels may use (numba's setting, e.g. NUMBA_NUM_THREADS)."""
    return int(numba.get_num_threads())


@dataclass
class SampleSums:
    """Global sums over the rows of a hash sample of the groups, by sampling level.

    Every group has a *level* (:func:`bigmixed.data.group_levels`, from a hash of its
    key): about one group in ``2**l`` has level ``>= l``.  Bucket ``b`` holds the sums
    ``X'X, X'y, y'y, N`` over the rows of the groups of level ``LEVEL_MIN + b`` (the last
    bucket: ``>= LEVEL_MAX``), so the sums over "every group of level ``>= k``" - a sample
    of ~G / 2^k groups chosen after the pass, the same whichever rows, files or Dask
    partitions they came from - are exact.  They make the warm-start subsample of
    :func:`bigmixed.optimize.minimize` a true fit of those groups.
    """

    XtX: np.ndarray  # (buckets, p, p)
    Xty: np.ndarray  # (buckets, p)
    yty: np.ndarray  # (buckets,)
    N: np.ndarray  # (buckets,) int64

    @classmethod
    def zeros(cls, p: int) -> "SampleSums":
        nb = _kernels.LEVEL_MAX - _kernels.LEVEL_MIN + 1
        return cls(np.zeros((nb, p, p)), np.zeros((nb, p)), np.zeros(nb), np.zeros(nb, dtype=np.int64))

    def plus(self, XtX, Xty, yty, N) -> "SampleSums":
        """New sums with these added (never in place: statistics derived from others share them)."""
        return SampleSums(self.XtX + XtX, self.Xty + Xty, self.yty + yty, self.N + N)

    def merge(self, other: "SampleSums") -> "SampleSums":
        return self.plus(other.XtX, other.Xty, other.yty, other.N)

    def at_least(self, level: int) -> tuple[np.ndarray, np.ndarray, float, int]:
        """``(X'X, X'y, y'y, N)`` over the rows of the groups of level >= ``level``."""
        if not _kernels.LEVEL_MIN <= level <= _kernels.LEVEL_MAX:
            raise ValueError(f"sample sums are kept for levels {_kernels.LEVEL_MIN}..{_kernels.LEVEL_MAX}, not {level}")
        b = int(level) - _kernels.LEVEL_MIN
        return self.XtX[b:].sum(axis=0), self.Xty[b:].sum(axis=0), float(self.yty[b:].sum()), int(self.N[b:].sum())

    def subset_fixed(self, cols: np.ndarray) -> "SampleSums":
        return SampleSums(np.ascontiguousarray(self.XtX[:, cols][:, :, cols]),
                          np.ascontiguousarray(self.Xty[:, cols]), self.yty.copy(), self.N.copy())


def _zeros(shape, dtype=np.float64) -> np.ndarray:
    # Written here, not left to calloc's lazy zero pages: otherwise the kernel's threads
    # take the page faults concurrently, which serialises them (a 1e5-group fit: the
    # statistics pass 30 ms -> 13 ms on a 2-core VM).
    a = np.empty(shape, dtype=dtype)
    a.fill(0)
    return a


@dataclass
class TermStats:
    """Per-level statistics of one random-effects term, contiguous arrays.

    ``A (G, q, q) = Z_i'Z_i``, ``B (G, q, p) = Z_i'X_i``, ``c (G, q) = Z_i'y_i``, ``n (G,)`` rows;
    ``levels`` each level's sampling level (int8) when the term defines the warm-start sample.
    """

    A: np.ndarray
    B: np.ndarray
    c: np.ndarray
    n: np.ndarray
    levels: np.ndarray | None = None
    XX: np.ndarray | None = None  # (G, p, p) per-level X'X, kept only on request (bootstrap)

    @classmethod
    def empty(cls, G: int, p: int, q: int, levels: np.ndarray | None = None) -> "TermStats":
        if levels is not None:
            levels = np.ascontiguousarray(levels, dtype=np.int8)
            if levels.shape != (G,):
                raise ValueError(f"levels must have one entry per group ({G}), not {levels.shape}")
        return cls(_zeros((G, q, q)), _zeros((G, q, p)), _zeros((G, q)), _zeros(G, np.int64), levels)

    @property
    def n_groups(self) -> int:
        return int(self.A.shape[0])

    @property
    def q(self) -> int:
        return int(self.A.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.A.nbytes + self.B.nbytes + self.c.nbytes + self.n.nbytes)

    def plus(self, other: "TermStats") -> "TermStats":
        if self.A.shape != other.A.shape or self.B.shape != other.B.shape:
            raise ValueError("cannot merge statistics of different shapes")
        lv = self.levels if (self.levels is not None and other.levels is not None) else None
        xx = self.XX + other.XX if (self.XX is not None and other.XX is not None) else None
        return TermStats(self.A + other.A, self.B + other.B, self.c + other.c, self.n + other.n, lv, xx)

    def subset(self, keep: np.ndarray) -> "TermStats":
        return TermStats(np.ascontiguousarray(self.A[keep]), np.ascontiguousarray(self.B[keep]),
                         np.ascontiguousarray(self.c[keep]), np.ascontiguousarray(self.n[keep]),
                         np.ascontiguousarray(self.levels[keep]) if self.levels is not None else None,
                         np.ascontiguousarray(self.XX[keep]) if self.XX is not None else None)

    def subset_fixed(self, cols: np.ndarray) -> "TermStats":
        xx = np.ascontiguousarray(self.XX[:, cols][:, :, cols]) if self.XX is not None else None
        return TermStats(self.A, np.ascontiguousarray(self.B[:, :, cols]), self.c, self.n, self.levels, xx)

    def transform_z(self, M: np.ndarray) -> "TermStats":
        """Statistics for this term's design ``Z M``."""
        A = np.ascontiguousarray(np.einsum("ka,gkl,lb->gab", M, self.A, M, optimize=True))
        B = np.ascontiguousarray(np.einsum("ka,gkm->gam", M, self.B, optimize=True))
        return TermStats(A, B, np.ascontiguousarray(self.c @ M), self.n, self.levels, self.XX)


@dataclass
class PairStats:
    """``Z_j'Z_k`` over the rows that a level of term k and a level of term j share.

    One block per pair of levels seen together, sorted by (code in k, code in j): for nested
    terms (k finer than j) one pair per level of k, ``jcodes`` being each level's parent.
    """

    k: int
    j: int
    kcodes: np.ndarray  # (npairs,) int64
    jcodes: np.ndarray  # (npairs,) int64
    vals: np.ndarray  # (npairs, q_j, q_k)

    @property
    def n_pairs(self) -> int:
        return int(self.kcodes.shape[0])

    def nested(self, n_k: int) -> bool:
        """Whether every level of k has exactly one level of j (k is nested in j)."""
        return self.n_pairs == n_k and bool(np.all(self.kcodes == np.arange(n_k)))

    def subset(self, keep_k: np.ndarray | None, keep_j: np.ndarray | None) -> "PairStats":
        """Pairs of the kept levels (boolean masks), with both codings renumbered."""
        sel = np.ones(self.n_pairs, dtype=bool)
        kc, jc = self.kcodes, self.jcodes
        if keep_k is not None:
            sel &= keep_k[kc]
            kc = (np.cumsum(keep_k) - 1)[kc]
        if keep_j is not None:
            sel &= keep_j[jc]
            jc = (np.cumsum(keep_j) - 1)[jc]
        return PairStats(self.k, self.j, np.ascontiguousarray(kc[sel]), np.ascontiguousarray(jc[sel]),
                         np.ascontiguousarray(self.vals[sel]))

    def transform_z(self, Mk: np.ndarray, Mj: np.ndarray) -> "PairStats":
        vals = np.ascontiguousarray(np.einsum("ka,gkl,lb->gab", Mj, self.vals, Mk, optimize=True))
        return PairStats(self.k, self.j, self.kcodes, self.jcodes, vals)


@dataclass
class Statistics:
    """Per-level and global sufficient statistics (of transformed rows).

    Attributes
    ----------
    terms
        One :class:`TermStats` per random-effects term (the model's term order).
    XtX, Xty, yty, N
        Global sums over all rows.
    pairs
        :class:`PairStats` for every pair of terms (several terms only).
    sample, sample_term
        The :class:`SampleSums` by sampling level of the levels of term ``sample_term``
        (the outermost term), or None when not kept.
    """

    terms: list[TermStats]
    XtX: np.ndarray
    Xty: np.ndarray
    yty: float = 0.0
    N: int = 0
    pairs: list[PairStats] = field(default_factory=list)
    sample: SampleSums | None = None
    sample_term: int = 0
    sum_log_w: float = 0.0  # sum of log w over the rows used (precision weights; 0 unweighted)

    @classmethod
    def single(cls, A, B, c, n, XtX, Xty, yty=0.0, N=0, levels=None, sample=None) -> "Statistics":
        """One-term statistics from their arrays."""
        return cls([TermStats(A, B, c, n, levels)], XtX, Xty, yty, N, [], sample, 0)

    @classmethod
    def empty(cls, G, p: int, q=None, levels=None, sample_term: int = 0) -> "Statistics":
        """Zero statistics; ``G``, ``q`` (and ``levels``) are ints (one term) or one per term."""
        if np.isscalar(G):
            Gs, qs, lvs = [G], [q], [levels]
        else:
            Gs, qs = list(G), list(q)
            lvs = [None] * len(Gs) if levels is None else list(levels)
        terms = [TermStats.empty(g, p, qq, lv) for g, qq, lv in zip(Gs, qs, lvs)]
        keep = terms[sample_term].levels is not None
        return cls(terms, np.zeros((p, p)), np.zeros(p), 0.0, 0, [], SampleSums.zeros(p) if keep else None,
                   sample_term)

    # -- one-term views (the single-factor paths)
    @property
    def A(self) -> np.ndarray:
        return self.terms[0].A

    @property
    def B(self) -> np.ndarray:
        return self.terms[0].B

    @property
    def c(self) -> np.ndarray:
        return self.terms[0].c

    @property
    def n(self) -> np.ndarray:
        return self.terms[0].n

    @property
    def levels(self) -> np.ndarray | None:
        return self.terms[self.sample_term].levels

    @property
    def n_groups(self) -> int:
        return self.terms[0].n_groups

    @property
    def p(self) -> int:
        return int(self.XtX.shape[0])

    @property
    def q(self) -> int:
        return self.terms[0].q

    @property
    def nbytes(self) -> int:
        return int(sum(t.nbytes for t in self.terms) + sum(pr.vals.nbytes + 16 * pr.n_pairs for pr in self.pairs))

    def add_rows(
        self,
        codes: np.ndarray,
        X: np.ndarray,
        Z: np.ndarray,
        y: np.ndarray,
        nthreads: int | None = None,
        scaling=None,
        term: int = 0,
        with_globals: bool = True,
        w: np.ndarray | None = None,
    ) -> int:
        """Reduce a block of rows into one term's statistics (and the global sums); returns rows skipped.

        Rows are transformed by ``scaling`` (identity if None) inside the kernel.  Rows with a
        negative code or a non-finite value are skipped (the caller counts and reports them).
        ``X`` and ``Z`` (this term's columns) are fastest in Fortran order (then ``X.T`` needs
        no copy), as :mod:`bigmixed.design` makes them.  ``scaling``'s Z arrays are this
        term's (see :meth:`bigmixed.scaling.Scaling.term`).  ``w``: precision weights (> 0), each
        transformed row multiplied by sqrt(w).
        """
        if codes.shape[0] == 0:
            return 0
        nthreads = nthreads or default_threads()
        p, q = X.shape[1], Z.shape[1]
        if scaling is None:
            from .scaling import Scaling

            scaling = Scaling.identity(p, q)
        ts = self.terms[term]
        levels = ts.levels if (with_globals and ts.levels is not None and self.sample is not None) else _NO_LEVELS
        G = ts.n_groups
        stride = _kernels.record_layout(q, p)[0]
        R = np.zeros(G * stride)
        tr = (scaling.x_shift, 1.0 / scaling.x_scale, scaling.z_shift, 1.0 / scaling.z_scale,
              float(scaling.y_shift), 1.0 / float(scaling.y_scale))
        XtX, Xty, out, sXtX, sXty, syty, sN = _kernels.accumulate_records(
            np.ascontiguousarray(codes, dtype=np.int64),
            np.ascontiguousarray(X.T, dtype=np.float64),
            np.ascontiguousarray(Z.T, dtype=np.float64),
            np.ascontiguousarray(y, dtype=np.float64),
            _NO_WEIGHTS if w is None else np.ascontiguousarray(w, dtype=np.float64),
            tr, R, stride, levels, -1, NO_ANCESTORS, bool(with_globals), int(nthreads), False,
        )
        A, B, c, n = np.empty_like(ts.A), np.empty_like(ts.B), np.empty_like(ts.c), np.empty_like(ts.n)
        _kernels.split_records(R, stride, _kernels.record_maps(q, p), A, B, c, n, NO_RANK, max(1, min(G, 64)))
        ts.A += A
        ts.B += B
        ts.c += c
        ts.n += n
        skipped = out[:, 2]
        if not with_globals:
            return int(skipped.sum())
        if self.sample is not None:
            self.sample = self.sample.plus(sXtX.sum(axis=0), sXty.sum(axis=0), syty.sum(axis=0), sN.sum(axis=0))
        self.XtX += XtX.sum(axis=0)
        self.Xty += Xty.sum(axis=0)
        self.yty += float(out[:, 0].sum())
        self.N += int(out[:, 1].sum())
        self.sum_log_w += float(out[:, 3].sum())
        return int(skipped.sum())

    def merge(self, other: "Statistics") -> "Statistics":
        """Sum of two statistics over the same level coding (disjoint rows; one-term models)."""
        if len(self.terms) != len(other.terms) or self.pairs or other.pairs:
            raise ValueError("merge adds statistics of one-term models over the same levels")
        both = self.sample is not None and other.sample is not None
        return Statistics([a.plus(b) for a, b in zip(self.terms, other.terms)], self.XtX + other.XtX,
                          self.Xty + other.Xty, self.yty + other.yty, self.N + other.N, [],
                          self.sample.merge(other.sample) if both else None, self.sample_term,
                          self.sum_log_w + other.sum_log_w)

    def subset_groups(self, keep: np.ndarray) -> "Statistics":
        """Statistics of the levels of term 0 selected by ``keep`` (one-term models).

        The global sums (and sample sums) are kept as they are: right when the levels
        left out have no rows, as in the callers that drop empty levels.
        """
        return self.subset_levels([keep] + [None] * (len(self.terms) - 1))

    def subset_levels(self, keeps: list) -> "Statistics":
        """Keep the levels ``keeps[k]`` (boolean mask, or None for all) of each term."""
        terms = [t if kp is None else t.subset(kp) for t, kp in zip(self.terms, keeps)]
        masks = [None if kp is None else _mask(kp, t.n_groups) for t, kp in zip(self.terms, keeps)]
        pairs = [pr.subset(masks[pr.k], masks[pr.j]) for pr in self.pairs]
        return Statistics(terms, self.XtX, self.Xty, self.yty, self.N, pairs, self.sample, self.sample_term,
                          self.sum_log_w)

    def transform_z(self, Ms) -> "Statistics":
        """Statistics for the random-effects designs ``Z_k M_k`` (one matrix, or one per term)."""
        Ms = [Ms] if isinstance(Ms, np.ndarray) else list(Ms)
        terms = [t.transform_z(M) for t, M in zip(self.terms, Ms)]
        pairs = [pr.transform_z(Ms[pr.k], Ms[pr.j]) for pr in self.pairs]
        return Statistics(terms, self.XtX, self.Xty, self.yty, self.N, pairs, self.sample, self.sample_term,
                          self.sum_log_w)

    def subset_fixed(self, cols: np.ndarray) -> "Statistics":
        """Statistics restricted to the fixed-effect columns ``cols``."""
        cols = np.asarray(cols, dtype=np.int64)
        return Statistics(
            [t.subset_fixed(cols) for t in self.terms],
            np.ascontiguousarray(self.XtX[np.ix_(cols, cols)]),
            np.ascontiguousarray(self.Xty[cols]),
            self.yty,
            self.N,
            self.pairs,
            self.sample.subset_fixed(cols) if self.sample is not None else None,
            self.sample_term,
            self.sum_log_w,
        )


def _mask(keep: np.ndarray, n: int) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.dtype == bool:
        return keep
    m = np.zeros(n, dtype=bool)
    m[keep] = True
    return m


_NO_LEVELS = np.zeros(0, dtype=np.int8)
_NO_WEIGHTS = np.zeros(0)
NO_RANK = np.zeros(0, np.int64)  # split_records: records already in level order
# the ``an`` argument of :func:`bigmixed._kernels.accumulate_records` for a term with no ancestors
NO_ANCESTORS = (np.zeros((0, 0), np.int64), np.zeros((0, 0)), np.zeros(0), np.zeros(0), np.zeros(1, np.int64),
                np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


def aliased_columns(XtX: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """Indices of fixed-effect columns that are linear combinations of earlier ones.

    Works like R's ``lm``/lme4: columns are taken in order and one is dropped
    when its residual sum of squares, after projection on the columns kept so
    far, is below ``tol`` relative to its own sum of squares.  Only ``X'X`` is
    needed, so the check costs O(p^3) whatever the number of rows.
    """
    p = XtX.shape[0]
    kept: list[int] = []
    dropped: list[int] = []
    for j in range(p):
        d = XtX[j, j]
        if d <= 0.0:
            dropped.append(j)
            continue
        if kept:
            S = XtX[np.ix_(kept, kept)]
            v = XtX[kept, j]
            try:
                coef = np.linalg.solve(S, v)
            except np.linalg.LinAlgError:
                coef = np.linalg.lstsq(S, v, rcond=None)[0]
            resid = d - v @ coef
        else:
            resid = d
        if resid <= tol * d:
            dropped.append(j)
        else:
            kept.append(j)
    return np.asarray(dropped, dtype=np.int64)
