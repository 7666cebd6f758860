"""Group keys -> dense codes: one index per grouping factor, composite keys, sampling levels.

Keys of any dtype are mapped to codes 0..G-1 in sorted key order (like R factor levels) by
:class:`GroupIndex`, built from one cheap pass over the key column only.  A grouping factor
that is the interaction of several columns (lme4's ``(1 | a:b)``) is a :class:`TermIndex`
over the combined codes of its columns, ordered like R's ``a:b`` levels (by ``a``, then ``b``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from . import _kernels
from .data import Source, _short, failing_part

__all__ = ["GroupIndex", "TermIndex", "group_levels"]



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
    strings.  (Per-chunk lookups stay on string hashes: packing a chunk cost
    more than hashing and verifying it.)
    """

    def __init__(self, keys: pl.Series, *, sorted_unique: bool = False,
                 _dense: tuple[np.ndarray, int] | None = None) -> None:
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
        if _dense is not None:  # already built by _dense_index
            self._lookup, self._offset = _dense
        elif self.keys.dtype.is_integer() and self.n_groups:
            lo, hi = int(self.keys[0]), int(self.keys[-1])
            span = hi - lo + 1
            if span <= max(4 * self.n_groups, 1 << 16) and span <= 1 << 31:
                table = np.full(span, -1, dtype=np.int64)
                table[self.keys.to_numpy() - lo] = np.arange(self.n_groups, dtype=np.int64)
                self._lookup, self._offset = table, lo

    def __getstate__(self) -> dict:
        # the hash table is cheap to rebuild and its string hashes are only
        # guaranteed stable within one process: never ship it
        state = dict(self.__dict__)
        state["_table"] = None
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
    def from_source(cls, source: Source, column: str) -> "GroupIndex":
        """One pass over the key column only (streaming for files)."""
        dtype = source.schema.get(column)
        if source.frame is not None and dtype is not None and dtype.is_integer():
            dense = cls._dense_index(source.frame.get_column(column))
            if dense is not None:
                return dense
        expr = pl.col(column)
        if dtype in (pl.Categorical,) or isinstance(dtype, pl.Enum):
            expr = expr.cast(pl.String)
        if dtype == pl.String or dtype in (pl.Categorical,) or isinstance(dtype, pl.Enum):
            try:  # short string keys: distinct packed uint64s (see the class docstring)
                out = source.lazy().select(
                    _pack_expr(expr).drop_nulls().unique().alias("u"),
                    (expr.is_not_null() & _pack_expr(expr).is_null()).any().alias("bad"),
                ).collect(engine="streaming")
            except pl.exceptions.PolarsError:
                out = None  # the general query below reports the error
            if out is not None and out.height and not out["bad"][0]:
                u = np.sort(out["u"].to_numpy())
                return cls(_unpack(u), sorted_unique=True)
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
            return _kernels.dense_codes(v, self._offset, self._lookup)
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


def _pack_expr(e: pl.Expr) -> pl.Expr:
    """An ASCII string of at most 8 bytes (no NUL) as the big-endian uint64 of its NUL-padded bytes; else null.

    Injective on such strings, and ordered like them (bytewise, as polars sorts
    strings).  ``str.pad_end`` counts characters, so a non-ASCII string pads to
    more than 8 bytes and gives null, as does a longer one: callers treat a null
    for a non-null key as "not packable".  (Padding by bytes was 30% slower.)
    """
    packed = e.str.pad_end(8, "\x00").cast(pl.Binary).bin.reinterpret(dtype=pl.UInt64, endianness="big")
    return pl.when(~e.str.contains("\x00", literal=True)).then(packed)


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
        out = np.full(h.shape[0], -1, dtype=np.int64)
        b = (h >> self.shift).astype(np.intp)
        pos = self.start[b].astype(np.intp)
        end = self.start[b + 1].astype(np.intp)
        rows = np.flatnonzero(pos < end)
        pos, end, h = pos[rows], end[rows], h[rows]
        # buckets hold ~1 hash on average: a few vectorised rounds finish them
        while rows.size:
            cand = self.hashes[pos]
            hit = cand == h
            out[rows[hit]] = self.order[pos[hit]]
            more = (~hit) & (cand < h) & (pos + 1 < end)  # hashes are sorted inside a bucket
            rows, pos, end, h = rows[more], pos[more] + 1, end[more], h[more]
        return out


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
