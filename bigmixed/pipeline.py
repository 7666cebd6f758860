"""The one streaming pass: source -> design -> per-group statistics.

This is the data flow of DESIGN.md section 5 up to the statistics:

1. a prototype (the in-memory frame, or the first rows of the files) fixes
   the design: column names, categorical levels (found over *all* rows by a
   cheap pass over the categorical columns only when streaming);
2. one pass over the key column builds the group index;
3. one pass over the rows, chunk by chunk: drop (and count) incomplete rows,
   build (y, X, Z), code the groups, transform (:class:`~bigmixed.stats.Scaling`)
   and reduce into the statistics with the numba kernel.

Memory is the statistics (O(G)) plus one chunk, whatever the number of rows.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from .data import GroupIndex, Source
from .design import Design
from .formula import ModelSpec
from .stats import Scaling, Statistics, aliased_columns

__all__ = ["BuildResult", "build_statistics", "DEFAULT_CHUNK_ROWS"]

DEFAULT_CHUNK_ROWS = 1_000_000


class DroppedRowsWarning(UserWarning):
    """Rows with missing or non-finite values were left out of the fit."""


@dataclass
class BuildResult:
    """Statistics and everything needed to interpret them."""

    stats: Statistics
    design: Design
    groups: GroupIndex
    scaling: Scaling
    n_rows_read: int
    n_dropped: int
    dropped_by_column: dict[str, int]
    aliased: list[str]
    kept_fe: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def _missing_exprs(columns, schema) -> dict[str, pl.Expr]:
    exprs = {}
    for c in columns:
        e = pl.col(c).is_null()
        dt = schema.get(c)
        if dt in (pl.Float32, pl.Float64):
            e = e | pl.col(c).is_nan() | pl.col(c).is_infinite()
        exprs[c] = e
    return exprs


def _prototype(source: Source, columns, rows: int = 50_000) -> pl.DataFrame:
    if source.frame is not None:
        return source.frame
    try:
        return source.parts[0][1].select(columns).head(rows).collect()
    except pl.exceptions.PolarsError as exc:
        raise ValueError(f"cannot read {source.parts[0][0]}: {str(exc).splitlines()[0]}") from None


def _discover_levels(source: Source, design: Design) -> dict[str, list]:
    """All levels of the categorical columns, over every row (streaming, columns only)."""
    levels = {}
    lf = source.lazy()
    for col in design.categorical:
        vals = lf.select(pl.col(col).drop_nulls().unique()).collect(engine="streaming").to_series()
        levels[col] = sorted(vals.to_list(), key=lambda v: (str(type(v)), v))
    return levels


class _Progress:
    """A rich progress line on stderr, only for a terminal and only past one second."""

    def __init__(self, enabled: bool | None, total_parts: int) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.enabled = enabled
        self.total = total_parts
        self.start = time.perf_counter()
        self._bar = None
        self.rows = 0
        self.parts_done = 0

    def update(self, rows: int, part_done: bool) -> None:
        self.rows += rows
        self.parts_done += int(part_done)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if self._bar is None and elapsed > 1.0:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("reading"), BarColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), console=Console(stderr=True), transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("read", total=self.total, info="")
        if self._bar is not None:
            rate = self.rows / max(elapsed, 1e-9)
            self._bar.update(self._task, completed=self.parts_done,
                             info=f"{self.rows:,} rows, {rate:,.0f} rows/s, {self.parts_done}/{self.total} parts")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def build_statistics(
    source: Source,
    spec: ModelSpec,
    *,
    missing: str = "drop",
    chunk_rows: int | None = None,
    levels: dict[str, list] | None = None,
    nthreads: int | None = None,
    progress: bool | None = None,
    warn: bool = True,
) -> BuildResult:
    """Reduce ``source`` to sufficient statistics for the model ``spec``.

    Parameters
    ----------
    missing
        ``"drop"`` (default): rows with a null, NaN or infinite value in a
        used column are left out and counted; ``"raise"``: such a row is an
        error naming the column (and file).
    chunk_rows
        Rows per chunk when streaming (memory is about 8 bytes x (p + q + 2)
        x chunk_rows on top of the statistics).
    levels
        Known levels of categorical columns; found by a pass over the data if
        not given.
    """
    if missing not in ("drop", "raise"):
        raise ValueError(f"missing must be 'drop' or 'raise', not {missing!r}")
    chunk_rows = int(chunk_rows or DEFAULT_CHUNK_ROWS)
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be a positive number of rows")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    if spec.group not in source.schema:
        source.check_columns([spec.group])
    proto = _prototype(source, list(source.schema))
    design = Design(spec, proto, levels)
    source.check_columns(design.columns)
    if not source.in_memory and design.categorical and levels is None:
        design = Design(spec, proto, _discover_levels(source, design))
    groups = GroupIndex.from_source(source, spec.group)
    timings["prepare"] = time.perf_counter() - t0

    p, q = len(design.fe_names), len(design.re_names)
    stats = Statistics.empty(groups.n_groups, p, q)
    z_may_centre = len(design.blocks) == 1
    exprs = _missing_exprs(design.columns, source.schema)
    dropped = dict.fromkeys(design.columns, 0)
    dropped["(non-finite after transformation)"] = 0
    n_read = n_dropped = 0
    scaling: Scaling | None = None
    t_read = t_reduce = 0.0
    bar = _Progress(progress, len(source.parts))
    last_label = None
    t1 = time.perf_counter()
    try:
        for label, chunk in source.batches(design.columns, chunk_rows):
            t2 = time.perf_counter()
            n_read += chunk.height
            y, X, Z = design.matrices(chunk)
            codes = groups.codes(chunk.get_column(spec.group))
            if scaling is None:
                # the transform is chosen from the first chunk's complete rows
                ok = (codes >= 0) & np.isfinite(y) & np.isfinite(X).all(axis=1) & np.isfinite(Z).all(axis=1)
                if ok.any():
                    scaling = Scaling.from_sample(X[ok], Z[ok], y[ok], z_may_centre=z_may_centre)
                else:
                    scaling = None  # nothing usable yet: every row of this chunk is skipped
            t3 = time.perf_counter()
            # The kernel skips rows with a null key or a non-finite value and
            # counts them; only then do we ask polars which columns were at fault.
            skipped = stats.add_rows(codes, X, Z, y, nthreads, scaling) if scaling is not None \
                else int(chunk.height)
            t4 = time.perf_counter()
            if skipped:
                counts = chunk.select([e.sum().alias(c) for c, e in exprs.items()]).row(0)
                if missing == "raise":
                    bad = [c for c, k in zip(exprs, counts) if k]
                    where = "" if label == "data" else f" in {label}"
                    what = (f"column(s) {', '.join(repr(b) for b in bad)} hold null/NaN/inf values" if bad
                            else f"{skipped} row(s) give non-finite values after the formula's transformations")
                    raise ValueError(f"{what}{where}; use missing='drop' to leave such rows out")
                for c, k in zip(exprs, counts):
                    dropped[c] += int(k)
                flagged = int(chunk.select(pl.any_horizontal(list(exprs.values())).sum()).item())
                dropped["(non-finite after transformation)"] += skipped - flagged
                n_dropped += skipped
            t_read += t3 - t2
            t_reduce += t4 - t3
            bar.update(chunk.height, part_done=label != last_label and last_label is not None)
            last_label = label
    finally:
        bar.close()
    timings["read"] = time.perf_counter() - t1 - t_reduce
    timings["statistics"] = t_reduce

    if n_read == 0:
        raise ValueError("the data has no rows")
    if stats.N == 0:
        raise ValueError(
            f"all {n_read} rows were dropped for missing or non-finite values "
            f"(by column: { {k: v for k, v in dropped.items() if v} })"
        )
    if scaling is None:  # pragma: no cover - stats.N > 0 implies a chunk was reduced
        scaling = Scaling.identity(p, q)
    dropped = {k: v for k, v in dropped.items() if v}
    if n_dropped and warn:
        warnings.warn(
            f"{n_dropped} of {n_read} rows dropped for missing or non-finite values "
            f"(by column: {dropped}); pass missing='raise' to make this an error",
            DroppedRowsWarning,
            stacklevel=3,
        )

    # Groups that lost all their rows are not groups of the fit.
    nonempty = stats.n > 0
    if not nonempty.all():
        stats = stats.subset_groups(nonempty)
        groups = groups.subset(nonempty)
    if groups.n_groups < 2:
        raise ValueError(
            f"the grouping column '{spec.group}' has {groups.n_groups} group(s) after dropping "
            "incomplete rows; a mixed model needs at least two groups"
        )

    # Aliased (collinear) fixed-effect columns are dropped, as lme4 does.
    drop = aliased_columns(stats.XtX)
    kept = np.setdiff1d(np.arange(p), drop)
    aliased = [design.fe_names[j] for j in drop]
    if aliased:
        if warn:
            warnings.warn(
                f"fixed-effect model matrix is rank deficient so dropping {len(aliased)} "
                f"column(s): {', '.join(aliased)}",
                UserWarning,
                stacklevel=3,
            )
        stats = stats.subset_fixed(kept)
    if stats.N <= len(kept):
        raise ValueError(
            f"{stats.N} usable rows for {len(kept)} fixed effects; a fit needs more rows than fixed effects"
        )
    scaling = scaling.subset_fixed(kept)
    return BuildResult(stats, design, groups, scaling, n_read, n_dropped, dropped, aliased, kept, timings)
