"""Fit on a Dask cluster: the per-level statistics are built on the workers and (optionally) kept there.

Only how the statistics are computed and where they live changes (DESIGN.md section 5); the
objective, the optimiser and the results run unchanged.

1. A worker lists and validates the files and reads the prototype (first rows), as the
   single-machine path does; the driver freezes the Design and a first Scaling from it.  With
   several random-effects terms, one cheap task per partition reads the key columns and says
   which terms are nested in which *there*; the driver orders the terms finest to coarsest
   (nested) or falls back to the crossed layout.
2. One task per input partition (a file, or a Dask DataFrame partition) runs the
   single-machine :class:`~bigmixed.pipeline.Reducer` over its rows (weights, offsets, dropped
   rows, nested pair blocks or crossed pair lists) with that partition's own level indexes and
   the driver's design, transform and layout, and emits flat frames keyed by key *values*: one
   row per (level, partition) per term, and per (pair of levels, partition) per pair of terms.
3. One task adds the partitions' global sums and picks the canonical (rounded) transform from
   them, as ``finalise`` does, so both paths solve the same transformed problem.
4. ``dask.dataframe``'s shuffle routes every row to an *owner* by a hash of the key of its
   level's outer term (nested; one term: its own key), so an owner holds complete outer groups;
   one task per owner sums them in (key, partition) order - a recomputation gives identical bits.
   Crossed terms are routed by their own keys and merged on the driver.  A second, small shuffle
   of (level hash, outer level hash) by level checks that every level of a finer term has one
   outer level across partitions; if not, the same reduced partitions are combined as crossed.
5. ``"resident"``: the owners stay on the workers as futures whose lineage the scheduler keeps
   (a lost worker's owners are recomputed from the files).  ``"gathered"``: they are merged on
   the driver in sorted-key order, the single-machine layout.
6. A resident evaluation is a map over the owners running the single-machine backend
   (:class:`~bigmixed.backends.LocalBackend` / :class:`~bigmixed.backends.NestedBackend`) on
   their groups, returning one small packed array each; the driver adds them in owner order.
"""

from __future__ import annotations

import time
import uuid
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

try:
    import dask
    import dask.dataframe as dd
    from dask.distributed import Client
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "fitting on a Dask cluster needs dask[distributed]; install it with `pip install bigmixed[dask]`"
    ) from exc

from .data import GROUP_COLUMN, Source, open_source
from .design import Design
from .formula import ModelSpec
from .keys import TermIndex
from .pipeline import (DEFAULT_CHUNK_ROWS, SCALING_SAMPLE_ROWS, BuildResult, DroppedRowsWarning, _sample_scaling,
                       _stateful, complete_rows_design)
from .scaling import Scaling
from .stats import Statistics, aliased_columns
from .dist_backend import DistributedBackend, DistributedGroups, DistributedTermIndex, _local_chain, _orient, merge_owned
from ._dist_worker import (
    CROUTE,
    NROUTE,
    _canonical,
    _check_nesting,
    _combine,
    _frame_of,
    _inspect_files,
    _Job,
    _nesting_part,
    _owner_apply,
    _owner_get,
    _part_columns,
    _part_levels,
    _reduce_part,
    _totals_of,
    empty_frames,
    index_from_frame,
    key_dtype,
)

# The distributed build returns the single-machine record, with ``backend`` and ``mode`` set.
DistributedBuild = BuildResult

__all__ = ["GATHER_LIMIT", "DistributedBackend", "DistributedBuild", "DistributedGroups", "DistributedTermIndex",
           "build_distributed"]

#: ``mode="auto"`` gathers the statistics to the driver when they take at most this many bytes.
GATHER_LIMIT = 256 * 2**20


# ---------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------


