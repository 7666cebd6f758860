"""Readers: any supported input becomes a stream of polars chunks.

Supported inputs: pandas DataFrame, polars DataFrame, polars LazyFrame, a
parquet path, a glob, or a list of those.  Files are validated (exist,
readable, same schema for the columns the model uses) before any row is
reduced, so a bad file fails the run before any output is written.

Group keys of any dtype are mapped to dense codes 0..G-1 in sorted key order
(like R factor levels) by :class:`GroupIndex`, built from one cheap pass over
the key column only.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from . import _kernels

__all__ = ["Source", "open_source", "GroupIndex", "GROUP_COLUMN"]

# Name used when groups are passed as an array rather than a column name.
GROUP_COLUMN = "__group__"

_NUMERIC_FLOAT = (pl.Float32, pl.Float64)


def _is_path_like(obj) -> bool:
    return isinstance(obj, (str, os.PathLike))


def expand_paths(data) -> list[Path]:
    """Paths and globs to a sorted list of existing parquet files (or a clear error)."""
    items = [data] if _is_path_like(data) else list(data)
    files: list[Path] = []
    for item in items:
        s = os.fspath(item)
        if any(ch in s for ch in "*?["):
            hits = sorted(_glob.glob(s, recursive=True))
            if not hits:
                raise ValueError(f"no file matches the pattern '{s}'; check the path and the glob")
            files.extend(Path(h) for h in hits)
        elif os.path.isdir(s):
            hits = sorted(Path(s).rglob("*.parquet"))
            if not hits:
                raise ValueError(f"directory '{s}' holds no .parquet file")
            files.extend(hits)
        elif os.path.exists(s):
            files.append(Path(s))
        else:
            raise ValueError(f"data file '{s}' does not exist")
    return files


@dataclass
class Source:
    """Normalised input: one or more parts, each a LazyFrame with a label for messages."""

    parts: list[tuple[str, pl.LazyFrame]]
    schema: dict[str, pl.DataType]
    in_memory: bool
    files: list[Path] = field(default_factory=list)
    frame: pl.DataFrame | None = None  # the whole data when it is in memory
    # Columns that only some files have: column -> (a file without it, a file with it).  Fine
    # unless the model uses them (check_columns says which file lacks what).
    partial: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return list(self.schema)

    def lazy(self) -> pl.LazyFrame:
        """All parts as one LazyFrame (for cheap whole-data passes such as unique keys)."""
        if self.frame is not None:
            return self.frame.lazy()
        if len(self.parts) == 1:
            return self.parts[0][1]
        # diagonal: files may differ in columns the model does not use (missing ones read as null)
        return pl.concat([lf for _, lf in self.parts], how="diagonal_relaxed")

    def check_columns(self, needed: Sequence[str]) -> None:
        missing = [c for c in needed if c not in self.schema]
        if missing:
            import difflib

            hints = []
            for m in missing:
                close = difflib.get_close_matches(m, self.columns, n=3)
                hints.append(f"'{m}'" + (f" (close: {', '.join(repr(c) for c in close)})" if close else ""))
            raise ValueError(f"column(s) {', '.join(hints)} not found in the data")
        lacking = [c for c in dict.fromkeys(needed) if c in self.partial]
        if lacking:
            file, other = self.partial[lacking[0]]
            cols = [c for c in lacking if self.partial[c][0] == file]
            raise ValueError(f"file '{file}' lacks column(s) {cols} that '{other}' has and the model uses; "
                             "every file needs the columns the model uses")

    def batches(self, columns: Sequence[str], chunk_rows: int,
                ordered: bool = True) -> Iterator[tuple[str, pl.DataFrame]]:
        """Yield ``(label, chunk)`` with only ``columns``, at most ``chunk_rows`` rows each.

        Parts come in order, and so do the rows within a part unless ``ordered``
        is False: predictions line up with the input, and the statistics of the
        same input are the same bits in every run (polars' unordered batches
        were no faster when measured).
        """
        cols = list(dict.fromkeys(columns))
        if self.frame is not None:
            df = self.frame.select(cols)
            for start, length in _slices(df, chunk_rows):
                yield "data", df.slice(start, length)
            return
        for label, lf in self.parts:
            try:
                for chunk in lf.select(cols).collect_batches(chunk_size=chunk_rows, maintain_order=ordered):
                    if chunk.height:
                        yield label, chunk
            except (pl.exceptions.PolarsError, OSError) as exc:
                raise ValueError(f"cannot read {label}: {_short(exc)}") from None


def _slices(df: pl.DataFrame, chunk_rows: int) -> Iterator[tuple[int, int]]:
    """``(start, length)`` of at most ``chunk_rows`` rows that do not cross the frame's own chunks.

    A frame read from parquet is a list of chunks (one per row group); a slice inside one
    chunk converts to numpy without a copy, one across two is copied (measured: 40 ms of
    copies for 10M rows).  Only when all columns share the chunk boundaries and the chunks
    are not tiny (a frame stacked from many small pieces is sliced evenly instead).
    """
    bounds = [0, df.height]
    if df.width and df.n_chunks() > 1:
        lens = [tuple(df.get_column(c).chunk_lengths()) for c in df.columns]
        if all(ln == lens[0] for ln in lens) and df.height >= len(lens[0]) * chunk_rows // 4:
            bounds = np.cumsum((0, *lens[0])).tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for start in range(lo, hi, chunk_rows):
            yield start, min(chunk_rows, hi - start)


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


def failing_part(source: Source, columns: Sequence[str]) -> str:
    """After a whole-source query failed: `` in file '...'`` for the first part that cannot be read.

    Only called on the error path, so reading the parts one by one costs nothing normally.
    """
    if len(source.parts) < 2 and source.frame is None and source.parts:
        return f" in {source.parts[0][0]}"
    for label, lf in ([] if source.frame is not None else source.parts):
        try:
            lf.select(list(columns)).collect(engine="streaming")
        except (pl.exceptions.PolarsError, OSError):
            return f" in {label}"
    return ""


def open_source(data, groups=None) -> Source:
    """Normalise the user's ``data`` (and array-valued ``groups``) into a :class:`Source`.

    Parameters
    ----------
    data
        pandas/polars DataFrame, polars LazyFrame, parquet path, glob, directory, or a list of paths.
    groups
        Optional array-like of group labels, one per row (statsmodels' ``groups=data["g"]``);
        only for in-memory data.  It becomes the column ``__group__``.
    """
    if isinstance(data, pd.DataFrame):
        try:
            frame = pl.from_pandas(data.reset_index(drop=True), include_index=False)
        except Exception as exc:  # pyarrow conversion errors are long; keep one line
            raise ValueError(f"cannot convert the pandas DataFrame: {_short(exc)}") from None
        return _in_memory(frame, groups)
    if isinstance(data, pl.DataFrame):
        return _in_memory(data, groups)
    if isinstance(data, pl.LazyFrame):
        if groups is not None and not isinstance(groups, str):
            raise ValueError("with a LazyFrame or files, pass groups as a column name, not an array")
        try:
            schema = dict(data.collect_schema())
        except pl.exceptions.PolarsError as exc:
            raise ValueError(f"cannot read the LazyFrame: {_short(exc)}") from None
        return Source([("LazyFrame", data)], schema, in_memory=False)
    if _is_path_like(data) or (isinstance(data, (list, tuple)) and data and all(_is_path_like(d) for d in data)):
        if groups is not None and not isinstance(groups, str):
            raise ValueError("with parquet files, pass groups as a column name, not an array")
        files = expand_paths(data)
        return _from_files(files)
    if hasattr(data, "__dataframe__") or hasattr(data, "to_pandas"):
        return open_source(pl.from_dataframe(data) if hasattr(data, "__dataframe__") else data.to_pandas(), groups)
    raise ValueError(
        f"data of type {type(data).__name__} is not supported; pass a pandas or polars DataFrame, "
        "a polars LazyFrame, or parquet path(s)/glob(s)"
    )


def _in_memory(frame: pl.DataFrame, groups) -> Source:
    if groups is not None and not isinstance(groups, str):
        values = groups.to_numpy() if isinstance(groups, (pd.Series, pl.Series)) else np.asarray(groups)
        if len(values) != frame.height:
            raise ValueError(f"groups has {len(values)} values but the data has {frame.height} rows")
        frame = frame.with_columns(pl.Series(GROUP_COLUMN, values))
    return Source([("data", frame.lazy())], dict(frame.schema), in_memory=True, frame=frame)


def _from_files(files: list[Path]) -> Source:
    """Validate every file's footer and schema up front, then scan them lazily.

    Files may differ in columns the model does not use (a column added to newer files);
    a column shared by several files must have one type (numeric widths may differ).
    """
    schema: dict[str, pl.DataType] = {}
    where: dict[str, Path] = {}  # the first file with each column
    present: dict[str, int] = {}  # in how many files
    absent: dict[str, Path] = {}  # a file without the column (the first one seen)
    parts = []
    for k, f in enumerate(files):
        try:
            s = dict(pl.read_parquet_schema(f))
        except Exception as exc:
            raise ValueError(f"file '{f}' is not a readable parquet file ({_short(exc)})") from None
        for c, dt in s.items():
            if c in schema:
                ref = schema[c]
                if dt != ref and not (dt.is_numeric() and ref.is_numeric()):
                    raise ValueError(f"column '{c}' is {dt} in file '{f}' but {ref} in '{where[c]}'; "
                                     "all files need one type per column")
            else:
                schema[c], where[c] = dt, f
                if k:
                    absent.setdefault(c, files[0])
            present[c] = present.get(c, 0) + 1
        for c in schema:
            if c not in s:
                absent.setdefault(c, f)
        parts.append((f"file '{f}'", pl.scan_parquet(f)))
    partial = {c: (str(absent[c]), str(where[c])) for c in schema if present[c] < len(files)}
    return Source(parts, schema, in_memory=False, files=files, partial=partial)


# ---------------------------------------------------------------------------
# group keys -> dense codes
# ---------------------------------------------------------------------------


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
