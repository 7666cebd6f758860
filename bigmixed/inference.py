"""Denominator degrees of freedom for the fixed effects: Satterthwaite (lmerTest) and Kenward-Roger (pbkrtest).

Everything is computed from the sufficient statistics (no pass over the rows), in the
coordinates of the transformed problem the fit solved (:mod:`bigmixed.scaling`): a contrast
``L`` of the user's coefficients is ``L~ = s_y L T`` of the transformed ones, and both methods
are invariant under that linear change of coordinates (and Satterthwaite's also under any smooth
reparametrisation of the variance parameters at an interior optimum).

**Satterthwaite** (lmerTest's ``contest1D``): ``df = 2 (L C L')^2 / (g' W g)`` with ``C = Cov(beta)``,
``g_r = L (dC / du_r) L'`` and ``W = 2 H^-1``, ``H`` the Hessian of the REML (ML) deviance in lme4's
variance parameters ``u = (theta, sigma)`` with beta profiled (lmerTest's parametrisation and its rule
for dropping eigenvalues, so that ``varpar=`` reproduces lmerTest at any estimates, e.g. lme4's).
``dC/du`` is analytic in the transformed ``(theta~, sigma~^2)``: ``C = sigma^2 F^-1`` and
``dF/dLambda_ab = -(S_ab + S_ab')`` from the backend's per-term gradient tensors (DESIGN.md sections 3
and 8, every backend, also statistics resident on Dask workers), chained with the Jacobian of the map
``u -> (theta~, sigma~^2)`` (a few q x q Cholesky factors, by differences); ``H`` is a central
difference of the analytic gradient.  Several contrasts at once: lmerTest's ``contestMD``.

**Kenward-Roger** (pbkrtest's ``vcovAdj`` and ``Lb_ddf``): the covariance parameters are the entries
of every Psi_k and sigma^2 (``V`` is linear in them, ``G_r = dV/dgamma_r``); the expected REML
information, the adjusted covariance ``Phi_A = Phi + 2 Phi U Phi`` and the Satterthwaite-type
approximation of the F distribution need traces of ``V^-1 G_r V^-1 G_s`` and products
``X'V^-1 G_r V^-1 G_s V^-1 X``.  With ``V^-1 = sigma^-2 (I - Z K Z')``, ``K = Lambda M^-1 Lambda'``
all of them are sums over blocks of the random effects of ``C = A - AKA``, ``H = B - AKB``,
``R = I - KA`` (``A = Z'Z``, ``B = Z'X`` of the block): one block per group (one term), per outer
group (nested terms), or one dense block of all random effects (crossed terms, at most
``KR_MAX_DENSE`` of them; :func:`bigmixed.bootstrap.design_blocks`).  Weights: the statistics are
of the rows times sqrt(w), where the residual covariance is sigma^2 I; pbkrtest instead takes ``G = I`` for the residual of the
*unweighted* rows (it ignores the weights in V while its Phi uses them), so for weighted fits
bigmixed gives the Kenward-Roger df of the weighted model and pbkrtest another number
(docs/inference.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

__all__ = ["coef_table", "contest", "satterthwaite_df", "kenward_roger", "adjusted_vcov", "ddf_method",
           "serial_kernels", "KR_MAX_DENSE"]

# Crossed terms: Kenward-Roger works on one dense block of all random effects; above this many
# the m^3 algebra (and m^2 memory) is left undone.
KR_MAX_DENSE = 5000

_DDF = {"satterthwaite": "Satterthwaite", "kenward-roger": "Kenward-Roger", "kenwardroger": "Kenward-Roger",
        "kr": "Kenward-Roger"}


def ddf_method(ddf: str) -> str:
    """lmerTest's name of a ddf method (``"Satterthwaite"`` or ``"Kenward-Roger"``) from any spelling."""
    key = str(ddf).lower().replace("_", "-").replace(" ", "-")
    if key not in _DDF:
        raise ValueError(f"unknown ddf method {ddf!r}; use 'Satterthwaite' or 'Kenward-Roger'")
    return _DDF[key]