def _open_input(client: Client, data: Any) -> tuple[list, dict, pl.DataFrame, bool, dict]:
    """Partitions (file paths or delayed frames), schema, prototype, whether in memory, and the
    columns only some files have (``Source.partial``)."""
    if isinstance(data, dd.DataFrame):
        head = client.compute(data.partitions[0].head(SCALING_SAMPLE_ROWS, compute=False)).result()
        return list(data.to_delayed()), dict(pl.from_pandas(data._meta).schema), pl.from_pandas(head), False, {}
    if isinstance(data, (pd.DataFrame, pl.DataFrame, pl.LazyFrame)):
        frame = data.collect() if isinstance(data, pl.LazyFrame) else open_source(data).frame
        k = max(1, min(sum(client.nthreads().values()), frame.height // 10_000))
        # The graph holds the rows, so lineage is intact; the frame fits on the driver anyway.
        bounds = [(i * frame.height // k, (i + 1) * frame.height // k) for i in range(k)]
        return [dask.delayed(frame.slice(lo, hi - lo)) for lo, hi in bounds], dict(frame.schema), frame, True, {}
    files, schema, proto, partial = client.submit(_inspect_files, data, pure=False).result()
    return files, schema, proto, False, partial


def _first_scaling(proto: pl.DataFrame, design: Design) -> Scaling:
    """The transform the partial sums are taken under: from the prototype's complete rows.

    Only their conditioning depends on it (the fit uses the canonical transform chosen from
    all rows); identity if the first rows hold no complete row.
    """
    sample = proto.head(SCALING_SAMPLE_ROWS)
    src = open_source(sample)
    sc = _sample_scaling(sample, design, [TermIndex.from_source(src, t.factors) for t in design.terms])
    return sc if sc is not None else Scaling.identity(design.p, design.q)


def _choose_layout(client: Client, parts: list, design: Design, dtypes: dict) -> tuple[str, tuple]:
    """``("single", (0,))``, ``("nested", chain finest to coarsest)`` or ``("crossed", chain)``.

    A term is nested in another if it is in every partition (a cheap pass over the key columns).
    Terms that pair one to one in every partition are ordered as the single-machine path breaks
    ties; if that is wrong across partitions, the nesting check after the shuffle falls back to
    the crossed layout.
    """
    K = len(design.terms)
    if K == 1:
        return "single", (0,)
    factors = [t.factors for t in design.terms]
    res = client.gather(client.compute([dask.delayed(_nesting_part, pure=True)(part, factors, dtypes)
                                        for part in parts]))
    inside = np.logical_and.reduce([r[1] for r in res])
    counts = np.sum([r[0] for r in res], axis=0)
    rank = inside.sum(axis=1)
    chain = sorted(range(K), key=lambda a: (-rank[a], -len(factors[a]), a))
    if all(inside[chain[x], chain[y]] for x in range(K) for y in range(x + 1, K)):
        return "nested", tuple(chain)
    return "crossed", tuple(_local_chain(list(counts), factors))


def _owner_graph(reduced: list, canon, job: _Job, k: int, slots: list, shuffle_method: str, token: str):
    """Owner tasks over the reduced partitions (and, for nested terms, the nesting check)."""
    metas = empty_frames(job)
    frames = {name: dd.from_delayed([dask.delayed(_frame_of, pure=True)(r, name) for r in reduced], meta=meta,
                                    verify_meta=False) for name, meta in metas.items()}
    on = CROUTE if job.layout == "crossed" else NROUTE
    shuffled = {name: f.shuffle(on=on, npartitions=k, shuffle_method=shuffle_method).to_delayed()
                for name, f in frames.items()}
    owners = []
    for j in range(k):
        # Spread the owners over the workers by threads: left alone, the scheduler put both owners
        # on one of 2 workers, and evaluations follow the data.  Loose, so a lost owner goes anywhere.
        with dask.annotate(workers=[slots[j % len(slots)]], allow_other_workers=True):
            owners.append(dask.delayed(_combine, pure=True)(
                [shuffled[f"t{t}"][j] for t in range(job.K)], [shuffled[f"p{a}_{b}"][j] for a, b in job.pairs],
                job, canon, dask_key_name=f"bigmixed-owner-{token}-{j}"))
    check = None
    if job.layout == "nested":
        parts = []
        for t in range(job.K):
            if t != job.root:
                d = frames[f"t{t}"][[CROUTE, NROUTE]].shuffle(on=CROUTE, npartitions=k, shuffle_method=shuffle_method)
                parts += [dask.delayed(_check_nesting, pure=True)(x) for x in d.to_delayed()]
        check = dask.delayed(sum, pure=True)(parts, dask_key_name=f"bigmixed-check-{token}")
    return owners, check


def build_distributed(
    client: Client,
    data: Any,
    spec: ModelSpec,
    *,
    missing: str = "drop",
    chunk_rows: int | None = None,
    levels: dict[str, list] | None = None,
    mode: str = "auto",
    n_owners: int | None = None,
    gather_limit: int = GATHER_LIMIT,
    shuffle_method: str = "tasks",
    warn: bool = True,
) -> DistributedBuild:
    """Build the statistics of ``spec`` on the Dask cluster behind ``client``.

    Parameters
    ----------
    client
        A ``dask.distributed.Client`` (LocalCluster, SLURMCluster, any scheduler).
    data
        Parquet path(s), glob(s) or directory - read by the workers, so the paths must be
        valid there -, a Dask DataFrame, or an in-memory pandas/polars frame.
    spec
        The model (:func:`~bigmixed.formula.spec_from_lmer` or statsmodels' spelling): one or
        more random-effects terms, nested or crossed, weights and offsets.
    missing, chunk_rows, levels
        As in :func:`~bigmixed.pipeline.build_statistics`; ``chunk_rows`` bounds each
        reading task's memory on top of its partition's statistics.
    mode
        ``"resident"`` (statistics stay on the workers; one term or nested terms),
        ``"gathered"`` (merged into one Statistics on the driver) or ``"auto"`` (gathered if at
        most ``gather_limit`` bytes, and always for crossed terms).
    n_owners
        Owner partitions the outer groups are hashed into (one task per owner and evaluation);
        default the cluster's worker threads at build time.
    shuffle_method
        For ``dask.dataframe.DataFrame.shuffle``; ``"tasks"`` keeps each owner recomputable
        task by task from its lineage.

    Returns
    -------
    DistributedBuild
        The :class:`~bigmixed.pipeline.BuildResult` :class:`~bigmixed.model.MixedLM` and the results use.
    """
    if not isinstance(client, Client):
        raise TypeError(f"client must be a dask.distributed.Client, not {type(client).__name__}; "
                        "e.g. client=Client('tcp://host:8786')")
    if mode not in ("auto", "resident", "gathered"):
        raise ValueError(f"mode must be 'auto', 'resident' or 'gathered', not {mode!r}")
    if missing not in ("drop", "raise"):
        raise ValueError(f"missing must be 'drop' or 'raise', not {missing!r}")
    chunk_rows = int(chunk_rows or DEFAULT_CHUNK_ROWS)
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be a positive number of rows")
    if GROUP_COLUMN in spec.key_columns:
        raise ValueError("with client=, pass groups as a column name of the data, not an array of labels")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    parts, schema, proto, in_memory, partial = _open_input(client, data)
    if not parts:
        raise ValueError("the data has no partitions")
    schema_only = Source([], schema, in_memory=in_memory, partial=partial)
    schema_only.check_columns(list(spec.key_columns))
    design = Design(spec, proto, levels)
    schema_only.check_columns(design.columns)
    if not in_memory and design.categorical and levels is None:  # levels over all rows
        cols = list(design.categorical)
        found: dict[str, set] = {c: set() for c in cols}
        for d in client.gather(client.compute([dask.delayed(_part_levels)(part, cols) for part in parts])):
            for c in cols:
                found[c].update(d[c])
        design = Design(spec, proto, {c: sorted(v, key=lambda v: (str(type(v)), v)) for c, v in found.items()})
    if _stateful(design):
        # scale(x), poly(x, 2), C(round(x)): their state comes from every complete row, as in R and on
        # one machine; the columns of the design come to the driver once (the single-machine path
        # reads them too)
        if not in_memory:
            cols = list(design.columns)
            proto = pl.concat(client.gather(client.compute([dask.delayed(_part_columns)(part, cols)
                                                            for part in parts])), how="diagonal_relaxed")
        design = complete_rows_design(spec, proto, design)
    dtypes = {c: key_dtype(schema[c]) for c in design.key_columns}
    layout, chain = _choose_layout(client, parts, design, dtypes)
    if layout == "crossed" and mode == "resident":
        raise ValueError(_CROSSED_RESIDENT.format(terms=" and ".join(f"'{t.name}'" for t in design.terms)))
    job = _Job(design, schema, dtypes, missing, chunk_rows, _first_scaling(proto, design), layout, chain)
    timings["prepare"] = time.perf_counter() - t0

    # The graph: reduce each partition, pick the canonical transform, shuffle on the keys, sum per owner.
    t1 = time.perf_counter()
    token = uuid.uuid4().hex[:8]
    reduced = [dask.delayed(_reduce_part, pure=True)(part, i, job, dask_key_name=f"bigmixed-reduce-{token}-{i}")
               for i, part in enumerate(parts)]
    totals = [dask.delayed(_totals_of, pure=True)(r, dask_key_name=f"bigmixed-totals-{token}-{i}")
              for i, r in enumerate(reduced)]
    canon = dask.delayed(_canonical, pure=True)(totals, job, dask_key_name=f"bigmixed-canonical-{token}")
    nthreads = client.nthreads()
    k = int(n_owners or max(1, sum(nthreads.values())))
    slots = [w for w, n in sorted(nthreads.items()) for _ in range(n)] or [None]
    owner_graph, check = _owner_graph(reduced, canon, job, k, slots, shuffle_method, token)
    # One submission: each partition is read once.  With nested terms the reduced partitions are
    # held until the nesting check says they need not be combined again as crossed.
    extra = [check, *reduced] if check is not None else []
    futures = client.compute([*owner_graph, canon, *extra])
    owners, rest = futures[:k], futures[k:]
    del futures
    total, scaling = rest[0].result()
    info = client.gather(client.map(_owner_get, owners, what="info", pure=False))
    if job.layout == "nested":
        violations = rest[1].result() + sum(i["violations"] for i in info)
        if violations or total.not_nested:  # not nested across partitions: the crossed handling
            if mode == "resident":
                raise ValueError(_CROSSED_RESIDENT.format(terms=" and ".join(f"'{t.name}'" for t in design.terms))
                                 + " (the terms looked nested within every partition, but are not across them)")
            job = job.crossed()
            del owners, info
            owner_graph, _ = _owner_graph(reduced, canon, job, k, slots, shuffle_method, token + "x")
            owners = client.compute(owner_graph)
            info = client.gather(client.map(_owner_get, owners, what="info", pure=False))
            total.sample = None
        del rest  # the reduced partitions are released (their lineage stays with the owners)
    timings["statistics"] = time.perf_counter() - t1

    if total.n_read == 0:
        raise ValueError("the data has no rows")
    dropped = {c: v for c, v in total.dropped.items() if v}
    if total.N == 0:
        raise ValueError(f"all {total.n_read} rows were dropped for missing or non-finite values "
                         f"(by column: {dropped})")
    if total.n_dropped and warn:
        warnings.warn(f"{total.n_dropped} of {total.n_read} rows dropped for missing or non-finite values "
                      f"(by column: {dropped}); pass missing='raise' to make this an error",
                      DroppedRowsWarning, stacklevel=3)
    n_levels = [sum(i["levels"][t] for i in info) for t in range(job.K)]
    for t, n in zip(design.terms, n_levels):
        if n < 2:
            what = "grouping column" if len(t.factors) == 1 else "grouping factor"
            raise ValueError(f"the {what} '{':'.join(t.factors)}' has {n} level(s) after dropping incomplete rows; "
                             "a mixed model needs at least two levels per grouping factor")
    drop = aliased_columns(total.XtX)  # dropped as lme4 does
    kept = np.setdiff1d(np.arange(job.p), drop)
    aliased = [design.fe_names[j] for j in drop]
    if aliased and warn:
        warnings.warn(f"fixed-effect model matrix is rank deficient so dropping {len(aliased)} "
                      f"column(s): {', '.join(aliased)}", UserWarning, stacklevel=3)
    if total.N <= len(kept):
        raise ValueError(f"{total.N} usable rows for {len(kept)} fixed effects; "
                         "a fit needs more rows than fixed effects")
    nbytes = sum(i["nbytes"] for i in info)
    if mode == "auto":
        mode = "gathered" if (job.layout == "crossed" or nbytes <= gather_limit) else "resident"
    sample = total.sample.subset_fixed(kept) if total.sample is not None else None
    factors = [t.factors for t in design.terms]

    t2 = time.perf_counter()
    if mode == "gathered":
        owned = client.gather(owners)
        del owners
        frames, st = merge_owned([o.keys for o in owned], [o.stats for o in owned], factors, job.pairs,
                                 [o.jkeys for o in owned] if job.layout == "crossed" else None)
        del owned
        layout, chain = job.layout, list(job.chain)
        if layout == "crossed":  # the single-machine order of the terms, now that their levels are known
            chain = _local_chain(n_levels, factors)
            st.pairs = _orient(st.pairs, chain)
        stats = Statistics(st.terms, total.XtX, total.Xty, total.yty, total.N, st.pairs,
                           total.sample if layout != "crossed" else None,
                           job.root if job.root is not None else 0, total.sum_log_w)
        if aliased:
            stats = stats.subset_fixed(kept)
        terms = [replace(t, index=index_from_frame(f, t.factors)) for t, f in zip(design.terms, frames)]
        backend = None
        timings["gather"] = time.perf_counter() - t2
    else:
        if aliased:
            owners = client.map(_owner_apply, owners, method="subset_fixed", arg=kept, pure=False)
        indexes = [DistributedTermIndex(client, owners, e, t.factors, n) for e, (t, n) in
                   enumerate(zip(design.terms, n_levels))]
        terms = [replace(t, index=ix) for t, ix in zip(design.terms, indexes)]
        stats, layout, chain = None, job.layout, list(job.chain)
        backend = DistributedBackend(client, owners, indexes, layout=layout, chain=chain, p=len(kept), qs=job.qs,
                                     XtX=total.XtX[np.ix_(kept, kept)], Xty=total.Xty[kept], yty=total.yty,
                                     N=total.N, sample=sample, sum_log_w=total.sum_log_w, nbytes=nbytes)
    return BuildResult(stats, design, terms, scaling.subset_fixed(kept), total.n_read, total.n_dropped,
                       dropped, aliased, kept, timings, backend=backend, mode=mode, layout=layout, chain=chain)


_CROSSED_RESIDENT = (
    "distributed_mode='resident' needs one random-effects term or nested terms, but {terms} are crossed: their "
    "factor has a dense block coupling the levels of the coarser terms across all outer groups, which cannot be "
    "split into independent owner partitions; use distributed_mode='gathered' (or 'auto'), which builds the "
    "statistics on the workers and fits them on the driver")
