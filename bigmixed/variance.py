"""The variance parameters of a fit: their covariance and statsmodels' table of them.

:func:`parameter_cov` is the covariance of (vech Psi_k for every term k, sigma^2) from the
Hessian of the deviance (the delta method); :func:`variance_table` lists each parameter under
statsmodels' name with its estimate and standard error (:class:`bigmixed.results.MixedLMResults`
serves both as ``variance_table``, ``bse_re`` and ``params``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .names import sm_var_name
from .objective import NumericalError
from .optimize import hessian

__all__ = ["parameter_cov", "variance_table"]


def parameter_cov(res) -> np.ndarray:
    """Covariance of (vech Psi_k for every k, sigma^2) from the Hessian of the deviance (delta method).

    The Hessian is taken in the transformed problem's (theta, sigma^2) by forward
    differences of the analytic gradient, then mapped to Psi.
    """
    obj = res.objective_fn
    th = res._sol.theta
    x0 = np.append(th, res._sol.sigma2)
    try:
        with np.errstate(all="ignore"):  # degenerate fits (sigma^2 ~ 0) give NaN, reported as NaN
            H = hessian(lambda x: obj.unprofiled(x[:-1], x[-1]), x0)
            cov_phi = 2.0 * np.linalg.inv(H)
    except (np.linalg.LinAlgError, NumericalError):
        cov_phi = np.full((x0.size, x0.size), np.nan)
    if np.any(np.diag(cov_phi) < 0):
        cov_phi = np.full_like(cov_phi, np.nan)
    J = _to_psi(res, x0.size)
    return J @ cov_phi @ J.T


def _to_psi(res, n: int) -> np.ndarray:
    """The Jacobian of (vech Psi_k, sigma^2) in the data's units by (theta, sigma^2) of the transformed problem."""
    sy2 = res.scaling.y_scale**2
    s2 = res._sol.sigma2
    pairs = res._pairs()
    tmap = res.tmap
    J = np.zeros((len(pairs) + 1, n))
    for i in range(tmap.size):
        k = int(tmap.term_of[i])
        tt, S, lam = tmap.terms[k], res._S[k], res._sol.lams[k]
        local = i - int(tmap.offsets[k])
        E = np.zeros((tt.q, tt.q))
        E[tt.rows[local], tt.cols[local]] = 1.0
        dPsi = sy2 * s2 * S @ (E @ lam.T + lam @ E.T) @ S.T
        for r, (kk, a, b) in enumerate(pairs):
            if kk == k:
                J[r, i] = dPsi[a, b]
    for r, (k, a, b) in enumerate(pairs):
        S, lam = res._S[k], res._sol.lams[k]
        J[r, -1] = (sy2 * S @ lam @ lam.T @ S.T)[a, b]
    J[-1, -1] = sy2
    return J


def variance_table(res, se: bool = True) -> pd.DataFrame:
    """One row per variance-component parameter: term, statsmodels' name, estimate, standard error."""
    n = len(res._pairs())
    if se:
        C = res._var_cov
        se_all = np.sqrt(np.clip(np.diag(C)[:-1], 0.0, None))
        ok = np.isfinite(np.diag(C)[:-1])
    else:
        se_all, ok = np.full(n, np.nan), np.zeros(n, dtype=bool)
    rows = []
    for r, (k, a, b) in enumerate(res._pairs()):
        if not res.structural(a, b, k) and a != b:
            continue
        t = res._terms[k]
        name = sm_var_name(t.re_names, a, b, None if k == 0 and res._group_re else t.name, res._sm_group)
        rows.append((t.name, name, res._covs[k][a, b], se_all[r] if ok[r] else np.nan))
    return pd.DataFrame(rows, columns=["term", "name", "estimate", "se"])
