"""The statistics pass: rows -> per-level records of one term, with software prefetch.

Each level of a term accumulates one *record* of contiguous doubles (padded to whole cache
lines), so that a row touches one or two cache lines instead of one per statistic::

    [ A = Z'Z (q*q) | B = Z'X (q*p) | c = Z'y (q) | n | per ancestor: U = Z_a'Z (q_a*q), parent + 1 ]

or, when Z is the first q columns of X (one term, the same transform), each distinct product once
(:func:`packed_layout`: ``y ~ x + x2 + (x | g)`` in one cache line instead of two).

Rows arrive in any order, so every row's record is a cache miss; the loop therefore
prefetches the record of the row ``PREFETCH`` rows ahead (LLVM's ``llvm.prefetch``), which
turns a chain of memory latencies into overlapping transfers (measured about 3x faster on
shuffled rows).  Thread ``t`` owns the ``t``-th slice of the codes present in the block: it
lists its rows by a branch-free scan, a block of rows at a time, then adds them (no two threads write one record, no
per-thread copies); the rows of a level are added in row order, so the bits never depend on
thread timing.

Nested terms keep their pair blocks with the ancestors in the same record (``U``, the
``parent`` code seen first, plus one), and count rows whose parent differs (not nested).  An
ancestor whose statistics are summed from these records afterwards (:func:`sum_records`) keeps
its parent only (``q_a`` = 0); then this pass also takes the sampling term's level of each row
through that ancestor's code, and leaves out rows without a level of an ancestor.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._common import _JIT, LEVEL_MAX, LEVEL_MIN

PREFETCH = 16  # rows ahead
OWN_BLOCK = 8192  # rows a thread scans for its own at a time (64 KB of row numbers)


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Prefetch ``arr.flat[idx]`` into the cache for writing (``llvm.prefetch``; a hint, never a fault)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False, boundscheck=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


def record_layout(q: int, p: int, anc_q: tuple[int, ...] = ()) -> tuple[int, list[int], list[int]]:
    """``(stride, up offsets, parent offsets)`` of a term's records (doubles; whole cache lines)."""
    off = q * q + q * p + q + 1
    ups, pars = [], []
    for qa in anc_q:
        ups.append(off)
        off += qa * q
        pars.append(off)
        off += 1
    return (off + 7) // 8 * 8, ups, pars


def record_maps(q: int, p: int) -> tuple:
    """Slots of ``(A, B, c, n)`` in a full record (:func:`record_layout`): ``(amap (q, q), bmap (q, p),
    cmap (q,), nslot)``, what :func:`split_records` reads."""
    oB = q * q
    oc = oB + q * p
    return (np.arange(q * q, dtype=np.int64).reshape(q, q), oB + np.arange(q * p, dtype=np.int64).reshape(q, p),
            oc + np.arange(q, dtype=np.int64), oc + q)


def packed_layout(q: int, p: int) -> tuple:
    """A record holding each distinct product once, for a term whose Z is the first ``q`` columns of X.

    The columns being equal (same values, same transform), ``z_a z_b``, ``z_a x_k`` and ``z_a y``
    are the products ``x_a x_k`` (``a < q``, ``k >= a``) and ``x_a y``: ``y ~ x + x2 + (x | g)``
    needs 7 (the full record 13, two cache lines).  Slots: row ``a``'s ``x_a x_k`` for ``k = a ..
    p-1``, row after row, then ``x_a y`` for each ``a``, then the row count.  Returns ``(stride,
    maps)`` with ``maps`` as :func:`record_maps` gives.
    """
    slot = {}
    for a in range(q):
        for k in range(a, p):
            slot[(a, k)] = len(slot)
    ys = len(slot)

    def at(a: int, k: int) -> int:
        return slot[(min(a, k), max(a, k))]  # x_a x_k = x_k x_a, bit for bit

    amap = np.array([[at(a, b) for b in range(q)] for a in range(q)], dtype=np.int64)
    bmap = np.array([[at(a, k) for k in range(p)] for a in range(q)], dtype=np.int64)
    cmap = ys + np.arange(q, dtype=np.int64)
    nslot = ys + q
    return (nslot + 1 + 7) // 8 * 8, (amap, bmap, cmap, nslot)


