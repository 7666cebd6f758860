"""Group keys -> dense codes: one index per grouping factor, composite keys, sampling levels.

Keys of any dtype are mapped to codes 0..G-1 in sorted key order (like R factor levels) by
:class:`GroupIndex`, built from one cheap pass over the key column only.  A grouping factor
that is the interaction of several columns (lme4's ``(1 | a:b)``) is a :class:`TermIndex`
over the combined codes of its columns, ordered like R's ``a:b`` levels (by ``a``, then ``b``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import polars as pl

from . import _kernels
from .data import Source, _short, failing_part

__all__ = ["GroupIndex", "KeyCoder", "TermIndex", "Unpackable", "group_levels"]

_NO_TABLE = np.zeros(0, dtype=np.int64)  # dense_codes without a table: keys that fill their range


class GroupIndex:
    """Sorted distinct group keys and the map from keys to codes 0..G-1.

    Codes follow the sorted key order (like R factor levels).  Two lookups,
    chosen by measurement (10M distinct string keys, 1M-row chunks; a polars
    join against the key table rebuilt its hash table on every chunk, 2.7 s,
    and a cast to ``pl.Enum`` took 5 s):

    * integer keys spanning a compact range: a dense table, one gather per row;
    * anything else: a bucketed hash table over 64-bit hashes of the keys
      (numpy only: ~100 ms per million rows into 10M keys).  Integer hashes
      are a bijection (exact); for other keys the key found is compared with
      the row's key, so a hash collision can never put a row in the wrong group.

    To find the distinct keys, string keys of at most 8 bytes (ids such as
    ``"s0012345"``) are *packed* into the big-endian uint64 of their bytes:
    exact, and ordered like the strings.  For 100M rows / 10M keys that took
    5.7 s and 1.6 GB instead of 11.5 s and 3.1 GB for polars' unique of the
    strings.  The chunks are then looked up by their packed values too (a
    bijective integer hash): packing a chunk costs less than gathering and
    comparing strings to verify a string hash.
    """

    def __init__(self, keys: pl.Series, *, sorted_unique: bool = False,
                 _dense: tuple[np.ndarray, int] | None = None, _packed: np.ndarray | None = None) -> None:
        keys = keys.drop_nulls()
        if keys.dtype.is_float():  # NaN/inf keys are missing values like null: their rows are dropped
            keys = keys.filter(keys.is_finite())
        if keys.dtype in (pl.Categorical,) or isinstance(keys.dtype, pl.Enum):
            keys = keys.cast(pl.String)
        self.keys = (keys if sorted_unique else keys.unique().sort()).rename("key")
        self.n_groups = self.keys.len()
        self._lookup = None
        self._offset = 0
        self._table = None  # hash table, built on first use
        self._packed = _packed  # short string keys: their packed uint64s, sorted like the keys
        if _dense is not None:  # already built by _dense_index
            self._lookup, self._offset = _dense
        elif self.keys.dtype.is_integer() and self.n_groups:
            lo, hi = int(self.keys[0]), int(self.keys[-1])
            span = hi - lo + 1
            if span <= max(4 * self.n_groups, 1 << 16) and span <= 1 << 31:
                table = np.full(span, -1, dtype=np.int64)
                table[self.keys.to_numpy() - lo] = np.arange(self.n_groups, dtype=np.int64)
                self._lookup, self._offset = table, lo
        # keys filling their range: code = key - offset, no table to gather from
        self._identity = self._lookup is not None and self._lookup.shape[0] == self.n_groups

    def __getstate__(self) -> dict:
        # the hash table is cheap to rebuild and its string hashes are only
        # guaranteed stable within one process: never ship it
        state = dict(self.__dict__)
        state["_table"] = None
        state["_packed"] = None  # the string path is as exact; no need to ship both forms
        return state

    @classmethod
    def _dense_index(cls, keys: pl.Series) -> "GroupIndex | None":
        """Integer keys in memory spanning a compact range: distinct keys and table in two passes, no sort.

        (10M rows, 1M keys: ~15 ms instead of 90 ms for polars' unique + sort and the
        table built after it.)  The column is read chunk by chunk, each a numpy view
        without a copy.  None when the range is not compact.
        """
        if keys.null_count():
            keys = keys.drop_nulls()
        if not keys.len():
            return None
        lo, hi = int(keys.min()), int(keys.max())
        span = hi - lo + 1
        if span > max(4 * keys.len(), 1 << 16) or span > 1 << 31 or hi >= 1 << 63:
            return None
        table = np.full(span, -1, dtype=np.int64)
        start = 0
        for length in keys.chunk_lengths():
            part = keys.slice(start, length).to_numpy()
            _kernels.mark_keys(part.astype(np.int64, copy=False), lo, table)
            start += length
        G = _kernels.number_keys(table)
        if span > max(4 * G, 1 << 16):  # the rule of __init__: not worth a table
            return None
        uniq = pl.Series("key", np.flatnonzero(table >= 0) + lo).cast(keys.dtype)
        return cls(uniq, sorted_unique=True, _dense=(table, lo))

    @classmethod
    def _span_index(cls, source: Source, column: str) -> "GroupIndex | None":
        """Integer keys of parquet files: every integer between the footers' min and max, no pass over the rows.

        The levels are then a superset of the keys present; the caller drops levels without
        rows after its pass (as levels whose rows were all incomplete always are), so the fit
        is the one of the exact index.  Only when the range is small next to the rows, so that
        statistics kept for absent keys stay a fraction of what the rows themselves take.
        """
        found = source.int_range(column)
        if found is None:
            return None
        lo, hi, rows = found
        span = hi - lo + 1
        if span > max(rows // SPAN_ROWS_PER_KEY, 1 << 16) or span > 1 << 31 or hi >= 1 << 63:
            return None
        dtype = source.schema[column]
        keys = pl.Series("key", np.arange(lo, hi + 1, dtype=np.int64)).cast(dtype)
        return cls(keys, sorted_unique=True, _dense=(np.arange(span, dtype=np.int64), lo))

    @classmethod
    def from_source(cls, source: Source, column: str) -> "GroupIndex":
        """One pass over the key column only (streaming for files)."""
        dtype = source.schema.get(column)
        if source.frame is not None and dtype is not None and dtype.is_integer():
            dense = cls._dense_index(source.frame.get_column(column))
            if dense is not None:
                return dense
        if source.frame is not None and source.frame.height <= SMALL_FRAME_ROWS and KeyCoder.handles(dtype) \
                and not dtype.is_integer():
            # a small frame in memory: the packed keys' unique values by numpy cost less than a
            # polars query's start-up (InstEval's key columns, 73,421 rows: about half the time)
            s = source.frame.get_column(column)
            pv, ok = _pack_arrow(s)
            if int(ok.sum()) == s.len() - s.null_count() and ok.any():
                u = np.unique(pv[ok])
                return cls(_unpack(u), sorted_unique=True, _packed=u)
        expr = pl.col(column)
        if dtype in (pl.Categorical,) or isinstance(dtype, pl.Enum):
            expr = expr.cast(pl.String)
        if dtype == pl.String or dtype in (pl.Categorical,) or isinstance(dtype, pl.Enum):
            try:  # short string keys: distinct packed uint64s (see the class docstring)
                # packed once (a second packing for the check took a third of the pass)
                out = source.lazy().select(_pack_expr(expr).alias("u"), expr.is_null().alias("n")).select(
                    pl.col("u").drop_nulls().unique().alias("u"),
                    (pl.col("u").is_null() & ~pl.col("n")).any().alias("bad"),
                ).collect(engine="streaming")
            except pl.exceptions.PolarsError:
                out = None  # the general query below reports the error
            if out is not None and out.height and not out["bad"][0]:
                u = np.sort(out["u"].to_numpy())
                return cls(_unpack(u), sorted_unique=True, _packed=u)
        try:
            uniq = source.lazy().select(expr.drop_nulls().unique().sort()).collect(engine="streaming")
        except pl.exceptions.PolarsError as exc:
            where = failing_part(source, [column])
            raise ValueError(f"cannot read the group column '{column}'{where}: {_short(exc)}") from None
        return cls(uniq.to_series(), sorted_unique=True)

    def codes(self, values: pl.Series) -> np.ndarray:
        """Codes of ``values``; -1 for keys not in the index (or null)."""
        if values.dtype in (pl.Categorical,) or isinstance(values.dtype, pl.Enum):
            values = values.cast(pl.String)
        if self._lookup is not None and values.dtype.is_integer():
            if values.null_count():
                values = values.fill_null(self._offset - 1)
            if values.dtype == pl.UInt64 and values.len() and values.max() >= 1 << 63:
                values = values.cast(pl.Int64, strict=False).fill_null(self._offset - 1)  # beyond any key
            v = values.to_numpy().astype(np.int64, copy=False)
            table = _NO_TABLE if self._identity else self._lookup
            return _kernels.dense_codes(v, self._offset, table, self.n_groups, int(numba.get_num_threads()))
        if self._packed is not None and values.dtype == pl.String:
            return self._packed_codes(values)
        if values.dtype != self.keys.dtype:
            try:
                values = values.cast(self.keys.dtype, strict=False)
            except pl.exceptions.PolarsError:
                values = values.cast(pl.String)
        if self.n_groups == 0:
            return np.full(values.len(), -1, dtype=np.int64)
        if self._table is None:
            self._table = _HashTable.build(self.keys)
        if self._table.exact is None:  # pathological hash collisions: join (slow, always right)
            frame = pl.DataFrame({"key": self.keys, "__code": np.arange(self.n_groups, dtype=np.int64)})
            joined = pl.DataFrame({"key": values.rename("key")}).join(
                frame, on="key", how="left", maintain_order="left")
            return joined["__code"].fill_null(-1).to_numpy().astype(np.int64, copy=False)
        out = self._table.find(_hash_keys(values, self._table.seed))
        if values.null_count():
            out[values.is_null().to_numpy()] = -1
        if not self._table.exact:
            found = np.flatnonzero(out >= 0)
            if found.size:
                same = (self.keys.gather(out[found]) == values.gather(found)).fill_null(False).to_numpy()
                out[found[~same]] = -1
        return out

    def _packed_codes(self, values: pl.Series) -> np.ndarray:
        """Codes of string values through their packed uint64s: exact (packing is injective), so no
        string is hashed or compared; a value that does not pack (null, long, non-ASCII) is no key."""
        if self._table is None:
            self._table = _HashTable.build(pl.Series("key", self._packed))
        pv, ok = _pack_arrow(values)
        with np.errstate(over="ignore"):
            out = self._table.find(pv * _GOLDEN)  # = _hash_keys of the packed uint64s
        out[~ok] = -1
        return out

    def subset(self, keep: np.ndarray) -> "GroupIndex":
        return GroupIndex(self.keys.filter(pl.Series(keep)), sorted_unique=True)

    def to_list(self) -> list:
        return self.keys.to_list()


def group_levels(keys: pl.Series) -> np.ndarray:
    """Sampling level of each key (int8): the trailing zero bits of a 32-bit hash of the key.

    About one key in ``2**l`` has level ``>= l``, and the level depends on the key alone,
    so a Dask partition holding any subset of the keys agrees with the single-machine
    fit about which groups form the warm-start sample (:class:`bigmixed.stats.SampleSums`).
    Integer keys hash bijectively (the same for every integer dtype); other keys by
    polars' hash with a fixed seed (stable within a polars version, which the processes
    of a Dask cluster share), floats as float64.
    """
    if keys.dtype.is_integer() and keys.dtype != pl.UInt64:
        v = keys.cast(pl.Int64).fill_null(0).to_numpy().view(np.uint64)
        return _kernels.hash_levels(np.ascontiguousarray(v), _GOLDEN)  # = _hash_keys, fused
    if keys.dtype.is_float():
        keys = keys.cast(pl.Float64)
    return _kernels.hash_levels(np.ascontiguousarray(_hash_keys(keys, 0)), np.uint64(1))


# Fibonacci hashing: an odd multiplier is a bijection of the 64-bit integers and
# mixes the low bits of consecutive ids into the top bits used as the bucket.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

# Up to this many rows an in-memory frame's string keys are indexed by numpy (a polars query's
# fixed cost is more than the sort below it; above, polars' parallel hash is the faster).
SMALL_FRAME_ROWS = 1 << 17

# The footer-statistics index of integer keys is used when the key range holds at most one
# integer per this many rows (dense ids: one group has ~10 rows in a typical panel).
SPAN_ROWS_PER_KEY = 4


def _pack_expr(e: pl.Expr) -> pl.Expr:
    """An ASCII string of at most 8 bytes (no NUL) as the big-endian uint64 of its NUL-padded bytes; else null.

    Injective on such strings, and ordered like them (bytewise, as polars sorts
    strings).  ``str.pad_end`` counts characters, so a non-ASCII string pads to
    more than 8 bytes and gives null, as does a longer one: callers treat a null
    for a non-null key as "not packable".  (Padding by bytes was 30% slower.)
    """
    packed = e.str.pad_end(8, "\x00").cast(pl.Binary).bin.reinterpret(dtype=pl.UInt64, endianness="big")
    return pl.when(~e.str.contains("\x00", literal=True)).then(packed)


def _pack_arrow(s: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(packed, ok)`` of a String series, as :func:`_pack_expr` (``ok`` false where it gives null).

    Read from the Arrow buffers by a kernel: polars' string views hold short strings inline,
    so the views are packed without a copy; other layouts go through a large-string array.
    """
    import pyarrow as pa  # loaded with polars' and pandas' Arrow interop already

    s = s.cast(pl.String)
    n = s.len()
    valid = s.is_not_null().to_numpy() if s.null_count() else np.ones(n, dtype=bool)
    out, ok = np.empty(n, dtype=np.uint64), np.empty(n, dtype=bool)
    threads = int(numba.get_num_threads())
    try:
        arr = s.to_arrow(compat_level=pl.CompatLevel.newest())
    except Exception:  # an older pyarrow without string views
        arr = None
    if isinstance(arr, getattr(pa, "StringViewArray", ())):  # pyarrow >= 16
        views = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=16 * (arr.offset + n))
        _kernels.pack_string_views(views[16 * arr.offset:], valid, out, ok, threads)
        return out, ok
    arr = s.to_arrow(compat_level=pl.CompatLevel.oldest()).cast(pa.large_string())
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64, count=n + 1, offset=8 * arr.offset)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    _kernels.pack_strings(offsets, data, valid, out, ok, threads)
    return out, ok


