"""Kernels over groups outside the objective: a change of row transform, the moment start's sums.

One pass over the per-group statistics each, in fixed chunks whose results the caller sums in
order (the same bits whatever the threads).  See :mod:`bigmixed._kernels` for the conventions.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import _JIT


@njit(parallel=True, **_JIT)
def transform_groups(A, B, c, Mz, Tx, a, b, xi, z_id, x_id, nchunks):
    """Per group, in place: ``c <- Mz'(a c + b B[:, xi])``, ``A <- Mz' A Mz``, ``B <- Mz' B Tx``.

    The statistics of rows transformed by another row transform (see
    :func:`bigmixed.scaling.transform_statistics`); ``xi < 0``: no intercept column.
    ``z_id`` / ``x_id``: Mz / Tx is the identity, so its products are skipped (usually
    only a shift or two of X change, and then only B moves).
    """
    G = A.shape[0]
    q = A.shape[1]
    p = B.shape[2]
    for t in prange(nchunks):
        lo = t * G // nchunks
        hi = (t + 1) * G // nchunks
        AM = np.empty((q, q))
        BT = np.empty((q, p))
        w = np.empty(q)
        c_id = z_id and a == 1.0 and b == 0.0
        for i in range(lo, hi):
            if not c_id:
                for r in range(q):
                    w[r] = a * c[i, r] + (b * B[i, r, xi] if xi >= 0 else 0.0)
                for r in range(q):
                    s = 0.0
                    for k in range(q):
                        s += Mz[k, r] * w[k]
                    c[i, r] = s
            if not z_id:
                for r in range(q):
                    for m in range(q):
                        s = 0.0
                        for k in range(q):
                            s += A[i, r, k] * Mz[k, m]
                        AM[r, m] = s
                for r in range(q):
                    for m in range(q):
                        s = 0.0
                        for k in range(q):
                            s += Mz[k, r] * AM[k, m]
                        A[i, r, m] = s
            if z_id and x_id:
                continue
            for r in range(q):
                for m in range(p):
                    s = 0.0
                    for k in range(p):
                        s += B[i, r, k] * Tx[k, m]
                    BT[r, m] = s
            for r in range(q):
                for m in range(p):
                    s = 0.0
                    for k in range(q):
                        s += Mz[k, r] * BT[k, m]
                    B[i, r, m] = s


# --------------------------------------------------------------------------
# start values: moments of the levels' own least-squares effects
# --------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def moment_sums(A, B, c, n, beta, rcond, nchunks):
    """Per chunk ``(sum n b b', sum n A^+, sum n, sum e'b, sum rank A)`` with ``e = c - B beta``
    and ``b = A^+ e``, for q = 1 or 2 (``e'b`` is the sum of squares the level's own effects explain).

    ``A^+`` is the pseudo-inverse in closed form, as :func:`bigmixed.start.psd_pinv` computes
    it (its numpy twin): a 2 x 2 block is inverted when ``det / tr > rcond * tr``, else
    taken as rank one, ``A / tr^2`` (0 when ``tr`` is 0).  The caller sums the chunks in order.
    """
    G = A.shape[0]
    q = A.shape[1]
    p = B.shape[2]
    out_bb = np.zeros((nchunks, q, q))
    out_ai = np.zeros((nchunks, q, q))
    out_n = np.zeros(nchunks)
    out_eb = np.zeros(nchunks)
    out_rk = np.zeros(nchunks)
    for t in prange(nchunks):
        e = np.empty(q)
        bv = np.empty(q)
        inv = np.empty((q, q))
        bb = np.zeros((q, q))
        ai = np.zeros((q, q))
        sn = 0.0
        seb = 0.0
        srk = 0.0
        for i in range(t * G // nchunks, (t + 1) * G // nchunks):
            for a in range(q):
                s = c[i, a]
                for m in range(p):
                    s -= B[i, a, m] * beta[m]
                e[a] = s
            if q == 1:
                a0 = A[i, 0, 0]
                inv[0, 0] = 1.0 / a0 if a0 > 0.0 else 0.0
                srk += 1.0 if a0 > 0.0 else 0.0
            else:
                a0, b0, d0 = A[i, 0, 0], A[i, 0, 1], A[i, 1, 1]
                tr = a0 + d0
                det = a0 * d0 - b0 * b0
                trs = tr if tr > 0.0 else 1.0
                if det / trs > rcond * tr:
                    r = 1.0 / det
                    inv[0, 0], inv[1, 1], inv[0, 1], inv[1, 0] = d0 * r, a0 * r, -b0 * r, -b0 * r
                    srk += 2.0
                else:
                    srk += 1.0 if tr > 0.0 else 0.0
                    for a in range(2):
                        for b in range(2):
                            inv[a, b] = A[i, a, b] / trs / trs if tr > 0.0 else 0.0
            for a in range(q):
                s = 0.0
                for k in range(q):
                    s += inv[a, k] * e[k]
                bv[a] = s
                seb += e[a] * s
            w = float(n[i])
            for a in range(q):
                for b in range(q):
                    bb[a, b] += w * bv[a] * bv[b]
                    ai[a, b] += w * inv[a, b]
            sn += w
        for a in range(q):
            for b in range(q):
                out_bb[t, a, b] = bb[a, b]
                out_ai[t, a, b] = ai[a, b]
        out_n[t] = sn
        out_eb[t] = seb
        out_rk[t] = srk
    return out_bb, out_ai, out_n, out_eb, out_rk