@njit(inline="always", **_JIT)
def _rows(q, p, codes, XT, ZT, y, w, tr, R, stride, glo, ghi, count_unknown, gl, sm, level_of, an, with_globals,
          packed):
    """The rows whose code lies in ``[glo, ghi)``; ``gl[2]`` gets (y'y, used, skipped, sum log w, conflicts)."""
    G = R.shape[0] // stride if stride > 0 else 0
    xs, xi, zs, zi, ys, yi = tr
    XtX, Xty, out = gl
    level, sXtX, sXty, syty, sN = sm
    acodes, aZT, azs, azi, aoff, aq, aup, apar = an
    N = codes.shape[0]
    na = acodes.shape[0]
    sampled = with_globals and level.shape[0] > 0
    weighted = w.shape[0] > 0
    xr = np.empty(p)
    zr = np.empty(q)
    za = np.empty(max(aZT.shape[0], 1))
    oB = q * q
    oc = oB + q * p
    on = oc + q
    yty = 0.0
    used = 0
    skip = 0
    lw = 0.0
    conflicts = 0
    lines = (stride + 7) // 8
    # This thread's rows first, in row order, by a branch-free scan of a block of rows into a
    # small buffer (it stays in cache): testing ownership row by row in the main loop
    # mispredicts on every other row of shuffled data (both threads own about half), and
    # prefetching PREFETCH of its own rows ahead reaches the same distance whatever the share.
    # A thread that owns every code (one thread) reads the rows directly, in one block.
    direct = glo <= 0 and ghi >= G
    step = max(N, 1) if direct else OWN_BLOCK
    own = np.empty(0 if direct else OWN_BLOCK, np.int64)
    width = np.uint64(ghi - glo) if ghi > glo else np.uint64(0)
    unknown = 0
    for r0 in range(0, N, step):
        stop = min(N, r0 + step)
        cnt = stop - r0
        if not direct:
            cnt = 0
            for j in range(r0, stop):
                g = codes[j]
                own[cnt] = j
                cnt += np.uint64(g - glo) < width  # g < glo wraps around to a large number
                unknown += g < 0
        for jj in range(cnt):
            j = r0 + jj
            if direct:
                if jj + PREFETCH < cnt:
                    gf = codes[j + PREFETCH]
                    if gf >= 0:
                        for k in range(lines):
                            _prefetch(R, gf * stride + 8 * k)
                        if sampled and level_of < 0:  # the level's sampling level is read with its record
                            _prefetch(level, gf)
            else:
                if jj + PREFETCH < cnt:
                    gf = codes[own[jj + PREFETCH]]
                    for k in range(lines):
                        _prefetch(R, gf * stride + 8 * k)
                    if sampled and level_of < 0:
                        _prefetch(level, gf)
                j = own[jj]
            g = codes[j]
            if g < 0:  # only read directly
                unknown += 1
                continue
            outside = False  # a row without a level of an ancestor is in no group of it: left out
            for e in range(na):
                outside = outside or acodes[e, j] < 0
            if outside:
                skip += 1
                continue
            yj = (y[j] - ys) * yi
            tot = yj
            for k in range(p):
                v = (XT[k, j] - xs[k]) * xi[k]
                xr[k] = v
                tot += v
            if not packed:
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
                for a in range(0 if packed else q):
                    ok = ok and np.isfinite(zr[a])
                if not ok:
                    skip += 1
                    continue
            if weighted:
                sw = np.sqrt(w[j])
                lw += np.log(w[j])
                yj *= sw
                for k in range(p):
                    xr[k] *= sw
                for a in range(0 if packed else q):
                    zr[a] *= sw
            used += 1
            base = g * stride
            if packed:  # Z is X's first q columns (packed_layout): z was not read
                o = base
                for a in range(q):
                    xa = xr[a]
                    for k in range(a, p):
                        R[o] += xa * xr[k]
                        o += 1
                for a in range(q):
                    R[o] += xr[a] * yj
                    o += 1
                R[o] += 1.0
            for a in range(0 if packed else q):
                zv = zr[a]
                for b in range(q):
                    R[base + a * q + b] += zv * zr[b]
                for k in range(p):
                    R[base + oB + a * p + k] += zv * xr[k]
                R[base + oc + a] += zv * yj
            if not packed:
                R[base + on] += 1.0
            for e in range(na):  # nested: the pair block with each ancestor, and its parent
                h = acodes[e, j]
                pslot = base + apar[e]
                if R[pslot] == 0.0:
                    R[pslot] = h + 1.0
                elif R[pslot] != h + 1.0:
                    conflicts += 1  # not nested: the caller starts again with pair lists
                sw = np.sqrt(w[j]) if weighted else 1.0
                for a in range(aq[e]):
                    za[a] = (aZT[aoff[e] + a, j] - azs[aoff[e] + a]) * azi[aoff[e] + a] * sw
                for a in range(aq[e]):
                    for b in range(q):
                        R[base + aup[e] + a * q + b] += za[a] * zr[b]
            if not with_globals:
                continue
            for k in range(p):
                xk = xr[k]
                for m in range(k, p):
                    XtX[k, m] += xk * xr[m]
                Xty[k] += xk * yj
            yty += yj * yj
            lg = g if level_of < 0 else acodes[level_of, j]  # the sampling term's level of the row
            if sampled and level[lg] >= LEVEL_MIN:
                bk = min(level[lg], LEVEL_MAX) - LEVEL_MIN
                for k in range(p):
                    xk = xr[k]
                    for m in range(k, p):
                        sXtX[bk, k, m] += xk * xr[m]
                    sXty[bk, k] += xk * yj
                syty[bk] += yj * yj
                sN[bk] += 1
    if count_unknown:
        skip += unknown
    out[0] = yty
    out[1] = used
    out[2] = skip
    out[3] = lw
    out[4] = conflicts


