"""Minimise the profiled deviance over theta with L-BFGS-B and the analytic gradient.

The optimiser's state is a small record (:class:`OptimizerState`) kept apart
from the model and the results, as in MixedModels.jl.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from .objective import NumericalError, Objective

__all__ = ["OptimizerState", "minimize", "hessian"]


@dataclass
class OptimizerState:
    """What the optimiser did: where it ended, how, and how long it took."""

    theta0: np.ndarray
    theta: np.ndarray
    fun: float
    grad: np.ndarray
    n_iter: int
    n_evals: int
    converged: bool
    message: str
    seconds: float
    history: list = field(default_factory=list)

    @property
    def projected_grad_norm(self) -> float:
        return float(np.max(np.abs(self.grad))) if self.grad.size else 0.0

    def to_dict(self) -> dict:
        return {
            "theta0": self.theta0.tolist(),
            "theta": self.theta.tolist(),
            "objective": self.fun,
            "gradient": self.grad.tolist(),
            "n_iter": self.n_iter,
            "n_evals": self.n_evals,
            "converged": self.converged,
            "message": self.message,
            "seconds": self.seconds,
        }


def _projected(grad: np.ndarray, theta: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Gradient with the components that push into an active bound removed."""
    g = grad.copy()
    at_bound = np.isfinite(lower) & (theta <= lower + 1e-12) & (g > 0)
    g[at_bound] = 0.0
    return g


def minimize(
    objective: Objective,
    theta0: np.ndarray,
    *,
    maxiter: int = 1000,
    gtol: float = 1e-6,
    verbose: bool = False,
) -> OptimizerState:
    """L-BFGS-B on the profiled deviance, then a check of the first-order conditions.

    Convergence is judged on the gradient projected onto the feasible set,
    relative to the size of the deviance: ``max|g| <= gtol * max(1, |d|)``
    (what lme4's ``check.conv.grad`` looks at, in the same spirit), where ``d`` is
    measured from the deviance without random effects (so that it does not depend on
    the units of the data) and ``g`` is per unit of log(theta) where |theta| > 1.
    """
    t0 = time.perf_counter()
    bounds = objective.map.bounds()
    lower = np.array([-np.inf if lo is None else lo for lo, _ in bounds])
    theta0 = np.asarray(theta0, dtype=float)
    history: list = []
    if objective.map.size == 0:
        fun, grad = objective(theta0)
        return OptimizerState(theta0, theta0, fun, grad, 0, 1, True, "no free parameters",
                              time.perf_counter() - t0)

    seen: list = []  # (f + shift, theta, max|projected gradient|) of every finite evaluation
    # The deviance moves by a constant with the units of y and X (the internal scaling is
    # rounded to powers of 2), and so would every test relative to |f|: measure it from the
    # no-random-effects deviance instead, plus a unit-free size, so the path and the stopping
    # point do not depend on those units (y -> c y gives beta -> c beta to round-off).
    shift = objective.dof * (1.0 + np.log(2.0 * np.pi)) - objective.ols_deviance() \
        if hasattr(objective, "ols_deviance") else 0.0

    def fg(th):
        try:
            f, g = objective(th)
        except NumericalError:
            # Far out (e.g. theta -> inf when the likelihood is unbounded) the linear algebra
            # breaks down; +inf makes L-BFGS-B's line search step back instead of crashing.
            return np.inf, np.zeros_like(th)
        if verbose:
            history.append((float(f), th.copy()))
        f = f + shift
        if np.isfinite(f):
            seen.append((float(f), th.copy(), float(np.max(np.abs(_projected(g, th, lower))))))
        return f, g

    res = optimize.minimize(
        fg,
        theta0,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        # ftol is relative in scipy.  The deviance is a sum over N rows, so its
        # round-off is ~1e-16 N; asking for less than ~1e-12 relative makes
        # L-BFGS-B thrash in that noise (seen: 80 evaluations instead of 12 at
        # 1e6 groups).  1e-12 still pins theta to ~1e-6 relative.  The gradient
        # test below decides convergence.
        options={"maxiter": int(maxiter), "ftol": 1e-12, "gtol": 1e-9, "maxcor": 20,
                 "maxls": 50},
    )
    if not seen:
        raise ValueError("the deviance cannot be evaluated at the start values (non-finite linear algebra); "
                         "check the data for extreme values, or give other start_params")
    # Near the optimum L-BFGS-B may accept a step whose "decrease" is round-off; of the points
    # whose deviance ties with the best one to round-off take the one with the smallest
    # gradient, so the answer does not hinge on the order rows were summed in (chunking,
    # row order, group labels).
    fbest = min(s[0] for s in seen)
    tied = [s for s in seen if s[0] <= fbest + 1e-11 * max(1.0, abs(fbest))]
    theta = np.maximum(min(tied, key=lambda s: s[2])[1], lower)
    fun, grad = objective(theta)
    pg = _projected(grad, theta, lower)
    scale = max(1.0, abs(fun + shift))
    # The gradient is taken per unit of log(theta) where |theta| > 1: far out (a huge start, or
    # a likelihood that keeps rising as theta -> inf) the deviance is flat in theta itself.
    converged = bool(np.max(np.abs(pg) * np.maximum(1.0, np.abs(theta))) <= gtol * scale) if pg.size else True
    if not converged and res.nit >= maxiter:
        message = f"iteration limit reached ({maxiter}); {res.message}"
    else:
        message = str(res.message)
    return OptimizerState(
        theta0=theta0,
        theta=theta,
        fun=float(fun),
        grad=pg,
        n_iter=int(res.nit),
        n_evals=int(objective.n_evals),
        converged=converged,
        message=message,
        seconds=time.perf_counter() - t0,
        history=history,
    )


def hessian(fun_grad, x: np.ndarray, rel_step: float = 1e-5) -> np.ndarray:
    """Symmetrised forward-difference Jacobian of an analytic gradient.

    k + 1 gradient evaluations (central differences would take 2k, each one a pass over
    the groups); the O(step) error, ~1e-5 relative, is far below what standard errors need.
    """
    x = np.asarray(x, dtype=float)
    k = x.size
    H = np.empty((k, k))
    g0 = np.asarray(fun_grad(x)[1], dtype=float)
    for j in range(k):
        h = rel_step * max(abs(x[j]), 1e-2)
        e = np.zeros(k)
        e[j] = h
        H[:, j] = (np.asarray(fun_grad(x + e)[1], dtype=float) - g0) / h
    return 0.5 * (H + H.T)
