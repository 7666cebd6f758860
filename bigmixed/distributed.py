"""Fit on a Dask cluster: the per-group statistics are built and kept on the workers.

Only how the statistics are computed and where they live changes (DESIGN.md section 5);
:class:`~bigmixed.objective.Objective`, the optimiser and the results run unchanged.

1. A worker lists and validates the files and reads the prototype (first rows), as the
   single-machine path does; the driver freezes the Design and a first Scaling from it.
2. One task per input partition (a file, or a Dask DataFrame partition) streams its rows
   through ``Design.matrices`` and ``Statistics.add_rows`` (the numba kernel, which also applies
   the row transform) into partial statistics: one row per (group, partition) of a pandas frame.
3. One task adds the partitions' global sums and picks the canonical (rounded) transform
   from them, as ``build_statistics`` does (:func:`~bigmixed.pipeline.canonical_scaling`),
   so both paths solve the same transformed problem and agree to round-off.
4. ``dask.dataframe``'s shuffle routes the partial rows by hash of the key to *owner*
   partitions; one task per owner sums them in (key, partition) order - a recomputation
   gives identical bits - into a Statistics with its groups sorted by key.
5. ``"resident"``: the owners stay on the workers as futures whose lineage the scheduler
   keeps (a lost worker's owners are recomputed from the files).  ``"gathered"``: they are
   merged on the driver in sorted-key order, the single-machine layout.
6. A resident evaluation is a map over the owners returning pass-1 sums (logdet, SF, Sg,
   Sh) and the gradient tensors (fused pass, small p) or, in a second map, the q x q
   gradient; the driver adds them in owner order.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

try:
    import dask
    import dask.dataframe as dd
    from dask.distributed import Client, Future
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "fitting on a Dask cluster needs dask[distributed]; install it with `pip install bigmixed[dask]`"
    ) from exc

from .data import GROUP_COLUMN, GroupIndex, Source, open_source
from .design import Design
from .formula import ModelSpec
from .pipeline import (
    BuildResult,
    DEFAULT_CHUNK_ROWS,
    SCALING_SAMPLE_ROWS,
    DroppedRowsWarning,
    scaling_from_sample,
)
from .objective import LocalBackend, subsample_backend
from .stats import SampleSums, Scaling, Statistics, aliased_columns
from ._dist_worker import (
    _Plan,
    _inspect_files,
    _part_levels,
    _partial_frame,
    _reduce_part,
    _canonical,
    _combine,
    _owner_get,
    _owner_apply,
    _sample_task,
    _pass1_task,
    _fused_task,
    _pass2_task,
    _modes_task,
    _write_task,
    _remove_stale,
)

__all__ = ["GATHER_LIMIT", "DistributedBackend", "DistributedBuild", "DistributedGroups", "build_distributed"]

#: ``mode="auto"`` gathers the statistics to the driver when they take at most this many bytes.
GATHER_LIMIT = 256 * 2**20
_NON_FINITE = "(non-finite after transformation)"


# ---------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------


class DistributedGroups:
    """The groups of resident statistics, like :class:`~bigmixed.data.GroupIndex`.

    ``n_groups`` is known; ``keys`` (sorted), ``to_list()`` and ``codes()`` gather all
    owners' keys on first use: fine for BLUP frames and predictions of moderate size,
    not for 1e8 groups (use ``MixedLMResults.write_random_effects`` there).
    """

    def __init__(self, client: Client, owners: list[Future], sizes: list[int]) -> None:
        self._client, self._owners = client, owners
        self.n_groups = int(sum(sizes))

    @cached_property
    def _sorted(self) -> tuple[pl.Series, np.ndarray]:
        keys = pl.concat(self._client.gather(self._client.map(_owner_get, self._owners, what="keys", pure=False)))
        order = keys.arg_sort().to_numpy()
        return keys.gather(order).rename("key"), order

    @property
    def keys(self) -> pl.Series:
        """All keys, sorted (as the single-machine path codes them)."""
        return self._sorted[0]

    @property
    def order(self) -> np.ndarray:
        """Permutation from owner-concatenated order to sorted-key order."""
        return self._sorted[1]

    @cached_property
    def _index(self) -> GroupIndex:
        return GroupIndex(self.keys)

    def codes(self, values: pl.Series) -> np.ndarray:
        """Positions of ``values`` in :attr:`keys`; -1 for unknown keys."""
        return self._index.codes(values)

    def to_list(self) -> list:
        return self.keys.to_list()


class DistributedBackend:
    """A :class:`~bigmixed.objective.StatsBackend` whose statistics stay on Dask workers.

    Each call maps a task over the owner futures (Dask runs it where the owner lives) and
    adds the results on the driver in owner order.  A task gets Lambda (and beta, F^-1) and
    returns O(p^2 + q^2) numbers (the fused pass: O(q^2 p^2)), whatever the number of groups.
    """

    def __init__(self, client: Client, owners: list[Future], groups: DistributedGroups,
                 p: int, q: int, XtX: np.ndarray, Xty: np.ndarray, yty: float, N: int,
                 sample: SampleSums | None = None) -> None:
        self.client, self.owners, self.groups = client, owners, groups
        self.p, self.q, self.n_groups = int(p), int(q), groups.n_groups
        self.XtX, self.Xty, self.yty, self.N = XtX, Xty, float(yty), int(N)
        self.sample = sample

    def _map(self, fn, *iterables, **kwargs) -> list:
        return self.client.gather(self.client.map(fn, self.owners, *iterables, pure=False, **kwargs))

    def pass1(self, lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
        ld, SF, Sg, Sh = 0.0, np.zeros((self.p, self.p)), np.zeros(self.p), 0.0
        for a, b, c, d in self._map(_pass1_task, lam=np.ascontiguousarray(lam, dtype=float)):
            ld, SF, Sg, Sh = ld + a, SF + b, Sg + c, Sh + d  # owner order: the same sums every time
        return ld, SF, Sg, Sh

    def fused(self, lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
        """Pass-1 sums plus the gradient tensors GA, S: one round trip per evaluation (small p)."""
        parts = self._map(_fused_task, lam=np.ascontiguousarray(lam, dtype=float))
        acc = list(parts[0])
        for part in parts[1:]:  # owner order
            acc = [a + b for a, b in zip(acc, part)]
        ld, SF, Sg, Sh, GA, S = acc
        return float(ld), SF, Sg, float(Sh), GA, S

    def pass2(self, lam: np.ndarray, beta: np.ndarray, Finv: np.ndarray, kappa: float,
              reml: bool) -> np.ndarray:
        out = np.zeros((self.q, self.q))
        for g in self._map(_pass2_task, lam=np.ascontiguousarray(lam, dtype=float),
                           beta=np.ascontiguousarray(beta, dtype=float),
                           Finv=np.ascontiguousarray(Finv, dtype=float), kappa=float(kappa), reml=bool(reml)):
            out += g
        return out

    def conditional_modes(self, lam: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All BLUPs and K_i, gathered (O(G) to the driver) in sorted-key order."""
        parts = self._map(_modes_task, lam=np.ascontiguousarray(lam, dtype=float),
                          beta=np.ascontiguousarray(beta, dtype=float))
        b = np.concatenate([m[0] for m in parts])[self.groups.order]
        K = np.concatenate([m[1] for m in parts])[self.groups.order]
        return np.ascontiguousarray(b), np.ascontiguousarray(K)

    def subsample(self, level: int) -> LocalBackend | None:
        """The warm-start subsample (groups of sampling level >= ``level``), gathered to the driver.

        The same groups, in the same (sorted-key) order and with the same exact sums, as
        the single-machine fit uses (:class:`~bigmixed.stats.SampleSums`), so both take
        the same optimiser path.  About G / 2^level groups: a few % of G.
        """
        if self.sample is None:
            return None
        parts = self._map(_sample_task, level=int(level))
        keys = pl.concat([pt[0] for pt in parts])
        order = keys.arg_sort().to_numpy()
        A, B, c, n = (np.ascontiguousarray(np.concatenate([pt[j] for pt in parts])[order]) for j in range(1, 5))
        sub = Statistics(A, B, c, n, self.XtX, self.Xty, self.yty, self.N)
        return subsample_backend(sub, self.sample, level, None)

    def transform_z(self, M: np.ndarray) -> DistributedBackend:
        """Backend for the random-effects design Z M, transformed on the workers (lineage kept)."""
        owners = self.client.map(_owner_apply, self.owners, method="transform_z", arg=np.asarray(M, float),
                                 pure=False)
        return DistributedBackend(self.client, owners, self.groups, self.p, self.q,
                                  self.XtX, self.Xty, self.yty, self.N, self.sample)

    def group_sizes(self) -> np.ndarray:
        """Rows per group, in sorted-key order."""
        return np.concatenate(self._map(_owner_get, what="n"))[self.groups.order]

    @property
    def nbytes(self) -> int:
        """Bytes of per-group statistics held on the workers."""
        return int(self.n_groups * 8 * (self.q * self.q + self.q * self.p + self.q + 1))

    def write_random_effects(self, out_dir: str | os.PathLike, lam: np.ndarray, beta: np.ndarray,
                             S: np.ndarray, y_scale: float, names: list[str], group: str) -> list[Path]:
        """Each owner's BLUPs written by its worker: ``out_dir/part-00000.parquet``, ...

        ``out_dir`` must be writable by the workers (a shared file system).  Part files of
        an earlier run with more partitions are removed afterwards.
        """
        out = os.path.abspath(os.fspath(out_dir))
        paths = self._map(_write_task, range(len(self.owners)), out_dir=out, lam=np.asarray(lam, float),
                          beta=np.asarray(beta, float), S=np.asarray(S, float), y_scale=float(y_scale),
                          names=list(names), group=group)
        self.client.submit(_remove_stale, out, paths, pure=False).result()
        return [Path(p) for p in paths]