@njit(**_JIT)
def _dispatch(codes, XT, ZT, y, w, tr, R, stride, glo, ghi, count_unknown, gl, sm, level_of, an, with_globals,
              packed):
    # q as a literal unrolls the per-row loops (see _groups._pass1_qn)
    q = ZT.shape[0]
    p = XT.shape[0]
    if q == 1:
        _rows(1, p, codes, XT, ZT, y, w, tr, R, stride, glo, ghi, count_unknown, gl, sm, level_of, an, with_globals,
              packed)
    elif q == 2:
        _rows(2, p, codes, XT, ZT, y, w, tr, R, stride, glo, ghi, count_unknown, gl, sm, level_of, an, with_globals,
              packed)
    else:
        _rows(q, p, codes, XT, ZT, y, w, tr, R, stride, glo, ghi, count_unknown, gl, sm, level_of, an, with_globals,
              packed)


@njit(parallel=True, **_JIT)
def accumulate_records(codes, XT, ZT, y, w, tr, R, stride, level, level_of, an, with_globals, nthreads, packed):
    """Transform rows and add them to the records ``R`` (flat, ``G * stride``), in place.

    ``XT`` (p, N) and ``ZT`` (q, N) hold the design column by column; ``tr`` the row transform
    ``(xs, xi, zs, zi, ys, yi)`` (x~ = (x - xs) * xi, likewise z and y); ``w`` precision weights
    (> 0; empty: none), every transformed value multiplied by sqrt(w); ``level`` each level's
    sampling level (int8, or empty), indexed by the term's own code (``level_of`` -1) or by the
    code of ancestor ``level_of`` (the sampling term is a coarser one whose statistics are summed
    from these records afterwards); ``an`` the ancestors of a nested term (see :func:`_rows`); ``packed``
    the records are :func:`packed_layout`'s (Z is X's first q columns; ``an`` then has none, and
    ``ZT`` is not read).
    Rows with a negative code (in the term or an ancestor) or a non-finite value are skipped
    and counted.

    Returns per-thread ``(XtX, Xty, out)`` with ``out`` = (y'y, used, skipped, sum log w,
    conflicts) and the sample sums ``(sXtX, sXty, syty, sN)`` per (thread, bucket); the global
    sums only if ``with_globals``.
    """
    N = codes.shape[0]
    p = XT.shape[0]
    G = R.shape[0] // stride if stride > 0 else 0
    nb = LEVEL_MAX - LEVEL_MIN + 1
    out_XtX = np.zeros((nthreads, p, p))
    out_Xty = np.zeros((nthreads, p))
    out = np.zeros((nthreads, 5))
    out_sXtX = np.zeros((nthreads, nb, p, p))
    out_sXty = np.zeros((nthreads, nb, p))
    out_syty = np.zeros((nthreads, nb))
    out_sN = np.zeros((nthreads, nb), dtype=np.int64)
    cmin = G
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
        if nthreads == 1:  # every code: the rows are read directly (see _rows)
            glo, ghi = 0, G
        XtX = np.zeros((p, p))
        Xty = np.zeros(p)
        res = np.zeros(5)
        sXtX = np.zeros((nb, p, p))
        sXty = np.zeros((nb, p))
        syty = np.zeros(nb)
        sN = np.zeros(nb, dtype=np.int64)
        # rows of unknown levels are counted by thread 0 only
        _dispatch(codes, XT, ZT, y, w, tr, R, stride, glo, ghi, t == 0, (XtX, Xty, res),
                  (level, sXtX, sXty, syty, sN), level_of, an, with_globals, packed)
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
        for k in range(5):
            out[t, k] = res[k]
    return out_XtX, out_Xty, out, out_sXtX, out_sXty, out_syty, out_sN


