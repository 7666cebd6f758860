"""Confidence intervals as lme4's ``confint.merMod``: profile likelihood, Wald, parametric bootstrap.

Profile intervals follow ``profile.merMod``: the fit is refitted by maximum likelihood (also for a
REML fit, as lme4's ``devfun2`` does), every parameter on lme4's ``sdcor`` scale - each random
effect's standard deviation ``sd_<effect>|<group>``, each correlation ``cor_<a>.<b>|<group>``,
``sigma``, and each fixed effect - is held at a value while the ML deviance is minimised over all
the others, and ``zeta(v) = sign(v - v_ML) sqrt(dev(v) - dev_ML)``.  The interval is where zeta
crosses ``qnorm((1 -+ level) / 2)``; a standard deviation whose profile stays below the cutoff
down to 0 gets the bound 0, a correlation +-1 (lme4's behaviour).  lme4 interpolates zeta with a
spline through points about 0.5 apart; here each endpoint is the root of zeta itself (Brent's
method), so the two agree to the accuracy of lme4's spline (~1e-4 relative).

Every profile point is a constrained refit from the statistics alone, warm-started from the
nearest point already computed: O(groups) per evaluation.  A fixed effect held at ``v`` needs no
new statistics either: with the constraint ``c' beta~ = d`` the generalised least-squares solution and
its residual sum of squares follow in closed form from the objective's ``F``, ``beta`` and ``r^2``,
and the gradient is the backend's, evaluated at the constrained beta (envelope theorem).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, special

from .objective import NumericalError, Objective, gradient_from_fused
from .optimize import minimize

__all__ = ["confint", "param_names", "boot_percentile"]

_MAX_STEPS = 40


@dataclass(frozen=True)
class _Par:
    name: str
    kind: str  # "sd", "cor", "sigma", "beta"
    k: int = -1  # term
    a: int = -1  # row (effect) of Psi_k
    b: int = -1  # column
    j: int = -1  # fixed effect


def _params(res) -> list[_Par]:
    """lme4's profile parameters in its order: per bar, vech of its covariance; sigma; fixed effects."""
    from .results import _lme4_bars

    out = []
    for k, bar in _lme4_bars(res._terms):
        t, tt = res._terms[k], res.tmap.terms[k]
        cols = [j for j, bb in enumerate(t.bar_of) if bb == bar and j not in tt.zero]
        names = res.lme4_names(k)
        for i, c in enumerate(cols):
            out.append(_Par(f"sd_{names[c]}|{t.name}", "sd", k, c, c))
            for a in cols[i + 1:]:
                if tt.structural(a, c):
                    out.append(_Par(f"cor_{names[a]}.{names[c]}|{t.name}", "cor", k, a, c))
    out.append(_Par("sigma", "sigma"))
    out += [_Par(n, "beta", j=j) for j, n in enumerate(res.fixef.index)]
    return out


def sdcor_values(res, vpars: list, theta: np.ndarray, s2: float) -> np.ndarray:
    """lme4's sd/cor/sigma values (user's scale) of the transformed problem's (theta~, sigma~^2)."""
    sy = float(res.scaling.y_scale)
    lams = res.tmap.lams(theta)
    psis = [sy ** 2 * s2 * S @ L @ L.T @ S.T for S, L in zip(res._S, lams)]
    out = []
    for p in vpars:
        if p.kind == "sd":
            out.append(np.sqrt(max(psis[p.k][p.a, p.a], 0.0)))
        elif p.kind == "cor":
            P = psis[p.k]
            den = np.sqrt(P[p.a, p.a] * P[p.b, p.b])
            out.append(P[p.a, p.b] / den if den > 0 else np.nan)
        else:
            out.append(sy * np.sqrt(s2))
    return np.asarray(out, dtype=float)


def param_names(res) -> list[str]:
    """The row names of :func:`confint` (lme4's ``oldNames = FALSE``)."""
    return [p.name for p in _params(res)]


