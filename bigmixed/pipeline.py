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
from typing import Any

import numpy as np
import polars as pl

from .data import GroupIndex, Source, failing_part, group_levels
from .design import Design
from .formula import ModelSpec
from .scaling import canonical_scaling, same_scaling, scaling_from_sample, transform_statistics  # noqa: F401
from .stats import Scaling, Statistics, aliased_columns

__all__ = ["BuildResult", "build_statistics", "DEFAULT_CHUNK_ROWS"]

DEFAULT_CHUNK_ROWS = 1_000_000
# Data already in memory are sliced (no copy) into smaller chunks: the design arrays of a
# chunk are then reused from the allocator's free lists instead of being page-faulted in
# fresh for every row (measured at 1e6 rows: 0.26 s -> 0.20 s for a whole fit).
IN_MEMORY_CHUNK_ROWS = 1 << 17
# Rows the internal centring/scaling is chosen from (the first rows read, whatever chunk_rows is).
# Only the accuracy of the sums depends on it (the statistics are mapped exactly to the canonical
# transform of all rows afterwards); 10k rows centre to ~1% of a standard deviation.
SCALING_SAMPLE_ROWS = 10_000


class DroppedRowsWarning(UserWarning):
    """Rows with missing or non-finite values were left out of the fit."""


@dataclass
class BuildResult:
    """Statistics and everything needed to interpret them.

    On a Dask cluster (:func:`bigmixed.distributed.build_distributed`) ``mode`` is
    ``"gathered"`` (``stats`` merged on the driver) or ``"resident"`` (``stats`` None, the
    statistics stay on the workers behind ``backend``, and ``groups`` gathers keys on demand).
    """

    stats: Statistics | None
    design: Design
    groups: GroupIndex
    scaling: Scaling
    n_rows_read: int
    n_dropped: int
    dropped_by_column: dict[str, int]
    aliased: list[str]
    kept_fe: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    backend: Any = None
    mode: str = "local"


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
    lf = source.parts[0][1]
    try:
        have = set(lf.collect_schema())
        # A column only later files have is a typed null column here: the design can be built,
        # and check_columns names the file that lacks it if the model uses it.
        exprs = [pl.col(c) if c in have else pl.lit(None, dtype=source.schema[c]).alias(c) for c in columns]
        return lf.select(exprs).head(rows).collect()
    except pl.exceptions.PolarsError as exc:
        raise ValueError(f"cannot read {source.parts[0][0]}: {str(exc).splitlines()[0]}") from None


def _check_finite(stats: Statistics, design: Design) -> None:
    """Finite values too large to square in float64 (|v| > ~1e154) overflow the sums: name them."""
    with np.errstate(all="ignore"):
        parts = [stats.XtX, stats.Xty, np.asarray(stats.yty), stats.A, stats.B, stats.c]
        if all(np.all(np.isfinite(a)) for a in parts):
            return
        bad = [design.response_name] * int(not (np.isfinite(stats.yty) and np.all(np.isfinite(stats.c))))
        bad += [n for n, v in zip(design.fe_names, np.diag(stats.XtX)) if not np.isfinite(v)]
        bad += [n for n, v in zip(design.re_names, np.einsum("gjj->j", stats.A)) if not np.isfinite(v)]
    what = ", ".join(repr(b) for b in dict.fromkeys(bad)) or "?"
    raise ValueError(f"model column(s) {what} hold values too large for float64 sums of squares (|value| above ~1e150 even "
                     "after centring and scaling); check the data for corrupt values or rescale them")


def _sample_scaling(proto: pl.DataFrame, design: Design, groups: GroupIndex, group: str,
                    z_may_centre: bool) -> Scaling | None:
    """The row transform, from the complete rows among the first ``SCALING_SAMPLE_ROWS`` of the data."""
    sample = proto.head(SCALING_SAMPLE_ROWS)
    if sample.height == 0:
        return None
    y, X, Z = design.matrices(sample)
    codes = groups.codes(sample.get_column(group))
    ok = _complete(codes, y, X, Z)
    if not ok.any():
        return None
    return scaling_from_sample(X[ok], Z[ok], y[ok], design)


