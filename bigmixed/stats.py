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
from dataclasses import dataclass

import numba
import numpy as np

from . import _kernels

__all__ = ["Scaling", "Statistics", "SampleSums", "aliased_columns"]


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


def default_threads() -> int:
    """Threads the kernels may use (numba's setting, e.g. NUMBA_NUM_THREADS)."""
    return int(numba.get_num_threads())


@dataclass(frozen=True)
class Scaling:
    """Affine transform applied to every row before it is reduced.

    ``X~ = (X - x_shift) / x_scale`` column-wise, likewise for ``Z`` and ``y``.
    Shifts are only used where an intercept column can absorb them: in ``X``
    when ``X`` has an intercept, in ``Z`` only when ``Z`` has an intercept *and*
    the random effects have one unstructured covariance block (centring a
    slope changes the model when its covariance with the intercept is fixed
    at zero).  The response shift needs an intercept in ``X``.
    """

    x_shift: np.ndarray
    x_scale: np.ndarray
    z_shift: np.ndarray
    z_scale: np.ndarray
    y_shift: float
    y_scale: float
    x_intercept: int  # column index of the intercept in X, or -1
    z_intercept: int  # column index of the intercept in Z, or -1

    @classmethod
    def identity(cls, p: int, q: int) -> "Scaling":
        return cls(np.zeros(p), np.ones(p), np.zeros(q), np.ones(q), 0.0, 1.0, -1, -1)

    # The linear maps between the original and the transformed coefficients:
    # X = X~ Tx^{-1}  <=>  X~ = X Tx, so  X beta = X~ (Tx^{-1} beta).

    def x_matrix(self) -> np.ndarray:
        """``T`` with ``X~ = X T`` (p x p)."""
        return _affine_matrix(self.x_shift, self.x_scale, self.x_intercept)

    def z_matrix(self) -> np.ndarray:
        """``S`` with ``Z~ = Z S`` (q x q)."""
        return _affine_matrix(self.z_shift, self.z_scale, self.z_intercept)

    def subset_fixed(self, kept: np.ndarray) -> "Scaling":
        """The transform of the fixed-effect columns ``kept`` (after aliased ones are dropped)."""
        kept = np.asarray(kept, dtype=np.int64)
        xi = int(np.flatnonzero(kept == self.x_intercept)[0]) if self.x_intercept in kept else -1
        if xi < 0 and self.x_intercept >= 0:
            # Without its intercept column the shifts cannot be absorbed; callers
            # never get here because the intercept comes first and is kept.
            raise ValueError("the intercept column was dropped as aliased")
        return Scaling(self.x_shift[kept], self.x_scale[kept], self.z_shift, self.z_scale,
                       self.y_shift, self.y_scale, xi, self.z_intercept)

    def to_dict(self) -> dict:
        return {
            "x_shift": self.x_shift.tolist(),
            "x_scale": self.x_scale.tolist(),
            "z_shift": self.z_shift.tolist(),
            "z_scale": self.z_scale.tolist(),
            "y_shift": self.y_shift,
            "y_scale": self.y_scale,
            "x_intercept": self.x_intercept,
            "z_intercept": self.z_intercept,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scaling":
        return cls(
            np.asarray(d["x_shift"], float),
            np.asarray(d["x_scale"], float),
            np.asarray(d["z_shift"], float),
            np.asarray(d["z_scale"], float),
            float(d["y_shift"]),
            float(d["y_scale"]),
            int(d["x_intercept"]),
            int(d["z_intercept"]),
        )


def _affine_matrix(shift: np.ndarray, scale: np.ndarray, icol: int) -> np.ndarray:
    T = np.diag(1.0 / scale)
    if icol >= 0:
        T[icol, :] = -shift / scale
        T[icol, icol] = 1.0
    return T


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


@dataclass
class Statistics:
    """Per-group and global sufficient statistics (transformed rows).

    Attributes
    ----------
    A, B, c, n
        Per-group arrays, contiguous: ``(G, q, q)``, ``(G, q, p)``, ``(G, q)``, ``(G,)``.
    XtX, Xty, yty, N
        Global sums over all rows.
    levels, sample
        Each group's sampling level (int8, ``(G,)``) and the :class:`SampleSums` by level;
        None when not kept.
    """

    A: np.ndarray
    B: np.ndarray
    c: np.ndarray
    n: np.ndarray
    XtX: np.ndarray
    Xty: np.ndarray
    yty: float = 0.0
    N: int = 0
    levels: np.ndarray | None = None
    sample: SampleSums | None = None

    @classmethod
    def empty(cls, G: int, p: int, q: int, levels: np.ndarray | None = None) -> "Statistics":
        """Zero statistics for ``G`` groups; with ``levels``, :class:`SampleSums` are kept too."""
        if levels is not None:
            levels = np.ascontiguousarray(levels, dtype=np.int8)
            if levels.shape != (G,):
                raise ValueError(f"levels must have one entry per group ({G}), not {levels.shape}")
        def zeros(shape, dtype=np.float64):
            # Written here, not left to calloc's lazy zero pages: otherwise the kernel's threads
            # take the page faults concurrently, which serialises them (a 1e5-group fit: the
            # statistics pass 30 ms -> 13 ms on a 2-core VM).
            a = np.empty(shape, dtype=dtype)
            a.fill(0)
            return a

        return cls(
            zeros((G, q, q)),
            zeros((G, q, p)),
            zeros((G, q)),
            zeros(G, dtype=np.int64),
            np.zeros((p, p)),
            np.zeros(p),
            0.0,
            0,
            levels,
            SampleSums.zeros(p) if levels is not None else None,
        )

    @property
    def n_groups(self) -> int:
        return int(self.A.shape[0])

    @property
    def p(self) -> int:
        return int(self.B.shape[2])

    @property
    def q(self) -> int:
        return int(self.A.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.A.nbytes + self.B.nbytes + self.c.nbytes + self.n.nbytes)

    def add_rows(
        self,
        codes: np.ndarray,
        X: np.ndarray,
        Z: np.ndarray,
        y: np.ndarray,
        nthreads: int | None = None,
        scaling: "Scaling | None" = None,
    ) -> int:
        """Reduce a block of rows into the statistics; returns how many rows were skipped.

        Rows are transformed by ``scaling`` (identity if None) inside the
        kernel.  Rows with a negative code or a non-finite value are skipped
        (the caller counts and reports them).  ``X`` and ``Z`` are fastest in
        Fortran order (then ``X.T`` needs no copy), as :mod:`bigmixed.design` makes them.
        """
        if codes.shape[0] == 0:
            return 0
        nthreads = nthreads or default_threads()
        p, q = X.shape[1], Z.shape[1]
        sc = scaling or Scaling.identity(p, q)
        levels = self.levels if self.levels is not None else _NO_LEVELS
        XtX, Xty, yty, used, skipped, sXtX, sXty, syty, sN = _kernels.accumulate_stats(
            np.ascontiguousarray(codes, dtype=np.int64),
            np.ascontiguousarray(X.T, dtype=np.float64),
            np.ascontiguousarray(Z.T, dtype=np.float64),
            np.ascontiguousarray(y, dtype=np.float64),
            sc.x_shift, 1.0 / sc.x_scale, sc.z_shift, 1.0 / sc.z_scale,
            float(sc.y_shift), 1.0 / float(sc.y_scale),
            self.A, self.B, self.c, self.n, levels,
            int(nthreads),
        )
        if self.sample is not None:
            self.sample = self.sample.plus(sXtX.sum(axis=0), sXty.sum(axis=0), syty.sum(axis=0), sN.sum(axis=0))
        self.XtX += XtX.sum(axis=0)
        self.Xty += Xty.sum(axis=0)
        self.yty += float(yty.sum())
        self.N += int(used.sum())
        return int(skipped.sum())

    def merge(self, other: "Statistics") -> "Statistics":
        """Sum of two statistics over the same group coding (disjoint rows)."""
        if self.A.shape != other.A.shape or self.B.shape != other.B.shape:
            raise ValueError("cannot merge statistics of different shapes")
        both = self.sample is not None and other.sample is not None
        return Statistics(
            self.A + other.A,
            self.B + other.B,
            self.c + other.c,
            self.n + other.n,
            self.XtX + other.XtX,
            self.Xty + other.Xty,
            self.yty + other.yty,
            self.N + other.N,
            self.levels if both else None,
            self.sample.merge(other.sample) if both else None,
        )

    def subset_groups(self, keep: np.ndarray) -> "Statistics":
        """Statistics of the groups selected by the boolean/index array ``keep``.

        The global sums (and sample sums) are kept as they are: right when the groups
        left out have no rows, as in the callers that drop empty groups.
        """
        return Statistics(
            np.ascontiguousarray(self.A[keep]),
            np.ascontiguousarray(self.B[keep]),
            np.ascontiguousarray(self.c[keep]),
            np.ascontiguousarray(self.n[keep]),
            self.XtX,
            self.Xty,
            self.yty,
            self.N,
            np.ascontiguousarray(self.levels[keep]) if self.levels is not None else None,
            self.sample,
        )

    def transform_z(self, M: np.ndarray) -> "Statistics":
        """Statistics for the random-effects design ``Z M`` (M is q x q)."""
        A = np.ascontiguousarray(np.einsum("ka,gkl,lb->gab", M, self.A, M, optimize=True))
        B = np.ascontiguousarray(np.einsum("ka,gkm->gam", M, self.B, optimize=True))
        c = np.ascontiguousarray(self.c @ M)
        return Statistics(A, B, c, self.n, self.XtX, self.Xty, self.yty, self.N, self.levels, self.sample)

    def subset_fixed(self, cols: np.ndarray) -> "Statistics":
        """Statistics restricted to the fixed-effect columns ``cols``."""
        cols = np.asarray(cols, dtype=np.int64)
        return Statistics(
            self.A,
            np.ascontiguousarray(self.B[:, :, cols]),
            self.c,
            self.n,
            np.ascontiguousarray(self.XtX[np.ix_(cols, cols)]),
            np.ascontiguousarray(self.Xty[cols]),
            self.yty,
            self.N,
            self.levels,
            self.sample.subset_fixed(cols) if self.sample is not None else None,
        )


_NO_LEVELS = np.zeros(0, dtype=np.int8)


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
