"""Step 2 of the pass over the rows: chunks of rows -> per-level statistics of every term.

A :class:`Reducer` takes the chunks of one data set (all of it, or one file or Dask partition)
for a :class:`~bigmixed.pipeline.Plan` and keeps, per term, one record per level (the
layout of :mod:`bigmixed._kernels._pass`: Z'Z, Z'X, Z'y, n and, for nested terms, the pair
blocks with the ancestors in the same record), the global sums and the accounting of dropped
rows.  :attr:`Reducer.stats` turns the records into the contiguous arrays the objective reads.

Nested terms whose columns are all the finest term's (``(1 | batch/cask)``, ``(t | child) +
(t | school)``) take no pass over the rows: their records are sums of the finest term's
records over each parent, made when the statistics are (which then also checks that they are
nested in the terms above them, raising :class:`NotNested` if not).
"""

from __future__ import annotations

import math
import mmap
import time
from dataclasses import replace

import numpy as np
import polars as pl

from . import _kernels
from ._kernels._pass import record_layout
from .keys import TermIndex
from .terms import check_crossed_memory
from .scaling import scaling_from_sample
from .stats import (NO_ANCESTORS, NO_RANK, PairStats, SampleSums, Statistics, TermStats, default_threads,
                    faulted_zeros)

__all__ = ["Reducer", "NotNested", "NON_FINITE", "ZERO_WEIGHT", "NEGATIVE_WEIGHT", "complete"]

NON_FINITE = "(non-finite after transformation)"
ZERO_WEIGHT = "(zero weight)"
NEGATIVE_WEIGHT = "(negative weight)"
_NO_INT8 = np.zeros(0, dtype=np.int8)


class NotNested(Exception):
    """Raised by the reducer when terms assumed nested share a level across two outer levels."""


