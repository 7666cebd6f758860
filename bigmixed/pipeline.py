"""The one streaming pass: source -> design -> per-level statistics, in three steps.

This is the data flow of DESIGN.md section 5 up to the statistics, shared by the local and
the Dask paths:

1. :func:`prepare` - a prototype (the in-memory frame, or the first rows of the files)
   fixes the design: column names, categorical levels (found over *all* rows by a cheap
   pass over the categorical columns when streaming); each term's level index comes from
   the frame in memory, or for files from the parquet footers (compact integer keys), from
   the pass itself (one term: :class:`~bigmixed.keys.KeyCoder`, so every file is read once)
   or from one pass over the key columns (several terms); the first row transform is chosen.
2. :class:`Reducer` - chunk by chunk: build (y, X, Z), code the levels of every term, drop
   (and count) incomplete rows, transform (:class:`~bigmixed.scaling.Scaling`) and reduce
   into the statistics with the numba kernels; several terms also get their pair statistics
   (nested terms one block per level of the finer term, crossed terms sorted pair lists).
3. :func:`finalise` - the canonical transform, empty levels dropped, aliased fixed effects
   dropped (as lme4), the checks that need all rows.

Memory is the statistics (O(levels)) plus one chunk, whatever the number of rows.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl

from . import _kernels
from ._progress import Progress, blocking
from .data import Source, failing_part
from .design import Design
from .formula import ModelSpec
from .keys import GroupIndex, KeyCoder, TermIndex, Unpackable
from .reduce import NEGATIVE_WEIGHT, NON_FINITE, ZERO_WEIGHT, NotNested, Reducer, complete
from .scaling import Scaling, canonical_scaling, same_scaling, scaling_from_sample, transform_statistics, z_may_centre
from .stats import PairStats, Statistics, aliased_columns, default_threads
from .terms import ReTerm, check_crossed_memory

__all__ = ["BuildResult", "Plan", "prepare", "Reducer", "finalise", "build_statistics", "DEFAULT_CHUNK_ROWS",
           "DroppedRowsWarning", "complete_rows_design"]

DEFAULT_CHUNK_ROWS = 1_000_000
# Data already in memory are sliced (no copy) into smaller chunks: the design arrays of a
# chunk are then reused from the allocator's free lists instead of being page-faulted in
# fresh for every row (measured at 1e6 rows: 0.26 s -> 0.20 s for a whole fit).
IN_MEMORY_CHUNK_ROWS = 1 << 17
# Rows the internal centring/scaling is chosen from (the first rows read, whatever chunk_rows is).
# Only the accuracy of the sums depends on it (the statistics are mapped exactly to the canonical
# transform of all rows afterwards); 10k rows centre to ~1% of a standard deviation.
SCALING_SAMPLE_ROWS = 10_000
# Formula functions whose state is learnt from the data (formulaic's stateful transforms).
_STATEFUL = ("scale(", "center(", "poly(", "standardize(", "bs(", "cr(", "cs(", "cc(", "te(", "hashed(")



class DroppedRowsWarning(UserWarning):
    """Rows with missing or non-finite values were left out of the fit."""


@dataclass
class BuildResult:
    """Statistics and everything needed to interpret them.

    ``terms`` are the model's random-effects terms (with their level indexes), ``layout``
    how they are factored: ``"single"`` (one term), ``"nested"`` or ``"crossed"``.  On a Dask
    cluster (:func:`bigmixed.distributed.build_distributed`) ``mode`` is ``"gathered"``
    (``stats`` merged on the driver) or ``"resident"`` (``stats`` None, the statistics stay on
    the workers behind ``backend``).
    """

    stats: Statistics | None
    design: Design
    terms: list[ReTerm]
    scaling: Scaling
    n_rows_read: int
    n_dropped: int
    dropped_by_column: dict[str, int]
    aliased: list[str]
    kept_fe: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    backend: Any = None
    mode: str = "local"
    layout: str = "single"
    chain: list = field(default_factory=lambda: [0])

    @property
    def groups(self):
        """The level index of the first term (one-term models: the groups)."""
        return self.terms[0].index


def _missing_exprs(columns, schema) -> dict[str, pl.Expr]:
    exprs = {}
    for c in columns:
        e = pl.col(c).is_null()
        dt = schema.get(c)
        if dt in (pl.Float32, pl.Float64):
            e = e | pl.col(c).is_nan() | pl.col(c).is_infinite()
        exprs[c] = e
    return exprs


def _prototype(source: Source, columns, rows: int | None = 50_000) -> pl.DataFrame:
    """The in-memory frame, or the first ``rows`` rows of the first part (all rows of all parts: None)."""
    if source.frame is not None:
        return source.frame
    if rows is None:
        try:
            return source.lazy().select(list(columns)).collect(engine="streaming")
        except pl.exceptions.PolarsError as exc:
            where = failing_part(source, list(columns))
            raise ValueError(f"cannot read the data{where}: {str(exc).splitlines()[0]}") from None
    heads, got = [], 0
    for label, lf in source.parts:  # the first rows of the data, past empty files
        try:
            have = set(lf.collect_schema())
            # A column only later files have is a typed null column here: the design can be built,
            # and check_columns names the file that lacks it if the model uses it.
            exprs = [(pl.col(c) if c in have else pl.lit(None, dtype=source.schema[c]).alias(c)).cast(source.schema[c])
                     for c in columns]
            heads.append(lf.select(exprs).head(rows - got).collect())
        except pl.exceptions.PolarsError as exc:
            raise ValueError(f"cannot read {label}: {str(exc).splitlines()[0]}") from None
        got += heads[-1].height
        if got:  # the first file with rows (earlier ones are empty)
            break
    return heads[0] if len(heads) == 1 else pl.concat(heads)


def _check_finite(stats: Statistics, design: Design) -> None:
    """Finite values too large to square in float64 (|v| > ~1e154) overflow the sums: name them."""
    with np.errstate(all="ignore"):
        parts = [stats.XtX, stats.Xty, np.asarray(stats.yty)] + [a for t in stats.terms for a in (t.A, t.B, t.c)]
        if all(np.all(np.isfinite(a)) for a in parts):
            return
        bad = [design.response_name] * int(not (np.isfinite(stats.yty) and all(np.all(np.isfinite(t.c))
                                                                               for t in stats.terms)))
        bad += [n for n, v in zip(design.fe_names, np.diag(stats.XtX)) if not np.isfinite(v)]
        diagZ = np.concatenate([np.einsum("gjj->j", t.A) for t in stats.terms])
        bad += [n for n, v in zip(design.re_names, diagZ) if not np.isfinite(v)]
    what = ", ".join(repr(b) for b in dict.fromkeys(bad)) or "?"
    raise ValueError(f"model column(s) {what} hold values too large for float64 sums of squares (|value| above ~1e150 even "
                     "after centring and scaling); check the data for corrupt values or rescale them")


def _sample_scaling(proto: pl.DataFrame, design: Design, indexes: list) -> Scaling | None:
    """The row transform, from the complete rows among the first ``SCALING_SAMPLE_ROWS`` of the data."""
    sample = proto.head(SCALING_SAMPLE_ROWS)
    if sample.height == 0:
        return None
    y, X, Z = design.matrices(sample)
    ok = complete([ix.codes(sample) for ix in indexes], y, X, Z)
    if not ok.any():
        return None
    return scaling_from_sample(X[ok], Z[ok], y[ok], design)


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


@dataclass
class Plan:
    """What the pass over the rows needs, decided before reading them.

    ``chain`` lists the terms from finest to coarsest when they are (assumed) nested - the
    reducer checks it on every row - and ``layout`` is then ``"nested"``; ``"crossed"``
    keeps sorted pair lists for every pair of terms; ``"single"`` is one term.
    """

    design: Design
    terms: list[ReTerm]
    scaling: Scaling | None
    layout: str
    chain: list[int]
    sample_term: int | None
    missing: str
    chunk_rows: int
    proto: pl.DataFrame | None = None
    timings: dict[str, float] = field(default_factory=dict)
    keep_xx: bool = False  # also keep per-level X'X of the sampling term (the parametric bootstrap)
    coder: KeyCoder | None = None  # the one term's levels are found during the pass (its index comes after)


def _chain(terms: list[ReTerm]) -> list[int]:
    """Terms from finest to coarsest: by levels (most first), then columns of the grouping factor."""
    return sorted(range(len(terms)), key=lambda k: (-terms[k].n_levels, -len(terms[k].factors), k))


def prepare(source: Source, spec: ModelSpec, *, levels: dict | None = None, missing: str = "drop",
            chunk_rows: int | None = None, progress: bool | None = None, layout: str | None = None,
            keep_xx: bool = False, one_pass: bool = True) -> Plan:
    """Design, level indexes and the first row transform; no pass over the rows yet.

    ``one_pass``: a one-term model on files may find its levels during the pass over the rows
    (:class:`~bigmixed.keys.KeyCoder`) instead of a pass over the key column first.
    """
    if missing not in ("drop", "raise"):
        raise ValueError(f"missing must be 'drop' or 'raise', not {missing!r}")
    if chunk_rows is not None and not chunk_rows >= 1:
        raise ValueError(f"chunk_rows must be a positive number of rows, not {chunk_rows!r}")
    chunk_rows = int(chunk_rows or (IN_MEMORY_CHUNK_ROWS if source.in_memory else DEFAULT_CHUNK_ROWS))
    t0 = time.perf_counter()
    proto = _prototype(source, list(source.schema))
    design = Design(spec, proto, levels)
    source.check_columns(design.columns)
    what = f"{len(source.files)} files" if source.files else "the data"
    if not source.in_memory and design.categorical and levels is None:
        found = blocking(progress, f"finding the levels of {', '.join(design.categorical)} in {what}",
                         lambda: _discover_levels(source, design))
        design = Design(spec, proto, found)
    if _stateful(design):
        # scale(x), poly(x, 2), C(round(x)): their state must come from every complete row, as in R
        if not source.in_memory:
            proto = blocking(progress, f"reading the columns of the stateful transforms in {what}",
                             lambda: _prototype(source, design.columns, rows=None))
        design = complete_rows_design(spec, proto, design)
    terms = design.terms
    coder = _single_term_levels(source, terms, allow_coder=one_pass and not keep_xx)
    for t in terms if coder is None else ():
        if t.index is not None:  # from the footers (_single_term_levels)
            continue
        label = ":".join(t.factors)
        if source.in_memory:
            t.index = TermIndex.from_source(source, t.factors)
        else:
            t.index = blocking(progress, f"indexing the levels of '{label}' in {what}",
                               lambda t=t: TermIndex.from_source(source, t.factors))
    if len(terms) == 1:
        chosen, chain = "single", [0]
    else:
        chain = _chain(terms)
        chosen = layout or "nested"
    sample_term = chain[-1] if chosen in ("single", "nested") else None
    indexes = [t.index if coder is None else TermIndex(t.factors, [GroupIndex(proto.get_column(t.factors[0]))])
               for t in terms]  # with a coder, the first rows' own keys: only to know which rows are complete
    scaling = _sample_scaling(proto, design, indexes)
    plan = Plan(design, terms, scaling, chosen, chain, sample_term, missing, chunk_rows, proto, keep_xx=keep_xx,
                coder=coder)
    plan.timings["prepare"] = time.perf_counter() - t0
    return plan


MAX_RESERVED_LEVELS = 1 << 27  # beyond this many keys the coder's arrays grow by doubling


def _single_term_levels(source: Source, terms: list[ReTerm], allow_coder: bool) -> KeyCoder | None:
    """Levels of one term on one column of files without a pass over the key column.

    Levels without rows are dropped by finalise, so integer keys may be indexed from the
    parquet footers (sets the term's index; a dense table, the cheapest lookup per row);
    otherwise, if allowed, a :class:`KeyCoder` finds them during the pass.  None: index as usual.
    """
    if source.in_memory or len(terms) != 1 or len(terms[0].factors) != 1:
        return None
    col = terms[0].factors[0]
    dtype = source.schema.get(col)
    if dtype is not None and dtype.is_integer():
        span = GroupIndex._span_index(source, col)
        if span is not None:
            terms[0].index = TermIndex(terms[0].factors, [span])
            return None
    if not allow_coder or not KeyCoder.handles(dtype):
        return None
    # room for as many keys as rows (np.empty and the records' mapping take memory only when written)
    rows = source.n_rows() or 0
    return KeyCoder(col, dtype, capacity=int(min(max(rows, 1 << 16), MAX_RESERVED_LEVELS)))


def _stateful(design: Design) -> bool:
    """Whether a part's encoding is learnt from the data beyond a column's levels: a stateful
    transform, or a categorical made from an expression (``C(round(x))``: its levels)."""
    texts = [design.spec.fixed] + [e for t in design.spec.terms for e in t.exprs]
    return any(f in t.replace(" ", "") for t in texts for f in _STATEFUL) or any(map(_expression_factor, texts))


def _expression_factor(text: str) -> bool:
    """``C(...)`` (lme4's ``factor(...)``) of anything but a bare column name."""
    for m in re.finditer(r"(?<![\w.])C\(", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        first = text[m.end():i - 1].split(",")[0].strip()
        if not re.fullmatch(r"[A-Za-z_]\w*|`[^`]*`", first):
            return True
    return False


def complete_rows_design(spec: ModelSpec, proto: pl.DataFrame, design: Design) -> Design:
    """The design rebuilt on the rows of ``proto`` complete in every column the model uses.

    A stateful transform's state (the mean and SD of ``scale(x)``, ``poly``'s coefficients, the
    levels of ``C(round(x))``) comes from the rows the fit uses, as R's model frame drops
    incomplete rows before evaluating the formula.
    """
    schema = dict(proto.schema)
    missing = _missing_exprs([c for c in design.columns if c in schema], schema).values()
    complete = proto.filter(~pl.any_horizontal(list(missing))) if missing else proto
    return Design(spec, complete, design.categorical)


def reduce_source(source: Source, plan: Plan, *, nthreads: int | None = None,
                  progress: bool | None = None) -> Reducer:
    """One pass over ``source`` into a :class:`Reducer` (which holds the statistics)."""
    from ._warmup import Warmup

    warm = None if source.in_memory else Warmup(nthreads, plan.terms[0].q)
    # the records in their own mapping, handed back while split: the per-level arrays then fill
    # on the pages just freed (in memory too: 1e6 groups, peak RSS 875 -> 781 MiB, time the same)
    red = Reducer(plan, nthreads, mapped=True, relayout=True)  # crossed terms seen in the first chunk: no second pass
    bar = Progress(progress, len(source.parts), "reading", source.files)
    last = None
    t1 = time.perf_counter()
    try:
        for label, chunk in source.batches(plan.design.columns, plan.chunk_rows):
            red.add(chunk, label, warm)
            bar.update(chunk.height, part_done=label != last and last is not None)
            last = label
        bar.update(0, part_done=last is not None)
    finally:
        bar.close()
        if warm is not None:
            warm.join()
    plan.timings["read"] = time.perf_counter() - t1 - red.t_reduce
    plan.timings["statistics"] = red.t_reduce
    return red


def finalise(stats: Statistics, plan: Plan, scaling: Scaling | None, *, n_read: int, n_dropped: int,
             dropped: dict, warn: bool = True) -> BuildResult:
    """Canonical transform, checks over all rows, empty levels and aliased columns dropped."""
    design, terms = plan.design, plan.terms
    if n_read == 0:
        raise ValueError("the data has no rows")
    if stats.N == 0:
        raise ValueError(
            f"all {n_read} rows were dropped for missing or non-finite values "
            f"(by column: { {k: v for k, v in dropped.items() if v} })"
        )
    t5 = time.perf_counter()
    # Independent of which rows came first: see canonical_scaling.
    canon = canonical_scaling(stats, scaling, z_may_centre(design))
    if not same_scaling(canon, scaling):
        transform_statistics(stats, scaling, canon)
        scaling = canon
    _check_finite(stats, design)
    plan.timings["statistics"] = plan.timings.get("statistics", 0.0) + time.perf_counter() - t5
    dropped = {k: v for k, v in dropped.items() if v}
    if n_dropped and warn:
        warnings.warn(
            f"{n_dropped} of {n_read} rows dropped for missing or non-finite values "
            f"(by column: {dropped}); pass missing='raise' to make this an error",
            DroppedRowsWarning,
            stacklevel=4,
        )
    # Levels that lost all their rows are not levels of the fit.
    keeps = [t.n > 0 for t in stats.terms]
    if not all(k.all() for k in keeps):
        stats = stats.subset_levels([None if k.all() else k for k in keeps])
        for t, k in zip(terms, keeps):
            if not k.all():
                t.index = t.index.subset(k)
    for t in terms:
        if t.n_levels < 2:
            what = "grouping column" if len(t.factors) == 1 else "grouping factor"
            raise ValueError(
                f"the {what} '{':'.join(t.factors)}' has {t.n_levels} level(s) after dropping incomplete rows; "
                "a mixed model needs at least two levels per grouping factor")
    layout = plan.layout
    if layout == "nested" and not all(pr.nested(stats.terms[pr.k].n_groups) for pr in stats.pairs):
        raise NotNested("after dropping rows")  # pragma: no cover - checked on every row
    # Aliased (collinear) fixed-effect columns are dropped, as lme4 does.
    p = design.p
    drop = aliased_columns(stats.XtX)
    kept = np.setdiff1d(np.arange(p), drop)
    aliased = [design.fe_names[j] for j in drop]
    if aliased:
        if warn:
            warnings.warn(
                f"fixed-effect model matrix is rank deficient so dropping {len(aliased)} "
                f"column(s): {', '.join(aliased)}",
                UserWarning,
                stacklevel=4,
            )
        stats = stats.subset_fixed(kept)
    if stats.N <= len(kept):
        raise ValueError(
            f"{stats.N} usable rows for {len(kept)} fixed effects; a fit needs more rows than fixed effects"
        )
    scaling = scaling.subset_fixed(kept)
    return BuildResult(stats, design, terms, scaling, n_read, n_dropped, dropped, aliased, kept,
                       dict(plan.timings), layout=layout, chain=list(plan.chain))


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
    keep_xx: bool = False,
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
    keep_xx
        Also keep each outer level's X'X (what the parametric bootstrap needs).
    """
    plan = prepare(source, spec, levels=levels, missing=missing, chunk_rows=chunk_rows, progress=progress,
                   keep_xx=keep_xx)
    try:
        try:
            red = reduce_source(source, plan, nthreads=nthreads, progress=progress)
        except Unpackable:  # a string key of over 8 bytes: index the keys first, then read again
            plan = prepare(source, spec, levels=levels, missing=missing, chunk_rows=chunk_rows, progress=progress,
                           keep_xx=keep_xx, one_pass=False)
            red = reduce_source(source, plan, nthreads=nthreads, progress=progress)
        stats = red.finish()  # (terms summed from the finest term's records are checked here)
    except NotNested:
        # Terms that looked nested share levels: read again keeping pair lists (crossed layout),
        # unless the crossed terms' dense block could not fit anyway.
        check_crossed_memory([(t.n_levels, t.q) for t in plan.terms], [t.name for t in plan.terms])
        plan = replace(plan, layout="crossed", sample_term=None)
        red = reduce_source(source, plan, nthreads=nthreads, progress=progress)
        stats = red.finish()
    plan = red.plan  # the crossed plan if the reducer found the terms crossed
    scaling = red.scaling if red.scaling is not None else Scaling.identity(plan.design.p, plan.design.q)
    return finalise(stats, plan, scaling, n_read=red.n_read, n_dropped=red.n_dropped, dropped=red.dropped,
                    warn=warn)
