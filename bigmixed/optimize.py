"""Minimise the profiled deviance over theta with the analytic gradient.

Three routes to the same optimum (the same first-order test decides convergence):

* **L-BFGS-B** from lme4's start (Lambda = I): ~13 evaluations for the usual
  random intercept and slope.
* **Newton steps with the average information** for crossed terms
  (:mod:`bigmixed.information`): the AI matrix at every point, from the
  factor the evaluation already holds and a few solves, instead of the
  Hessian; from the moment start 6-7 evaluations instead of L-BFGS-B's
  11-12 (InstEval, 1e5 users x 2,000 items).  A variance heading for 0 is
  held there (the matrix is singular in that entry alone) and the boundary
  probes check it; a point where the matrix cannot be had hands over to
  L-BFGS-B.
* **Subsample, then Newton** for many groups (at least 16 times
  ``WARM_GROUPS_MIN``): fit the same model to 2-4% of the groups, a sample
  by a hash of the key whose statistics the pass over the rows kept exactly
  (:class:`~bigmixed.stats.SampleSums`; each evaluation costs that fraction
  of a full one), take that optimum and a forward-difference
  Hessian there, scaled up by the ratio of rows, and polish on all groups by
  Newton steps with BFGS updates of that Hessian.  Starting inside the
  quadratic region with a good curvature estimate takes 3-4 full evaluations
  instead of ~13 (4 measured at 1e5 and 1e6 groups, issue 4).  Anything
  unusual - a subsample optimum on or near a bound, a non-positive-definite
  Hessian, a step that does not descend, no convergence in ``NEWTON_MAXITER``
  steps - hands over to L-BFGS-B from the best point seen, so the route can
  only save evaluations, never change what is accepted as converged.

The optimiser's state is a small record (:class:`OptimizerState`) kept apart
from the model and the results, as in MixedModels.jl.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .objective import NumericalError, Objective

__all__ = ["OptimizerState", "minimize", "hessian"]

# The warm-start subsample: about a fixed share of the groups, at least WARM_GROUPS_MIN of
# them, and only when that is at most 1/16 of all groups (below, the subsample fit costs
# about what it saves).  2% keeps its cost near a third of one full evaluation at any size.
WARM_FRACTION = 0.02
WARM_GROUPS_MIN = 5_000
# ... and at most about this many (a Dask fit gathers them to the driver once; more would not
# make the starting point noticeably better).
WARM_GROUPS_MAX = 200_000
NEWTON_MAXITER = 20
# Diagonal theta entries below this are tried at exactly 0 after the fit (kept if no worse);
# lme4 calls a fit singular below 1e-4.
SNAP_TOL = 1e-4
# One-sided probes off a zero diagonal (the optimiser's scaled units, where theta ~ 1).
PROBE_STEPS = (1e-3, 1e-2, 1e-1)
# The average information is taken as singular below this ratio of its smallest to its largest
# eigenvalue (InstEval's is about 1/15 at the optimum; a slope's small moment start, 1e-5).
INFO_COND_MIN = 1e-8
# A Newton step with the average information that takes an even theta entry (a relative sd)
# below this (the optimiser's scaled units, theta ~ 1) through 0, the deviance rising away from
# 0, holds that entry at 0: a variance at 0 in sight.  From above, a step goes at most half way.
FLIP_SMALL = 0.05
# How often the optimiser may restart off a false boundary point.
MAX_RESTARTS = 3
# Same relative decrease that ends L-BFGS-B (its ftol, see minimize).
FTOL = 1e-12
# L-BFGS-B is stopped after this many evaluations in a row that lower the best deviance by
# less than FTOL (relative) once the best point passes the gradient test: at an optimum its
# line search otherwise keeps trying steps whose changes are round-off (seen: 11 of 26
# evaluations of a crossed fit), and none of them can be accepted as better.
STALL_EVALS = 2


class _Stalled(Exception):
    """Raised from inside the L-BFGS-B run when it only re-evaluates round-off (STALL_EVALS)."""


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
    warm_start: bool = True,
) -> OptimizerState:
    """Minimise the profiled deviance, then check the first-order conditions.

    Convergence is judged on the gradient projected onto the feasible set,
    relative to the size of the deviance: ``max|g| <= gtol * max(1, |d|)``
    (what lme4's ``check.conv.grad`` looks at, in the same spirit), where ``d`` is
    measured from the deviance without random effects (so that it does not depend on
    the units of the data) and ``g`` is per unit of log(theta) where |theta| > 1.

    ``warm_start`` allows the subsample-then-Newton route (module docstring) when
    the objective has enough groups; pass False when ``theta0`` is the user's.
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
    pgs: list = []  # the projected gradient of each entry of seen
    watch = {"on": False}  # the stall test runs only inside L-BFGS-B
    # The deviance moves by a constant with the units of y and X (the internal scaling is
    # rounded to powers of 2), and so would every test relative to |f|: measure it from the
    # no-random-effects deviance instead, plus a unit-free size, so the path and the stopping
    # point do not depend on those units (y -> c y gives beta -> c beta to round-off).
    shift = objective.dof * (1.0 + np.log(2.0 * np.pi)) - objective.ols_deviance()

    def fg(th):
        try:
            f, g = objective(th)
        except NumericalError:
            # Far out (e.g. theta -> inf when the likelihood is unbounded) the linear algebra
            # breaks down; +inf makes a line search step back instead of crashing.
            return np.inf, np.zeros_like(th)
        if verbose:
            history.append((float(f), th.copy()))
        f = f + shift
        if np.isfinite(f):
            pg = _projected(g, th, lower)
            seen.append((float(f), th.copy(), float(np.max(np.abs(pg)))))
            pgs.append(pg)
            if watch["on"] and stalled():
                raise _Stalled
        return f, g

    def stalled() -> bool:
        if len(seen) <= STALL_EVALS:
            return False
        before = min(s[0] for s in seen[:-STALL_EVALS])
        if before - min(s[0] for s in seen[-STALL_EVALS:]) > FTOL * max(1.0, abs(before)):
            return False
        i = min(range(len(seen)), key=lambda i: seen[i][0])
        return converged_at(seen[i][0] - shift, seen[i][1], pgs[i])

    def converged_at(fun, theta, pg):
        # The gradient is taken per unit of log(theta) where |theta| > 1: far out (a huge start, or
        # a likelihood that keeps rising as theta -> inf) the deviance is flat in theta itself.
        scale = max(1.0, abs(fun + shift))
        return bool(np.max(np.abs(pg) * np.maximum(1.0, np.abs(theta))) <= gtol * scale) if pg.size else True

    start, n_iter, message, done = theta0, 0, "", False
    if objective.backend.information:
        done, start, n_iter = _newton(fg, theta0, None, lower, min(NEWTON_MAXITER, maxiter),
                                      information=_information(objective), diag=_even_thetas(objective.map))
        message = "Newton steps with the average information converged" if done else ""
    elif warm_start:
        want = min(max(WARM_GROUPS_MIN, int(WARM_FRACTION * objective.backend.n_groups)), WARM_GROUPS_MAX)
        sub = objective.subsample(want)
        guess = _subsample_guess(sub, theta0, objective.map, objective.N, gtol) if sub is not None else None
        if guess is not None:
            done, start, n_iter = _newton(fg, guess[0], guess[1], lower, min(NEWTON_MAXITER, maxiter))
            message = "Newton steps from a subsample fit converged" if done else ""
    if done:
        th = min(seen, key=lambda s: s[0])[1]
        fun, grad = objective(th)
        done = converged_at(fun, th, _projected(grad, th, lower))
    escape = None
    for _round in range(MAX_RESTARTS + 1):
        if not done:
            if escape is not None:
                start = escape
            elif seen:  # continue from the best point of the Newton route
                start = min(seen, key=lambda s: s[0])[1]
            n_iter, message = _lbfgsb(fg, start, bounds, maxiter, n_iter, watch)
        if not seen:
            raise ValueError("the deviance cannot be evaluated at the start values (non-finite linear algebra); "
                             "check the data for extreme values, or give other start_params")
        # Near the optimum a step may be accepted whose "decrease" is round-off; of the points
        # whose deviance ties with the best one to round-off take the one with the smallest
        # gradient, so the answer does not hinge on the order rows were summed in (chunking,
        # row order, group labels).
        fbest = min(s[0] for s in seen)
        tied = [s for s in seen if s[0] <= fbest + 1e-11 * max(1.0, abs(fbest))]
        theta = objective.map.rectify(min(tied, key=lambda s: s[2])[1])
        theta, escape = _settle_boundary(fg, seen, objective.map, theta)
        if escape is None:
            break
        # Moving a zero diagonal into the interior lowers the deviance: the optimiser stopped at
        # a stationary point of the even function (DESIGN.md section 9), not at the optimum.
        done = False
        message = "restarted off a false boundary point; " + message
    fun, grad = objective(theta)
    pg = _projected(grad, theta, lower)
    converged = converged_at(fun, theta, pg)
    if not converged and n_iter >= maxiter:
        message = f"iteration limit reached ({maxiter}); {message}"
    return OptimizerState(
        theta0=theta0,
        theta=theta,
        fun=float(fun),
        grad=pg,
        n_iter=n_iter,
        n_evals=int(objective.n_evals),
        converged=converged,
        message=message,
        seconds=time.perf_counter() - t0,
        history=history,
    )


def _lbfgsb(fg, start: np.ndarray, bounds, maxiter: int, n_iter: int, watch: dict) -> tuple[int, str]:
    """Run L-BFGS-B from ``start``; returns ``(iterations so far, message)``."""
    iters = [0]

    def count(_xk) -> None:
        iters[0] += 1

    # imported here: when Newton steps from the subsample fit converge (most large fits) scipy's
    # optimisers are never needed, and importing them is a tenth of a second of every start-up
    from scipy import optimize

    watch["on"] = True
    try:
        res = optimize.minimize(
            fg,
            start,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            callback=count,
            # ftol is relative in scipy.  The deviance is a sum over N rows, so its
            # round-off is ~1e-16 N; asking for less than ~1e-12 relative makes
            # L-BFGS-B thrash in that noise (seen: 80 evaluations instead of 12 at
            # 1e6 groups).  1e-12 still pins theta to ~1e-6 relative.  The gradient
            # test in minimize decides convergence.
            options={"maxiter": max(1, int(maxiter) - n_iter), "ftol": FTOL, "gtol": 1e-9, "maxcor": 20,
                     "maxls": 50},
        )
        return n_iter + int(res.nit), str(res.message)
    except _Stalled:
        return n_iter + iters[0], f"stopped: {STALL_EVALS} evaluations without a decrease beyond round-off"
    finally:
        watch["on"] = False


def _settle_boundary(fg, seen: list, tmap, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Snap near-zero diagonals to 0 where that costs nothing; probe every zero diagonal.

    Returns ``(theta, escape)``: ``escape`` is a point to restart from when moving a zero
    diagonal into the interior lowers the deviance, else None.  The deviance is even in each
    column of Lambda, so its derivative along a diagonal is 0 wherever the column is 0: only a
    probe off that point tells a boundary optimum from a saddle or a maximum.  Nothing is
    evaluated when no diagonal is near 0.
    """
    diag = np.flatnonzero(tmap.is_diag)
    small = [k for k in diag if abs(theta[k]) < SNAP_TOL]
    if not small:
        return theta, None
    f = _value_at(fg, seen, theta)
    for k in small:  # lme4's check.boundary: keep the exact 0 when it is no worse (to round-off)
        if theta[k] == 0.0:
            continue
        t = theta.copy()
        t[k] = 0.0
        ft, _ = fg(t)
        if ft <= f + 1e-12 * max(1.0, abs(f)):
            theta, f = t, min(f, ft)
    for k in small:
        if theta[k] != 0.0:
            continue
        for step in PROBE_STEPS:  # a one-sided ladder, as lme4's restart_edge and mixedlm-rs
            t = theta.copy()
            t[k] = step
            ft, gt = fg(t)
            if ft < f - 1e-12 * max(1.0, abs(f)) or (gt[k] < 0.0 and abs(gt[k]) * step > 1e-9 * max(1.0, abs(f))):
                return theta, t
    return theta, None


def _value_at(fg, seen: list, theta: np.ndarray) -> float:
    """The (shifted) deviance at ``theta``: from the evaluations so far, or one more."""
    for f, th, _ in reversed(seen):
        if np.array_equal(th, theta):
            return f
    return fg(theta)[0]


def _subsample_guess(sub: Objective, theta0: np.ndarray, tmap, n_full: int,
                     gtol: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Optimum and Hessian (scaled to the full data) of the subsample fit, or None if unsuitable."""
    try:
        with np.errstate(all="ignore"):
            st = minimize(sub, theta0, gtol=gtol, warm_start=False)
            if not st.converged:
                return None
            th = st.theta
            # Near zero (a variance ~0) the full optimum may be a boundary point, where the
            # deviance is flat to second order: leave that case to L-BFGS-B and the probes.
            if np.any(tmap.is_diag & (np.abs(th) < 1e-2)):
                return None
            H = hessian(sub, th) * (n_full / sub.N)
            np.linalg.cholesky(H)  # positive definite, or LinAlgError
    except (NumericalError, ValueError, np.linalg.LinAlgError, FloatingPointError):
        return None
    if not np.all(np.isfinite(H)):
        return None
    return th, H


def _even_thetas(tmap) -> np.ndarray:
    """Which theta entries the deviance is even in: a diagonal of Lambda alone in its column
    (a scalar term ``(1 | g)``, each entry of ``(x || g)``), a relative standard deviation."""
    parts = []
    for t in tmap.terms:
        alone = np.array([np.sum(t.cols == c) == 1 for c in t.cols], dtype=bool)
        parts.append(t.is_diag & alone)
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def _information(objective):
    """The average information at theta, or None where it cannot be had (the caller gives up)."""

    def info(theta: np.ndarray) -> np.ndarray | None:
        try:
            with np.errstate(all="ignore"):
                H = objective.information(theta)
        except (NumericalError, np.linalg.LinAlgError, FloatingPointError):
            return None
        return H if H is not None and np.all(np.isfinite(H)) else None

    return info


def _newton_step(H: np.ndarray, g: np.ndarray, theta: np.ndarray, held: np.ndarray,
                 information: bool) -> np.ndarray | None:
    """The Newton step of the quadratic model ``g, H``, with the ``held`` entries taken to 0.

    The other entries minimise the model given those moves.  None where the matrix of the free
    entries is not positive definite (or, for the average information, numerically singular).
    """
    free = ~held
    Hf, gf = H[np.ix_(free, free)], g[free]
    step = np.zeros_like(theta)
    step[held] = -theta[held]
    if held.any():
        gf = gf + H[np.ix_(free, held)] @ step[held]
    if information and gf.size:
        ev = np.linalg.eigvalsh(Hf)
        if not ev[0] > INFO_COND_MIN * ev[-1]:
            return None
    try:
        L = np.linalg.cholesky(Hf)
    except np.linalg.LinAlgError:
        return None
    step[free] = -np.linalg.solve(L.T, np.linalg.solve(L, gf))
    return step


def _newton(fg, theta: np.ndarray, H: np.ndarray | None, lower: np.ndarray, maxiter: int, information=None,
            diag: np.ndarray | None = None):
    """Newton steps with BFGS updates of ``H`` from a point near the optimum.

    With ``information`` (theta -> matrix or None) ``H`` is that matrix at every point instead
    (Fisher scoring with the average information, :mod:`bigmixed.information`), which needs no
    point near the optimum: the steps are halved until they descend.  ``diag`` marks the entries
    the deviance is even in (:func:`_even_thetas`).  A step that takes one of them through 0
    goes at most half way to 0 from afar.  From below ``FLIP_SMALL``, where the deviance rises
    away from 0, the entry is held: taken to 0 and kept there while the others converge (the
    information is singular in it at 0); the boundary probes of :func:`minimize` then check
    that 0 is its optimum.  From below ``FLIP_SMALL`` otherwise, the step crosses 0 (its mirror
    image is as good a point).  (A diagonal sharing its column of Lambda with off-diagonal
    entries, as all but the last of a correlated term's do, is free to cross 0: the deviance is
    even in the whole column only.)

    Returns ``(converged, theta, iterations)``.  Converged means the predicted
    decrease ``g' H^-1 g / 2`` fell below the relative ``FTOL`` that stops L-BFGS-B,
    once the quadratic model has been confirmed: the last step was a full one and
    gained what the model predicted for it (to a factor 2).  Without that check, below
    1/1000 of ``FTOL`` only, or ``FTOL`` itself once steps stop descending (round-off).
    Each full step evaluates the whole data; the check is what lets a fit stop as
    soon as the gap left is below what L-BFGS-B would leave, rather than take steps
    whose gain is round-off.  Giving up (returns False) is always safe: the caller
    goes on with L-BFGS-B from the best point evaluated.
    """
    f, g = fg(theta)
    if not np.isfinite(f):
        return False, theta, 0
    tol = FTOL * max(1.0, abs(f))
    confirmed = False  # the last step gained what the quadratic model predicted
    held = np.zeros(theta.size, dtype=bool)  # even entries taken to 0 (the information route)
    for it in range(1, maxiter + 1):
        if information is not None:
            free = ~held
            if H is not None and not theta[held].any() and _predicted(H[np.ix_(free, free)], g[free]) <= 1e-3 * tol:
                return True, theta, it - 1  # converged by the last matrix: this point's is not needed
            H = information(theta)
            if H is None:
                return False, theta, it - 1
        step = _newton_step(H, g, theta, held, information is not None)
        if step is not None and information is not None and diag is not None:
            hold = _to_hold(theta, step, g, diag & ~held)
            if hold.any():
                held |= hold
                step = _newton_step(H, g, theta, held, True)
        if step is None:
            return False, theta, it - 1
        slope = float(g @ step)  # < 0: a descent direction, H being positive definite
        predicted = -0.5 * slope
        # With the average information the last step is cheap and pins the flat directions of
        # crossed terms (a 14-level factor's theta) well below what FTOL of the deviance would.
        settled = not theta[held].any()
        if settled and (predicted <= 1e-3 * tol or (confirmed and predicted <= tol and information is None)):
            return True, theta, it - 1
        if not slope < 0.0:  # held entries' moves against the gradient
            return False, theta, it - 1
        t = 1.0 if diag is None else _first_step(theta, step, diag & ~held)
        for _ in range(4 if information is None else 6):  # halve a step that does not descend enough (Armijo)
            new = theta + t * step
            if np.any(new < lower):
                return False, theta, it
            fn, gn = fg(new)
            if np.isfinite(fn) and fn <= f + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            return settled and predicted <= tol, theta, it
        confirmed = t == 1.0 and 0.5 * predicted <= f - fn <= 2.0 * predicted
        s, yv = new - theta, gn - g
        sy = float(s @ yv)
        if information is None and sy > 1e-12 * float(np.linalg.norm(s) * np.linalg.norm(yv)):
            Hs = H @ s
            H = H - np.outer(Hs, Hs) / float(s @ Hs) + np.outer(yv, yv) / sy
        theta, f, g = new, fn, gn
    return False, theta, maxiter


def _to_hold(theta: np.ndarray, step: np.ndarray, g: np.ndarray, even: np.ndarray) -> np.ndarray:
    """Even entries to hold at 0: below ``FLIP_SMALL``, stepped through 0, the deviance rising away from 0."""
    flip = even & (theta != 0.0) & (np.sign(theta + step) != np.sign(theta))
    return flip & (np.abs(theta) < FLIP_SMALL) & (g * theta > 0.0)


def _first_step(theta: np.ndarray, step: np.ndarray, even: np.ndarray) -> float:
    """The first step length to try: 1, or at most half way to 0 for an ``even`` entry the step
    takes through 0 from ``FLIP_SMALL`` or more (from below, the mirror image is as good a point)."""
    far = even & (np.abs(theta) >= FLIP_SMALL) & (np.sign(theta + step) != np.sign(theta))
    if not np.any(far):
        return 1.0
    return min(1.0, 0.5 * float(np.min(np.abs(theta[far] / step[far]))))


def _predicted(H: np.ndarray, g: np.ndarray) -> float:
    """The quadratic model's decrease ``g' H^-1 g / 2`` (inf where H is not positive definite)."""
    try:
        L = np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        return np.inf
    z = np.linalg.solve(L, g)
    return 0.5 * float(z @ z)


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
