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

    @property
    def columns(self) -> list[str]:
        return list(self.schema)

    def lazy(self) -> pl.LazyFrame:
        """All parts as one LazyFrame (for cheap whole-data passes such as unique keys)."""
        if self.frame is not None:
            return self.frame.lazy()
        if len(self.parts) == 1:
            return self.parts[0][1]
        return pl.concat([lf for _, lf in self.parts], how="vertical_relaxed")

    def check_columns(self, needed: Sequence[str]) -> None:
        missing = [c for c in needed if c not in self.schema]
        if missing:
            import difflib

            hints = []
            for m in missing:
                close = difflib.get_close_matches(m, self.columns, n=3)
                hints.append(f"'{m}'" + (f" (close: {', '.join(repr(c) for c in close)})" if close else ""))
            raise ValueError(f"column(s) {', '.join(hints)} not found in the data")

    def batches(self, columns: Sequence[str], chunk_rows: int) -> Iterator[tuple[str, pl.DataFrame]]:
        """Yield ``(label, chunk)`` with only ``columns``, at most ``chunk_rows`` rows each."""
        cols = list(dict.fromkeys(columns))
        if self.frame is not None:
            df = self.frame.select(cols)
            for start in range(0, max(df.height, 1), chunk_rows):
                part = df.slice(start, chunk_rows)
                if part.height:
                    yield "data", part
            return
        for label, lf in self.parts:
            try:
                for chunk in lf.select(cols).collect_batches(chunk_size=chunk_rows, maintain_order=False):
                    if chunk.height:
                        yield label, chunk
            except (pl.exceptions.PolarsError, OSError) as exc:
                raise ValueError(f"cannot read {label}: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


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
    """Validate every file's footer and schema up front, then scan them lazily."""
    schema: dict[str, pl.DataType] | None = None
    first = None
    parts = []
    for f in files:
        try:
            s = dict(pl.read_parquet_schema(f))
        except Exception as exc:
            raise ValueError(f"file '{f}' is not a readable parquet file ({_short(exc)})") from None
        if schema is None:
            schema, first = s, f
        else:
            _check_schema(schema, s, first, f)
        parts.append((f"file '{f}'", pl.scan_parquet(f)))
    assert schema is not None
    return Source(parts, schema, in_memory=False, files=files)


def _check_schema(ref: dict, other: dict, ref_file: Path, file: Path) -> None:
    missing = [c for c in ref if c not in other]
    if missing:
        raise ValueError(f"file '{file}' lacks column(s) {missing} that '{ref_file}' has; all files need one schema")
    for c, dt in ref.items():
        odt = other[c]
        if dt != odt and not (dt.is_numeric() and odt.is_numeric()):
            raise ValueError(
                f"column '{c}' is {odt} in file '{file}' but {dt} in '{ref_file}'; all files need one schema"
            )


# ---------------------------------------------------------------------------
# group keys -> dense codes
# ---------------------------------------------------------------------------


class GroupIndex:
    """Sorted distinct group keys and the map from keys to codes 0..G-1.

    Integer keys spanning a compact range are coded by a lookup table (one
    gather per row); other keys by a hash join in polars.
    """

    def __init__(self, keys: pl.Series) -> None:
        keys = keys.drop_nulls()
        if keys.dtype in (pl.Categorical,) or isinstance(keys.dtype, pl.Enum):
            keys = keys.cast(pl.String)
        self.keys = keys.unique().sort().rename("key")
        self.n_groups = self.keys.len()
        self._lookup = None
        self._offset = 0
        if self.keys.dtype.is_integer() and self.n_groups:
            lo, hi = int(self.keys[0]), int(self.keys[-1])
            span = hi - lo + 1
            if span <= max(4 * self.n_groups, 1 << 16) and span <= 1 << 31:
                table = np.full(span, -1, dtype=np.int64)
                table[self.keys.to_numpy() - lo] = np.arange(self.n_groups, dtype=np.int64)
                self._lookup, self._offset = table, lo
        self._frame = pl.DataFrame({"key": self.keys, "__code": np.arange(self.n_groups, dtype=np.int64)})

    @classmethod
    def from_source(cls, source: Source, column: str) -> "GroupIndex":
        """One pass over the key column only (streaming for files)."""
        try:
            uniq = source.lazy().select(pl.col(column).unique()).collect(engine="streaming")
        except pl.exceptions.PolarsError as exc:
            raise ValueError(f"cannot read the group column '{column}': {_short(exc)}") from None
        return cls(uniq.to_series())

    def codes(self, values: pl.Series) -> np.ndarray:
        """Codes of ``values``; -1 for keys not in the index (or null)."""
        if values.dtype in (pl.Categorical,) or isinstance(values.dtype, pl.Enum):
            values = values.cast(pl.String)
        if self._lookup is not None and values.dtype.is_integer():
            v = values.fill_null(self._offset - 1).to_numpy().astype(np.int64, copy=False) - self._offset
            out = np.full(v.shape[0], -1, dtype=np.int64)
            ok = (v >= 0) & (v < self._lookup.shape[0])
            out[ok] = self._lookup[v[ok]]
            return out
        try:
            s = values.cast(self.keys.dtype, strict=False).rename("key")
        except pl.exceptions.PolarsError:
            s = values.cast(pl.String).rename("key")
        joined = pl.DataFrame({"key": s}).join(self._frame, on="key", how="left", maintain_order="left")
        return joined["__code"].fill_null(-1).to_numpy().astype(np.int64, copy=False)

    def subset(self, keep: np.ndarray) -> "GroupIndex":
        return GroupIndex(self.keys.filter(pl.Series(keep)))

    def to_list(self) -> list:
        return self.keys.to_list()
