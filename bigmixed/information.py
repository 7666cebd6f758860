"""The average-information matrix of the profiled deviance, from the statistics and the factor.

AI-REML (Gilmour, Thompson and Cullis 1995) replaces the Hessian of the deviance by the mean of
its observed and expected values, which needs no traces: with ``H = I + Z Lambda Lambda' Z'``
(``V = sigma^2 H``), ``r = P_H y`` the penalised residual and, for each theta entry k, the
*working variate* ``w_k = (dH / d theta_k) r``,

    AI_kl = nu (w_k' P_H w_l - q_k q_l / r^2) / r^2,      q_k = y' P_H w_k,  r^2 = y' P_H y,

in deviance units, with sigma^2 profiled out (the Schur complement of the (theta, sigma^2)
matrix) and ``nu`` the residual degrees of freedom.  ``w_k' P_H w_l`` is what the deviance's
own sums are for ``y``: the working variates are added as extra columns beside ``[y X]``
(their per-level sums ``Z_j' w_k`` come from Z'Z: a term's blocks and the pair blocks; ``Z'r`` from
the spherical conditional modes), the
backend returns their corrections from the factor it already holds at this theta
(``schur_columns``), and X is profiled out as for the deviance.  At the optimum AI is close to
the Hessian (tests compare it with finite differences), so Newton steps with it converge in a
few evaluations where L-BFGS-B takes ten or more (DESIGN.md section 8, crossed terms).
"""

from __future__ import annotations

import numpy as np

from . import _kernels
from .stats import Statistics

__all__ = ["average_information", "zz_times"]


def zz_times(stats: Statistics, j: int, k: int, v: np.ndarray) -> np.ndarray:
    """``Z_j' Z_k v`` per level of term j, for ``v (levels_k, q_k)`` given per level of term k."""
    tj = stats.terms[j]
    if j == k:
        return np.einsum("gab,gb->ga", tj.A, v)
    n, q = tj.n_groups, tj.A.shape[1]
    out = np.zeros((n, q))
    for pr in stats.pairs:  # pr.vals (pairs, q_j, q_k) = Z_j'Z_k over the rows a pair of levels shares
        if (pr.j, pr.k) == (j, k):
            codes, other, vals = pr.jcodes, pr.kcodes, pr.vals
        elif (pr.j, pr.k) == (k, j):
            codes, other, vals = pr.kcodes, pr.jcodes, np.swapaxes(pr.vals, 1, 2)
        else:
            continue
        if vals.shape[1] == vals.shape[2] == 1:  # scalar terms (most crossed models): one pass, no temporaries
            out += _kernels.pair_sums(codes, other, vals[:, 0, 0], v, n)
            continue
        part = np.einsum("eab,eb->ea", vals, v[other])
        for a in range(q):  # bincount sums in pair order: the same bits every time
            out[:, a] += np.bincount(codes, weights=part[:, a], minlength=n)
    return out


def _residual_sums(lams: list, modes: list, stats: Statistics | None = None,
                   beta: np.ndarray | None = None) -> list | None:
    """``Z_k' r`` per term from the spherical modes: the mixed-model equations give
    ``Lambda' Z' r = u``, so ``Z_k' r = Lambda_k^-T u_k``.

    A column of Lambda that is 0 and alone in its block (a variance held at 0 by the Newton
    route) has no working variate (``dH/dtheta`` is 0 there), so its entry of ``Z'r`` is not
    needed: it is set to 0 and the rest solved without it.  Where a Lambda is singular otherwise
    (a correlated term's last diagonal at 0: a correlation of +-1) the term's sums come from the
    statistics, ``Z_k'y - Z_k'X beta - sum_j Z_k'Z_j b_j``; None if they are not given.
    """
    out, b = [], None
    for k, (lam, u) in enumerate(zip(lams, modes)):
        s = _sums_from_modes(lam, u)
        if s is None:
            if stats is None or beta is None:
                return None
            if b is None:
                b = [uj @ lj.T for uj, lj in zip(modes, lams)]
            t = stats.terms[k]
            s = t.c - np.einsum("gap,p->ga", t.B, beta)
            for j in range(len(stats.terms)):
                s = s - zz_times(stats, k, j, b[j])
        out.append(s)
    return out


def _sums_from_modes(lam: np.ndarray, u: np.ndarray) -> np.ndarray | None:
    """``Lambda^-T u`` per level, 0 in the zero columns alone in their block; None if singular otherwise."""
    d = np.abs(np.diag(lam))
    zero = d == 0.0
    off = np.abs(lam) * (1.0 - np.eye(lam.shape[0]))
    keep = ~(zero & ~off.any(axis=0) & ~off.any(axis=1))  # all but the zero columns alone in their block
    if d[keep].size and d[keep].min() <= 1e-10 * max(1.0, d.max()):
        return None
    s = np.zeros_like(u)
    if keep.any():
        sub = lam[np.ix_(keep, keep)]
        s[:, keep] = np.linalg.solve(sub.T, u[:, keep].T).T  # s = Lambda^-T u, per level
    return s


def _variates(tmap, lams: list, sums: list) -> list:
    """Per theta entry: (term, ``(dLambda Lambda' / dtheta) Z'r`` per level of that term)."""
    out = []
    for k, tt in enumerate(tmap.terms):
        lam, s = lams[k], sums[k]
        ls = s @ lam  # Lambda' s per level
        for a, b in zip(tt.rows, tt.cols):  # d(Lambda Lambda') = E_ab Lambda' + Lambda E_ba
            v = s[:, a:a + 1] * lam[:, b][None, :]
            v[:, a] += ls[:, b]
            out.append((k, v))
    return out


def average_information(objective, theta: np.ndarray) -> np.ndarray | None:
    """AI at ``theta`` (``(k, k)``, deviance units), or None when the backend has no route for it."""
    be = objective.backend
    if not be.information:
        return None
    stats = be.stats
    sol = objective.solve(theta)
    sums = _residual_sums(sol.lams, be.spherical_modes(sol.lams, sol.beta), stats, sol.beta)
    if sums is None:
        return None
    variates = _variates(objective.map, sol.lams, sums)
    K, p, nterms = len(variates), be.p, len(stats.terms)
    # Z_j' w_k per level of every term j (levels_j, q_j, K)
    ext = [np.stack([zz_times(stats, j, k, v) for k, v in variates], axis=2) if K else None
           for j in range(nterms)]
    SWW, SWD = be.schur_columns(sol.lams, ext)
    WD = np.empty((K, p + 1))  # W'[y X]
    WW = np.empty((K, K))
    for a, (k, v) in enumerate(variates):
        t = stats.terms[k]
        WD[a, 0] = np.sum(t.c * v)
        WD[a, 1:] = np.einsum("gap,ga->p", t.B, v)
        WW[a] = np.einsum("ga,gab->b", v, ext[k])
    WW = 0.5 * (WW + WW.T)
    # [w]' H^-1 [y X w], then X profiled out as for the deviance (F = X'H^-1X)
    GWW = WW - SWW
    GWD = WD - SWD
    GWX, GWy = GWD[:, 1:], GWD[:, 0]
    T, q = GWW, GWy
    if p:
        T = GWW - GWX @ np.linalg.solve(sol.F, GWX.T)
        q = GWy - GWX @ sol.beta
    r2 = sol.r2
    H = objective.dof * (T - np.outer(q, q) / r2) / r2
    return 0.5 * (H + H.T)
