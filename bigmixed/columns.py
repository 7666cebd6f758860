"""One data column of a chunk as the design's fast path reads it: float64 values or level codes.

:class:`bigmixed.design.Design` builds the columns of a plain part (the intercept, numeric columns,
level dummies and their products) from these two readers, without a formula engine per chunk.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import polars as pl

__all__ = ["numeric_column", "level_codes", "is_pandas"]


def is_pandas(obj: Any, kind: str = "DataFrame") -> bool:
    """Whether ``obj`` is a pandas ``kind`` (``"DataFrame"`` or ``"Series"``), without importing pandas.

    An object can be one only once pandas is loaded; a job on polars frames or parquet files
    then never pays pandas' import (a large part of a small command-line job's start-up).  While
    another thread imports pandas (the command line's prefetch) the module is in ``sys.modules``
    before its classes are: no object is an instance of a class not defined yet.
    """
    cls = getattr(sys.modules.get("pandas"), kind, None)
    return cls is not None and isinstance(obj, cls)


def _copy_column(s: pl.Series, dest: np.ndarray) -> None:
    """Copy a polars column into ``dest`` piece by piece: a column read from parquet is a list
    of chunks, each of which converts to numpy without a copy (the whole column would be
    concatenated first)."""
    if s.n_chunks() == 1:
        dest[:] = s.to_numpy()
        return
    start = 0
    for n in s.chunk_lengths():
        dest[start:start + n] = s.slice(start, n).to_numpy()
        start += n


def numeric_column(chunk: Any, c: str, is_pl: bool, dest: np.ndarray) -> np.ndarray:
    """Numeric column ``c`` of a chunk (polars or pandas) copied into ``dest`` (NaN where missing)."""
    try:
        if is_pl:
            _copy_column(chunk.get_column(c), dest)
        else:
            dest[:] = chunk[c].to_numpy(dtype=np.float64, na_value=np.nan)
    except (ValueError, TypeError):  # e.g. strings in new data for predict()
        dtype = chunk.schema[c] if is_pl else chunk[c].dtype
        raise ValueError(f"column {c!r} is used as a number by the model but holds {dtype} values; "
                         "convert it to a numeric type") from None
    return dest


def level_codes(chunk: Any, col: str, levels: list, is_pl: bool) -> np.ndarray:
    """Each row's level of categorical ``col``: its index in ``levels``, -1 where missing.

    A value outside ``levels`` is an error naming the column (the levels were fixed when the
    design was built, over all rows when streaming).
    """
    if is_pl:
        s = chunk.get_column(col)
        if isinstance(s.dtype, (pl.Categorical, pl.Enum)):
            s = s.cast(pl.String)
        nulls = s.is_null().to_numpy()
        try:
            if s.dtype == pl.String and all(isinstance(v, str) for v in levels):  # Enum codes: the fastest
                coded = s.cast(pl.Enum(levels), strict=False).to_physical().fill_null(-1)
            else:
                coded = s.replace_strict(levels, list(range(len(levels))), default=-1, return_dtype=pl.Int64)
            codes = coded.cast(pl.Int64).to_numpy(writable=True)
        except pl.exceptions.PolarsError:  # values of another type than the levels
            codes = np.full(len(s), -1)
        bad = np.flatnonzero((codes < 0) & ~nulls)
        value = s[int(bad[0])] if bad.size else None
    else:
        import pandas as pd

        s = chunk[col]
        codes = pd.Index(levels).get_indexer(s)
        nulls = s.isna().to_numpy()
        bad = np.flatnonzero((codes < 0) & ~nulls)
        value = s.iloc[bad[0]] if bad.size else None
    if bad.size:
        raise ValueError(f"column {col!r} has level {value!r} that is not among the levels known "
                         f"when the design was built ({levels[:10]}{' ...' if len(levels) > 10 else ''}); "
                         "pass all levels via levels=")
    codes[nulls] = -1
    return codes