# Below this many random-effect levels the numba kernels run on one thread inside these
# routines: each evaluation is then microseconds, and waking a thread team costs more than that
# (measured: 0.09 ms on one thread, 4 ms on two when the other core is busy, 72 groups).
SERIAL_LEVELS = 20_000


class serial_kernels:
    """Context manager: numba kernels on one thread for small models (see ``SERIAL_LEVELS``)."""

    def __init__(self, res) -> None:
        self.small = sum(int(t.n_levels) for t in res._terms) < SERIAL_LEVELS
        self.old = None

    def __enter__(self) -> "serial_kernels":
        if self.small:
            import numba

            self.old = numba.get_num_threads()
            numba.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            import numba

            numba.set_num_threads(self.old)


def _cache(res) -> dict:
    c = res.__dict__.get("_inference_cache")
    if c is None:
        c = res.__dict__["_inference_cache"] = {}
    return c


def _user_map(res) -> np.ndarray:
    """``Tu`` with beta = Tu beta~ (+ the response shift on the intercept)."""
    return res.scaling.y_scale * res._T


def _contrast_matrix(res, L) -> np.ndarray:
    p = len(res.exog_names)
    Lm = np.atleast_2d(np.asarray(L, dtype=float))
    if Lm.ndim != 2 or Lm.shape[1] != p:
        raise ValueError(f"a contrast needs one column per fixed effect ({p}: {', '.join(res.fixef.index)}), "
                         f"got an array of shape {np.shape(L)}")
    if not np.all(np.isfinite(Lm)):
        raise ValueError("the contrast matrix has non-finite entries")
    return Lm


# ----------------------------------------------------------------------------------- Satterthwaite
@dataclass
class _Satt:
    vcov: np.ndarray  # Cov(beta~) of the transformed problem
    jac: list  # dCov(beta~)/dphi_r, phi = (theta~, sigma~^2)
    vcov_varpar: np.ndarray  # 2 H^-1 (pseudo-inverse on the positive eigenvalues)
    hessian: np.ndarray


def _central_hessian(grad, x0: np.ndarray, rel: float = 1e-4) -> np.ndarray:
    """Symmetrised central differences of an analytic gradient (error ~1e-8 relative)."""
    k = x0.size
    H = np.empty((k, k))
    for j in range(k):
        h = rel * max(abs(x0[j]), 1e-2)
        e = np.zeros(k)
        e[j] = h
        H[:, j] = (grad(x0 + e) - grad(x0 - e)) / (2.0 * h)
    return 0.5 * (H + H.T)


