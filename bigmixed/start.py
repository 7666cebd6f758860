"""Starting values for theta from moments of the statistics (several random-effects terms).

lme4 starts every fit at Lambda = I.  With several terms that start can be far off in one
direction - InstEval's ``(1 | dept)`` has theta ~0.07 - and a quasi-Newton method then spends
most of its evaluations walking there (32 evaluations from Lambda = I, 13 from here).  The start
below costs one pass over the levels and no evaluation of the deviance:

    e_l  = Z_l'(y - X beta_ols)            per level l of a term (from c_l and B_l)
    b_l  = A_l^+ e_l                       the level's own least-squares effect
    Psi ~ sum_l w_l b_l b_l' - sigma_ols^2 sum_l w_l A_l^+     (w_l = n_l / N)

(the moment identity E[b b'] = Psi + sigma^2 A^-1 for one term alone; crossed and nested terms
bias it, which a start can afford), projected onto the term's covariance pattern and made
positive definite, relative to sigma_ols^2.

Crossed terms (``crossed=True``) change two things.  The OLS residual variance also holds every
term's own variance, so theta is taken relative to what is left of it, ``sigma_ols^2 - sum_k
tr(Psi_k sum_l A_l / N)`` (at least ``RESIDUAL_SHARE_MIN`` of it): 1e5 users x 2,000 items start
at theta (0.96, 0.47) instead of (0.63, 0.33) for an optimum at (1.00, 0.49).  And a term with
a slope takes Psi from ``sum_l e_l e_l' = sum_l A_l Psi A_l + sigma_w^2 sum_l A_l`` (``e_l =
Z_l'(y - X beta_ols)``, ``sigma_w^2`` the within-level residual variance): users with 2-3 rows
have nearly singular A_l, whose own effects ``A_l^+ e_l`` swing the moments above negative (every
entry floored), while here they weigh little.  Nested terms would subtract an outer term's
variance twice (a level's mean also carries the effect of the level it sits in), so they keep
the moments above relative to sigma_ols^2.
"""

from __future__ import annotations

import numpy as np

from . import _kernels
from .stats import Statistics
from .terms import ThetaMap

__all__ = ["moment_start", "ols_moments", "term_moments", "level_sums", "theta_from_moments", "theta_from_psi",
           "psd_pinv"]

# singular values below this share of the largest count as 0 (numpy's pinv default)
_RCOND = 1e-15
# fixed chunks of levels for the moment sums: the same bits whatever the number of threads
_MOMENT_CHUNKS = 64
# the crossed start's residual variance is at least this share of the OLS one
RESIDUAL_SHARE_MIN = 0.1


def psd_pinv(A: np.ndarray) -> np.ndarray:
    """Pseudo-inverses of a batch ``(G, q, q)`` of symmetric positive semi-definite matrices.

    Closed forms for q = 1 and 2 (a batched SVD costs far more than the rest of the start at
    a million levels), ``eigh`` otherwise; eigenvalues below ``1e-15`` of the largest are dropped,
    as ``np.linalg.pinv`` does.  For q <= 2 :func:`term_moments` uses the kernel
    :func:`bigmixed._kernels.moment_sums` instead, and this is its numpy twin (tests).
    """
    G, q = A.shape[0], A.shape[1]
    if q == 1:
        a = A[:, 0, 0]
        return np.where(a > 0.0, 1.0 / np.where(a > 0.0, a, 1.0), 0.0)[:, None, None]
    if q == 2:  # (the branches not taken may overflow: np.where picks the other)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            a, b, d = A[:, 0, 0], A[:, 0, 1], A[:, 1, 1]
            tr = a + d
            det = a * d - b * b
            trs = np.where(tr > 0.0, tr, 1.0)
            full = det / trs > _RCOND * tr  # (scaled by tr: tr^2 underflows for tiny blocks)
            out = np.empty_like(A)
            inv_det = 1.0 / np.where(full, det, 1.0)
            out[:, 0, 0], out[:, 1, 1] = d * inv_det, a * inv_det
            out[:, 0, 1] = out[:, 1, 0] = -b * inv_det
            # rank one: A = tr v v', so A^+ = A / tr^2 (or 0)
            r1 = np.where((tr > 0.0)[:, None, None], A / trs[:, None, None] / trs[:, None, None], 0.0)
            return np.where(full[:, None, None], out, r1)
    vals, vecs = np.linalg.eigh(A)
    top = vals.max(axis=1, keepdims=True) if G else vals
    with np.errstate(over="ignore"):  # a tiny kept eigenvalue: inf, as numpy's pinv gives
        inv = np.where(vals > _RCOND * top, 1.0 / np.where(vals > 0.0, vals, 1.0), 0.0)
    return np.einsum("gak,gk,gbk->gab", vecs, inv, vecs)


