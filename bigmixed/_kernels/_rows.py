"""Kernels over rows: the statistics pass, group keys to codes, sampling levels, predictions.

See the package docstring (:mod:`bigmixed._kernels`) for the conventions.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import _JIT, LEVEL_MAX, LEVEL_MIN

# --------------------------------------------------------------------------
# statistics: one pass over rows
# --------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _accumulate_range(q, p, codes, XT, ZT, y, xs, xi, zs, zi, ys, yi, A, B, c, n, glo, ghi,
                      count_unknown, XtX, Xty, out, level, sXtX, sXty, syty, sN):
    """The rows whose code lies in ``[glo, ghi)``; ``out`` gets (y'y, used, skipped).

    A row of a group with ``level[g] >= LEVEL_MIN`` is also added to the sample sums of
    bucket ``min(level, LEVEL_MAX) - LEVEL_MIN`` (``level`` empty: no sampling).
    """
    N = codes.shape[0]
    sampled = level.shape[0] > 0
    xr = np.empty(p)
    zr = np.empty(q)
    yty = 0.0
    used = 0
    skip = 0
    for j in range(N):
        g = codes[j]
        if g < 0:
            if count_unknown:
                skip += 1
            continue
        if g < glo or g >= ghi:
            continue
        yj = (y[j] - ys) * yi
        tot = yj
        for k in range(p):
            v = (XT[k, j] - xs[k]) * xi[k]
            xr[k] = v
            tot += v
        for a in range(q):
            v = (ZT[a, j] - zs[a]) * zi[a]
            zr[a] = v
            tot += v
        # One test for the common all-finite row (a NaN or inf anywhere makes the sum
        # non-finite); finite values whose sum overflows are checked one by one.
        if not np.isfinite(tot):
            ok = np.isfinite(yj)
            for k in range(p):
                ok = ok and np.isfinite(xr[k])
            for a in range(q):
                ok = ok and np.isfinite(zr[a])
            if not ok:
                skip += 1
                continue
        used += 1
        for a in range(q):
            za = zr[a]
            for b in range(q):
                A[g, a, b] += za * zr[b]
            for k in range(p):
                B[g, a, k] += za * xr[k]
            c[g, a] += za * yj
        n[g] += 1
        for k in range(p):
            xk = xr[k]
            for m in range(k, p):
                XtX[k, m] += xk * xr[m]
            Xty[k] += xk * yj
        yty += yj * yj
        if sampled and level[g] >= LEVEL_MIN:
            bk = min(level[g], LEVEL_MAX) - LEVEL_MIN
            for k in range(p):
                xk = xr[k]
                for m in range(k, p):
                    sXtX[bk, k, m] += xk * xr[m]
                sXty[bk, k] += xk * yj
            syty[bk] += yj * yj
            sN[bk] += 1
    out[0] = yty
    out[1] = used
    out[2] = skip


@njit(**_JIT)
def _accumulate_dispatch(codes, XT, ZT, y, xs, xi, zs, zi, ys, yi, A, B, c, n, glo, ghi,
                         count_unknown, XtX, Xty, out, level, sXtX, sXty, syty, sN):
    # see _pass1_dispatch: q as a literal unrolls the per-row loops (measured 0.23 -> 0.18 s
    # for 10M rows at q = 2, one thread)
    q = ZT.shape[0]
    p = XT.shape[0]
    if q == 1:
        _accumulate_range(1, p, codes, XT, ZT, y, xs, xi, zs, zi, ys, yi, A, B, c, n, glo, ghi,
                          count_unknown, XtX, Xty, out, level, sXtX, sXty, syty, sN)
    elif q == 2:
        _accumulate_range(2, p, codes, XT, ZT, y, xs, xi, zs, zi, ys, yi, A, B, c, n, glo, ghi,
                          count_unknown, XtX, Xty, out, level, sXtX, sXty, syty, sN)
    else:
        _accumulate_range(q, p, codes, XT, ZT, y, xs, xi, zs, zi, ys, yi, A, B, c, n, glo, ghi,
                          count_unknown, XtX, Xty, out, level, sXtX, sXty, syty, sN)


@njit(parallel=True, **_JIT)
def accumulate_stats(codes, XT, ZT, y, xs, xi, zs, zi, ys, yi, A, B, c, n, level, nthreads):
    """Transform rows and add them to the per-group statistics, in place.

    ``XT`` (p, N) and ``ZT`` (q, N) hold the design column by column (so that
    filling them from columnar data is a contiguous copy).  Each row is
    transformed on the fly, ``x~ = (x - xs) * xi`` (likewise z, y), rather than
    in a separate numpy pass over the rows.  Rows with a negative code
    (unknown or missing group) or a non-finite value are skipped and counted.

    Rows may come in any order.  Thread ``t`` owns the ``t``-th of ``nthreads``
    equal slices of the range of codes *present in this block* and scans all
    rows, so no two threads ever write the same group and no per-thread copy
    of the statistics is needed (the statistics can be gigabytes; a copy per
    thread would double that).  Slicing the block's own code range, not
    ``[0, G)``, matters for data sorted by group: a block then holds a narrow
    range of codes, which a split of ``[0, G)`` would hand to one thread.

    ``level`` (int8 per group, or empty) selects the rows whose global sums are
    also kept per sampling level (see :class:`bigmixed.stats.SampleSums`).

    Returns per-thread partial global sums ``(XtX, Xty, yty, n_used, n_skipped)``
    and sample sums ``(sXtX, sXty, syty, sN)`` with a leading (thread, bucket) axis pair.
    """
    N = codes.shape[0]
    p = XT.shape[0]
    nb = LEVEL_MAX - LEVEL_MIN + 1
    out_sXtX = np.zeros((nthreads, nb, p, p))
    out_sXty = np.zeros((nthreads, nb, p))
    out_syty = np.zeros((nthreads, nb))
    out_sN = np.zeros((nthreads, nb), dtype=np.int64)
    out_XtX = np.zeros((nthreads, p, p))
    out_Xty = np.zeros((nthreads, p))
    out_yty = np.zeros(nthreads)
    out_used = np.zeros(nthreads, dtype=np.int64)
    out_skip = np.zeros(nthreads, dtype=np.int64)
    cmin = A.shape[0]
    cmax = -1
    for j in range(N):
        g = codes[j]
        if g >= 0:
            cmin = min(cmin, g)
            cmax = max(cmax, g)
    span = max(cmax + 1 - cmin, 0)
    for t in prange(nthreads):
        glo = cmin + t * span // nthreads
        ghi = cmin + (t + 1) * span // nthreads
        XtX = np.zeros((p, p))
        Xty = np.zeros(p)
        res = np.zeros(3)
        sXtX = np.zeros((nb, p, p))
        sXty = np.zeros((nb, p))
        syty = np.zeros(nb)
        sN = np.zeros(nb, dtype=np.int64)
        # rows of unknown groups are counted by thread 0 only
        _accumulate_dispatch(codes, XT, ZT, y, xs, xi, zs, zi, ys, yi, A, B, c, n, glo, ghi,
                             t == 0, XtX, Xty, res, level, sXtX, sXty, syty, sN)
        for k in range(p):
            out_Xty[t, k] = Xty[k]
            for m in range(k, p):
                out_XtX[t, k, m] = XtX[k, m]
                out_XtX[t, m, k] = XtX[k, m]
        for b in range(nb):
            out_syty[t, b] = syty[b]
            out_sN[t, b] = sN[b]
            for k in range(p):
                out_sXty[t, b, k] = sXty[b, k]
                for m in range(k, p):
                    out_sXtX[t, b, k, m] = sXtX[b, k, m]
                    out_sXtX[t, b, m, k] = sXtX[b, k, m]
        out_yty[t] = res[0]
        out_used[t] = int(res[1])
        out_skip[t] = int(res[2])
    return out_XtX, out_Xty, out_yty, out_used, out_skip, out_sXtX, out_sXty, out_syty, out_sN


# --------------------------------------------------------------------------
# integer group keys -> codes through a dense table
# --------------------------------------------------------------------------


@njit(**_JIT)
def mark_keys(values, lo, table):
    """``table[v - lo] = 0`` for every value (int64, in ``[lo, lo + len(table))``): present keys.

    Called once per chunk of the key column (a chunk converts to numpy without a copy);
    :func:`number_keys` then numbers them.
    """
    for j in range(values.shape[0]):
        table[values[j] - lo] = 0


@njit(**_JIT)
def number_keys(table):
    """Number the marked (0) entries of ``table`` 0, 1, ... in order, in place; return how many.

    The distinct keys come out sorted without sorting the rows; unmarked entries stay -1.
    """
    G = 0
    for k in range(table.shape[0]):
        if table[k] == 0:
            table[k] = G
            G += 1
    return G


@njit(**_JIT)
def dense_codes(values, offset, table):
    """``table[v - offset]`` per value, -1 outside the table (an unknown key)."""
    n = values.shape[0]
    out = np.empty(n, dtype=np.int64)
    m = table.shape[0]
    for j in range(n):
        k = values[j] - offset
        out[j] = table[k] if 0 <= k < m else -1
    return out


@njit(**_JIT)
def hash_levels(h, multiplier):
    """Sampling level per 64-bit hash: trailing zero bits of its top 32 bits (32 if all zero).

    Each ``h`` is first multiplied by ``multiplier`` (mod 2^64): the caller's Fibonacci
    hashing of integer keys, fused into this pass (1 for hashes that are already mixed).
    """
    n = h.shape[0]
    out = np.empty(n, dtype=np.int8)
    for j in range(n):
        t = (h[j] * multiplier) >> np.uint64(32)
        lv = 0
        if t == 0:
            lv = 32
        else:
            while (t & np.uint64(1)) == 0:
                t = t >> np.uint64(1)
                lv += 1
        out[j] = lv
    return out


# --------------------------------------------------------------------------
# predictions
# --------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def linear_predictor(X, Z, beta, bhat, codes, nthreads):
    """X beta + Z b_{group} per row; a negative code (unknown group) gets X beta."""
    N = X.shape[0]
    p = X.shape[1]
    q = Z.shape[1]
    out = np.empty(N)
    for t in prange(nthreads):
        lo = t * N // nthreads
        hi = (t + 1) * N // nthreads
        for j in range(lo, hi):
            acc = 0.0
            for m in range(p):
                acc += X[j, m] * beta[m]
            g = codes[j]
            if g >= 0:
                for a in range(q):
                    acc += Z[j, a] * bhat[g, a]
            out[j] = acc
    return out
