"""Readers: any supported input becomes a stream of polars chunks.

Supported inputs: pandas DataFrame, polars DataFrame, polars LazyFrame, a
parquet path, a glob, or a list of those.  Files are validated (exist,
readable, same schema for the columns the model uses) before any row is
reduced, so a bad file fails the run before any output is written.

Group keys become codes in :mod:`bigmixed.keys`.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from .columns import is_pandas

__all__ = ["Source", "open_source", "GROUP_COLUMN"]

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
    seen: dict[Path, Path] = {}
    for f in files:  # a glob and a path naming one file would read its rows twice
        first = seen.setdefault(f.resolve(), f)
        if first is not f:
            raise ValueError(f"file '{f}' is given twice (also as '{first}'); give each file once")
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
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # facts read from the footers

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

    def _footers(self) -> list | None:
        """Each file's parquet metadata, read once (None in memory or for an unreadable footer)."""
        if not self.files:
            return None
        if "footers" not in self._cache:
            import pyarrow.parquet as pq  # pyarrow is loaded already (polars' and pandas' interop)

            try:
                self._cache["footers"] = [pq.ParquetFile(f).metadata for f in self.files]
            except (OSError, ValueError):
                self._cache["footers"] = None
        return self._cache["footers"]

    def n_rows(self) -> int | None:
        """Rows in all files, from their footers (None in memory or for an unreadable footer)."""
        mds = self._footers()
        return None if mds is None else sum(md.num_rows for md in mds)

    def int_range(self, column: str) -> tuple[int, int, int] | None:
        """``(min, max, rows)`` of an integer column of the parquet files, from their footers alone.

        None when the data is in memory, or any row group lacks the column's min/max statistics
        (writers may omit them; a row group of nulls only has none).
        """
        mds = self._footers()
        if mds is None:
            return None
        lo = hi = None
        for md in mds:
            if column not in md.schema.names:  # a file without the column: read the rows instead
                return None
            j = md.schema.names.index(column)
            for r in range(md.num_row_groups):
                col = md.row_group(r).column(j)
                st = col.statistics
                if col.path_in_schema != column or st is None or not st.has_min_max:
                    return None
                if not (isinstance(st.min, int) and isinstance(st.max, int)):
                    return None
                lo = st.min if lo is None else min(lo, st.min)
                hi = st.max if hi is None else max(hi, st.max)
        return None if lo is None else (int(lo), int(hi), sum(md.num_rows for md in mds))

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
                bad = _failing_columns(lf, cols)
                what = f"column(s) {bad} of {label}" if bad and len(bad) < len(cols) else label
                raise ValueError(f"cannot read {what}: {_short(exc)}") from None


def _failing_columns(lf: pl.LazyFrame, columns: list[str]) -> list[str]:
    """The columns of one part that cannot be read (error path only: one read per column)."""
    bad = []
    for c in columns:
        try:
            lf.select(c).collect()
        except (pl.exceptions.PolarsError, OSError):
            bad.append(c)
    return bad


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
    if is_pandas(data):
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
        series = isinstance(groups, pl.Series) or is_pandas(groups, "Series")
        values = groups.to_numpy() if series else np.asarray(groups)
        if len(values) != frame.height:
            raise ValueError(f"groups has {len(values)} values but the data has {frame.height} rows")
        frame = frame.with_columns(pl.Series(GROUP_COLUMN, values))
    return Source([("data", frame.lazy())], dict(frame.schema), in_memory=True, frame=frame)


def _wider(a: pl.DataType, b: pl.DataType) -> pl.DataType:
    """A numeric type holding the values of both: Float64 if either is a float, else a 64-bit integer."""
    if a.is_float() or b.is_float():
        return pl.Float64
    return pl.UInt64 if pl.UInt64 in (a, b) else pl.Int64


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
                if dt != ref:  # numeric widths differ: one type that holds both (an Int8 key, then Int64)
                    schema[c] = _wider(ref, dt)
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
