"""The row transform: choose it from a sample, make it canonical, move statistics between transforms.

Rows are centred and scaled before they are reduced (:class:`Scaling`).  The
transform is chosen from the first rows read; after the pass the statistics are mapped exactly to
a *canonical* transform computed from all rows and rounded to a coarse grid, so every way of
reading the same rows (files, order, chunking, Dask partitions) solves the same problem.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from . import _kernels
from .stats import SampleSums, default_threads

__all__ = ["Scaling", "scaling_from_sample", "canonical_scaling", "transform_statistics", "same_scaling"]


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

    def term(self, offset: int, q: int) -> "Scaling":
        """The transform of one term's random-effect columns ``offset .. offset + q - 1``."""
        zi = self.z_intercept - offset if offset <= self.z_intercept < offset + q else -1
        return Scaling(self.x_shift, self.x_scale, self.z_shift[offset:offset + q], self.z_scale[offset:offset + q],
                       self.y_shift, self.y_scale, self.x_intercept, zi)

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




# ---------------------------------------------------------------------------
# canonical row transform
# ---------------------------------------------------------------------------
# The statistics are accumulated under a transform S1 chosen from the first rows
# read, which depend on file order, row order and chunking.  The optimiser's path
# (and so the last digits of its answer) depends on the transformed problem, so
# after the pass the statistics are mapped exactly to a *canonical* transform
# computed from the global sums and rounded to a coarse grid (scales to powers
# of 2, shifts to 1/64 of the scale): any two ways of reading the same rows then
# solve the same transformed problem up to round-off and agree to ~1e-12
# (in-memory vs shuffled files vs chunk_rows; see tests/test_streaming.py).

_SHIFT_GRID = 64.0  # shifts on a grid of 1/64 of the (power-of-2) scale: centring within ~1/100 sd