def _pack_series(s: pl.Series) -> pl.Series:
    return s.rename("k").to_frame().select(_pack_expr(pl.col("k"))).to_series()


def _unpack(u: np.ndarray) -> pl.Series:
    """Inverse of packing: uint64s back to strings (numpy's S8 drops the NUL padding)."""
    return pl.Series("key", u.astype(">u8").view("S8")).cast(pl.String)


def _hash_keys(values: pl.Series, seed: int) -> np.ndarray:
    """64-bit hashes of ``values`` (uint64); integer keys map bijectively."""
    if values.dtype == pl.UInt64:
        with np.errstate(over="ignore"):
            return values.fill_null(0).to_numpy() * _GOLDEN
    if values.dtype.is_integer():
        v = values.cast(pl.Int64).fill_null(0).to_numpy().view(np.uint64)
        with np.errstate(over="ignore"):
            return v * _GOLDEN
    return values.hash(seed=seed).to_numpy()


@dataclass
class _HashTable:
    """Hashes of the sorted keys, bucketed by their top bits (open hashing, numpy only)."""

    hashes: np.ndarray  # uint64, sorted
    order: np.ndarray  # code of each sorted hash
    start: np.ndarray  # bucket b holds hashes[start[b]:start[b + 1]]
    shift: np.uint64
    seed: int
    exact: bool | None  # True: hashes are a bijection; False: verify; None: collisions, unusable

    @classmethod
    def build(cls, keys: pl.Series) -> "_HashTable":
        G = keys.len()
        bits = max(1, int(np.ceil(np.log2(max(G, 2)))))
        idx = np.int32 if G < 2**31 - 1 else np.int64
        for seed in (0, 1, 2):
            h = _hash_keys(keys, seed)
            order = pl.Series(h).arg_sort().to_numpy().astype(idx, copy=False)
            hs = h[order]
            if keys.dtype.is_integer() or not np.any(hs[1:] == hs[:-1]):
                break
        else:
            return cls(hs, order, np.zeros(1, idx), np.uint64(0), 0, None)
        shift = np.uint64(64 - bits)
        counts = np.bincount((hs >> shift).astype(np.intp), minlength=1 << bits)
        start = np.zeros((1 << bits) + 1, dtype=idx)
        np.cumsum(counts, out=start[1:])
        return cls(hs, order, start, shift, seed, keys.dtype.is_integer())

    def find(self, h: np.ndarray) -> np.ndarray:
        """Codes of the hashes ``h`` (-1 when absent)."""
        h = np.ascontiguousarray(h, dtype=np.uint64)
        return _kernels.hash_find(h, self.hashes, self.order, self.start, np.uint64(self.shift),
                                  int(numba.get_num_threads()))


