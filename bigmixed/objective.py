"""Profiled REML/ML deviance and its analytic gradient, from statistics only.

For relative covariance factors Lambda_k(theta) (Psi_k = sigma^2 Lambda_k Lambda_k') a
backend (:mod:`bigmixed.backends`) returns logdet and the corrections that turn X'X, X'y
and y'y into ``F = sigma^2 X'V^-1 X``, ``g`` and ``h``, hence beta-hat and r^2, and the
gradient pieces of every term: either tensors that this module contracts with beta-hat and
F^-1 (one pass, few fixed effects) or, in a second call, the contracted gradient.  See
DESIGN.md sections 2-3 and 7-8.  Where the statistics live (this process, Dask workers)
and how the factor is computed (one term, nested, crossed) is the backend's business; the
objective is the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from ._kernels import LEVEL_MAX, LEVEL_MIN
from .backends import LocalBackend, NumericalError, subsample_backend  # noqa: F401  (re-exported)
from .terms import ThetaMap

__all__ = ["ThetaMap", "Objective", "LocalBackend", "Pass1", "NumericalError", "subsample_backend",
           "gradient_from_fused"]

_LOG2PI = float(np.log(2.0 * np.pi))
# r^2 = h - g'beta is a difference of numbers of the size of y'y.  Below this fraction of y'y
# the residual variance is taken as 0 (the model fits the response exactly) and the deviance
# stops falling: on the way there theta^2 ~ psi/sigma^2 grows like 1/R2_FLOOR and F = X'V^-1X
# loses digits like 1e-16/R2_FLOOR (1e-10: beta still good to ~1e-6 in a degenerate fit).
R2_FLOOR = 1e-10


# One fused pass costs q^2 (p+1)^2 extra multiply-adds per group; a second
# pass costs about q p^2 + q^2 p + 6 q^3 plus re-reading the statistics.  Up to
# this many fixed effects the fused pass is faster (measured at q = 2: 30% less
# time per evaluation at p = 3, break-even at p = 6).
FUSED_MAX_P = 5


def gradient_from_fused(GA, S, beta, Finv, kappa, reml) -> np.ndarray:
    """d(deviance)/d(Lambda) from the fused pass's tensors.

    ``2 GA - 2 kappa sum_kl S[:, :, k, l] g_k g_l - [REML] 2 sum_kl S[:, :, 1+k, 1+l] Finv_kl``
    with ``g = (1, -beta)``; the lower triangle of the matrix :func:`objective_pass2`
    accumulates (the kernel fills only that, where theta lives; the rest is 0).
    """
    g = np.concatenate(([1.0], -np.asarray(beta, dtype=float)))
    out = 2.0 * GA - 2.0 * kappa * np.einsum("abkl,k,l->ab", S, g, g)
    if reml and Finv.size:
        out -= 2.0 * np.einsum("abkl,kl->ab", S[:, :, 1:, 1:], Finv)
    return out


@dataclass
class Pass1:
    """Everything pass 1 determines at one theta."""

    theta: np.ndarray
    lams: list
    logdet: float
    F: np.ndarray
    Fchol: np.ndarray
    logdetF: float
    beta: np.ndarray
    r2: float
    deviance: float
    sigma2: float
    exact: bool = False  # r^2 at its round-off floor: residual variance 0 to working precision
    GA: list | None = None  # per-term gradient tensors of the fused pass
    S: list | None = None

    @property
    def lam(self) -> np.ndarray:
        """Lambda of a one-term model."""
        return self.lams[0]


class Objective:
    """The profiled deviance d(theta) (ML) or dR(theta) (REML), with gradient.

    The numbers are those of the *transformed* problem; ``offset`` is the
    constant that turns them into the deviance on the user's scale
    (see :class:`bigmixed.stats.Scaling`).
    """

    def __init__(self, backend, thetamap: ThetaMap, reml: bool, offset: float = 0.0) -> None:
        self.backend = backend
        self.map = thetamap
        self.reml = bool(reml)
        self.offset = float(offset)
        self.p = backend.p
        self.N = backend.N
        self.dof = self.N - self.p if self.reml else self.N
        self.n_evals = 0
        self._last: Pass1 | None = None
        # One pass per evaluation when p is small (see FUSED_MAX_P).
        self._fused = self.p <= FUSED_MAX_P

    # -- pass 1 -------------------------------------------------------------

    def solve(self, theta: np.ndarray) -> Pass1:
        """Profile beta and sigma^2 out at ``theta``."""
        theta = np.asarray(theta, dtype=float)
        if self._last is not None and np.array_equal(theta, self._last.theta):
            return self._last
        be = self.backend
        lams = self.map.lams(theta)
        ev = be.evaluate(lams, self._fused)
        logdet, SF, Sg, Sh, GA, S = ev.logdet, ev.SF, ev.Sg, ev.Sh, ev.GA, ev.S
        F = be.XtX - SF
        g = be.Xty - Sg
        h = be.yty - Sh
        # checked once here, so the small factorisations below skip scipy's own finiteness checks
        if not (np.isfinite(logdet) and np.isfinite(h) and np.all(np.isfinite(F)) and np.all(np.isfinite(g))):
            raise NumericalError(f"non-finite deviance terms at theta={theta}")
        if self.p:
            try:
                Fchol = linalg.cholesky(F, lower=True, check_finite=False)
            except linalg.LinAlgError:
                # F is X'V^-1X: positive definite unless X is rank deficient, which
                # the model layer removes first; guard against round-off anyway.
                F = F + np.eye(self.p) * 1e-12 * np.max(np.abs(np.diag(F)))
                try:
                    Fchol = linalg.cholesky(F, lower=True, check_finite=False)
                except linalg.LinAlgError:
                    raise NumericalError(f"X'V^-1X is not positive definite at theta={theta}") from None
            beta = linalg.cho_solve((Fchol, True), g, check_finite=False)
            logdetF = 2.0 * float(np.sum(np.log(np.diag(Fchol))))
        else:
            Fchol = np.zeros((0, 0))
            beta = np.zeros(0)
            logdetF = 0.0
        floor = max(R2_FLOOR * max(abs(float(be.yty)), float(self.N)), 1e-300)
        r2 = float(h - g @ beta)
        exact = not r2 > floor  # also catches NaN
        if exact:
            r2 = floor
        if self.reml:
            dev = logdet + logdetF + self.dof * (1.0 + _LOG2PI + np.log(r2 / self.dof))
        else:
            dev = logdet + self.N * (1.0 + _LOG2PI + np.log(r2 / self.N))
        res = Pass1(theta.copy(), lams, logdet, F, Fchol, logdetF, beta, r2, float(dev), r2 / self.dof, exact, GA, S)
        self._last = res
        return res

    # -- value and gradient ----------------------------------------------------

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Deviance and its gradient in theta (the form scipy's jac=True wants)."""
        self.n_evals += 1
        s = self.solve(theta)
        Finv = self._finv(s)
        kappa = 0.0 if s.exact else self.dof / s.r2  # the floored r^2 term is constant
        Glam = self._grad_lambda(s, Finv, kappa)
        grad = self.map.grad(Glam)
        if not np.all(np.isfinite(grad)):
            raise NumericalError(f"non-finite gradient at theta={theta}")
        return s.deviance, grad

    def unprofiled(self, theta: np.ndarray, sigma2: float) -> tuple[float, np.ndarray]:
        """Deviance with sigma^2 not profiled out, and its gradient in (theta, sigma^2).

        beta stays profiled (its estimate is asymptotically independent of the
        variance parameters); used for the Hessian behind the variance SEs.
        """
        s = self.solve(theta)
        Finv = self._finv(s)
        Glam = self._grad_lambda(s, Finv, 1.0 / sigma2)
        dev = s.logdet + self.dof * (_LOG2PI + np.log(sigma2)) + s.r2 / sigma2
        if self.reml:
            dev += s.logdetF
        dsig = self.dof / sigma2 - s.r2 / sigma2**2
        return float(dev), np.append(self.map.grad(Glam), dsig)

    def _grad_lambda(self, s: Pass1, Finv: np.ndarray, kappa: float) -> list:
        """d(deviance)/d(Lambda_k) per term: from the fused pass's tensors, or by a second pass."""
        if s.S is not None:
            return [gradient_from_fused(GA, S, s.beta, Finv, kappa, self.reml) for GA, S in zip(s.GA, s.S)]
        return self.backend.gradient(s.lams, s.beta, Finv, kappa, self.reml)

    def information(self, theta: np.ndarray) -> np.ndarray | None:
        """The average-information matrix at ``theta`` (:mod:`bigmixed.information`), or None
        where the backend has no route for it."""
        from .information import average_information

        return average_information(self, theta)

    def subsample(self, min_groups: int) -> "Objective | None":
        """The same objective on a hash sample of at least ``min_groups`` groups (None if unavailable).

        The sample is the groups of the highest sampling level that still holds
        ``min_groups`` in expectation (:class:`~bigmixed.stats.SampleSums`), and only if that
        is at most 1/16 of the groups.  Its optimum is a starting point for this objective
        (see :func:`bigmixed.optimize.minimize`).
        """
        be = self.backend
        ratio = int(be.n_groups) // max(int(min_groups), 1)
        if ratio < 2 ** LEVEL_MIN:
            return None
        level = min(int(np.log2(ratio)), LEVEL_MAX)
        sub = be.subsample(level)
        if sub is None or sub.n_groups < 2 or sub.N <= self.p:
            return None
        return Objective(sub, self.map, self.reml, 0.0)

    def ols_deviance(self) -> float:
        """The deviance at theta = 0 (no random effects), from the global sums alone.

        It moves with the units of y and X exactly as the deviance does, so the optimiser measures
        the deviance from it and its stopping rules do not depend on those units.
        """
        be = self.backend
        floor = max(R2_FLOOR * max(abs(float(be.yty)), float(self.N)), 1e-300)
        logdetF, fit = 0.0, 0.0
        if self.p:
            try:
                c = linalg.cho_factor(be.XtX, lower=True)
            except (linalg.LinAlgError, ValueError):
                return 0.0
            fit = float(be.Xty @ linalg.cho_solve(c, be.Xty))
            logdetF = 2.0 * float(np.sum(np.log(np.diag(c[0]))))
        r2 = max(float(be.yty) - fit, floor)
        dev = self.dof * (1.0 + _LOG2PI + np.log(r2 / self.dof))
        return float(dev + (logdetF if self.reml else 0.0))

    def _finv(self, s: Pass1) -> np.ndarray:
        if not self.p:
            return np.zeros((0, 0))
        return linalg.cho_solve((s.Fchol, True), np.eye(self.p), check_finite=False)
