"""The back-substitution of crossed terms when every term is scalar: ``(1|s) + (1|d) + (1|dept)``.

The same results as :func:`bigmixed._kernels._crossed.crossed_backward` (its docstring has the
algebra) without the block loops: every block is ``1 x 1``.  Per leading level ``i`` with pairs
``e`` (rest position ``r_e``), the gather ``sum_e2 Sigma_R[r_e, r_e2] V_e2`` visits each pair of
pairs once (Sigma_R is symmetric) and reads only the lower triangle of ``Sigma_R``, which is
what LAPACK's dpotri sets: the cost is half the ``(pairs in level)^2`` lookups of the block form.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import _JIT
from ._nested import _add_contracted, _add_tensor


@njit(parallel=True, **_JIT)
def crossed_backward1(A0, D0, lam0, ptr, pcol, pterm, W, lamR, L, P, V, RR, SigR, chunks,
                      want_grad, want_modes, g, cf, kappa, reml, m):
    """:func:`crossed_backward` for ``q0 = 1`` and scalar rest terms; the same outputs and shapes.

    ``SigR`` is read in its lower triangle only.  Pairs within a level are sorted by ``pcol``.
    """
    l0 = A0.shape[0]
    p1 = D0.shape[2]
    nchunks = chunks.shape[0] - 1
    tensor = want_grad and cf.shape[0] == 0
    sd = p1 if tensor else 0
    out_GA = np.zeros((nchunks, 1, 1))
    out_S = np.zeros((nchunks, 1, 1, sd, sd))
    out_GC = np.zeros((nchunks, 1, 1))
    mg = m if want_grad else 0
    out_TR = np.zeros((nchunks, mg, p1))
    out_GR = np.zeros((nchunks, mg, 1))
    nm = l0 if want_modes else 0
    bhat = np.zeros((nm, 1))
    bcov = np.zeros((nm, 1, 1))
    lmax = 0
    for i in range(l0):
        lmax = max(lmax, ptr[i + 1] - ptr[i])
    l00 = lam0[0, 0]
    for t in prange(nchunks):
        acc = np.zeros(lmax)
        R = np.zeros((1, p1))
        T = np.zeros((1, p1))
        Gi = np.zeros((1, 1))
        S = np.zeros((1, 1, sd, sd))
        GC = np.zeros((1, 1))
        GA = 0.0
        TR = np.zeros((mg, p1))
        GR = np.zeros((mg, 1))
        for i in range(chunks[t], chunks[t + 1]):
            e0, e1 = ptr[i], ptr[i + 1]
            li = L[i, 0, 0]
            for c in range(p1):
                s = P[i, 0, c]
                for e in range(e0, e1):
                    s -= V[e, 0, 0] * RR[pcol[e], c]
                R[0, c] = s / li
            # acc_e = sum_e2 Sigma_R[r_e, r_e2] V_e2 over both triangles, each pair of pairs once
            for e in range(e0, e1):
                r = pcol[e]
                ve = V[e, 0, 0]
                s = SigR[r, r] * ve
                for e2 in range(e0, e):
                    sg = SigR[r, pcol[e2]]  # r > pcol[e2]: the lower triangle
                    s += sg * V[e2, 0, 0]
                    acc[e2 - e0] += sg * ve
                acc[e - e0] = s  # later pairs of the level add their part
            # Su_e = -acc_e / l_i;  Sd = (1 / l_i - sum_e Su_e V_e) / l_i
            sdv = 1.0 / li
            for e in range(e0, e1):
                su = -acc[e - e0] / li
                acc[e - e0] = su
                sdv -= su * V[e, 0, 0]
            sdv /= li
            if want_modes:
                u = 0.0
                for c in range(p1):
                    u += R[0, c] * g[c]
                bhat[i, 0] = l00 * u
                bcov[i, 0, 0] = l00 * sdv * l00
            if not want_grad:
                continue
            a0 = A0[i, 0, 0] * l00
            for c in range(p1):
                T[0, c] = D0[i, 0, c] - a0 * R[0, c]
            gi = a0 * sdv
            for e in range(e0, e1):
                r = pcol[e]
                su = acc[e - e0]
                tw = W[e, 0, 0] * lamR[pterm[e], 0, 0]  # W' Lambda_j
                tw2 = W[e, 0, 0] * l00  # W Lambda_0
                for c in range(p1):
                    T[0, c] -= tw * RR[r, c]
                    TR[r, c] += tw2 * R[0, c]
                gi += tw * su
                GR[r, 0] += tw2 * su
            Gi[0, 0] = gi
            GA += gi
            if tensor:
                _add_tensor(1, T, R, p1, S)
            else:
                _add_contracted(1, T, R, Gi, g, cf, kappa, reml, GC)
        out_GA[t, 0, 0] = GA
        out_GC[t, 0, 0] = GC[0, 0]
        for k in range(sd):
            for m2 in range(sd):
                out_S[t, 0, 0, k, m2] = S[0, 0, k, m2]
        for r in range(mg):
            for c in range(p1):
                out_TR[t, r, c] = TR[r, c]
            out_GR[t, r, 0] = GR[r, 0]
    return out_GA, out_S, out_GC, out_TR, out_GR, bhat, bcov


@njit(**_JIT)
def pair_sums(rows, lev, vals, X, nrows):
    """``out[rows[e]] += vals[e] * X[lev[e]]`` for every pair ``e`` in order, all columns of X at once.

    What ``np.bincount(rows, weights=vals * X[lev, c])`` gives per column ``c`` (its numpy twin,
    the same bits: each entry sums its pairs in pair order), in one pass without the gathered
    ``(pairs,)`` temporaries: the average information's ``Z_j'Z_k v``, the Schur columns and the
    spherical modes of scalar crossed terms.  Serial: the order of the sums is the pairs'.
    """
    k = X.shape[1]
    out = np.zeros((nrows, k))
    for e in range(rows.shape[0]):
        r = rows[e]
        v = vals[e]
        x = lev[e]
        for c in range(k):
            out[r, c] += v * X[x, c]
    return out
