"""Writing outputs atomically, and streaming predictions to parquet.

Every output is written to a hidden temporary file in its target directory,
``.<name>.tmp-<pid>``, and renamed onto its final name with :func:`os.replace`
only once it is complete.  A failed or interrupted run therefore never leaves a
file under a final name that is partial: on an exception (including
``KeyboardInterrupt`` and the ``SystemExit`` the CLI raises on SIGTERM) the
temporary file is removed; a SIGKILL can leave the hidden temporary file, whose
name says what it is and is never mistaken for output.

:class:`OutputSet` commits several files together (the CLI's ``fit.json``,
``ranef.parquet``, ``pred.parquet``): nothing is renamed until all are written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

__all__ = ["OutputSet", "atomic_path", "temp_path", "write_json", "write_parquet", "write_predictions"]


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden temporary name ``path`` is written under: ``.<name>.tmp-<pid>`` in the same directory."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any exception it is removed.

    The same directory is used so that :func:`os.replace` is an atomic rename
    (never a copy across file systems).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)  # no-op after a successful replace


class OutputSet:
    """Files that appear together or not at all.

    ``path(final)`` gives the temporary path to write ``final`` to; ``commit()``
    renames them all (in the order they were requested); ``abort()`` (or an
    exception inside ``with``) removes every temporary file.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def path(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(final)
        self._pending.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        done = []
        for tmp, final in self._pending:
            os.replace(tmp, final)
            done.append(final)
        self._pending = []
        return done

    def abort(self) -> None:
        for tmp, _ in self._pending:
            _remove(tmp)
        self._pending = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            finally:
                self.abort()  # anything left (a failed rename) is removed
        else:
            self.abort()


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically (NaN/inf become null)."""
    text = json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_parquet(df: Any, path: str | os.PathLike) -> Path:
    """Write a polars or pandas frame to parquet, atomically."""
    if not isinstance(df, pl.DataFrame):
        df = pl.from_pandas(df)
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)
    return Path(path)


def _predictions_of(results, data: Any):
    from .data import open_source

    if data is None:
        if getattr(results.model, "data", None) is None:
            raise ValueError("the fitted data are not held in this process; pass the data to predict")
        return results.model.data
    return open_source(data)


def iter_predictions(results, data: Any = None, *, keys: Sequence[str] | None = None,
                     chunk_rows: int | None = None, include_random: bool = True,
                     progress: bool | None = False) -> Iterator[pl.DataFrame]:
    """Chunks of ``keys`` columns + ``fitted`` (+ ``resid`` when the response is in the data), in row order."""
    from ._progress import Progress
    from .blups import predict_chunk
    from .pipeline import DEFAULT_CHUNK_ROWS

    source = _predictions_of(results, data)
    design = results.model.built.design
    key_cols = [c for c in design.key_columns if c in source.schema]
    if keys is None:
        keys = key_cols
    keys = list(dict.fromkeys(keys))
    source.check_columns(keys)
    needed = [c for c in design.predictor_columns if c in source.schema]
    missing_pred = [c for c in design.predictor_columns if c not in source.schema]
    if missing_pred:
        raise ValueError(f"the data to predict lack column(s) {missing_pred} used by the model")
    source.check_columns(needed)  # a file that lacks one of them
    needed += [c for c in key_cols if c not in needed]
    # the response's columns (for residuals), when they are all present
    resp_cols = list(design.response_columns)
    with_resid = bool(resp_cols) and all(c in source.schema for c in resp_cols)
    cols = list(dict.fromkeys(keys + needed + (resp_cols if with_resid else [])))
    bar = Progress(progress, len(source.parts), "predicting", source.files)
    last = None
    try:
        for label, chunk in source.batches(cols, int(chunk_rows or DEFAULT_CHUNK_ROWS), ordered=True):
            fitted = predict_chunk(results, chunk, include_random)
            out = chunk.select(keys).with_columns(pl.Series("fitted", fitted))
            if with_resid:
                y = np.asarray(design.response(chunk), dtype=np.float64)
                out = out.with_columns(pl.Series("resid", y - fitted))
            bar.update(chunk.height, part_done=label != last and last is not None)
            last = label
            yield out
    finally:
        bar.close()


def write_predictions(results, data: Any, out: str | os.PathLike, *, keys: Sequence[str] | None = None,
                      chunk_rows: int | None = None, include_random: bool = True,
                      progress: bool | None = False, _tmp: Path | None = None) -> Path:
    """Stream predictions for ``data`` into one parquet file ``out``, atomically.

    Memory is one chunk of rows (plus the fitted model); each chunk becomes a
    row group.  Columns: ``keys`` (default: the grouping column), ``fitted``
    (X beta + Z b for groups of the fit, X beta for new groups; NaN when a
    predictor is missing) and ``resid`` (response minus fitted, when the
    response is in the data).  Rows are in the order of the input.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)

    def write(tmp: Path) -> None:
        writer = None
        schema = None
        try:
            for frame in iter_predictions(results, data, keys=keys, chunk_rows=chunk_rows,
                                          include_random=include_random, progress=progress):
                table = frame.to_arrow()
                if writer is None:
                    schema = table.schema
                    writer = pq.ParquetWriter(tmp, schema)
                elif table.schema != schema:
                    table = table.cast(schema)
                writer.write_table(table)
            if writer is None:  # no rows: still a valid (empty) file
                empty = pa.table({"fitted": pa.array([], pa.float64())})
                pq.write_table(empty, tmp)
        finally:
            if writer is not None:
                writer.close()

    if _tmp is not None:  # part of an OutputSet: the caller renames
        write(_tmp)
        return out
    with atomic_path(out) as tmp:
        write(tmp)
    return out