# The distributed build returns the single-machine record, with ``backend`` and ``mode`` set.
DistributedBuild = BuildResult


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


def _first_scaling(proto: pl.DataFrame, plan: _Plan) -> Scaling:
    """The transform the partial sums are taken under: from the prototype's complete rows.

    Only their conditioning depends on it (the fit uses the canonical transform chosen
    from all rows); identity if the first rows hold no complete row.
    """
    sample = proto.head(SCALING_SAMPLE_ROWS)
    y, X, Z = plan.design.matrices(sample)
    ok = (sample.get_column(plan.group).is_not_null().to_numpy() & np.isfinite(y)
          & np.isfinite(X).all(axis=1) & np.isfinite(Z).all(axis=1))
    return scaling_from_sample(X[ok], Z[ok], y[ok], plan.design) if ok.any() else Scaling.identity(plan.p, plan.q)


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
        The model (:func:`~bigmixed.formula.spec_from_lmer` or statsmodels' spelling).
    missing, chunk_rows, levels
        As in :func:`~bigmixed.pipeline.build_statistics`; ``chunk_rows`` bounds each
        reading task's memory on top of its partition's statistics.
    mode
        ``"resident"`` (statistics stay on the workers), ``"gathered"`` (merged into one
        Statistics on the driver) or ``"auto"`` (gathered if at most ``gather_limit`` bytes).
    n_owners
        Owner partitions the groups are hashed into (one task per owner and evaluation); default
        the cluster's worker threads at build time.
    shuffle_method
        For ``dask.dataframe.DataFrame.shuffle``; ``"tasks"`` keeps each owner recomputable
        task by task from its lineage.

    Returns
    -------
    DistributedBuild
        The attributes :class:`~bigmixed.model.MixedLM` and the results use.
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
    if spec.group == GROUP_COLUMN:
        raise ValueError("with client=, pass groups as a column name of the data, not an array of labels")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    parts, schema, proto, in_memory, partial = _open_input(client, data)
    if not parts:
        raise ValueError("the data has no partitions")
    schema_only = Source([], schema, in_memory=in_memory, partial=partial)
    schema_only.check_columns([spec.group])
    design = Design(spec, proto, levels)
    schema_only.check_columns(design.columns)
    if not in_memory and design.categorical and levels is None:  # levels over all rows
        cols = list(design.categorical)
        found: dict[str, set] = {c: set() for c in cols}
        for d in client.gather(client.compute([dask.delayed(_part_levels)(part, cols) for part in parts])):
            for c in cols:
                found[c].update(d[c])
        design = Design(spec, proto, {c: sorted(v, key=lambda v: (str(type(v)), v)) for c, v in found.items()})
    key_dtype = schema[spec.group]
    # one key dtype for every partition (int32 in one file, int64 in another)
    key_dtype = (pl.Int64 if key_dtype.is_integer() else pl.Float64 if key_dtype.is_float()
                 else pl.String if key_dtype == pl.String or isinstance(key_dtype, (pl.Categorical, pl.Enum))
                 else key_dtype)
    plan = _Plan(design, schema, key_dtype, missing, chunk_rows)
    plan = replace(plan, scaling=_first_scaling(proto, plan))
    p, q = plan.p, plan.q
    timings["prepare"] = time.perf_counter() - t0

    # The graph: reduce each partition, pick the canonical transform, shuffle on the key, sum per owner.
    t1 = time.perf_counter()
    token = uuid.uuid4().hex[:8]
    reduced = [dask.delayed(_reduce_part, nout=2, pure=True)(
        part, i, plan, dask_key_name=f"bigmixed-reduce-{token}-{i}") for i, part in enumerate(parts)]
    canon = dask.delayed(_canonical, pure=True)([r[1] for r in reduced], plan,
                                                dask_key_name=f"bigmixed-totals-{token}")
    meta = _partial_frame(pl.Series("key", [], dtype=key_dtype), Statistics.empty(0, p, q), 0, plan)
    partial = dd.from_delayed([r[0] for r in reduced], meta=meta, verify_meta=False)
    nthreads = client.nthreads()
    k = int(n_owners or max(1, sum(nthreads.values())))
    shuffled = partial.shuffle(on="key", npartitions=k, shuffle_method=shuffle_method)
    # Spread the owners over the workers by threads: left alone, the scheduler put both owners on
    # one of 2 workers, and evaluations follow the data.  Loose, so a lost owner goes anywhere.
    slots = [w for w, n in sorted(nthreads.items()) for _ in range(n)] or [None]
    graph = []
    for j, d in enumerate(shuffled.to_delayed()):
        with dask.annotate(workers=[slots[j % len(slots)]], allow_other_workers=True):
            graph.append(dask.delayed(_combine, pure=True)(d, plan, canon,
                                                           dask_key_name=f"bigmixed-owner-{token}-{j}"))
    futures = client.compute([*graph, canon])  # one submission: each partition is read once
    owners = futures[:-1]
    total, scaling = futures.pop().result()
    info = client.gather(client.map(_owner_get, owners, what="info", pure=False))
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
    n_groups = sum(g for g, _ in info)
    if n_groups < 2:
        raise ValueError(f"the grouping column '{spec.group}' has {n_groups} group(s) after dropping "
                         "incomplete rows; a mixed model needs at least two groups")
    drop = aliased_columns(total.XtX)  # dropped as lme4 does
    kept = np.setdiff1d(np.arange(p), drop)
    aliased = [design.fe_names[j] for j in drop]
    if aliased and warn:
        warnings.warn(f"fixed-effect model matrix is rank deficient so dropping {len(aliased)} "
                      f"column(s): {', '.join(aliased)}", UserWarning, stacklevel=3)
    if total.N <= len(kept):
        raise ValueError(f"{total.N} usable rows for {len(kept)} fixed effects; "
                         "a fit needs more rows than fixed effects")
    if mode == "auto":
        mode = "gathered" if sum(b for _, b in info) <= gather_limit else "resident"

    t2 = time.perf_counter()
    if mode == "gathered":
        owned = client.gather(owners)
        del owners, futures
        keys = pl.concat([o.keys for o in owned])
        order = keys.arg_sort().to_numpy()  # sorted-key order, as build_statistics codes groups
        stats = Statistics(*(np.ascontiguousarray(np.concatenate([getattr(o.stats, a) for o in owned])[order])
                             for a in ("A", "B", "c", "n")), total.XtX, total.Xty, total.yty, total.N,
                           np.ascontiguousarray(np.concatenate([o.stats.levels for o in owned])[order]),
                           total.sample)
        stats, backend, groups = stats.subset_fixed(kept) if aliased else stats, None, GroupIndex(keys)
        timings["gather"] = time.perf_counter() - t2
    else:
        if aliased:
            owners = client.map(_owner_apply, owners, method="subset_fixed", arg=kept, pure=False)
        groups = DistributedGroups(client, owners, [g for g, _ in info])
        stats, backend = None, DistributedBackend(client, owners, groups, len(kept), q,
                                                  total.XtX[np.ix_(kept, kept)], total.Xty[kept], total.yty, total.N,
                                                  total.sample.subset_fixed(kept))
    return BuildResult(stats, design, groups, scaling.subset_fixed(kept), total.n_read, total.n_dropped,
                       dropped, aliased, kept, timings, backend=backend, mode=mode)