def _pow2(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    ok = np.isfinite(v) & (v > 0.0)
    out = np.ones_like(v)
    out[ok] = np.exp2(np.round(np.log2(v[ok])))
    return out


def _grid(mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    step = scale / _SHIFT_GRID
    out = np.round(np.asarray(mean, dtype=float) / step) * step
    return np.where(np.isfinite(out), out, 0.0)


def _rounded_scaling(xm, xsd, zm, zsd, ym, ysd, xi: int, zi: int, z_centre: bool) -> Scaling:
    """A :class:`Scaling` from column means and spreads (spread = sd when centred, else RMS)."""
    x_scale, z_scale = _pow2(xsd), _pow2(zsd)
    x_shift = _grid(xm, x_scale) if xi >= 0 else np.zeros_like(x_scale)
    z_shift = _grid(zm, z_scale) if (zi >= 0 and z_centre) else np.zeros_like(z_scale)
    if xi >= 0:
        x_scale[xi], x_shift[xi] = 1.0, 0.0
    if zi >= 0:
        z_scale[zi], z_shift[zi] = 1.0, 0.0
    y_scale = float(_pow2(np.array([ysd]))[0])
    y_shift = float(_grid(np.array([ym]), np.array([y_scale]))[0]) if xi >= 0 else 0.0
    return Scaling(x_shift, x_scale, z_shift, z_scale, y_shift, y_scale, int(xi), int(zi))


def _intercepts(design) -> tuple[int, int]:
    xi = design.fe_names.index("Intercept") if "Intercept" in design.fe_names else -1
    one = len(design.terms) == 1
    zi = design.re_names.index("Intercept") if one and "Intercept" in design.re_names else -1
    return xi, zi


def z_may_centre(design) -> bool:
    """Centring Z is a reparametrisation only for one term with one unstructured covariance block."""
    return len(design.terms) == 1 and len(design.terms[0].blocks) == 1


def scaling_from_sample(X: np.ndarray, Z: np.ndarray, y: np.ndarray, design) -> Scaling:
    """The row transform from complete rows; intercepts are taken from the design, not guessed from data."""
    xi, zi = _intercepts(design)
    z_centre = z_may_centre(design)

    def moments(M, centre):
        if M.shape[0] == 0:
            return np.zeros(M.shape[1]), np.ones(M.shape[1])
        m = M.mean(axis=0)
        return m, (M.std(axis=0) if centre else np.sqrt((M * M).mean(axis=0)))

    xm, xsd = moments(X, xi >= 0)
    zm, zsd = moments(Z, zi >= 0 and z_centre)
    ym, ysd = moments(y.reshape(-1, 1), xi >= 0)
    return _rounded_scaling(xm, xsd, zm, zsd, ym[0], ysd[0], xi, zi, z_centre)


def canonical_scaling(stats, scaling: Scaling, z_centre: bool) -> Scaling:
    """The rounded transform given by the moments of *all* rows (from statistics under ``scaling``)."""
    N = float(stats.N)
    xi, zi = scaling.x_intercept, scaling.z_intercept
    # moments in the current (well-conditioned) coordinates, then mapped per column
    dX = np.diag(stats.XtX) / N
    mX = stats.XtX[xi] / N if xi >= 0 else np.zeros_like(dX)
    # (einsum: sum(axis=0) was 5x slower on (G, q, q))
    sAs = [np.einsum("gab->ab", t.A) / N for t in stats.terms]
    dZ = np.concatenate([np.diag(a) for a in sAs])
    mZ = sAs[0][zi] if zi >= 0 else np.zeros_like(dZ)
    yy = stats.yty / N
    my = stats.Xty[xi] / N if xi >= 0 else 0.0

    def orig(shift, scale, m, d, centre):
        if centre:
            return shift + scale * m, scale * np.sqrt(np.maximum(d - m * m, 0.0))
        return shift + scale * m, scale * np.sqrt(np.maximum(d, 0.0))

    xm, xsd = orig(scaling.x_shift, scaling.x_scale, mX, dX, xi >= 0)
    zm, zsd = orig(scaling.z_shift, scaling.z_scale, mZ, dZ, zi >= 0 and z_centre)
    ym, ysd = orig(scaling.y_shift, scaling.y_scale, my, yy, xi >= 0)
    return _rounded_scaling(xm, xsd, zm, zsd, float(ym), float(ysd), xi, zi, z_centre)


def same_scaling(a: Scaling, b: Scaling) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in
               ("x_shift", "x_scale", "z_shift", "z_scale", "y_shift", "y_scale", "x_intercept", "z_intercept"))


def transform_statistics(stats, old: Scaling, new: Scaling) -> None:
    """Map statistics accumulated under ``old`` to ``new``, exactly, in place.

    With X~ = X T: X~new = X~old Tx (Tx = Told^-1 Tnew), likewise Z~new = Z~old Mz, and
    y~new = a y~old + b 1, where 1 is the (untransformed) intercept column of X.
    """
    if old.x_intercept != new.x_intercept or old.z_intercept != new.z_intercept:
        raise ValueError("transforms with different intercept columns cannot be converted")
    xi = old.x_intercept
    Tx = np.linalg.solve(old.x_matrix(), new.x_matrix())
    Mz = np.linalg.solve(old.z_matrix(), new.z_matrix())
    a = old.y_scale / new.y_scale
    b = (old.y_shift - new.y_shift) / new.y_scale
    if b != 0.0 and xi < 0:  # pragma: no cover - shifts need an intercept
        raise ValueError("a response shift needs an intercept column")

    def move(XtX, Xty, yty, N):
        ones = XtX[:, xi] if xi >= 0 else np.zeros_like(Xty)
        # the intercept column's square sum is N, or the sum of the weights (its rows are sqrt(w))
        new_yty = a * a * yty + ((2.0 * a * b * Xty[xi] + b * b * XtX[xi, xi]) if xi >= 0 else 0.0)
        return Tx.T @ XtX @ Tx, Tx.T @ (a * Xty + b * ones), float(new_yty)

    stats.XtX, stats.Xty, stats.yty = move(stats.XtX, stats.Xty, stats.yty, stats.N)
    sm = stats.sample
    if sm is not None:  # the same map for the sums over each sampling level's rows (new arrays:
        # a SampleSums may be shared by statistics derived from these)
        moved = [move(sm.XtX[k], sm.Xty[k], sm.yty[k], sm.N[k]) for k in range(sm.N.shape[0])]
        stats.sample = SampleSums(np.array([m[0] for m in moved]), np.array([m[1] for m in moved]),
                                  np.array([m[2] for m in moved]), sm.N.copy())
    # One parallel pass over each term's levels (numba), in place.
    x_id = bool(np.array_equal(Tx, np.eye(Tx.shape[0])))
    off = 0
    blocks = []
    for t in stats.terms:
        q = t.q
        Mk = np.ascontiguousarray(Mz[off:off + q, off:off + q])
        blocks.append(Mk)
        off += q
        z_id = bool(np.array_equal(Mk, np.eye(q)))
        _kernels.transform_groups(t.A, t.B, t.c, Mk, np.ascontiguousarray(Tx), float(a), float(b), int(xi),
                                  z_id, x_id, max(1, min(t.A.shape[0], 4 * default_threads())))
        if t.XX is not None and not x_id:
            t.XX = np.ascontiguousarray(np.einsum("ka,gkl,lb->gab", Tx, t.XX, Tx, optimize=True))
    for k, pr in enumerate(stats.pairs):
        if not (np.array_equal(blocks[pr.k], np.eye(blocks[pr.k].shape[0]))
                and np.array_equal(blocks[pr.j], np.eye(blocks[pr.j].shape[0]))):
            stats.pairs[k] = pr.transform_z(blocks[pr.k], blocks[pr.j])