@njit(parallel=True, **_JIT)
def split_records(R, stride, maps, A, B, c, n, rank, nchunks):
    """Records -> the contiguous per-level arrays the objective reads (A, B, c, n).

    ``maps = (amap, bmap, cmap, nslot)`` give each entry's slot in a record (:func:`record_maps`,
    or a packed record's, :func:`packed_layout`).  Record ``g`` (of ``R.shape[0] // stride``) goes
    to level ``rank[g]``, or to ``g`` when ``rank`` is empty: records kept in the order keys were
    first seen are put in key order while they are read in sequence.
    """
    G = R.shape[0] // stride
    ranked = rank.shape[0] > 0
    for t in prange(nchunks):
        lo = t * G // nchunks
        hi = (t + 1) * G // nchunks
        if ranked:
            for g in range(lo, hi):
                _split_one(R, g * stride, maps, A, B, c, n, rank[g])
        else:
            for g in range(lo, hi):
                _split_one(R, g * stride, maps, A, B, c, n, g)


@njit(inline="always", **_JIT)
def _split_one(R, base, maps, A, B, c, n, d):
    amap, bmap, cmap, nslot = maps
    q = A.shape[1]
    p = B.shape[2]
    for a in range(q):
        for b in range(q):
            A[d, a, b] = R[base + amap[a, b]]
        for k in range(p):
            B[d, a, k] = R[base + bmap[a, k]]
        c[d, a] = R[base + cmap[a]]
    n[d] = np.int64(R[base + nslot])


@njit(**_JIT)
def sum_records(Rf, sf, pslot, src, dst, psrc, pdst, Rj, sj):
    """Add every record of ``Rf`` (stride ``sf``) into its parent's record in ``Rj`` (stride ``sj``).

    Nested terms whose columns are all the finest term's have statistics that are sums of that
    term's records over each parent (its rows are the parent's rows), so they need no pass over
    the rows of their own.  The parent of record ``g`` is ``Rf[g * sf + pslot] - 1`` (-1: a
    record without rows, skipped); slot ``dst[i]`` of the parent's record gets slot ``src[i]``
    added; parent slots ``pdst[e]`` (a code + 1, of the parent's own parent) take slot
    ``psrc[e]``, and records that disagree there are counted (not nested).  Sequential, in
    record order: the same bits whatever the threads.  Returns the count of disagreements.
    """
    G = Rf.shape[0] // sf
    conflicts = 0
    for g in range(G):
        b = g * sf
        h = np.int64(Rf[b + pslot]) - 1
        if h < 0:
            continue
        t = h * sj
        for i in range(src.shape[0]):
            Rj[t + dst[i]] += Rf[b + src[i]]
        for e in range(psrc.shape[0]):
            v = Rf[b + psrc[e]]
            cur = Rj[t + pdst[e]]
            if cur == 0.0:
                Rj[t + pdst[e]] = v
            elif cur != v:
                conflicts += 1
    return conflicts
