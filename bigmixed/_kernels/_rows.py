"""Kernels over rows: group keys to codes, sampling levels, predictions, pair products.

The statistics pass itself is :mod:`bigmixed._kernels._pass`.

See the package docstring (:mod:`bigmixed._kernels`) for the conventions.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import _JIT, LEVEL_MAX, LEVEL_MIN
from ._pass import PREFETCH, _prefetch

# --------------------------------------------------------------------------
# integer group keys -> codes through a dense table
# --------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def mark_keys(values, lo, table):
    """``table[v - lo] = 0`` for every value (int64, in ``[lo, lo + len(table))``): present keys.

    Called once per chunk of the key column (a chunk converts to numpy without a copy);
    :func:`number_keys` then numbers them.  Threads take fixed row ranges; two of them may
    mark one key, but every write is the same 0, so the table never depends on timing.
    """
    N = values.shape[0]
    nchunks = 16
    for t in prange(nchunks):
        for j in range(t * N // nchunks, (t + 1) * N // nchunks):
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


@njit(parallel=True, **_JIT)
def dense_codes(values, offset, table, span, nthreads):
    """``table[v - offset]`` per value, -1 outside the table (an unknown key).

    An empty ``table`` is the identity on ``[0, span)``: the codes of keys that fill their
    range are ``v - offset``, and skipping the gather saves a cache miss a row (rows come in
    any order, and a table of millions of keys is larger than the cache).  Threads take
    contiguous row ranges and write only their own rows.
    """
    n = values.shape[0]
    out = np.empty(n, dtype=np.int64)
    m = table.shape[0]
    identity = m == 0
    for t in prange(nthreads):
        for j in range(t * n // nthreads, (t + 1) * n // nthreads):
            k = values[j] - offset
            if identity:
                out[j] = k if 0 <= k < span else -1
            else:
                out[j] = table[k] if 0 <= k < m else -1
    return out


# --------------------------------------------------------------------------
# other keys -> codes through a bucketed table of 64-bit hashes
# --------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def hash_find(h, hashes, order, start, shift, nthreads):
    """Code of each 64-bit hash in ``h`` (-1 when absent) in a bucketed table.

    ``hashes`` are the keys' hashes sorted, ``order[i]`` the code of ``hashes[i]``, and bucket
    ``b = hash >> shift`` holds ``hashes[start[b]:start[b + 1]]``.  With millions of keys each
    row costs two dependent cache misses (its bucket, then its hashes), so the loop is a
    two-stage software pipeline: the bucket bound of row ``j + 2 * PREFETCH`` and the hashes of
    row ``j + PREFETCH`` are prefetched while row ``j`` is looked up.  Threads take contiguous
    row ranges and write only their own rows.
    """
    n = h.shape[0]
    out = np.empty(n, dtype=np.int64)
    for t in prange(nthreads):
        lo = t * n // nthreads
        hi = (t + 1) * n // nthreads
        for j in range(lo, hi):
            if j + 2 * PREFETCH < hi:
                _prefetch(start, np.intp(h[j + 2 * PREFETCH] >> shift))
            if j + PREFETCH < hi:
                ahead = np.intp(start[np.intp(h[j + PREFETCH] >> shift)])
                _prefetch(hashes, ahead)
                _prefetch(order, ahead)
            hj = h[j]
            b = np.intp(hj >> shift)
            pos = np.intp(start[b])
            end = np.intp(start[b + 1])
            code = -1
            while pos < end:  # hashes are sorted inside a bucket
                c = hashes[pos]
                if c >= hj:
                    if c == hj:
                        code = np.int64(order[pos])
                    break
                pos += 1
            out[j] = code
    return out


@njit(inline="always", **_JIT)
def _pack8(buf, lo, m):
    """``(packed, ok)`` of the ``m`` bytes ``buf[lo:lo + m]``: big-endian, NUL-padded to 8 bytes;
    ok only for at most 8 ASCII bytes without NUL (exactly what :func:`bigmixed.keys._pack_expr` packs)."""
    if m > 8:
        return np.uint64(0), False
    x = np.uint64(0)
    for i in range(8):
        b = np.uint64(0)
        if i < m:
            b = np.uint64(buf[lo + i])
            if b == 0 or b >= 128:
                return np.uint64(0), False
        x = (x << np.uint64(8)) | b
    return x, True


@njit(parallel=True, **_JIT)
def pack_strings(offsets, data, valid, out, ok, nthreads):
    """Arrow strings (``offsets``, ``data``) -> the big-endian uint64 of their NUL-padded bytes.

    ``ok[j]`` is true for a valid string that packs (:func:`_pack8`); ``out[j]`` is then its
    packed value, else 0.
    """
    n = out.shape[0]
    for t in prange(nthreads):
        for j in range(t * n // nthreads, (t + 1) * n // nthreads):
            x, good = _pack8(data, offsets[j], offsets[j + 1] - offsets[j])
            good = good and valid[j]
            out[j] = x if good else np.uint64(0)
            ok[j] = good


@njit(parallel=True, **_JIT)
def pack_string_views(views, valid, out, ok, nthreads):
    """:func:`pack_strings` for Arrow string views (16 bytes each, flat): a string of at most 12 bytes
    is stored inline (little-endian int32 length, then its bytes), so no data buffer is read."""
    n = out.shape[0]
    for t in prange(nthreads):
        for j in range(t * n // nthreads, (t + 1) * n // nthreads):
            v = 16 * j
            m = np.int64(views[v]) | (np.int64(views[v + 1]) << 8) | (np.int64(views[v + 2]) << 16) \
                | (np.int64(views[v + 3]) << 24)
            x, good = _pack8(views, v + 4, m)
            good = good and valid[j]
            out[j] = x if good else np.uint64(0)
            ok[j] = good


# --------------------------------------------------------------------------
# keys -> codes in the order they are first seen (the one-pass coder)
# --------------------------------------------------------------------------

_FIB = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing, as bigmixed.keys


@njit(**_JIT)
def code_first_seen(v, valid, start, slot_key, slot_code, keys, first_row, G, max_G, out):
    """Code each 64-bit key ``v[j]`` (``j >= start``) by first appearance, adding new keys.

    ``slot_key``/``slot_code`` are an open-addressing table (power-of-two size, linear probing,
    ``slot_code < 0`` empty); a new key gets code ``G``, its value is stored at ``keys[G]`` and
    the row that brought it at ``first_row[G]``.  Rows with ``valid[j]`` false get -1.  Stops
    before a new key would make ``G`` exceed ``max_G`` (the caller grows the arrays and calls
    again from the returned row).  Sequential on purpose: the codes depend on the row order
    only, never on thread timing.  Returns ``(rows done, G)``.
    """
    n = v.shape[0]
    mask = slot_key.shape[0] - 1
    bits = 0
    while (1 << bits) < slot_key.shape[0]:
        bits += 1
    shift = np.uint64(64 - bits)
    for j in range(start, n):
        if j + PREFETCH < n:
            ahead = np.intp((v[j + PREFETCH] * _FIB) >> shift) if bits > 0 else 0
            _prefetch(slot_code, ahead)
            _prefetch(slot_key, ahead)
        if not valid[j]:
            out[j] = -1
            continue
        x = v[j]
        i = np.intp((x * _FIB) >> shift) if bits > 0 else 0
        while True:
            c = slot_code[i]
            if c < 0:
                if G >= max_G:
                    return j, G
                slot_key[i] = x
                slot_code[i] = G
                keys[G] = x
                first_row[G] = j
                out[j] = G
                G += 1
                break
            if slot_key[i] == x:
                out[j] = c
                break
            i = (i + 1) & mask
    return n, G


@njit(**_JIT)
def rehash_first_seen(keys, G, slot_key, slot_code):
    """Put the distinct ``keys[:G]`` (codes 0..G-1) into an empty, larger table."""
    mask = slot_key.shape[0] - 1
    bits = 0
    while (1 << bits) < slot_key.shape[0]:
        bits += 1
    shift = np.uint64(64 - bits)
    for g in range(G):
        x = keys[g]
        i = np.intp((x * _FIB) >> shift) if bits > 0 else 0
        while slot_code[i] >= 0:
            i = (i + 1) & mask
        slot_key[i] = x
        slot_code[i] = g


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


# --------------------------------------------------------------------------
# several terms: complete rows, pair statistics
# --------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def complete_rows(codes, XT, ZT, y, nthreads):
    """Per row: True when every term's code is >= 0 and y, X, Z are finite.

    ``codes`` (K, N).  A row lacking any one term's key is dropped from the whole fit, as R's
    model frame drops it.
    """
    K = codes.shape[0]
    N = codes.shape[1]
    p = XT.shape[0]
    q = ZT.shape[0]
    ok = np.empty(N, dtype=np.bool_)
    for t in prange(nthreads):
        lo = t * N // nthreads
        hi = (t + 1) * N // nthreads
        for j in range(lo, hi):
            good = np.isfinite(y[j])
            for k in range(K):
                good = good and codes[k, j] >= 0
            for k in range(p):
                good = good and np.isfinite(XT[k, j])
            for a in range(q):
                good = good and np.isfinite(ZT[a, j])
            ok[j] = good
    return ok


@njit(inline="always", **_JIT)
def _counting_pass(codes, n, idx):
    """The indices ``idx`` stably sorted by ``codes[idx]`` (``0 <= codes < n``): one counting sort."""
    m = idx.shape[0]
    cnt = np.zeros(n + 1, dtype=np.int64)
    for t in range(m):
        cnt[codes[idx[t]] + 1] += 1
    for v in range(n):
        cnt[v + 1] += cnt[v]
    out = np.empty(m, dtype=np.int64)
    for t in range(m):
        i = idx[t]
        v = codes[i]
        out[cnt[v]] = i
        cnt[v] += 1
    return out


@njit(**_JIT)
def pair_order(ck, cj, nk, nj):
    """Indices that sort the pairs ``(ck, cj)`` (``0 <= ck < nk``, ``0 <= cj < nj``) by ``ck``, then
    ``cj``, stably: two counting-sort passes (``cj``, then ``ck``), linear where a comparison sort
    of the keys ``ck * nj + cj`` is not; the same order as a stable sort of those keys."""
    return _counting_pass(ck, nk, _counting_pass(cj, nj, np.arange(ck.shape[0])))


@njit(**_JIT)
def order_within_runs(ptr, keys):
    """Indices that sort ``keys`` stably within each run ``[ptr[i], ptr[i+1])``, the runs kept in
    place: the order of a stable sort of ``run * K + keys`` when the pairs are in run order already.

    A run is a few pairs (a user's items): insertion sort, linear in practice; a run longer than
    ``32`` takes numba's stable merge sort.
    """
    order = np.arange(keys.shape[0])
    for i in range(ptr.shape[0] - 1):
        a, b = ptr[i], ptr[i + 1]
        if b - a > 32:
            order[a:b] = a + np.argsort(keys[a:b], kind="mergesort")
            continue
        for x in range(a + 1, b):
            e = order[x]
            kx = keys[e]
            y = x - 1
            while y >= a and keys[order[y]] > kx:
                order[y + 1] = order[y]
                y -= 1
            order[y + 1] = e
    return order


@njit(**_JIT)
def pair_products(ck, cj, nj, ZkT, ZjT, zks, zki, zjs, zji, w):
    """Pair keys ``c_k * nj + c_j`` and blocks ``z_j z_k'`` of the rows (``c_k >= 0``), summed per key.

    Returns ``(keys, vals)`` sorted by key (stable, so sums follow row order).
    """
    N = ck.shape[0]
    qk = ZkT.shape[0]
    qj = ZjT.shape[0]
    m = 0
    for r in range(N):
        if ck[r] >= 0:
            m += 1
    keys = np.empty(m, dtype=np.int64)
    rows = np.empty(m, dtype=np.int64)
    sk = np.empty(m, dtype=np.int64)
    sj = np.empty(m, dtype=np.int64)
    m = 0
    nk = 0
    for r in range(N):
        if ck[r] >= 0:
            keys[m] = ck[r] * nj + cj[r]
            rows[m] = r
            sk[m] = ck[r]
            sj[m] = cj[r]
            nk = max(nk, ck[r] + 1)
            m += 1
    order = pair_order(sk, sj, nk, nj)
    nu = 0
    for i in range(m):
        if i == 0 or keys[order[i]] != keys[order[i - 1]]:
            nu += 1
    ukeys = np.empty(nu, dtype=np.int64)
    vals = np.zeros((nu, qj, qk))
    zk = np.empty(qk)
    zj = np.empty(qj)
    u = -1
    for i in range(m):
        o = order[i]
        if i == 0 or keys[o] != keys[order[i - 1]]:
            u += 1
            ukeys[u] = keys[o]
        r = rows[o]
        for a in range(qk):
            zk[a] = (ZkT[a, r] - zks[a]) * zki[a]
        for a in range(qj):
            zj[a] = (ZjT[a, r] - zjs[a]) * zji[a]
        wr = w[r] if w.shape[0] > 0 else 1.0
        for a in range(qj):
            for b in range(qk):
                vals[u, a, b] += wr * zj[a] * zk[b]
    return ukeys, vals


@njit(**_JIT)
def merge_pairs(keys, vals, nj):
    """Sum the blocks of equal keys ``ck * nj + cj`` (concatenated from chunks); stable, sorted result."""
    m = keys.shape[0]
    nk = 0
    for i in range(m):
        nk = max(nk, keys[i] // nj + 1)
    order = pair_order(keys // nj, keys % nj, nk, nj)
    nu = 0
    for i in range(m):
        if i == 0 or keys[order[i]] != keys[order[i - 1]]:
            nu += 1
    ukeys = np.empty(nu, dtype=np.int64)
    out = np.zeros((nu, vals.shape[1], vals.shape[2]))
    u = -1
    for i in range(m):
        o = order[i]
        if i == 0 or keys[o] != keys[order[i - 1]]:
            u += 1
            ukeys[u] = keys[o]
        for a in range(vals.shape[1]):
            for b in range(vals.shape[2]):
                out[u, a, b] += vals[o, a, b]
    return ukeys, out


@njit(**_JIT)
def accumulate_level_xx(codes, XT, xs, xi, w, XX):
    """``XX[g] += x x'`` per row (transformed as in :func:`~bigmixed._kernels._pass.accumulate_records`, times w): per-level X'X.

    Kept only when asked for (the parametric bootstrap simulates the y-dependent statistics
    of each level, whose joint law needs its X'X).  Rows with a negative code are skipped.
    """
    N = codes.shape[0]
    p = XT.shape[0]
    xr = np.empty(p)
    weighted = w.shape[0] > 0
    for j in range(N):
        g = codes[j]
        if g < 0:
            continue
        sw = w[j] if weighted else 1.0
        for k in range(p):
            xr[k] = (XT[k, j] - xs[k]) * xi[k]
        for k in range(p):
            for m in range(p):
                XX[g, k, m] += sw * xr[k] * xr[m]