class _Profiler:
    """The ML deviance of the fit's statistics as a function of lme4's sdcor parameters."""

    def __init__(self, res) -> None:
        self.res = res
        tmap = res.tmap
        if any(tt.held for tt in tmap.terms):
            raise NotImplementedError("profile intervals with a variance held at a fixed value are not supported")
        be = res.objective_fn.backend
        self.obj = res.objective_fn if not res.reml else Objective(be, tmap, False, 0.0)
        theta = res._sol.theta
        if res.reml:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theta = minimize(self.obj, theta, warm_start=False).theta
        sol = self.obj.solve(theta)
        self.theta_ml = np.asarray(theta, dtype=float).copy()
        self.base = float(sol.deviance)
        self.sy = float(res.scaling.y_scale)
        self.Sinv = [np.linalg.inv(S) for S in res._S]
        self.pars = _params(res)
        self.vpars = [p for p in self.pars if p.kind != "beta"]
        self.s_hat = self.s_of_phi(sol.theta, sol.sigma2)
        Tu = self.sy * res._T
        self.Tu = Tu
        shift = np.zeros(len(res.exog_names))
        if res.scaling.x_intercept >= 0:
            shift[res.scaling.x_intercept] = res.scaling.y_shift
        self.shift = shift
        self.beta_hat = Tu @ sol.beta + shift
        self._full: dict = {}

    # -- maps between lme4's sdcor vector s (variance parameters then sigma) and (theta~, sigma~^2)
    def s_of_phi(self, theta: np.ndarray, s2: float) -> np.ndarray:
        return np.nan_to_num(sdcor_values(self.res, self.vpars, theta, s2), nan=0.0)

    def phi_of_s(self, s: np.ndarray) -> tuple[np.ndarray, float]:
        from .results import safe_cholesky

        res = self.res
        sigma = float(s[-1])
        psis = [np.zeros((t.q, t.q)) for t in res._terms]
        sds = {}
        for p, v in zip(self.vpars, s):
            if p.kind == "sd":
                sds[(p.k, p.a)] = v
                psis[p.k][p.a, p.a] = v * v
        for p, v in zip(self.vpars, s):
            if p.kind == "cor":
                psis[p.k][p.a, p.b] = psis[p.k][p.b, p.a] = v * sds[(p.k, p.a)] * sds[(p.k, p.b)]
        parts = []
        for k, tt in enumerate(res.tmap.terms):
            inner = self.Sinv[k] @ (psis[k] / sigma ** 2) @ self.Sinv[k].T
            parts.append(tt.theta(safe_cholesky(0.5 * (inner + inner.T))))
        return np.concatenate(parts), (sigma / self.sy) ** 2

    def bounds(self, p: _Par) -> tuple[float, float]:
        if p.kind == "sd":
            return 0.0, np.inf
        if p.kind == "cor":
            return -1.0, 1.0
        if p.kind == "sigma":
            return 1e-12 * max(self.s_hat[-1], 1e-300), np.inf
        return -np.inf, np.inf

    def dev_s(self, s: np.ndarray, free: np.ndarray) -> tuple[float, np.ndarray]:
        """The ML deviance at sdcor ``s`` and its gradient in ``s[free]`` (chain rule, map by differences)."""
        th, s2 = self.phi_of_s(s)
        try:
            f, g = self.obj.unprofiled(th, s2)
        except NumericalError:
            return np.inf, np.zeros(free.size)
        base = np.append(th, s2)
        grad = np.empty(free.size)
        for n, i in enumerate(free):
            lo, hi = self.bounds(self.vpars[i])
            h = 1e-7 * max(abs(s[i]), 1e-3)
            up, dn = s.copy(), s.copy()
            up[i] = min(s[i] + h, hi)
            dn[i] = max(s[i] - h, lo)
            pu, pd_ = (np.append(*self.phi_of_s(up)), np.append(*self.phi_of_s(dn))) if up[i] > dn[i] else (base, base)
            grad[n] = float(g @ (pu - pd_)) / (up[i] - dn[i]) if up[i] > dn[i] else 0.0
        return float(f), grad

    # -- one profile point: the deviance with parameter w held at v
    def zeta(self, w: int, v: float, x0: np.ndarray) -> tuple[float, np.ndarray]:
        """zeta at ``v`` and the point of the constrained minimum (warm-started from ``x0``)."""
        dev, x = self.point(w, v, x0)
        return float(np.sign(v - self.estimate(w)) * np.sqrt(max(dev - self.base, 0.0))), x

    def point(self, w: int, v: float, x0: np.ndarray) -> tuple[float, np.ndarray]:
        """min f(x) over x with x[iw] = v, escaping the stationary points where a column of Lambda is 0."""
        _, _, lo, hi, iw = self.full(w)
        x = np.clip(np.asarray(x0, dtype=float).copy(), lo, hi)
        x[iw] = v
        f, x = self._descend(w, x)
        for _ in range(3):
            esc = self.escape(w, x, f)
            if esc is None:
                break
            f, x = self._descend(w, esc)
        return f, x

    def _even(self, w: int) -> list[tuple[int, float]]:
        """(coordinate, scale) of the free coordinates the deviance is even in (theta diagonals, SDs)."""
        if self.pars[w].kind == "beta":
            return [(int(i), 1.0) for i in np.flatnonzero(self.res.tmap.is_diag)]
        return [(i, float(self.s_hat[-1])) for i, p in enumerate(self.vpars) if p.kind == "sd" and i != w]

    def escape(self, w: int, x: np.ndarray, f: float) -> np.ndarray | None:
        """A point off a zero theta diagonal / SD with a lower deviance (lme4's boundary probe), or None.

        The deviance is even in such a coordinate, so its derivative there is 0 for any data: Newton
        steps and L-BFGS-B stay at 0 even where the minimum is in the interior (DESIGN.md section 9).
        """
        fg, _, lo, hi, _ = self.full(w)
        for k, sc in self._even(w):
            if abs(x[k]) > 1e-6 * sc:
                continue
            for step in (1e-3, 1e-2, 1e-1):
                y = x.copy()
                y[k] = min(step * sc, hi[k])
                if fg(y)[0] < f - 1e-10 * max(1.0, abs(f)):
                    return y
        return None

    def _descend(self, w: int, x: np.ndarray) -> tuple[float, np.ndarray]:
        """min f over the coordinates other than w from x: Newton steps (Hessian by differences), else L-BFGS-B."""
        fg, _, lo, hi, iw = self.full(w)
        rest = np.array([i for i in range(x.size) if i != iw], dtype=np.int64)
        f, g = fg(x)
        if rest.size == 0:
            return f, x
        H = None
        for it in range(25):
            if not np.isfinite(f):
                break
            if it % 4 == 0:
                H = self.hessian(fg, x, lo, hi)[np.ix_(rest, rest)]
            try:
                step = -np.linalg.solve(H, g[rest])
            except np.linalg.LinAlgError:
                break
            if float(g[rest] @ step) >= 0.0:  # not a descent direction: leave it to L-BFGS-B
                break
            t, ok = 1.0, False
            for _ in range(8):
                y = x.copy()
                y[rest] += t * step
                if np.all(y >= lo) and np.all(y <= hi):
                    fy, gy = fg(y)
                    if fy <= f + 1e-4 * t * float(g[rest] @ step):
                        ok = True
                        break
                t *= 0.5
            if not ok:
                break
            done = np.max(np.abs(t * step) / np.maximum(np.abs(x[rest]), 1e-3)) < 1e-10
            x, f, g = y, fy, gy
            if done or f - fy > -1e-13 and np.max(np.abs(t * step)) < 1e-12:
                return f, x
        bnds = list(zip(lo[rest], hi[rest]))
        bnds = [(None if not np.isfinite(a) else a, None if not np.isfinite(b) else b) for a, b in bnds]

        def sub(xr):
            y = x.copy()
            y[rest] = xr
            fy, gy = fg(y)
            return fy, gy[rest]

        r = optimize.minimize(sub, x[rest], jac=True, method="L-BFGS-B", bounds=bnds,
                              options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 2000, "maxcor": 20})
        if r.fun < f:
            x = x.copy()
            x[rest] = r.x
            f = float(r.fun)
        return float(f), x

    # -- the whole problem of parameter w as one smooth function (for the Newton endpoint)
    def full(self, w: int):
        """``(fg, x0, lo, hi, iw)``: f(x) = the ML deviance with x[iw] the parameter, the others free."""
        if w not in self._full:
            self._full[w] = self._make_full(w)
        return self._full[w]

    def _make_full(self, w: int):
        p = self.pars[w]
        if p.kind != "beta":
            n = len(self.vpars)
            allf = np.arange(n)
            lo = np.array([self.bounds(q)[0] for q in self.vpars])
            hi = np.array([self.bounds(q)[1] for q in self.vpars])
            return (lambda x: self.dev_s(x, allf)), self.s_hat.copy(), lo, hi, w
        c = self.Tu[p.j]
        obj, tmap, N = self.obj, self.res.tmap, float(self.obj.N)
        nt = tmap.size

        def fg(x):
            th, v = x[:nt], x[nt]
            d = float(v - self.shift[p.j])
            try:
                s = obj.solve(th)
                Finv = obj._finv(s)
                Fc = Finv @ c
                cFc = float(c @ Fc)
                gap = float(c @ s.beta) - d
                beta = s.beta - Fc * gap / cFc
                r2 = s.r2 + gap * gap / cFc
                f = s.logdet + N * (1.0 + np.log(2.0 * np.pi * r2 / N))
                kappa = N / r2
                if s.S is not None:
                    G = [gradient_from_fused(GA, S, beta, Finv, kappa, False) for GA, S in zip(s.GA, s.S)]
                else:
                    G = obj.backend.gradient(s.lams, beta, Finv, kappa, False)
                return float(f), np.append(tmap.grad(G), -2.0 * kappa * gap / cFc)
            except NumericalError:
                return np.inf, np.zeros_like(x)

        x0 = np.append(self.theta_ml, self.beta_hat[p.j])
        return fg, x0, np.full(nt + 1, -np.inf), np.full(nt + 1, np.inf), nt

    def hessian(self, fg, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        n = x.size
        H = np.empty((n, n))
        for j in range(n):
            h = 1e-5 * max(abs(x[j]), 1e-2)
            up, dn = x.copy(), x.copy()
            up[j] = min(x[j] + h, hi[j])
            dn[j] = max(x[j] - h, lo[j])
            H[:, j] = (fg(up)[1] - fg(dn)[1]) / (up[j] - dn[j])
        return 0.5 * (H + H.T)

    def newton_endpoint(self, w: int, target: float, H0: np.ndarray | None = None) -> float | None:
        """Solve grad_{-w} f = 0, f = base + target^2 by Newton's method; None if that fails."""
        fg, x0, lo, hi, iw = self.full(w)
        if H0 is None:
            H0 = self.hessian(fg, x0, lo, hi)
        try:
            Hi = np.linalg.solve(H0, np.eye(x0.size)[iw])
        except np.linalg.LinAlgError:
            return None
        if not Hi[iw] > 0:
            return None
        x = x0 + np.sign(target) * abs(target) * np.sqrt(2.0 / Hi[iw]) * Hi
        goal = self.base + target * target
        H = H0
        rest = np.array([i for i in range(x0.size) if i != iw])
        for it in range(30):
            if np.any(x < lo) or np.any(x > hi):
                return None
            f, g = fg(x)
            if not np.isfinite(f):
                return None
            if it in (1, 4):
                H = self.hessian(fg, x, lo, hi)
            J = np.vstack([H[rest], g[None, :]]) if rest.size else g[None, :]
            r = np.append(g[rest], f - goal)
            try:
                step = -np.linalg.solve(J, r)
            except np.linalg.LinAlgError:
                return None
            x = x + step
            if abs(step[iw]) <= 1e-10 * max(abs(x[iw]), 1e-8 + abs(x0[iw])) and abs(f - goal) < 1e-8:
                if np.sign(x[iw] - x0[iw]) != np.sign(target) or np.any(x < lo) or np.any(x > hi):
                    return None
                if self.escape(w, x, fg(x)[0]) is not None:  # a stationary point, not the minimum
                    return None
                return float(x[iw])
        return None

    def start(self, w: int) -> np.ndarray:
        return self.full(w)[1].copy()

    def estimate(self, w: int) -> float:
        p = self.pars[w]
        return float(self.beta_hat[p.j] if p.kind == "beta" else self.s_hat[w])

    # -- the interval endpoint on one side
    def endpoint(self, w: int, target: float, scale: float) -> float:
        p = self.pars[w]
        lo, hi = self.bounds(p) if p.kind != "beta" else (-np.inf, np.inf)
        est = self.estimate(w)
        side = 1.0 if target > 0 else -1.0
        if (side < 0 and est <= lo) or (side > 0 and est >= hi):
            return lo if side < 0 else hi
        pts = [(est, 0.0, self.start(w))]

        def near(v):
            return min(pts, key=lambda t: abs(t[0] - v))[2]

        step = max(scale, 1e-8 * max(abs(est), 1.0))
        v_prev, z_prev = est, 0.0
        v = est + side * step
        for _ in range(_MAX_STEPS):
            v = min(max(v, lo), hi)
            z, x = self.zeta(w, v, near(v))
            pts.append((v, z, x))
            if side * z >= side * target:
                break
            if v in (lo, hi):
                return v  # the profile stays within the cutoff up to the bound
            slope = (z - z_prev) / (v - v_prev)
            nxt = v + (target - z) / slope if side * slope > 0 else v + 2.0 * (v - v_prev)
            # at most 4x the last step, at least a 5% overshoot so the root is bracketed soon
            dv = np.clip(1.05 * (nxt - v), -4.0 * abs(v - v_prev), 4.0 * abs(v - v_prev))
            v_prev, z_prev = v, z
            v = v + dv
        else:
            return np.nan
        a, b = (v_prev, v) if v_prev < v else (v, v_prev)
        return float(optimize.brentq(lambda t: self.zeta(w, t, near(t))[0] - target, a, b,
                                     xtol=1e-12 * max(abs(est), 1.0), rtol=1e-11, maxiter=100))

    def interval(self, w: int, z: float) -> tuple[float, float]:
        """Both endpoints: Newton on the whole problem, else stepping along the profile (bounds)."""
        fg, x0, lo, hi, _ = self.full(w)
        H0 = self.hessian(fg, x0, lo, hi)
        out = []
        blo, bhi = self.bounds(self.pars[w]) if self.pars[w].kind != "beta" else (-np.inf, np.inf)
        for target in (-z, z):
            v = self.newton_endpoint(w, target, H0)
            if v is None:
                bound = blo if target < 0 else bhi
                if np.isfinite(bound) and self.pars[w].kind != "sigma":
                    # Newton left the domain: is the whole profile up to the bound within the cutoff?
                    zb, _ = self.zeta(w, bound, self.start(w))
                    if abs(zb) < abs(target):
                        out.append(bound)
                        continue
                v = self.endpoint(w, target, self.scale(w))
            out.append(v)
        return out[0], out[1]

    def scale(self, w: int) -> float:
        """A first step: about a tenth of a standard error."""
        p = self.pars[w]
        if p.kind == "beta":
            return 0.1 * float(self.res.bse_fe.iloc[p.j])
        if p.kind == "cor":
            return 0.02
        return 0.02 * max(self.s_hat[w], 1e-3 * self.s_hat[-1])


def _select(names: list[str], parm) -> list[int]:
    if parm is None:
        return list(range(len(names)))
    if isinstance(parm, str):
        if parm == "theta_":
            return [i for i, n in enumerate(names) if n.startswith(("sd_", "cor_")) or n == "sigma"]
        if parm == "beta_":
            return [i for i, n in enumerate(names) if not (n.startswith(("sd_", "cor_")) or n == "sigma")]
        parm = [parm]
    out = []
    for q in parm:
        if isinstance(q, (int, np.integer)):
            out.append(int(q))
        elif q in names:
            out.append(names.index(q))
        else:
            raise ValueError(f"no parameter {q!r}; the parameters are {names}")
    return out


def _columns(level: float) -> list[str]:
    a = (1.0 - level) / 2.0
    return [f"{100 * a:.3g} %", f"{100 * (1 - a):.3g} %"]


def confint(res, parm=None, level: float = 0.95, method: str = "profile", nsim: int = 500,
            seed: int | None = None, boot_type: str = "perc") -> pd.DataFrame:
    """Confidence intervals of every parameter, as lme4's ``confint(fit, method, oldNames = FALSE)``.

    Parameters
    ----------
    res
        A fitted :class:`~bigmixed.results.MixedLMResults`.
    parm
        Parameter names (or positions), ``"theta_"`` (variance parameters) or ``"beta_"`` (fixed
        effects); ``None`` for all.
    level
        Confidence level.
    method
        ``"profile"`` (profile likelihood of the ML deviance), ``"Wald"`` (fixed effects only; the
        variance parameters get NaN, as in lme4) or ``"boot"`` (parametric bootstrap percentiles).
    nsim, seed
        Bootstrap replicates and seed (``method="boot"``).
    boot_type
        ``"perc"`` (percentile, lme4's default) or ``"norm"`` (normal approximation).

    Returns
    -------
    pandas.DataFrame
        Rows named as lme4 names them (``sd_(Intercept)|Pig``, ``cor_Time.(Intercept)|Pig``,
        ``sigma``, ``(Intercept)``, ...), columns ``"2.5 %"`` and ``"97.5 %"`` (for level 0.95).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, not {level!r}")
    names = param_names(res)
    sel = _select(names, parm)
    cols = _columns(level)
    m = str(method).lower()
    out = np.full((len(sel), 2), np.nan)
    if m == "wald":
        z = special.ndtri(1.0 - (1.0 - level) / 2.0)
        pars = _params(res)
        se = res.bse_fe.to_numpy()
        beta = res.fixef.to_numpy()
        for r, i in enumerate(sel):
            if pars[i].kind == "beta":
                j = pars[i].j
                out[r] = beta[j] - z * se[j], beta[j] + z * se[j]
    elif m == "profile":
        from .inference import serial_kernels

        z = special.ndtri(1.0 - (1.0 - level) / 2.0)
        with np.errstate(all="ignore"), serial_kernels(res):
            pr = _Profiler(res)
            for r, i in enumerate(sel):
                out[r] = pr.interval(i, z)
        pr.obj.solve(pr.theta_ml)
        res.objective_fn.solve(res._sol.theta)
    elif m == "boot":
        from .bootstrap import bootstrap

        b = bootstrap(res, nsim, seed=seed)
        a = (1.0 - level) / 2.0
        for r, i in enumerate(sel):
            t = b[names[i]].to_numpy()
            if boot_type == "perc":
                out[r] = boot_percentile(t, [a, 1.0 - a])
            elif boot_type == "norm":  # boot.ci(type = "norm"): bias-corrected normal interval
                t0 = float(b.attrs["t0"][names[i]])
                mu, sd = np.nanmean(t), np.nanstd(t, ddof=1)
                zz = special.ndtri(1.0 - a)
                out[r] = 2.0 * t0 - mu - zz * sd, 2.0 * t0 - mu + zz * sd
            else:
                raise ValueError(f"unknown boot_type {boot_type!r}; use 'perc' or 'norm'")
    else:
        raise ValueError(f"unknown method {method!r}; use 'profile', 'Wald' or 'boot'")
    return pd.DataFrame(out, index=[names[i] for i in sel], columns=cols)


def boot_percentile(t: np.ndarray, alpha) -> np.ndarray:
    """Percentile interval endpoints as the boot package's ``norm.inter`` (R's ``boot.ci(type = "perc")``).

    The ``(R + 1) alpha``-th order statistic, interpolated on the normal quantile scale between
    neighbouring order statistics.
    """
    t = np.sort(np.asarray(t, dtype=float)[np.isfinite(t)])
    R = t.size
    if R == 0:
        return np.full(len(alpha), np.nan)
    out = []
    for a in alpha:
        rk = (R + 1) * a
        k = int(np.trunc(rk))
        if k == rk and 1 <= k <= R:
            out.append(t[k - 1])
        elif k <= 0:
            out.append(t[0])
        elif k >= R:
            out.append(t[R - 1])
        else:
            z1, z2, z3 = special.ndtri(a), special.ndtri(k / (R + 1)), special.ndtri((k + 1) / (R + 1))
            out.append(t[k - 1] + (z1 - z2) / (z3 - z2) * (t[k] - t[k - 1]))
    return np.asarray(out)