def _pos_pinv(H: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """2 x the inverse on the eigenvalues above ``tol`` (lmerTest's rule for ``vcov_varpar``)."""
    w, V = np.linalg.eigh(H)
    pos = w > tol
    return 2.0 * (V[:, pos] / w[pos]) @ V[:, pos].T


def _dF_dtheta(res, lams) -> list[np.ndarray]:
    """dF/dtheta~_i (F = sigma^2 X'V^-1X of the transformed problem) from the backend's gradient tensors."""
    obj, tmap = res.objective_fn, res.tmap
    ev = obj.backend.evaluate(lams, True)
    out = []
    for i in range(tmap.size):
        k = int(tmap.term_of[i])
        tt = tmap.terms[k]
        loc = i - int(tmap.offsets[k])
        D = ev.S[k][int(tt.rows[loc]), int(tt.cols[loc]), 1:, 1:]
        out.append(-(D + D.T))
    return out


def _phi(res, u: np.ndarray) -> np.ndarray:
    """lme4's variance parameters u = (theta in lme4's order, sigma) -> (theta~, sigma~^2) of the fit."""
    from .results import theta_order, theta_to_scaled

    tmap = res.tmap
    internal = np.empty(tmap.size)
    internal[theta_order(res._terms, tmap)] = u[:-1]
    parts = [theta_to_scaled(th, tt, res._term_scaling(k)) for k, (th, tt) in
             enumerate(zip(tmap.split(internal), tmap.terms))]
    s2 = (u[-1] / res.scaling.y_scale) ** 2
    return np.append(np.concatenate(parts) if parts else np.zeros(0), s2)


def _phi_jacobian(res, u: np.ndarray, rel: float = 1e-7) -> np.ndarray:
    """d phi / d u by central differences (the map is a few q x q Cholesky factors: no data)."""
    J = np.empty((u.size, u.size))
    for j in range(u.size):
        h = rel * max(abs(u[j]), 1e-3)
        e = np.zeros(u.size)
        e[j] = h
        J[:, j] = (_phi(res, u + e) - _phi(res, u - e)) / (2.0 * h)
    return J


def _satterthwaite(res, varpar=None) -> _Satt:
    """lmerTest's ingredients in lme4's variance parameters (theta, sigma), at the fit or at ``varpar``."""
    cache = _cache(res)
    key = ("satt", None if varpar is None else tuple(np.asarray(varpar, dtype=float).tolist()))
    if key in cache:
        return cache[key]
    obj, sol = res.objective_fn, res._sol
    if not sol.F.size:
        raise ValueError("the model has no fixed effects")
    u0 = np.append(res.theta, res.sigma) if varpar is None else np.asarray(varpar, dtype=float).ravel()
    if u0.size != res.tmap.size + 1 or not np.all(np.isfinite(u0)):
        raise ValueError(f"varpar must be lme4's theta ({res.tmap.size} values) and sigma, finite")
    phi0 = _phi(res, u0) if varpar is not None else np.append(sol.theta, sol.sigma2)
    J0 = _phi_jacobian(res, u0)
    at = obj.solve(phi0[:-1])
    Finv = np.linalg.inv(at.F)
    s2 = float(phi0[-1])
    jphi = [-s2 * Finv @ dF @ Finv for dF in _dF_dtheta(res, at.lams)]
    jphi.append(Finv)  # d(sigma^2 F^-1)/d sigma^2
    jac = [sum(J0[i, j] * jphi[i] for i in range(len(jphi))) for j in range(u0.size)]

    def grad_u(u):
        ph = _phi(res, u)
        return _phi_jacobian(res, u).T @ obj.unprofiled(ph[:-1], ph[-1])[1]

    with np.errstate(all="ignore"), serial_kernels(res):
        H = _central_hessian(grad_u, u0)
    obj.solve(sol.theta)  # leave the objective's cache at the optimum
    out = _Satt(s2 * Finv, jac, _pos_pinv(H), H)
    cache[key] = out
    return out


def _satt_1d(sa: _Satt, Lt: np.ndarray) -> tuple[float, float]:
    """(variance of L~beta~, Satterthwaite df) of one transformed contrast."""
    var = float(Lt @ sa.vcov @ Lt)
    g = np.array([float(Lt @ J @ Lt) for J in sa.jac])
    denom = float(g @ sa.vcov_varpar @ g)
    return var, (2.0 * var * var / denom if denom > 0 else np.inf)


def satterthwaite_df(res, L=None, varpar=None) -> np.ndarray:
    """Satterthwaite's denominator df of each row of ``L`` (default: every fixed effect), as lmerTest.

    Parameters
    ----------
    res
        A fitted :class:`~bigmixed.results.MixedLMResults`.
    L
        Contrasts, one row each (p columns); ``None`` gives the identity (one df per coefficient).
    varpar
        lme4's variance parameters ``(theta..., sigma)`` (theta in lme4's order) to evaluate
        lmerTest's formula at instead of the fit's optimum, e.g. another program's estimates.

    Returns
    -------
    numpy.ndarray
        One df per row of ``L``.
    """
    Lm = np.eye(len(res.exog_names)) if L is None else _contrast_matrix(res, L)
    sa = _satterthwaite(res, varpar)
    Tu = _user_map(res)
    return np.array([_satt_1d(sa, row @ Tu)[1] for row in Lm])


# ----------------------------------------------------------------------------------- Kenward-Roger
@dataclass
class _KR:
    phi: np.ndarray  # Cov(beta~) (unadjusted)
    phi_adj: np.ndarray  # pbkrtest's vcovAdj, transformed
    P: list
    W: np.ndarray


def _gammas(res) -> list[tuple[int, int, int]]:
    """(term, a, b), a >= b, of every covariance parameter of the Psi_k (pbkrtest's ggamma, minus sigma^2)."""
    out = []
    for k, tt in enumerate(res.tmap.terms):
        if tt.held:
            raise NotImplementedError("Kenward-Roger with a variance held at a fixed value is not supported")
        for b in range(tt.q):
            for a in range(b, tt.q):
                if tt.structural(a, b):
                    out.append((k, a, b))
    return out


def _times_E(M: np.ndarray, mu: np.ndarray, d: int) -> np.ndarray:
    """``M E`` for the unit matrix E of one covariance parameter (batched over blocks).

    ``mu`` (nb, m) marks the columns of effect b of the parameter's term; its partners (effect a)
    are ``d = a - b`` columns on.  E has ones at (u, u + d) and (u + d, u) for every marked u.
    """
    if d == 0:
        return M * mu[:, None, :]
    mw = np.roll(mu, d, axis=-1)
    return np.roll(M * mu[:, None, :], d, axis=-1) + np.roll(M * mw[:, None, :], -d, axis=-1)


def _kenward_roger(res) -> _KR:
    cache = _cache(res)
    if "kr" in cache:
        return cache["kr"]
    if not res.reml:
        raise ValueError("Kenward-Roger's method is only available for REML fits (as in lmerTest and pbkrtest); "
                         "refit with REML=True")
    sol = res._sol
    st = res.model.built.stats
    if st is None:
        raise NotImplementedError("Kenward-Roger's df need the statistics in this process; they are resident on "
                                  "the Dask workers (fit with distributed_mode='gathered', or use ddf='Satterthwaite')")
    from .bootstrap import design_blocks

    blk = design_blocks(res)
    s2 = float(sol.sigma2)
    XtX = st.XtX
    N = float(st.N)
    m = blk.m
    Lam = blk.lam(sol.lams)
    A, B = blk.A, blk.B
    Mm = np.swapaxes(Lam, 1, 2) @ A @ Lam + np.eye(m)
    K = Lam @ np.linalg.solve(Mm, np.swapaxes(Lam, 1, 2))
    KA = K @ A
    C = A - A @ KA
    KB = K @ B
    H = B - A @ KB
    R = np.eye(m) - KA
    Ht = np.swapaxes(H, 1, 2)
    RH = np.swapaxes(R, 1, 2) @ H  # R'H
    RAR = np.swapaxes(R, 1, 2) @ A @ R
    BKB = np.einsum("bmi,bmj->ij", B, KB)
    BKAKB = np.einsum("bmi,bmn,bnj->ij", KB, A, KB)
    HKH = np.einsum("bmi,bmj->ij", H, K @ H)
    trKA = float(np.einsum("bii->", KA))
    trKAKA = float(np.einsum("bij,bji->", KA, KA))
    gam = _gammas(res)
    ng = len(gam) + 1
    CE, HtE = [], []
    for k, a, b in gam:
        mu = ((blk.term == k) & (blk.eff == b)).astype(float)
        CE.append(_times_E(C, mu, a - b))
        HtE.append(_times_E(Ht, mu, a - b))
    RARE = [None] * len(gam)
    for r, (k, a, b) in enumerate(gam):
        mu = ((blk.term == k) & (blk.eff == b)).astype(float)
        RARE[r] = _times_E(RAR, mu, a - b)
    s4, s6 = s2 ** -2, s2 ** -3
    Ktr = np.zeros((ng, ng))
    P = [None] * ng
    Q = {}
    XS2X = XtX - 2.0 * BKB + BKAKB  # sigma^4 X'V^-2X
    for r in range(len(gam)):
        P[r] = -s4 * np.einsum("bim,bmj->ij", HtE[r], H)
        for s in range(r, len(gam)):
            Ktr[r, s] = Ktr[s, r] = s4 * float(np.einsum("bij,bji->", CE[r], CE[s]))
            Q[(r, s)] = s6 * np.einsum("bim,bmn,bnj->ij", HtE[r], C, np.swapaxes(HtE[s], 1, 2))
        Ktr[r, -1] = Ktr[-1, r] = s4 * float(np.einsum("bii->", RARE[r]))
        Q[(r, ng - 1)] = s6 * np.einsum("bim,bmj->ij", HtE[r], RH)
    Ktr[-1, -1] = s4 * (N - 2.0 * trKA + trKAKA)
    P[-1] = -s4 * XS2X
    Q[(ng - 1, ng - 1)] = s6 * (XS2X - HKH)
    P = [0.5 * (x + x.T) for x in P]
    Phi = s2 * np.linalg.inv(sol.F)
    IE = np.zeros((ng, ng))
    for i in range(ng):
        PhiPi = Phi @ P[i]
        for j in range(i, ng):
            IE[i, j] = IE[j, i] = Ktr[i, j] - 2.0 * float(np.sum(Phi * Q[(i, j)])) + float(np.sum(PhiPi * (P[j] @ Phi)))
    Jg = _gamma_jacobian(res, gam)
    IEu = np.linalg.solve(Jg.T, np.linalg.solve(Jg.T, IE.T).T)  # information in the user's units
    condi = float(np.min(np.abs(np.linalg.eigvalsh(0.5 * (IEu + IEu.T)))))
    W = 2.0 * (np.linalg.inv(IE) if condi > 1e-10 else np.linalg.pinv(IE))
    W = 0.5 * (W + W.T)
    U = np.zeros_like(Phi)
    for i in range(ng - 1):
        for j in range(i + 1, ng):
            U += W[i, j] * (Q[(i, j)] - P[i] @ Phi @ P[j])
    U = U + U.T
    for i in range(ng):
        U += W[i, i] * (Q[(i, i)] - P[i] @ Phi @ P[i])
    out = _KR(Phi, Phi + 2.0 * Phi @ U @ Phi, P, W)
    cache["kr"] = out
    return out


def _gamma_jacobian(res, gam) -> np.ndarray:
    """d gamma_user / d gamma~ (linear): Psi_k = s_y^2 S_k Psi~_k S_k', sigma^2 = s_y^2 sigma~^2."""
    sy2 = res.scaling.y_scale ** 2
    ng = len(gam) + 1
    J = np.zeros((ng, ng))
    for r, (k, a, b) in enumerate(gam):
        S = res._S[k]
        E = np.zeros((S.shape[0], S.shape[0]))
        E[a, b] = E[b, a] = 1.0
        D = sy2 * S @ E @ S.T
        for i, (kk, aa, bb) in enumerate(gam):
            if kk == k:
                J[i, r] = D[aa, bb]
    J[-1, -1] = sy2
    return J


def _lb_terms(kr: _KR, Lt: np.ndarray) -> tuple[float, float, int]:
    """pbkrtest's A1, A2 and q for the transformed contrasts ``Lt`` (rows)."""
    V0 = kr.phi
    Theta = Lt.T @ np.linalg.solve(Lt @ V0 @ Lt.T, Lt)
    TV = Theta @ V0
    u = [TV @ Pi @ V0 for Pi in kr.P]
    A1 = A2 = 0.0
    n = len(u)
    for i in range(n):
        for j in range(i, n):
            e = 1.0 if i == j else 2.0
            A1 += e * kr.W[i, j] * float(np.trace(u[i])) * float(np.trace(u[j]))
            A2 += e * kr.W[i, j] * float(np.sum(u[i] * u[j].T))
    return A1, A2, int(np.linalg.matrix_rank(Lt))


def _kr_ddf(A1: float, A2: float, q: int) -> tuple[float, float]:
    """pbkrtest's denominator df and F scaling from A1, A2 and the number of contrasts q."""
    B = (A1 + 6.0 * A2) / (2.0 * q)
    g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
    den = 3.0 * q + 2.0 * (1.0 - g)
    c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
    V0 = 1.0 + c1 * B
    V1 = 1.0 - c2 * B
    V2 = 1.0 - c3 * B
    V0 = 0.0 if abs(V0) < 1e-10 else V0
    x = 1.0 - A2 / q
    ratio = 1.0 if (abs(x) < 1e-14 and abs(V1) < 1e-14) else x / V1
    rho = ratio * ratio * V0 / (q * V2)
    df2 = 4.0 + (q + 2.0) / (q * rho - 1.0)
    fscale = 1.0 if abs(df2 - 2.0) < 1e-2 else df2 * (1.0 - A2 / q) / (df2 - 2.0)
    return float(df2), float(fscale)


def kenward_roger(res, L=None) -> tuple[np.ndarray, np.ndarray]:
    """Kenward-Roger df and adjusted variances of each row of ``L`` (default: every fixed effect), as pbkrtest.

    Parameters
    ----------
    res
        A REML fit (:class:`~bigmixed.results.MixedLMResults`).
    L
        Contrasts, one row each; ``None`` gives one per coefficient.

    Returns
    -------
    (df, var)
        Denominator df (``pbkrtest::Lb_ddf``) and the variance of each contrast under the adjusted
        covariance (``pbkrtest::vcovAdj``), on the user's scale.
    """
    Lm = np.eye(len(res.exog_names)) if L is None else _contrast_matrix(res, L)
    kr = _kenward_roger(res)
    Tu = _user_map(res)
    dfs, var = [], []
    for row in Lm:
        Lt = (row @ Tu)[None, :]
        A1, A2, q = _lb_terms(kr, Lt)
        dfs.append(_kr_ddf(A1, A2, 1)[0])
        var.append(float((Lt @ kr.phi_adj @ Lt.T)[0, 0]))
    return np.array(dfs), np.array(var)


def adjusted_vcov(res) -> pd.DataFrame:
    """pbkrtest's ``vcovAdj``: the Kenward-Roger adjusted covariance of the fixed effects (user's scale)."""
    kr = _kenward_roger(res)
    Tu = _user_map(res)
    names = list(res.fixef.index)
    return pd.DataFrame(Tu @ kr.phi_adj @ Tu.T, index=names, columns=names)


# ----------------------------------------------------------------------------------- tables
def _t_table(est, se, df, rhs=0.0) -> pd.DataFrame:
    est = np.asarray(est, float)
    t = (est - rhs) / se
    p = 2.0 * special.stdtr(df, -np.abs(t))
    return pd.DataFrame({"Estimate": est, "Std. Error": se, "df": df, "t value": t, "Pr(>|t|)": p})


def coef_table(res, ddf: str = "Satterthwaite") -> pd.DataFrame:
    """lmerTest's ``summary(fit)$coefficients``: Estimate, Std. Error, df, t value, Pr(>|t|).

    Parameters
    ----------
    res
        A fitted :class:`~bigmixed.results.MixedLMResults`.
    ddf
        ``"Satterthwaite"`` (lmerTest's default) or ``"Kenward-Roger"`` (pbkrtest; REML fits only;
        the standard errors are then those of the adjusted covariance, as lmerTest reports them).

    Returns
    -------
    pandas.DataFrame
        One row per fixed effect, named as lme4 names them.
    """
    method = ddf_method(ddf)
    beta = res.fixef.to_numpy()
    if method == "Satterthwaite":
        se = res.bse_fe.to_numpy()
        df = satterthwaite_df(res)
    else:
        df, var = kenward_roger(res)
        se = np.sqrt(var)
    out = _t_table(beta, se, df)
    out.index = list(res.fixef.index)
    return out


def contest(res, L, ddf: str = "Satterthwaite", joint: bool = True, rhs=0.0) -> pd.DataFrame:
    """lmerTest's ``contest``: tests of contrasts ``L beta = rhs``.

    Parameters
    ----------
    res
        A fitted :class:`~bigmixed.results.MixedLMResults`.
    L
        One contrast (p numbers) or a matrix of contrasts (one per row).
    ddf
        ``"Satterthwaite"`` or ``"Kenward-Roger"``.
    joint
        True: one F test of all rows (``Sum Sq, Mean Sq, NumDF, DenDF, F value, Pr(>F)``, lmerTest's
        ``contestMD``); False: one t test per row (``Estimate, Std. Error, df, t value, Pr(>|t|)``).
    rhs
        Right-hand side(s) of the hypothesis.

    Returns
    -------
    pandas.DataFrame
    """
    method = ddf_method(ddf)
    Lm = _contrast_matrix(res, L)
    rhs = np.broadcast_to(np.asarray(rhs, dtype=float), (Lm.shape[0],)).copy()
    beta = res.fixef.to_numpy()
    if not joint:
        if method == "Satterthwaite":
            sa, Tu = _satterthwaite(res), _user_map(res)
            parts = [_satt_1d(sa, row @ Tu) for row in Lm]
            var, df = np.array([v for v, _ in parts]), np.array([d for _, d in parts])
        else:
            df, var = kenward_roger(res, Lm)
        return _t_table(Lm @ beta, np.sqrt(var), df, rhs)
    if method == "Kenward-Roger":
        return _kr_ftest(res, Lm, beta, rhs)
    return _satt_ftest(res, Lm, beta, rhs)


def _f_table(F, ndf, ddf, sigma, fscale=1.0) -> pd.DataFrame:
    ms = F * sigma ** 2
    Fs = F * fscale
    p = special.fdtrc(ndf, ddf, Fs) if np.isfinite(ddf) else special.chdtrc(ndf, ndf * Fs)
    return pd.DataFrame({"Sum Sq": [ms * ndf], "Mean Sq": [ms], "NumDF": [ndf], "DenDF": [ddf], "F value": [Fs],
                         "Pr(>F)": [p]})


def _satt_ftest(res, Lm, beta, rhs) -> pd.DataFrame:
    if np.any(rhs != 0.0):
        beta = beta - np.linalg.pinv(Lm) @ rhs
    sa, Tu = _satterthwaite(res), _user_map(res)
    C = res.cov_params().to_numpy()
    d, P = np.linalg.eigh(Lm @ C @ Lm.T)
    d, P = d[::-1], P[:, ::-1]
    tol = max(np.sqrt(np.finfo(float).eps) * d[0], 0.0)
    q = int(np.sum(d > tol))
    if q == 0:
        raise ValueError("the contrasts have no variance (L Cov(beta) L' is 0)")
    PtL = (P.T @ Lm)[:q]
    t2 = (PtL @ beta) ** 2 / d[:q]
    F = float(np.sum(t2) / q)
    nu = np.array([_satt_1d(sa, row @ Tu)[1] for row in PtL])
    if q == 1:
        ddf = float(nu[0])
    elif np.all(np.abs(np.diff(nu)) < 1e-8):
        ddf = float(np.mean(nu))
    elif np.any(nu <= 2):
        ddf = 2.0
    else:
        E = float(np.sum(nu / (nu - 2.0)))
        ddf = 2.0 * E / (E - q)
    return _f_table(F, q, ddf, res.sigma)


def _kr_ftest(res, Lm, beta, rhs) -> pd.DataFrame:
    kr, Tu = _kenward_roger(res), _user_map(res)
    betaH = np.linalg.pinv(Lm) @ rhs if np.any(rhs != 0.0) else np.zeros_like(beta)
    Lt = Lm @ Tu
    A1, A2, q = _lb_terms(kr, Lt)
    ddf, fscale = _kr_ddf(A1, A2, q)
    diff = Lm @ (beta - betaH)
    Cadj = Lt @ kr.phi_adj @ Lt.T
    F = float(diff @ np.linalg.solve(Cadj, diff)) / q
    return _f_table(F, q, ddf, res.sigma, fscale)