def _complete(codes: np.ndarray, y: np.ndarray, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Rows with a known group and finite values (column by column: X and Z are Fortran-ordered)."""
    ok = (codes >= 0) & np.isfinite(y)
    for M in (X, Z):
        for j in range(M.shape[1]):
            ok &= np.isfinite(M[:, j])
    return ok


def _discover_levels(source: Source, design: Design) -> dict[str, list]:
    """All levels of the categorical columns, over every row (streaming, columns only)."""
    cols = list(design.categorical)
    if not cols:
        return {}
    exprs = []
    for col in cols:
        e = pl.col(col)
        if source.schema.get(col) == pl.Categorical or isinstance(source.schema.get(col), pl.Enum):
            e = e.cast(pl.String)
        exprs.append(e.drop_nulls().unique().implode().alias(col))
    try:  # one query: each file is opened once for all categorical columns
        out = source.lazy().select(exprs).collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        where = failing_part(source, cols)
        raise ValueError(f"cannot read the categorical column(s) {cols}{where}: {str(exc).splitlines()[0]}") from None
    return {col: sorted(out[col][0].to_list(), key=lambda v: (str(type(v)), v)) for col in cols}


class _Warmup:
    """Load the numba kernels of a fit from the on-disk cache (~0.3 s) in a background thread.

    The statistics kernel first, while polars reads the prototype and indexes the
    keys (``wait_statistics`` before its first real call); then the objective's
    kernels, during the pass over the rows, but only under a thread-safe numba
    threading layer (omp, tbb): under ``workqueue`` two threads must never run
    parallel kernels at once, so the thread stops there.  ``join`` before the fit.
    """

    def __init__(self, nthreads: int | None) -> None:
        import threading

        self.nthreads = nthreads
        self._stats_ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bigmixed-warm")
        self._thread.start()

    def _run(self) -> None:
        try:
            st = Statistics.empty(2, 1, 1)
            ones = np.ones((4, 1), order="F")
            st.add_rows(np.array([0, 0, 1, 1]), ones, ones.copy(order="F"), np.array([1.0, 2.0, 4.0, 3.5]),
                        self.nthreads)
        except Exception:  # only a warm-up: the real call reports any problem
            return
        finally:
            self._stats_ready.set()
        try:
            import numba

            if numba.threading_layer() not in ("omp", "tbb"):
                return
            from .objective import LocalBackend, Objective, ThetaMap

            be = LocalBackend(st, self.nthreads)
            obj = Objective(be, ThetaMap(1), True, 0.0)
            theta = np.array([0.5])
            obj(theta)
            obj.unprofiled(theta, 1.0)
            be.conditional_modes(np.eye(1), np.zeros(1))
        except Exception:
            pass

    def wait_statistics(self) -> None:
        self._stats_ready.wait()

    def join(self) -> None:
        self._thread.join()


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _console():
    from rich.console import Console

    return Console(stderr=True)


class _Progress:
    """A rich progress bar on stderr for one pass over the data.

    Shown only when enabled (``None``: when stderr is a terminal) and only once
    the pass has lasted ``DELAY`` seconds, so quick passes print nothing.  It
    shows rows read, rows/s and files done; with files, the bar advances by
    rows (totals from the parquet footers, read only once the bar appears).
    """

    DELAY = 1.0

    def __init__(self, enabled: bool | None, total_parts: int, description: str = "reading",
                 files: list | None = None) -> None:
        self.enabled = _stderr_is_terminal() if enabled is None else bool(enabled)
        self.total = total_parts
        self.description = description
        self.files = files or []
        self.start = time.perf_counter()
        self._bar = None
        self._rows_total: int | None = None
        self.rows = 0
        self.parts_done = 0

    def _open(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self.files and len(self.files) <= 2000:
            try:
                import pyarrow.parquet as pq

                self._rows_total = sum(pq.read_metadata(f).num_rows for f in self.files)
            except Exception:  # a progress bar must never fail a run
                self._rows_total = None
        self._bar = Progress(
            TextColumn(self.description), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=_console(), transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self._rows_total or self.total, info="")

    def update(self, rows: int, part_done: bool = False) -> None:
        self.rows += rows
        self.parts_done += int(part_done)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if self._bar is None and elapsed > self.DELAY:
            self._open()
        if self._bar is not None:
            rate = self.rows / max(elapsed, 1e-9)
            files = f", {self.parts_done}/{self.total} files" if self.files else ""
            self._bar.update(self._task, completed=self.rows if self._rows_total else self.parts_done,
                             info=f"{self.rows:,} rows, {rate:,.0f} rows/s{files}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _blocking(enabled: bool | None, description: str, fn):
    """Run ``fn()`` (one polars query over all files); a spinner on stderr if it lasts over a second."""
    enabled = _stderr_is_terminal() if enabled is None else bool(enabled)
    if not enabled:
        return fn()
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    th = threading.Thread(target=run, daemon=True, name="bigmixed-scan")
    th.start()
    th.join(_Progress.DELAY)
    if th.is_alive():
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn(description), TimeElapsedColumn(),
                      console=_console(), transient=True) as bar:
            bar.add_task(description, total=None)
            while th.is_alive():
                th.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]


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
    chunk_rows = int(chunk_rows or (IN_MEMORY_CHUNK_ROWS if source.in_memory else DEFAULT_CHUNK_ROWS))
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be a positive number of rows")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # Streaming: load the numba kernels from the on-disk cache (~0.3 s) while polars
    # reads the prototype and indexes the keys; joined before the first kernel call.
    warm = None if source.in_memory else _Warmup(nthreads)

    if spec.group not in source.schema:
        source.check_columns([spec.group])
    proto = _prototype(source, list(source.schema))
    design = Design(spec, proto, levels)
    source.check_columns(design.columns)
    what = f"{len(source.files)} files" if source.files else "the data"
    if not source.in_memory and design.categorical and levels is None:
        found = _blocking(progress, f"finding the levels of {', '.join(design.categorical)} in {what}",
                          lambda: _discover_levels(source, design))
        design = Design(spec, proto, found)
    if source.in_memory:
        groups = GroupIndex.from_source(source, spec.group)
    else:
        groups = _blocking(progress, f"indexing the groups '{spec.group}' of {what}",
                           lambda: GroupIndex.from_source(source, spec.group))
    timings["prepare"] = time.perf_counter() - t0

    p, q = len(design.fe_names), len(design.re_names)
    # Sampling levels by key: the pass also keeps exact global sums over a hash sample of the
    # groups, for the optimiser's warm start (stats.SampleSums).
    stats = Statistics.empty(groups.n_groups, p, q, levels=group_levels(groups.keys))
    z_may_centre = len(design.blocks) == 1
    exprs = _missing_exprs(design.columns, source.schema)
    dropped = dict.fromkeys(design.columns, 0)
    dropped["(non-finite after transformation)"] = 0
    n_read = n_dropped = 0
    # The transform comes from a fixed sample (the first rows of the prototype), not from
    # the first chunk, so that chunk_rows cannot change the fit (issue 6); the loop below
    # still picks one from the first chunk with complete rows if the sample has none.
    scaling = _sample_scaling(proto, design, groups, spec.group, z_may_centre)
    t_read = t_reduce = 0.0
    bar = _Progress(progress, len(source.parts), "reading", source.files)
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
                ok = _complete(codes, y, X, Z)
                if ok.any():
                    scaling = scaling_from_sample(X[ok], Z[ok], y[ok], design)
                else:
                    scaling = None  # nothing usable yet: every row of this chunk is skipped
            if warm is not None:  # the first chunk was read while the kernels loaded
                warm.wait_statistics()
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
                    terms = [design.response_name] * int(not np.isfinite(y).all()) + \
                        [n for n, ok in zip(design.fe_names, np.isfinite(X).all(axis=0)) if not ok] + \
                        [n for n, ok in zip(design.re_names, np.isfinite(Z).all(axis=0)) if not ok]
                    what = (f"column(s) {', '.join(repr(b) for b in bad)} hold null/NaN/inf values" if bad
                            else f"{skipped} row(s) give non-finite values after the formula's transformations "
                                 f"(in {', '.join(repr(t) for t in dict.fromkeys(terms))})")
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
        bar.update(0, part_done=last_label is not None)
    finally:
        bar.close()
        if warm is not None:
            warm.join()
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
    # Independent of which rows came first: see canonical_scaling.
    t5 = time.perf_counter()
    canon = canonical_scaling(stats, scaling, z_may_centre)
    if not same_scaling(canon, scaling):
        transform_statistics(stats, scaling, canon)
        scaling = canon
    _check_finite(stats, design)
    timings["statistics"] += time.perf_counter() - t5
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