def complete(codes: list, y: np.ndarray, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Rows with known levels of every term and finite values (column by column: X and Z are Fortran-ordered)."""
    ok = np.isfinite(y)
    for c in codes:
        ok &= c >= 0
    for M in (X, Z):
        for j in range(M.shape[1]):
            ok &= np.isfinite(M[:, j])
    return ok


def _missing_expr(c: str, schema) -> pl.Expr:
    e = pl.col(c).is_null()
    if schema.get(c) in (pl.Float32, pl.Float64):
        e = e | pl.col(c).is_nan() | pl.col(c).is_infinite()
    return e


RELEASE_SLABS = 16  # pieces in which the records are split and handed back (see _Records.split)
_HUGE_PAGE = 2 << 20  # transparent huge pages on x86-64 and most arm64 systems
_CAN_RELEASE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")  # not on Windows


def _mapping(nbytes: int) -> mmap.mmap:
    """A private anonymous mapping, with transparent huge pages asked for (as numpy does for
    large arrays): every row lands on a random record, and 4 KB pages would add a TLB miss to it.

    Private, not mmap's default MAP_SHARED: a shared anonymous mapping is shared memory, which
    Linux backs with huge pages only if shmem_enabled allows (usually not), and from which
    MADV_DONTNEED only unmaps pages, without freeing them (the release in split would free
    nothing while the process's RSS fell).
    """
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:  # Windows: no flags (pagefile-backed memory of this process)
        m = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # not supported here: ordinary pages
            pass
    return m


class _Records:
    """One term's records during the pass (see :mod:`bigmixed._kernels._pass`)."""

    def __init__(self, G: int, q: int, p: int, anc_q: tuple[int, ...], capacity: int | None = None,
                 mapped: bool = False, packed: bool = False) -> None:
        self.q, self.p, self.anc_q = q, p, anc_q
        self.stride, self.ups, self.pars = record_layout(q, p, anc_q)
        self.maps, self.packed = _kernels.record_maps(q, p), False
        if packed and not anc_q:  # Z is X's first q columns: each distinct product once
            stride, maps = _kernels.packed_layout(q, p)
            if stride < self.stride:  # fewer cache lines per row (else the full record, as before)
                self.stride, self.maps, self.packed = stride, maps, True
        self.released = False
        self._map = None
        if not mapped:  # a numpy array (the Dask workers' statistics of one partition)
            self.G, self._cap = G, G
            self.R = faulted_zeros(G * self.stride)
            return
        # An anonymous mapping of its own, so that split(release=True) can hand its pages back
        # to the system slab by slab while the per-level arrays fill: the records and those
        # arrays are the two largest things of a fit's statistics, and need not be held at once.
        # Levels found during the pass (KeyCoder) grow it (``ensure``).
        self.G, self._cap = 0, max(int(capacity or G), G, 1)
        try:  # a large capacity is address space only, but a system may refuse it: then start small
            self._map = _mapping(self._cap * self.stride * 8)
        except (OSError, OverflowError):
            self._cap = max(G, 1 << 16)
            self._map = _mapping(self._cap * self.stride * 8)
        self.R = np.frombuffer(self._map, dtype=np.float64, count=0)
        self.ensure(G)

    def ensure(self, G: int) -> None:
        """Records for levels ``0..G-1`` (new ones zero)."""
        if G <= self.G:
            return
        if self._map is None:
            raise RuntimeError("records of a fixed number of levels cannot grow")
        st = self.stride
        if G > self._cap:
            cap = max(G, 2 * self._cap)
            new = _mapping(cap * st * 8)
            np.frombuffer(new, dtype=np.float64, count=self.G * st)[:] = self.R
            self.R = None
            self._map.close()
            self._map, self._cap = new, cap
        R = np.frombuffer(self._map, dtype=np.float64, count=G * st)
        R[self.G * st:].fill(0.0)  # written here: the kernel's threads would take the page faults serially
        self.R, self.G = R, G

    def ancestors(self, codes: list[np.ndarray], Zs: list[np.ndarray], scales: list) -> tuple:
        """The ``an`` argument of the kernel: codes, Z rows and transforms of the ancestors."""
        if not self.anc_q:
            return NO_ANCESTORS
        aoff = np.concatenate(([0], np.cumsum(self.anc_q))).astype(np.int64)
        qa = self.anc_q  # 0 for an ancestor whose pair block is summed from the records afterwards
        return (np.ascontiguousarray(np.vstack(codes)),
                np.ascontiguousarray(np.vstack([Z[:, :n].T for Z, n in zip(Zs, qa)])),
                np.concatenate([s.z_shift[:n] for s, n in zip(scales, qa)]),
                np.concatenate([1.0 / s.z_scale[:n] for s, n in zip(scales, qa)]),
                aoff, np.asarray(self.anc_q, np.int64), np.asarray(self.ups, np.int64),
                np.asarray(self.pars, np.int64))

    def split(self, levels, XX, release: bool = False, rank: np.ndarray = NO_RANK) -> TermStats:
        """The per-level arrays (record ``g`` as level ``rank[g]`` if given); ``release``: free the
        records slab by slab as they are copied (nothing may read them afterwards)."""
        if self.released:
            raise RuntimeError("the records were released by an earlier split")
        q, p, G = self.q, self.p, self.G
        if not release or self._map is None:
            A, B, c, n = (faulted_zeros((G, q, q)), faulted_zeros((G, q, p)), faulted_zeros((G, q)),
                          faulted_zeros(G, np.int64))
            _kernels.split_records(self.R, self.stride, self.maps, A, B, c, n, rank, max(1, min(G, 64)))
            return TermStats(A, B, c, n, levels, XX)
        # handed back slab by slab: the arrays' pages are faulted in only as the records' go, so
        # the two are never resident at once.  In level order each slab of the arrays is faulted
        # in by one sequential fill first, on the pages the previous slab gave back (the
        # kernel's threads faulting together are several times slower); scattered by rank they
        # fill as the kernel writes them.
        A, B, c, n = np.empty((G, q, q)), np.empty((G, q, p)), np.empty((G, q)), np.empty(G, np.int64)
        rec_bytes = 8 * self.stride
        # levels per piece, a multiple of a huge page's bytes (the mapping asks for huge pages):
        # pieces given back in 2 MB units are more likely whole pages the arrays can take again
        unit = math.lcm(mmap.PAGESIZE, _HUGE_PAGE, rec_bytes) // rec_bytes
        step = -(-max(G // RELEASE_SLABS, 1) // unit) * unit
        for lo in range(0, G, step):
            hi = min(G, lo + step)
            R = self.R[lo * self.stride:hi * self.stride]
            if rank.size:  # scattered into level order: the arrays are whole, the records read in sequence
                _kernels.split_records(R, self.stride, self.maps, A, B, c, n, rank[lo:hi], max(1, min(hi - lo, 64)))
            else:
                for arr in (A, B, c, n):
                    arr[lo:hi].fill(0)
                _kernels.split_records(R, self.stride, self.maps, A[lo:hi], B[lo:hi], c[lo:hi], n[lo:hi], rank,
                                       max(1, min(hi - lo, 64)))
            del R
            if _CAN_RELEASE:
                self._map.madvise(mmap.MADV_DONTNEED, lo * rec_bytes, (hi - lo) * rec_bytes)
        self.released = True
        self.R = None
        try:
            self._map.close()
        except BufferError:  # a view of the records is still alive somewhere: it keeps the (freed) mapping
            pass
        return TermStats(A, B, c, n, levels, XX)

    def pair(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(parent codes, blocks (G, q_a, q)) of the e-th ancestor."""
        R = self.R.reshape(self.G, self.stride)
        qa = self.anc_q[e]
        up = np.ascontiguousarray(R[:, self.ups[e]:self.ups[e] + qa * self.q].reshape(self.G, qa, self.q))
        return R[:, self.pars[e]].astype(np.int64) - 1, up


def _packed(plan) -> bool:
    """A one-term model whose Z is the first q columns of X (plain copies of the same data columns,
    or the intercept) under the same row transform: its records keep each distinct product once
    (:func:`~bigmixed._kernels.packed_layout`), one cache line a row for ``y ~ x + x2 + (x | g)``."""
    if plan.layout != "single" or plan.scaling is None:
        return False
    if not plan.design.z_leads_x():
        return False
    sc, q = plan.scaling, plan.design.q
    # a column transformed otherwise in Z has other values there: the full record
    return bool(np.array_equal(sc.z_shift[:q], sc.x_shift[:q]) and np.array_equal(sc.z_scale[:q], sc.x_scale[:q]))


_CHECK_ROWS = 1000  # rows of the prototype on which a summed term's columns are compared


def _columns_in_finest(plan) -> dict[int, np.ndarray]:
    """Coarser nested terms whose statistics are sums of the finest term's records.

    A term qualifies when each of its columns is one of the finest term's (the same name, and
    the same values and transform where those are known here), and so does every term coarser
    than it (its pair blocks with them are then the finest term's Z'Z too).  Returns, per such
    term, the finest term's column of each of its columns.
    """
    d, ch, terms = plan.design, plan.chain, plan.terms
    if plan.layout != "nested" or plan.coder is not None or len(ch) < 2:
        return {}
    f = terms[ch[0]]
    Z = d.matrices(plan.proto.head(_CHECK_ROWS))[2] if plan.proto is not None else None
    sc = plan.scaling
    out: dict[int, np.ndarray] = {}
    for j in reversed(ch[1:]):  # coarsest first: a term qualifies only if all coarser ones do
        t = terms[j]
        if not all(n in f.re_names for n in t.re_names):
            break
        m = np.array([f.re_names.index(n) for n in t.re_names], dtype=np.int64)
        cols_j, cols_f = t.offset + np.arange(t.q), f.offset + m
        if Z is not None and not np.array_equal(Z[:, cols_j], Z[:, cols_f], equal_nan=True):
            break
        if sc is not None and not (np.array_equal(sc.z_shift[cols_j], sc.z_shift[cols_f])
                                   and np.array_equal(sc.z_scale[cols_j], sc.z_scale[cols_f])):
            break
        out[j] = m
    return out


def _sum_plan(rf: "_Records", anc_f: tuple, rj: "_Records", j: int, anc_j: tuple, cols: dict) -> tuple:
    """The slots of :func:`bigmixed._kernels.sum_records` that build term ``j``'s records from the finest's."""
    qf, p, qj = rf.q, rf.p, rj.q
    m = cols[j]
    src, dst = [], []
    for a in range(qj):
        for b in range(qj):
            src.append(m[a] * qf + m[b])
            dst.append(a * qj + b)
        for k in range(p):
            src.append(qf * qf + m[a] * p + k)
            dst.append(qj * qj + a * p + k)
        src.append(qf * qf + qf * p + m[a])
        dst.append(qj * qj + qj * p + a)
    src.append(qf * qf + qf * p + qf)  # n
    dst.append(qj * qj + qj * p + qj)
    psrc, pdst = [], []
    for e, j2 in enumerate(anc_j):  # Z_j2'Z_j = the finest term's Z'Z at those columns
        m2 = cols[j2]
        for a in range(len(m2)):
            for b in range(qj):
                src.append(m2[a] * qf + m[b])
                dst.append(rj.ups[e] + a * qj + b)
        psrc.append(rf.pars[anc_f.index(j2)])
        pdst.append(rj.pars[e])
    as64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return rf.pars[anc_f.index(j)], as64(src), as64(dst), as64(psrc), as64(pdst)


def _as_slice(idx: np.ndarray) -> slice | np.ndarray:
    """A run of consecutive indices as a slice: numpy copies a strided slice about ten times faster
    than it gathers the same entries by an index array (1e6 levels' 2 x 2 blocks: 15 against 190 ms)."""
    idx = np.asarray(idx)
    if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        return slice(int(idx[0]), int(idx[0]) + idx.size)
    return idx


class Reducer:
    """Adds chunks of rows to the statistics of a :class:`~bigmixed.pipeline.Plan`.

    ``add`` may raise :class:`NotNested` (terms assumed nested are not): the caller starts
    again with ``layout="crossed"``.  With ``relayout`` the reducer does that itself when the
    first chunk it reduces shows it (nothing summed yet): ``plan`` is then the crossed plan.
    """

    def __init__(self, plan, nthreads: int | None = None, mapped: bool = False, relayout: bool = False) -> None:
        self.mapped = mapped  # records in their own mapping, handed back by finish()
        self.nthreads = int(nthreads or default_threads())
        self.relayout = relayout
        self._setup(plan)
        self.dropped = dict.fromkeys(plan.design.columns, 0)
        self.dropped[NON_FINITE] = 0
        self.n_read = 0
        self.n_dropped = 0
        self.t_reduce = 0.0
        self.scaling = plan.scaling
        self._buffers: dict = {}  # the design's arrays, reused from chunk to chunk of one size

    def _setup(self, plan) -> None:
        """The records, pair lists and global sums of ``plan``'s layout, all empty."""
        self.plan = plan
        self._reduced = False  # whether any chunk went into the statistics
        d, terms = plan.design, plan.terms
        ch = plan.chain
        anc = {k: () for k in range(len(terms))}
        if plan.layout == "nested":  # every finer term keeps its blocks with all coarser ones
            anc = {ch[a]: tuple(ch[a + 1:]) for a in range(len(ch))}
        self._anc = anc
        self._coder = plan.coder  # one term whose levels are found during the pass (KeyCoder)
        self._cols: dict[int, np.ndarray] = {}  # terms summed from the finest term's records
        self._sums: dict[int, tuple] = {}
        self._summed = False
        packed = _packed(plan)
        if self._coder is not None:
            self._rec = [_Records(0, terms[0].q, d.p, (), capacity=self._coder.keys.shape[0], mapped=True,
                                  packed=packed)]
            self._levels = [None]
        else:
            # the finest term keeps only the parent codes of the terms summed from its records
            self._cols = _columns_in_finest(plan)
            self._rec = [_Records(t.n_levels, t.q, d.p, tuple(0 if k == ch[0] and j in self._cols else terms[j].q
                                                              for j in anc[k]), mapped=self.mapped, packed=packed)
                         for k, t in enumerate(terms)]
            self._levels = [t.index.sampling_levels() if k == plan.sample_term else None for k, t in enumerate(terms)]
            self._sums = {j: _sum_plan(self._rec[ch[0]], anc[ch[0]], self._rec[j], j, anc[j], self._cols)
                          for j in self._cols}
        self._first = plan.sample_term if plan.sample_term is not None else 0
        # the terms that take a pass over the rows; the one taking the global sums (and the sampling
        # term's levels, through its code in that term's ancestors when it is summed afterwards)
        self._passes = [k for k in range(len(terms)) if k not in self._cols]
        self._glob_term = ch[0] if self._first in self._cols else self._first
        self._level_of = anc[ch[0]].index(self._first) if self._first in self._cols else -1
        self._XX = np.zeros((terms[self._first].n_levels, d.p, d.p)) if plan.keep_xx else None
        p = d.p
        self._glob = Statistics([], np.zeros((p, p)), np.zeros(p), 0.0, 0, [],
                                SampleSums.zeros(p) if plan.sample_term is not None else None,
                                self._first)
        self._pairs = [(ch[a], ch[b]) for a in range(len(ch)) for b in range(a + 1, len(ch))] \
            if plan.layout in ("nested", "crossed") else []
        self._lists: dict = {pr: [] for pr in self._pairs}
        self._stats: Statistics | None = None

    def _become_crossed(self) -> None:
        """Terms assumed nested are crossed, seen before anything was summed: start the crossed layout.

        Saves reading the first chunk again (all of in-memory data), which is what the caller's
        fallback on :class:`NotNested` would do.
        """
        terms = self.plan.terms
        check_crossed_memory([(t.n_levels, t.q) for t in terms], [t.name for t in terms])
        self._setup(replace(self.plan, layout="crossed", sample_term=None))

    # -- the statistics -------------------------------------------------------------

    @property
    def stats(self) -> Statistics:
        """The statistics of the rows added so far (the records split into per-level arrays).

        Raises :class:`NotNested` when a term summed from the finest term's records turns out to
        share a level between two levels of a coarser term.
        """
        if self._stats is None:
            self._stats = self._split(release=False)
        return self._stats

    def finish(self) -> Statistics:
        """The statistics, once no more rows will be added: with ``mapped`` records, their memory
        is handed back while they are split (one-term models; other layouts still read their pair
        blocks).  Raises :class:`NotNested` as :attr:`stats` may.
        """
        if self._stats is None:
            self._stats = self._split(release=self.mapped and self.plan.layout == "single")
        return self._stats

    def _split(self, release: bool) -> Statistics:
        st = self._glob
        if self._coder is not None:  # the levels in key order, as an index of all keys gives them
            index, rank, levels = self._coder.finish()
            term = self.plan.terms[0]
            term.index = TermIndex(term.factors, [index])
            ts = self._rec[0].split(levels, None, release, rank)
            return Statistics([ts], st.XtX, st.Xty, st.yty, st.N, [], st.sample, st.sample_term, st.sum_log_w)
        pairs = self.pairs()  # (sums the summed terms' records first)
        terms = [r.split(self._levels[k], self._XX if k == self._first else None, release)
                 for k, r in enumerate(self._rec)]
        return Statistics(terms, st.XtX, st.Xty, st.yty, st.N, pairs, st.sample, st.sample_term, st.sum_log_w)

    def _sum_terms(self) -> None:
        """The records of the terms summed from the finest term's (see :func:`_columns_in_finest`)."""
        if self._summed:
            return
        rf = self._rec[self.plan.chain[0]]
        for j, (pslot, src, dst, psrc, pdst) in self._sums.items():
            rj = self._rec[j]
            rj.R.fill(0.0)
            if _kernels.sum_records(rf.R, rf.stride, pslot, src, dst, psrc, pdst, rj.R, rj.stride):
                terms = self.plan.terms
                raise NotNested(f"{terms[j].name} in {', '.join(terms[a].name for a in self._anc[j])}")
        self._summed = True

    def pairs(self) -> list[PairStats]:
        """The pair statistics gathered so far (nested blocks, or merged pair lists)."""
        out = []
        terms = self.plan.terms
        self._sum_terms()
        f = self.plan.chain[0]
        for k, j in self._pairs:
            if self.plan.layout == "nested":
                parent, up = self._rec[k].pair(self._anc[k].index(j))
                if k == f and j in self._cols:  # Z_j'Z_f: rows of the finest term's Z'Z
                    rec = self._rec[f]
                    A = rec.R.reshape(rec.G, rec.stride)[:, :rec.q * rec.q].reshape(rec.G, rec.q, rec.q)
                    up = np.ascontiguousarray(A[:, _as_slice(self._cols[j]), :])
                out.append(PairStats(k, j, np.arange(terms[k].n_levels, dtype=np.int64), parent, up))
                continue
            parts = self._lists[(k, j)]
            nj = terms[j].n_levels
            if parts:
                keys = np.concatenate([p[0] for p in parts])
                vals = np.concatenate([p[1] for p in parts])
                keys, vals = _kernels.merge_pairs(keys, vals, max(nj, 1)) if len(parts) > 1 else (keys, vals)
            else:
                keys, vals = np.zeros(0, np.int64), np.zeros((0, terms[j].q, terms[k].q))
            out.append(PairStats(k, j, keys // max(nj, 1), keys % max(nj, 1), vals))
        return out

    # -- adding rows -------------------------------------------------------------------

    def add(self, chunk: pl.DataFrame, label: str, warm=None) -> None:
        """Reduce one chunk (a polars frame holding the design's columns)."""
        plan, d = self.plan, self.plan.design
        if any(r.released for r in self._rec):
            raise RuntimeError("rows added after finish()")
        self._stats = None
        self._summed = False
        self.n_read += chunk.height
        y, X, Z = d.matrices(chunk, self._buffers)  # nothing below keeps them past this chunk
        off = d.offset(chunk)
        if off is not None:  # a known part of the mean: the model is fitted to y - offset
            y = y - off
        if self._coder is not None:
            codes = [self._coder.codes(chunk)]
            self._rec[0].ensure(self._coder.G)
        else:
            codes = [t.index.codes(chunk) for t in plan.terms]
        w = self._weights(chunk, label, codes)
        if self.scaling is None:
            # no complete row among the first rows read: the transform comes from this chunk's
            ok = complete(codes, y, X, Z)
            if not ok.any():
                self._count(chunk, label, chunk.height, y, X, Z)
                return
            self.scaling = scaling_from_sample(X[ok], Z[ok], y[ok], d)
        if warm is not None:  # the first chunk was read while the kernels loaded
            warm.wait_statistics()
        t0 = time.perf_counter()
        try:
            skipped = self._reduce(codes, y, X, Z, w)
        except NotNested:
            if self._reduced or not self.relayout or plan.layout != "nested":
                raise
            self._become_crossed()  # what this chunk added so far is dropped with the old layout
            skipped = self._reduce(codes, y, X, Z, w)
        self._reduced = True
        self.t_reduce += time.perf_counter() - t0
        if skipped:
            self._count(chunk, label, skipped, y, X, Z)

    def _weights(self, chunk: pl.DataFrame, label: str, codes: list) -> np.ndarray | None:
        """The chunk's weights, with rows of zero or (under missing='drop') negative weight dropped.

        Dropped rows get code -1 in every term, so the kernels skip them and :meth:`_count`
        counts them under "(zero weight)" / "(negative weight)".
        """
        d = self.plan.design
        w = d.weights(chunk)
        if w is None:
            return None
        neg = w < 0
        if neg.any() and self.plan.missing == "raise":
            where = "" if label == "data" else f" in {label}"
            raise ValueError(f"weights column {d.spec.weights!r} holds {int(neg.sum())} negative value(s){where} "
                             f"(e.g. {float(w[neg][0])}); weights must be >= 0 (0 leaves a row out), or use "
                             "missing='drop' to leave such rows out")
        bad = ~((w > 0) & np.isfinite(w))  # zero, negative, NaN or infinite
        if bad.any():
            for c in codes:
                c[bad] = -1
            w = np.where(bad, 1.0, w)
        return w

    def _reduce(self, codes: list, y, X, Z, w=None) -> int:
        plan, sc, nt = self.plan, self.scaling, self.nthreads
        terms = plan.terms
        ww = np.zeros(0) if w is None else np.ascontiguousarray(w, dtype=np.float64)
        XT = np.ascontiguousarray(X.T, dtype=np.float64)
        y = np.ascontiguousarray(y, dtype=np.float64)
        if plan.layout == "crossed" or len(self._passes) > 1:  # every pass must leave out the same rows
            ok = _kernels.complete_rows(np.ascontiguousarray(np.vstack(codes)), XT, np.ascontiguousarray(Z.T), y, nt)
            if not ok.all():
                codes = [np.where(ok, c, -1) for c in codes]
        Zs = [Z[:, t.offset:t.offset + t.q] for t in terms]
        scales = [sc.term(t.offset, t.q) if len(terms) > 1 else sc for t in terms]
        if self._cols:
            self._check_summed_scales(scales)
        skipped = 0
        g0 = self._glob_term
        order = [g0] + [k for k in self._passes if k != g0]
        for k in order:  # the term taking the global sums first
            rec, s = self._rec[k], scales[k]
            an = rec.ancestors([codes[j] for j in self._anc[k]], [Zs[j] for j in self._anc[k]],
                               [scales[j] for j in self._anc[k]])
            tr = (s.x_shift, 1.0 / s.x_scale, s.z_shift, 1.0 / s.z_scale, float(s.y_shift), 1.0 / float(s.y_scale))
            glob = k == g0
            lvs = self._levels[self._first]
            lv = lvs if (glob and lvs is not None and self._glob.sample is not None) else _NO_INT8
            if self._coder is not None and self._glob.sample is not None:
                lv = self._coder.levels[:self._coder.G]
            XtX, Xty, out, sXtX, sXty, syty, sN = _kernels.accumulate_records(
                np.ascontiguousarray(codes[k], dtype=np.int64), XT, np.ascontiguousarray(Zs[k].T, dtype=np.float64),
                y, ww, tr, rec.R, rec.stride, lv, self._level_of if glob else -1, an, glob, nt, rec.packed)
            if out[:, 4].sum():
                raise NotNested(f"{terms[k].name} in {', '.join(terms[j].name for j in self._anc[k])}")
            if glob:
                self._add_globals(XtX, Xty, out, sXtX, sXty, syty, sN)
                skipped = int(out[:, 2].sum())
        for k, j in self._pairs if plan.layout == "crossed" else ():
            zk, zj = scales[k], scales[j]
            self._lists[(k, j)].append(_kernels.pair_products(
                codes[k], codes[j], terms[j].n_levels, np.ascontiguousarray(Zs[k].T), np.ascontiguousarray(Zs[j].T),
                zk.z_shift, 1.0 / zk.z_scale, zj.z_shift, 1.0 / zj.z_scale, ww))
        if self._XX is not None:
            k = self._first
            okr = _kernels.complete_rows(np.ascontiguousarray(np.vstack(codes)), XT, np.ascontiguousarray(Z.T), y, nt)
            _kernels.accumulate_level_xx(np.where(okr, codes[k], -1), XT, sc.x_shift, 1.0 / sc.x_scale, ww, self._XX)
        return skipped

    def _check_summed_scales(self, scales: list) -> None:
        """A summed term's columns are the finest term's, so the row transform must be theirs too."""
        sf = scales[self.plan.chain[0]]
        for j, m in self._cols.items():
            if not (np.array_equal(scales[j].z_shift, sf.z_shift[m]) and np.array_equal(scales[j].z_scale, sf.z_scale[m])):
                raise RuntimeError(f"internal: the transform of the columns of {self.plan.terms[j].name} differs from "
                                   "that of the same columns of the finest term; please report this")

    def _add_globals(self, XtX, Xty, out, sXtX, sXty, syty, sN) -> None:
        st = self._glob
        st.XtX += XtX.sum(axis=0)
        st.Xty += Xty.sum(axis=0)
        st.yty += float(out[:, 0].sum())
        st.N += int(out[:, 1].sum())
        st.sum_log_w += float(out[:, 3].sum())
        if st.sample is not None:
            st.sample = st.sample.plus(sXtX.sum(axis=0), sXty.sum(axis=0), syty.sum(axis=0), sN.sum(axis=0))

    def _count(self, chunk, label, skipped, y, X, Z) -> None:
        """Attribute the skipped rows to columns (only now, when there are some)."""
        d = self.plan.design
        exprs = {c: _missing_expr(c, chunk.schema) for c in d.columns}
        wc = d.spec.weights
        if wc is not None:  # weights that leave a row out (NaN/inf are counted under the column)
            finite = pl.col(wc).is_not_null() & pl.col(wc).is_finite()
            exprs[ZERO_WEIGHT] = finite & (pl.col(wc) == 0)
            exprs[NEGATIVE_WEIGHT] = finite & (pl.col(wc) < 0)
        counts = chunk.select([e.sum().alias(c) for c, e in exprs.items()]).row(0)
        if self.plan.missing == "raise":
            bad = [c for c, k in zip(exprs, counts) if k and c not in (ZERO_WEIGHT, NEGATIVE_WEIGHT)]
            if not bad and skipped == counts[-2]:  # only zero weights: those rows are left out
                self.dropped[ZERO_WEIGHT] = self.dropped.get(ZERO_WEIGHT, 0) + int(skipped)
                self.n_dropped += skipped
                return
            where = "" if label == "data" else f" in {label}"
            names = [d.response_name] * int(not np.isfinite(y).all()) + \
                [n for n, ok in zip(d.fe_names, np.isfinite(X).all(axis=0)) if not ok] + \
                [n for n, ok in zip(d.re_names, np.isfinite(Z).all(axis=0)) if not ok]
            what = (f"column(s) {', '.join(repr(b) for b in bad)} hold null/NaN/inf values" if bad
                    else f"{skipped} row(s) give non-finite values after the formula's transformations "
                         f"(in {', '.join(repr(t) for t in dict.fromkeys(names))})")
            raise ValueError(f"{what}{where}; use missing='drop' to leave such rows out")
        for c, k in zip(exprs, counts):
            self.dropped[c] = self.dropped.get(c, 0) + int(k)
        flagged = int(chunk.select(pl.any_horizontal(list(exprs.values())).sum()).item())
        self.dropped[NON_FINITE] += skipped - flagged
        self.n_dropped += skipped