class TermIndex:
    """The levels of one grouping factor: a column, or the interaction of several (``a:b``).

    For one column it wraps a :class:`GroupIndex`.  For an interaction each column has its
    own index, a row's combined code is the mixed-radix number of its column codes (last
    column fastest), and the levels are the combinations seen in the data, in that order -
    R's order of ``a:b`` levels.  Rows with a missing value in any column get code -1.
    """

    def __init__(self, factors: tuple[str, ...], parts: list[GroupIndex], combined: GroupIndex | None = None):
        self.factors = tuple(factors)
        self.parts = parts
        self.combined = combined
        if len(self.factors) > 1 and combined is None:
            raise ValueError("a TermIndex over several columns needs the index of their combined codes")
        self._strides = self._radix([p.n_groups for p in parts])

    @staticmethod
    def _radix(sizes: list[int]) -> list[int]:
        strides, acc = [], 1
        for n in reversed(sizes):
            strides.append(acc)
            acc *= max(int(n), 1)
        if acc >= 2**62:
            raise ValueError(f"the interaction of {len(sizes)} grouping columns has too many possible levels "
                             f"({acc:.3g}); build one combined key column in the data instead")
        return list(reversed(strides))

    # ---- construction
    @classmethod
    def from_source(cls, source: Source, factors: tuple[str, ...]) -> "TermIndex":
        """One pass over the key column(s) only (streaming for files)."""
        if len(factors) == 1:
            return cls(factors, [GroupIndex.from_source(source, factors[0])])
        cols = list(factors)
        try:
            uniq = source.lazy().select(cols).unique().collect(engine="streaming")
        except pl.exceptions.PolarsError as exc:
            where = failing_part(source, cols)
            raise ValueError(f"cannot read the grouping columns {cols}{where}: {_short(exc)}") from None
        parts = [GroupIndex(uniq.get_column(c)) for c in cols]
        tmp = cls(factors, parts, GroupIndex(pl.Series("key", [], dtype=pl.Int64)))
        comb = tmp._combine(uniq)
        comb = comb[comb >= 0]
        return cls(factors, parts, GroupIndex(pl.Series("key", comb)))

    def _combine(self, chunk: pl.DataFrame) -> np.ndarray:
        out = np.zeros(chunk.height, dtype=np.int64)
        bad = np.zeros(chunk.height, dtype=bool)
        for col, part, stride in zip(self.factors, self.parts, self._strides):
            c = part.codes(chunk.get_column(col))
            bad |= c < 0
            out += c * stride
        out[bad] = -1
        return out

    # ---- lookups
    @property
    def n_groups(self) -> int:
        return int(self.parts[0].n_groups if self.combined is None else self.combined.n_groups)

    def codes(self, chunk: pl.DataFrame) -> np.ndarray:
        """Codes of the rows of ``chunk`` (which holds the factor columns); -1 for unknown or missing keys."""
        if self.combined is None:
            return self.parts[0].codes(chunk.get_column(self.factors[0]))
        comb = self._combine(chunk)
        out = self.combined.codes(pl.Series(comb))
        out[comb < 0] = -1
        return out

    def frame(self) -> pl.DataFrame:
        """One row per level, in code order: the key column(s)."""
        if self.combined is None:
            return pl.DataFrame({self.factors[0]: self.parts[0].keys})
        comb = self.combined.keys.to_numpy().astype(np.int64)
        data = {}
        for col, part, stride in zip(self.factors, self.parts, self._strides):
            data[col] = part.keys.gather((comb // stride) % max(part.n_groups, 1))
        return pl.DataFrame(data)

    @property
    def keys(self) -> pl.Series:
        """The levels as one Series: the key for one column, ``"a:b"`` labels for an interaction."""
        if self.combined is None:
            return self.parts[0].keys
        f = self.frame()
        return f.select(pl.concat_str([pl.col(c).cast(pl.String) for c in self.factors], separator=":")
                        .alias("key")).to_series()

    def to_list(self) -> list:
        return self.keys.to_list()

    def subset(self, keep: np.ndarray) -> "TermIndex":
        if self.combined is None:
            return TermIndex(self.factors, [self.parts[0].subset(keep)])
        return TermIndex(self.factors, self.parts, self.combined.subset(keep))

    def sampling_levels(self) -> np.ndarray:
        """Each level's sampling level (int8), from its key value(s) only (see :func:`group_levels`)."""
        if self.combined is None:
            return group_levels(self.parts[0].keys)
        return frame_levels(self.frame())


class Unpackable(Exception):
    """A string key that :class:`KeyCoder` cannot pack (over 8 bytes, non-ASCII, a NUL byte)."""


class KeyCoder:
    """One grouping column's keys -> codes in the order they are first seen, during the pass over the rows.

    So that each parquet file is read once: no pass over the key column before the rows.
    Integer keys are coded by value, string keys by their packed uint64 (exact, see
    :class:`GroupIndex`); a string key that does not pack raises :class:`Unpackable` and the
    caller indexes the keys first instead.  The table is an open-addressing hash of 64-bit
    values (numba, sequential, so the codes depend on the row order alone).  :meth:`finish`
    gives the :class:`GroupIndex` in sorted key order (R's level order), the rank of each
    first-seen code in it and the sampling levels (:func:`group_levels`) in that order.
    """

    MAX_LOAD = 0.6  # table slots in use before it doubles (linear probing stays short)

    def __init__(self, column: str, dtype: pl.DataType, capacity: int = 1 << 16) -> None:
        if not self.handles(dtype):
            raise TypeError(f"KeyCoder codes integer or string keys, not {dtype}")
        self.column, self.dtype = column, dtype
        self.strings = not dtype.is_integer()
        self.G = 0
        # np.empty takes no memory until written: a capacity up to the rows read costs nothing
        self.keys = np.empty(capacity, np.uint64)  # first-seen order
        self.levels = np.empty(capacity, np.int8)
        self._first_row = np.empty(capacity, np.int64)
        self._rehash(1 << 16)

    @staticmethod
    def handles(dtype: pl.DataType | None) -> bool:
        return dtype is not None and (dtype.is_integer() or dtype == pl.String or dtype == pl.Categorical
                                      or isinstance(dtype, pl.Enum))

    def _rehash(self, slots: int) -> None:
        self.slot_key = np.empty(slots, np.uint64)
        self.slot_code = np.full(slots, -1, np.int32)  # codes < 2**31: far beyond any memory here
        _kernels.rehash_first_seen(self.keys, self.G, self.slot_key, self.slot_code)

    def _values(self, s: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """(64-bit values, valid rows) of one chunk's keys."""
        if self.strings:
            v, ok = _pack_arrow(s)
            if int(ok.sum()) != s.len() - s.null_count():
                bad = s.cast(pl.String).filter(pl.Series(~ok) & s.is_not_null())[0]
                raise Unpackable(f"key {bad!r} of '{self.column}' does not pack into 8 bytes")
            return v, ok
        if s.dtype == pl.UInt64:
            v = s.fill_null(0).to_numpy()
        else:
            v = s.cast(pl.Int64).fill_null(0).to_numpy().view(np.uint64)
        valid = s.is_not_null().to_numpy() if s.null_count() else np.ones(s.len(), dtype=bool)
        return np.ascontiguousarray(v, dtype=np.uint64), valid

    def _levels_of(self, s: pl.Series, v: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Sampling levels of the keys first seen at ``rows``, as :func:`group_levels` gives them."""
        if self.strings:
            return _kernels.hash_levels(np.ascontiguousarray(_hash_keys(s.cast(pl.String).gather(rows), 0)),
                                        np.uint64(1))
        return _kernels.hash_levels(np.ascontiguousarray(v[rows]), _GOLDEN)

    def codes(self, chunk: pl.DataFrame) -> np.ndarray:
        """Codes of the chunk's rows (-1 for a null key); new keys get the next codes."""
        s = chunk.get_column(self.column)
        v, valid = self._values(s)
        out = np.empty(v.shape[0], dtype=np.int64)
        start, G0 = 0, self.G
        while True:
            limit = min(self.keys.shape[0], int(self.MAX_LOAD * self.slot_key.shape[0]))
            start, self.G = _kernels.code_first_seen(v, valid, start, self.slot_key, self.slot_code,
                                                      self.keys, self._first_row, self.G, limit, out)
            if start >= v.shape[0]:
                break
            if self.G >= self.keys.shape[0]:
                cap = 2 * self.keys.shape[0]
                self.keys = _grown(self.keys, self.G, cap)
                self.levels = _grown(self.levels, self.G, cap)
                self._first_row = _grown(self._first_row, self.G, cap)
            if self.G >= int(self.MAX_LOAD * self.slot_key.shape[0]):
                self._rehash(2 * self.slot_key.shape[0])
        if self.G > G0:
            self.levels[G0:self.G] = self._levels_of(s, v, self._first_row[G0:self.G])
        return out

    def finish(self) -> tuple[GroupIndex, np.ndarray, np.ndarray]:
        """``(index, rank, levels)``: the keys sorted, code ``g``'s level ``rank[g]``, sampling levels by level."""
        G = self.G
        vals = self.keys[:G]
        if not self.strings and self.dtype != pl.UInt64:
            vals = vals.view(np.int64)
        order = pl.Series(vals).arg_sort().to_numpy()
        rank = np.empty(G, dtype=np.int64)
        rank[order] = np.arange(G, dtype=np.int64)
        ordered = vals[order]
        if self.strings:
            index = GroupIndex(_unpack(ordered.view(np.uint64)), sorted_unique=True, _packed=ordered.view(np.uint64))
        else:
            index = GroupIndex(pl.Series("key", ordered).cast(self.dtype), sorted_unique=True)
        return index, rank, self.levels[:G][order]


def _grown(a: np.ndarray, used: int, cap: int) -> np.ndarray:
    out = np.empty(cap, dtype=a.dtype)
    out[:used] = a[:used]
    return out


def frame_levels(frame: pl.DataFrame) -> np.ndarray:
    """Sampling levels of composite keys: the columns' 64-bit hashes combined, then as :func:`group_levels`."""
    h = np.zeros(frame.height, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in frame.columns:
            s = frame.get_column(col)
            if s.dtype.is_float():
                s = s.cast(pl.Float64)
            h = (h ^ _hash_keys(s, 0)) * _GOLDEN
    return _kernels.hash_levels(np.ascontiguousarray(h), np.uint64(1))
