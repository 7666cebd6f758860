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
"""

from __future__ import annotations

import numpy as np

from .stats import Statistics
from .terms import ThetaMap

__all__ = ["moment_start"]


def moment_start(stats: Statistics, tmap: ThetaMap, floor: float = 1e-2) -> np.ndarray:
    """theta (the model's order) from the moments above; diagonal entries at least ``floor``."""
    if stats.p:
        try:
            beta = np.linalg.solve(stats.XtX, stats.Xty)
        except np.linalg.LinAlgError:
            beta = np.linalg.lstsq(stats.XtX, stats.Xty, rcond=None)[0]
        r2 = float(stats.yty - stats.Xty @ beta)
    else:
        beta, r2 = np.zeros(0), float(stats.yty)
    s2 = max(r2 / max(stats.N - stats.p, 1), 1e-300)
    parts = []
    for t, tt in zip(stats.terms, tmap.terms):
        e = t.c - np.einsum("gqp,p->gq", t.B, beta)
        Ainv = np.linalg.pinv(t.A, hermitian=True)
        b = np.einsum("gab,gb->ga", Ainv, e)
        w = t.n / max(float(t.n.sum()), 1.0)
        psi = np.einsum("g,ga,gb->ab", w, b, b) - s2 * np.einsum("g,gab->ab", w, Ainv)
        rel = _pattern(psi / s2, tt)
        vals, vecs = np.linalg.eigh(rel)
        rel = (vecs * np.maximum(vals, floor**2)) @ vecs.T
        lam = np.linalg.cholesky(rel)
        th = tt.theta(lam)
        parts.append(np.where(tt.is_diag, np.maximum(th, floor), th))
    out = np.concatenate(parts) if parts else np.zeros(0)
    return out if np.all(np.isfinite(out)) else tmap.start()


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