def ols_moments(XtX: np.ndarray, Xty: np.ndarray, yty: float, N: int) -> tuple[np.ndarray, float]:
    """The least-squares beta and residual variance of the global sums."""
    p = XtX.shape[0]
    if p:
        try:
            beta = np.linalg.solve(XtX, Xty)
        except np.linalg.LinAlgError:
            beta = np.linalg.lstsq(XtX, Xty, rcond=None)[0]
        r2 = float(yty - Xty @ beta)
    else:
        beta, r2 = np.zeros(0), float(yty)
    return beta, max(r2 / max(N - p, 1), 1e-300)


def term_moments(t, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(sum_l n_l b_l b_l', sum_l n_l A_l^+, sum_l n_l)`` over the levels of one term's statistics.

    These sums add up over disjoint sets of levels (the Dask owners send theirs).
    """
    return level_sums(t, beta)[:3]


def level_sums(t, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """:func:`term_moments` and ``(sum_l e_l' b_l, sum_l rank A_l)``: the sum of squares the
    levels' own effects explain, and the parameters they use (for the within-level variance)."""
    if t.n_groups == 0:
        return np.zeros((t.q, t.q)), np.zeros((t.q, t.q)), 0.0, 0.0, 0.0
    if t.q <= 2:  # one pass in a kernel: the numpy below makes a dozen temporaries of G blocks
        bb, ai, n, eb, rk = _kernels.moment_sums(t.A, t.B, t.c, t.n, np.ascontiguousarray(beta, dtype=float),
                                                 _RCOND, _MOMENT_CHUNKS)
        return bb.sum(axis=0), ai.sum(axis=0), float(n.sum()), float(eb.sum()), float(rk.sum())
    e = t.c - np.einsum("gqp,p->gq", t.B, beta)
    Ainv = psd_pinv(t.A)
    b = np.einsum("gab,gb->ga", Ainv, e)
    n = t.n.astype(float)
    vals = np.linalg.eigvalsh(t.A)
    rank = float(np.sum(vals > _RCOND * np.maximum(vals.max(axis=1, keepdims=True), 0.0)))
    return (np.einsum("g,ga,gb->ab", n, b, b), np.einsum("g,gab->ab", n, Ainv), float(n.sum()),
            float(np.sum(e * b)), rank)


def theta_from_moments(moments: list, s2: float, tmap: ThetaMap, floor: float = 1e-2) -> np.ndarray:
    """theta from each term's :func:`term_moments`, relative to the residual variance ``s2``."""
    return theta_from_psi([(Sbb - s2 * SA) / max(n, 1.0) for Sbb, SA, n in moments], s2, tmap, floor)


def theta_from_psi(psis: list, s2: float, tmap: ThetaMap, floor: float = 1e-2) -> np.ndarray:
    """theta from each term's covariance estimate ``Psi``, relative to the residual variance ``s2``."""
    parts = []
    for psi, tt in zip(psis, tmap.terms):
        rel = _pattern(psi / s2, tt)
        vals, vecs = np.linalg.eigh(rel)
        rel = (vecs * np.maximum(vals, floor**2)) @ vecs.T
        th = tt.theta(np.linalg.cholesky(rel))
        parts.append(np.where(tt.is_diag, np.maximum(th, floor), th))
    out = np.concatenate(parts) if parts else np.zeros(0)
    return out if np.all(np.isfinite(out)) else tmap.start()


def moment_start(stats: Statistics, tmap: ThetaMap, floor: float = 1e-2, crossed: bool = False) -> np.ndarray:
    """theta (the model's order) from the moments above; diagonal entries at least ``floor``.

    ``crossed``: relative to the residual variance left once every term's share is taken out of
    the OLS one, and a slope term's Psi weighted by its levels' information (module docstring).
    """
    beta, s2 = ols_moments(stats.XtX, stats.Xty, stats.yty, stats.N)
    if not crossed:
        return theta_from_moments([term_moments(t, beta) for t in stats.terms], s2, tmap, floor)
    return _crossed_start(stats, tmap, beta, s2, floor)


def _crossed_start(stats: Statistics, tmap: ThetaMap, beta: np.ndarray, s2: float, floor: float) -> np.ndarray:
    """:func:`moment_start` of crossed terms: slope terms by :func:`_crossed_psi`, scalar terms by
    their level means (well conditioned), all relative to the residual variance they leave."""
    ee = s2 * max(stats.N - stats.XtX.shape[0], 1)  # e'e of the OLS fit
    means = [None if t.q >= 2 else term_moments(t, beta) for t in stats.terms]

    def psi(k: int, noise: float) -> np.ndarray:
        Sbb, SA, n = means[k]
        return (Sbb - noise * SA) / max(n, 1.0)

    first = [_crossed_psi(t, beta, ee, stats.N) if means[k] is None else psi(k, s2) for k, t in enumerate(stats.terms)]
    left = _residual_variance(first, stats, s2)
    # the noise in a scalar term's level means is taken as the residual variance left, as theta is
    return theta_from_psi([p if means[k] is None else psi(k, left) for k, p in enumerate(first)], left, tmap, floor)


def _crossed_psi(t, beta: np.ndarray, ee: float, N: int) -> np.ndarray:
    """One crossed term's Psi from ``sum_l e_l e_l' = sum_l A_l Psi A_l + sigma_w^2 sum_l A_l``
    (``e_l = Z_l'(y - X beta)``; ``sigma_w^2`` the within-level residual variance, the other
    terms' included).  No level's A is inverted, so nearly singular ones (a slope over a few
    close x) weigh little instead of dominating as in :func:`term_moments`."""
    if t.n_groups == 0:
        return np.zeros((t.q, t.q))
    _, _, _, eb, rank = level_sums(t, beta)
    within = max(ee - eb, 0.0) / max(N - rank, 1.0)
    e = t.c - np.einsum("gqp,p->gq", t.B, beta)
    q = t.q
    M = np.einsum("ga,gb->ab", e, e) - within * t.A.sum(axis=0)
    K = np.einsum("gac,gbd->abcd", t.A, t.A).reshape(q * q, q * q)
    psi = np.linalg.lstsq(K, M.reshape(-1), rcond=None)[0].reshape(q, q)
    return 0.5 * (psi + psi.T)


def _residual_variance(psis: list, stats: Statistics, s2: float) -> float:
    """The OLS residual variance less each term's share of it, ``tr(Psi E[z z'])``."""
    held = 0.0
    for psi, t in zip(psis, stats.terms):
        vals, vecs = np.linalg.eigh(0.5 * (psi + psi.T))
        psd = (vecs * np.maximum(vals, 0.0)) @ vecs.T
        held += float(np.sum(psd * t.A.sum(axis=0))) / max(stats.N, 1)
    return max(s2 - held, RESIDUAL_SHARE_MIN * s2)


def _pattern(rel: np.ndarray, tt) -> np.ndarray:
    """Keep the entries the term's covariance template estimates (blocks; held effects at 0)."""
    q = rel.shape[0]
    keep = np.zeros((q, q), dtype=bool)
    for blk in tt.blocks:
        for a in blk:
            for b in blk:
                keep[a, b] = a not in tt.zero and b not in tt.zero
    out = np.where(keep, rel, 0.0)
    for j in tt.zero:
        out[j, j] = 1.0  # a placeholder; its theta entries are not free
    for j, v in tt.held.items():
        out[j, j] = v * v
    return 0.5 * (out + out.T)
