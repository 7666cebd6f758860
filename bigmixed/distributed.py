"""Fit on a Dask cluster: the per-group statistics are built and kept on the workers.

Only how the statistics are computed and where they live changes (DESIGN.md
section 5); :class:`~bigmixed.objective.Objective`, the optimiser and
:class:`~bigmixed.results.MixedLMResults` run unchanged on the driver.

Data flow:

1. A worker lists and validates the files and reads the prototype (the first
   rows), exactly as the single-machine path does; the driver freezes the
   :class:`~bigmixed.design.Design` from it.  The :class:`~bigmixed.stats.Scaling`
   is chosen from the first chunk of complete rows (read by a worker) and sent
   with every task, so both paths transform every row identically.
2. One task per input partition (a file, or a partition of a Dask DataFrame)
   streams its rows chunk by chunk through ``Design.matrices``,
   ``Scaling.apply`` and ``Statistics.add_rows`` (the numba kernel) into the
   partial statistics of the groups it saw: a frame with one row per
   (group, partition).
3. ``dask.dataframe`` shuffles those rows on the group key (hash partitioning),
   so each group lands on one *owner* partition; one task per owner sums its
   rows in (key, partition) order - a recomputation gives identical bits -
   into a :class:`~bigmixed.stats.Statistics` with its groups sorted by key.
4. ``"resident"``: the owners stay on the workers as futures whose lineage the
   scheduler keeps, so a lost worker's owners are recomputed from the files.
   ``"gathered"``: they are fetched and merged into one in-process Statistics
   in sorted-key order, exactly the single-machine layout.
5. Resident evaluations are map-reduces: one small task per owner returns
   pass-1 sums (logdet, SF, Sg, Sh) or the q x q pass-2 gradient; the driver
   adds them in owner order.  Nothing per group crosses the network.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numba
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

from . import _kernels
from .data import GROUP_COLUMN, GroupIndex, Source, open_source
from .design import Design
from .formula import ModelSpec
from .pipeline import DEFAULT_CHUNK_ROWS, DroppedRowsWarning, _missing_exprs, _prototype
from .stats import Scaling, Statistics, aliased_columns

__all__ = ["build_distributed", "DistributedBackend", "DistributedBuild", "DistributedGroups", "GATHER_LIMIT"]

#: ``mode="auto"`` gathers the statistics to the driver when they take at most this many bytes.
GATHER_LIMIT = 256 * 2**20
_NON_FINITE = "(non-finite after transformation)"


# ---------------------------------------------------------------------------
# what every task needs to know (small, pickled into the graph)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    design: Design
    schema: dict
    key_dtype: Any
    missing: str
    chunk_rows: int
    scaling: Scaling | None = None

    @property
    def group(self) -> str:
        return self.design.group_column

    @property
    def p(self) -> int:
        return self.design.p

    @property
    def q(self) -> int:
        return self.design.q


@dataclass
class _Totals:
    """Global sums and row accounting of one partition (added up on the driver)."""

    XtX: np.ndarray
    Xty: np.ndarray
    yty: float = 0.0
    N: int = 0
    n_read: int = 0
    n_dropped: int = 0
    dropped: dict = field(default_factory=dict)

    @classmethod
    def zero(cls, plan: _Plan) -> "_Totals":
        d = dict.fromkeys(plan.design.columns, 0)
        d[_NON_FINITE] = 0
        return cls(np.zeros((plan.p, plan.p)), np.zeros(plan.p), dropped=d)

    def add(self, o: "_Totals") -> None:
        self.XtX = self.XtX + o.XtX
        self.Xty = self.Xty + o.Xty
        self.yty += o.yty
        self.N += o.N
        self.n_read += o.n_read
        self.n_dropped += o.n_dropped
        for k, v in o.dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + v


@dataclass
class _Owner:
    """One owner partition: its groups' keys (sorted) and their statistics."""

    keys: pl.Series
    stats: Statistics


@contextmanager
def _single_thread() -> Iterator[None]:
    # Parallelism comes from Dask (one task per partition/owner and worker
    # thread); a kernel fanning out to every core from every worker thread
    # would oversubscribe the machine.  numba's setting is thread-local.
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(old)


def _canonical_key_dtype(dt: Any) -> Any:
    """One key dtype for all partitions (files may store int32 here and int64 there)."""
    if dt.is_integer():
        return pl.Int64
    if dt.is_float():
        return pl.Float64
    if dt == pl.String or isinstance(dt, (pl.Categorical, pl.Enum)):
        return pl.String
    return dt


# ---------------------------------------------------------------------------
# worker-side tasks: reading and reducing
# ---------------------------------------------------------------------------


def _inspect_files(data: Any) -> tuple[list[str], dict, pl.DataFrame]:
    """On a worker: expand globs, validate every footer and schema, read the prototype."""
    source = open_source(data)
    return [str(f) for f in source.files], dict(source.schema), _prototype(source, list(source.schema))


def _part_source(part: str | pd.DataFrame | pl.DataFrame) -> Source:
    return open_source([part]) if isinstance(part, str) else open_source(part)


def _complete_rows(chunk: pl.DataFrame, label: str, plan: _Plan, tot: _Totals):
    """``(y, X, Z, chunk)`` of the complete rows; counts (or raises on) the others as pipeline does."""
    exprs = _missing_exprs(plan.design.columns, plan.schema)
    tot.n_read += chunk.height
    where = "" if label == "data" else f" in {label}"
    counts = chunk.select([e.sum().alias(c) for c, e in exprs.items()]).row(0)
    if any(counts):
        if plan.missing == "raise":
            bad = [c for c, k in zip(exprs, counts) if k]
            raise ValueError(
                f"column(s) {', '.join(repr(b) for b in bad)} hold null/NaN/inf values{where} "
                f"({sum(counts)} cells); use missing='drop' to leave such rows out"
            )
        for c, k in zip(exprs, counts):
            tot.dropped[c] += int(k)
        before = chunk.height
        chunk = chunk.filter(~pl.any_horizontal(list(exprs.values())))
        tot.n_dropped += before - chunk.height
    y, X, Z = plan.design.matrices(chunk)
    ok = np.isfinite(y) & np.isfinite(X).all(axis=1) & np.isfinite(Z).all(axis=1)
    if not ok.all():
        k = int((~ok).sum())
        if plan.missing == "raise":
            raise ValueError(f"{k} row(s) give non-finite values after the formula's transformations"
                             f"{where}; use missing='drop' to leave them out")
        tot.dropped[_NON_FINITE] += k
        tot.n_dropped += k
        y, X, Z = y[ok], X[ok], Z[ok]
        chunk = chunk.filter(pl.Series(ok))
    return y, X, Z, chunk


def _sample_scaling(parts: list, plan: _Plan) -> Scaling | None:
    """The transform the single-machine path picks: from the first chunk holding complete rows."""
    if parts and isinstance(parts[0], str):
        source = open_source(parts)  # the files in order, as build_statistics reads them
    else:
        source = _part_source(parts[0])
    plan = replace(plan, missing="drop")
    for label, chunk in source.batches(plan.design.columns, plan.chunk_rows):
        if chunk.height == 0:
            continue
        y, X, Z, _ = _complete_rows(chunk, label, plan, _Totals.zero(plan))
        if y.size:
            return Scaling.from_sample(X, Z, y, z_may_centre=len(plan.design.blocks) == 1)
    return None


def _part_levels(part: str | pd.DataFrame, columns: list[str]) -> dict[str, list]:
    lf = _part_source(part).lazy()
    return {c: lf.select(pl.col(c).drop_nulls().unique()).collect().to_series().to_list() for c in columns}


def _partial_frame(keys: pl.Series, s: Statistics, index: int, plan: _Plan) -> pd.DataFrame:
    """Per-group statistics as a flat frame, one row per group: key, part, n, v0..v{k-1}."""
    G = s.n_groups
    p, q = plan.p, plan.q
    vals = np.concatenate([s.A.reshape(G, q * q), s.B.reshape(G, q * p), s.c.reshape(G, q)], axis=1)
    cols: dict[str, Any] = {"key": keys.cast(plan.key_dtype).rename("key"),
                            "part": np.full(G, index, dtype=np.int32), "n": s.n}
    cols.update({f"v{j}": vals[:, j] for j in range(vals.shape[1])})
    return pl.DataFrame(cols).to_pandas()


def _reduce_part(part: str | pd.DataFrame, index: int, plan: _Plan) -> tuple[pd.DataFrame, _Totals]:
    """One input partition -> partial statistics of its groups (and its global sums)."""
    with _single_thread():
        source = _part_source(part)
        groups = GroupIndex.from_source(source, plan.group)
        stats = Statistics.empty(groups.n_groups, plan.p, plan.q)
        tot = _Totals.zero(plan)
        for label, chunk in source.batches(plan.design.columns, plan.chunk_rows):
            if label == "data":
                label = f"partition {index}"
            y, X, Z, chunk = _complete_rows(chunk, label, plan, tot)
            if y.size == 0:
                continue
            codes = groups.codes(chunk.get_column(plan.group))
            plan.scaling.apply(X, Z, y)
            stats.add_rows(codes, X, Z, y, 1)
    tot.XtX, tot.Xty, tot.yty, tot.N = stats.XtX, stats.Xty, float(stats.yty), int(stats.N)
    keep = stats.n > 0  # a group whose rows were all dropped is no group of the fit
    frame = _partial_frame(groups.keys.filter(pl.Series(keep)), stats.subset_groups(keep), index, plan)
    return frame, tot


def _combine(pdf: pd.DataFrame, plan: _Plan) -> _Owner:
    """Sum an owner's partial rows per group, in (key, partition) order so the bits never vary."""
    p, q = plan.p, plan.q
    if len(pdf) == 0:
        return _Owner(pl.Series("key", [], dtype=plan.key_dtype), Statistics.empty(0, p, q))
    df = pl.from_pandas(pdf).with_columns(pl.col("key").cast(plan.key_dtype)).sort(["key", "part"])
    keys = df.get_column("key")
    starts = np.flatnonzero(np.r_[True, keys.ne_missing(keys.shift(1)).to_numpy()[1:]])
    vals = np.ascontiguousarray(df.select([f"v{j}" for j in range(q * q + q * p + q)]).to_numpy())
    summed = np.add.reduceat(vals, starts, axis=0)
    G = starts.size
    st = Statistics.empty(G, p, q)
    st.A = np.ascontiguousarray(summed[:, : q * q].reshape(G, q, q))
    st.B = np.ascontiguousarray(summed[:, q * q: q * q + q * p].reshape(G, q, p))
    st.c = np.ascontiguousarray(summed[:, q * q + q * p:])
    st.n = np.add.reduceat(df.get_column("n").to_numpy().astype(np.int64), starts)
    return _Owner(keys.gather(starts).rename("key"), st)


# ---------------------------------------------------------------------------
# worker-side tasks: one per owner and evaluation
# ---------------------------------------------------------------------------


def _owner_info(o: _Owner) -> tuple[int, int]:
    return o.stats.n_groups, o.stats.nbytes


def _owner_keys(o: _Owner) -> pl.Series:
    return o.keys


def _owner_sizes(o: _Owner) -> np.ndarray:
    return o.stats.n


def _owner_subset_fixed(o: _Owner, kept: np.ndarray) -> _Owner:
    return _Owner(o.keys, o.stats.subset_fixed(kept))


def _owner_transform_z(o: _Owner, M: np.ndarray) -> _Owner:
    return _Owner(o.keys, o.stats.transform_z(M))


def _pass1_task(o: _Owner, lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
    s = o.stats
    with _single_thread():
        ld, SF, Sg, Sh = _kernels.objective_pass1(s.A, s.B, s.c, lam, 1)
    return float(ld.sum()), SF.sum(axis=0), Sg.sum(axis=0), float(Sh.sum())


def _pass2_task(o: _Owner, lam: np.ndarray, beta: np.ndarray, Finv: np.ndarray,
                kappa: float, reml: bool) -> np.ndarray:
    s = o.stats
    with _single_thread():
        out = _kernels.objective_pass2(s.A, s.B, s.c, lam, beta, Finv, kappa, reml, 1)
    return out.sum(axis=0)


def _modes_task(o: _Owner, lam: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = o.stats
    with _single_thread():
        return _kernels.conditional_modes(s.A, s.B, s.c, lam, beta, 1)


def _write_task(o: _Owner, k: int, out_dir: str, lam: np.ndarray, beta: np.ndarray, S: np.ndarray,
                y_scale: float, names: list[str], group: str) -> str:
    """This owner's BLUPs on the user's scale, to ``out_dir/part-k.parquet`` (temp file + rename)."""
    bt, _ = _modes_task(o, lam, beta)
    b = y_scale * (bt @ S.T)
    frame = pl.DataFrame({group: o.keys, **{n: b[:, j] for j, n in enumerate(names)}})
    return _atomic_write(frame, Path(out_dir) / f"part-{k:05d}.parquet")


def _atomic_write(frame: pl.DataFrame, path: Path) -> str:
    # A reader (or a re-run after a crash) never sees a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(path)


def _remove_stale(out_dir: str, keep: list[str]) -> None:
    """Drop part files of an earlier run with more partitions (they would be read as ours)."""
    keep_set = {os.path.abspath(k) for k in keep}
    for f in Path(out_dir).glob("part-*.parquet"):
        if os.path.abspath(f) not in keep_set:
            f.unlink()


# ---------------------------------------------------------------------------
# driver side: the statistics' home, as the objective sees it
# ---------------------------------------------------------------------------


class DistributedGroups:
    """The groups of resident statistics: count known, keys fetched only when asked for.

    Mirrors :class:`~bigmixed.data.GroupIndex` (``n_groups``, ``keys`` sorted,
    ``to_list()``, ``codes()``); the keys of all owners are gathered on first
    use, which is fine for predictions and BLUP frames of moderate size but not
    for 1e8 groups (use :meth:`MixedLMResults.write_random_effects` there).
    """

    def __init__(self, client: Client, owners: list[Future], sizes: list[int]) -> None:
        self._client = client
        self._owners = owners
        self.sizes = [int(s) for s in sizes]
        self.n_groups = int(sum(self.sizes))

    @cached_property
    def _sorted(self) -> tuple[pl.Series, np.ndarray]:
        keys = pl.concat(self._client.gather(self._client.map(_owner_keys, self._owners, pure=False)))
        order = keys.arg_sort().to_numpy()
        return keys.gather(order).rename("key"), order

    @property
    def keys(self) -> pl.Series:
        """All keys, sorted (as the single-machine path codes them)."""
        return self._sorted[0]

    @property
    def order(self) -> np.ndarray:
        """Permutation taking owner-concatenated order to sorted-key order."""
        return self._sorted[1]

    @cached_property
    def _index(self) -> GroupIndex:
        return GroupIndex(self.keys)

    def codes(self, values: pl.Series) -> np.ndarray:
        """Codes (positions in :attr:`keys`) of ``values``; -1 for unknown keys."""
        return self._index.codes(values)

    def to_list(self) -> list:
        return self.keys.to_list()


class DistributedBackend:
    """A :class:`~bigmixed.objective.StatsBackend` whose statistics stay on Dask workers.

    Each call is a map over the owner futures followed by a sum on the driver
    in owner order; the tasks run where the owners live and return O(p^2 + q^2)
    numbers, so an evaluation moves the same few kilobytes whatever the number
    of groups.
    """

    def __init__(self, client: Client, owners: list[Future], groups: DistributedGroups,
                 p: int, q: int, XtX: np.ndarray, Xty: np.ndarray, yty: float, N: int) -> None:
        self.client = client
        self.owners = owners
        self.groups = groups
        self.p, self.q, self.n_groups = int(p), int(q), groups.n_groups
        self.XtX, self.Xty, self.yty, self.N = XtX, Xty, float(yty), int(N)
        self.n_calls = 0

    def _map(self, fn, *iterables, **kwargs) -> list:
        self.n_calls += 1
        futs = self.client.map(fn, self.owners, *iterables, pure=False, **kwargs)
        return self.client.gather(futs)

    def pass1(self, lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
        parts = self._map(_pass1_task, lam=np.ascontiguousarray(lam, dtype=float))
        ld, Sh = 0.0, 0.0
        SF, Sg = np.zeros((self.p, self.p)), np.zeros(self.p)
        for a, b, c, d in parts:  # owner order: the same sum every time
            ld += a
            SF += b
            Sg += c
            Sh += d
        return ld, SF, Sg, Sh

    def pass2(self, lam: np.ndarray, beta: np.ndarray, Finv: np.ndarray, kappa: float,
              reml: bool) -> np.ndarray:
        parts = self._map(_pass2_task, lam=np.ascontiguousarray(lam, dtype=float),
                          beta=np.ascontiguousarray(beta, dtype=float),
                          Finv=np.ascontiguousarray(Finv, dtype=float), kappa=float(kappa), reml=bool(reml))
        out = np.zeros((self.q, self.q))
        for g in parts:
            out += g
        return out

    def conditional_modes(self, lam: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All BLUPs and K_i, gathered and put in sorted-key order (O(G) to the driver)."""
        parts = self._map(_modes_task, lam=np.ascontiguousarray(lam, dtype=float),
                          beta=np.ascontiguousarray(beta, dtype=float))
        order = self.groups.order
        b = np.concatenate([m[0] for m in parts]) if parts else np.zeros((0, self.q))
        K = np.concatenate([m[1] for m in parts]) if parts else np.zeros((0, self.q, self.q))
        return np.ascontiguousarray(b[order]), np.ascontiguousarray(K[order])

    def transform_z(self, M: np.ndarray) -> "DistributedBackend":
        """Backend for the random-effects design Z M; transformed on the workers."""
        owners = self.client.map(_owner_transform_z, self.owners, M=np.asarray(M, float), pure=False)
        return DistributedBackend(self.client, owners, self.groups, self.p, self.q,
                                  self.XtX, self.Xty, self.yty, self.N)

    def group_sizes(self) -> np.ndarray:
        """Rows per group, in sorted-key order."""
        n = self.client.gather(self.client.map(_owner_sizes, self.owners, pure=False))
        return np.concatenate(n)[self.groups.order] if n else np.zeros(0, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes of per-group statistics held on the workers."""
        return int(self.n_groups * 8 * (self.q * self.q + self.q * self.p + self.q + 1))

    def write_random_effects(self, out_dir: str | os.PathLike, lam: np.ndarray, beta: np.ndarray,
                             S: np.ndarray, y_scale: float, names: list[str], group: str) -> list[Path]:
        """Each worker writes its owners' BLUPs: ``out_dir/part-00000.parquet``, one per owner.

        ``out_dir`` must be on a file system the workers can write to.  Files
        of an earlier run with more partitions are removed afterwards.
        """
        out = os.path.abspath(os.fspath(out_dir))
        futs = self.client.map(_write_task, self.owners, range(len(self.owners)), out_dir=out,
                               lam=np.asarray(lam, float), beta=np.asarray(beta, float), S=np.asarray(S, float),
                               y_scale=float(y_scale), names=list(names), group=group, pure=False)
        paths = self.client.gather(futs)
        self.client.submit(_remove_stale, out, paths, pure=False).result()
        return [Path(p) for p in paths]


@dataclass
class DistributedBuild:
    """What :func:`build_distributed` returns: the attributes of :class:`~bigmixed.pipeline.BuildResult`.

    ``stats`` is the merged :class:`~bigmixed.stats.Statistics` in ``"gathered"``
    mode (``backend`` is then None and the fit uses a LocalBackend), None in
    ``"resident"`` mode (``backend`` is the :class:`DistributedBackend`).
    """

    stats: Statistics | None
    backend: DistributedBackend | None
    design: Design
    groups: GroupIndex | DistributedGroups
    scaling: Scaling
    n_rows_read: int
    n_dropped: int
    dropped_by_column: dict[str, int]
    aliased: list[str]
    kept_fe: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    mode: str = "resident"


# ---------------------------------------------------------------------------
# the build
# ---------------------------------------------------------------------------


def _open_input(client: Client, data: Any) -> tuple[list, dict, pl.DataFrame, bool]:
    """Partitions (file paths or delayed pandas frames), schema, prototype, in-memory flag."""
    if isinstance(data, dd.DataFrame):
        schema = dict(pl.from_pandas(data._meta).schema)
        head = client.compute(data.partitions[0].head(50_000, compute=False)).result()
        return list(data.to_delayed()), schema, pl.from_pandas(head), False
    if isinstance(data, (pd.DataFrame, pl.DataFrame, pl.LazyFrame)):
        frame = data.collect() if isinstance(data, pl.LazyFrame) else open_source(data).frame
        nparts = max(1, min(sum(client.nthreads().values()), frame.height // 10_000 or 1))
        # The graph holds the rows (lineage intact); fine for frames that fit in the driver anyway.
        parts = [dask.delayed(frame.slice(lo, hi - lo)) for lo, hi in _bounds(frame.height, nparts)]
        return parts, dict(frame.schema), frame, True
    files, schema, proto = client.submit(_inspect_files, data, pure=False).result()
    return files, schema, proto, False


def _bounds(n: int, k: int) -> list[tuple[int, int]]:
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def _choose_scaling(client: Client, parts: list, proto: pl.DataFrame, plan: _Plan,
                    in_memory: bool) -> Scaling | None:
    if in_memory:  # the prototype is the whole frame: its first chunk, as build_statistics takes it
        return _sample_scaling([proto], plan)
    if parts and isinstance(parts[0], str):
        return client.submit(_sample_scaling, parts, plan, pure=False).result()
    for part in parts:  # partitions of a Dask DataFrame, until one has complete rows
        sc = client.compute(dask.delayed(_sample_scaling)([part], plan)).result()
        if sc is not None:
            return sc
    return None


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
        Parquet path(s), glob(s) or directory (read by the workers, so the paths
        must be valid there), a Dask DataFrame, or an in-memory pandas/polars frame.
    spec
        The model (from :func:`~bigmixed.formula.spec_from_lmer` or statsmodels' spelling).
    missing, chunk_rows, levels
        As in :func:`~bigmixed.pipeline.build_statistics`; ``chunk_rows`` bounds
        each task's memory on top of its partition's statistics.
    mode
        ``"resident"`` (statistics stay on the workers), ``"gathered"``
        (merged into one Statistics on the driver) or ``"auto"`` (gathered
        when they take at most ``gather_limit`` bytes).
    n_owners
        Number of owner partitions the groups are hashed into; default the
        cluster's total worker threads (each evaluation runs one task per owner).
    shuffle_method
        Passed to ``dask.dataframe.DataFrame.shuffle``; the default ``"tasks"``
        keeps every owner recomputable task by task from its lineage.

    Returns
    -------
    DistributedBuild
        With the attributes :class:`~bigmixed.model.MixedLM` and the results use.
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

    parts, schema, proto, in_memory = _open_input(client, data)
    if not parts:
        raise ValueError("the data has no partitions")
    source_like = Source([], schema, in_memory=in_memory)
    source_like.check_columns([spec.group])
    design = Design(spec, proto, levels)
    source_like.check_columns(design.columns)
    if not in_memory and design.categorical and levels is None:
        cols = list(design.categorical)
        found: dict[str, set] = {c: set() for c in cols}
        for d in client.gather(client.map(_part_levels, parts, cols=cols, pure=False)
                               if isinstance(parts[0], str) else
                               client.compute([dask.delayed(_part_levels)(p, cols) for p in parts])):
            for c in cols:
                found[c].update(d[c])
        design = Design(spec, proto, {c: sorted(v, key=lambda v: (str(type(v)), v)) for c, v in found.items()})
    plan = _Plan(design, schema, _canonical_key_dtype(schema[spec.group]), missing, chunk_rows)
    p, q = plan.p, plan.q
    scaling = _choose_scaling(client, parts, proto, plan, in_memory) or Scaling.identity(p, q)
    plan = replace(plan, scaling=scaling)
    timings["prepare"] = time.perf_counter() - t0

    # The graph: reduce each partition, shuffle the partial rows on the key, sum per owner.
    t1 = time.perf_counter()
    token = uuid.uuid4().hex[:8]
    reduced = [dask.delayed(_reduce_part, nout=2, pure=True)(part, i, plan,
                                                             dask_key_name=f"bigmixed-reduce-{token}-{i}")
               for i, part in enumerate(parts)]
    meta = _partial_frame(pl.Series("key", [], dtype=plan.key_dtype), Statistics.empty(0, p, q), 0, plan)
    partial = dd.from_delayed([r[0] for r in reduced], meta=meta, verify_meta=False)
    nthreads = client.nthreads()
    k = int(n_owners or max(1, sum(nthreads.values())))
    shuffled = partial.shuffle(on="key", npartitions=k, shuffle_method=shuffle_method)
    # Spread the owners over the workers in proportion to their threads: the
    # scheduler would otherwise put them where the last shuffle inputs happen
    # to be (all on one worker, seen with 2), and evaluations follow the data.
    # The hint is loose, so a lost owner is recomputed on any worker.
    slots = [w for w, n in sorted(nthreads.items()) for _ in range(n)] or [None]
    owner_graph = []
    for j, d in enumerate(shuffled.to_delayed()):
        with dask.annotate(workers=[slots[j % len(slots)]], allow_other_workers=True):
            owner_graph.append(dask.delayed(_combine, pure=True)(d, plan,
                                                                dask_key_name=f"bigmixed-owner-{token}-{j}"))
    # One submission, so each partition is read once for both the owners and the totals.
    futures = client.compute(owner_graph + [r[1] for r in reduced])
    owners, total_futs = futures[: len(owner_graph)], futures[len(owner_graph):]
    total = _Totals.zero(plan)
    for t in client.gather(total_futs):  # partition order: deterministic sums
        total.add(t)
    del total_futs
    info = client.gather(client.map(_owner_info, owners, pure=False))
    timings["statistics"] = time.perf_counter() - t1

    if total.n_read == 0:
        raise ValueError("the data has no rows")
    dropped = {c: v for c, v in total.dropped.items() if v}
    if total.N == 0:
        raise ValueError(f"all {total.n_read} rows were dropped for missing or non-finite values "
                         f"(by column: {dropped})")
    if total.n_dropped and warn:
        warnings.warn(
            f"{total.n_dropped} of {total.n_read} rows dropped for missing or non-finite values "
            f"(by column: {dropped}); pass missing='raise' to make this an error",
            DroppedRowsWarning, stacklevel=3,
        )
    n_groups = sum(g for g, _ in info)
    if n_groups < 2:
        raise ValueError(
            f"the grouping column '{spec.group}' has {n_groups} group(s) after dropping "
            "incomplete rows; a mixed model needs at least two groups"
        )
    drop = aliased_columns(total.XtX)
    kept = np.setdiff1d(np.arange(p), drop)
    aliased = [design.fe_names[j] for j in drop]
    if aliased and warn:
        warnings.warn(f"fixed-effect model matrix is rank deficient so dropping {len(aliased)} "
                      f"column(s): {', '.join(aliased)}", UserWarning, stacklevel=3)
    if total.N <= len(kept):
        raise ValueError(f"{total.N} usable rows for {len(kept)} fixed effects; "
                         "a fit needs more rows than fixed effects")
    XtX, Xty = total.XtX[np.ix_(kept, kept)], total.Xty[kept]
    nbytes = sum(b for _, b in info)
    if mode == "auto":
        mode = "gathered" if nbytes <= gather_limit else "resident"

    t2 = time.perf_counter()
    if mode == "gathered":
        owned = client.gather(owners)
        del owners
        keys = pl.concat([o.keys for o in owned])
        order = keys.arg_sort().to_numpy()
        stats = Statistics(
            *(np.ascontiguousarray(np.concatenate([getattr(o.stats, a) for o in owned])[order])
              for a in ("A", "B", "c", "n")),
            total.XtX, total.Xty, total.yty, total.N,
        )
        if aliased:
            stats = stats.subset_fixed(kept)
        build = DistributedBuild(stats, None, design, GroupIndex(keys), scaling.subset_fixed(kept),
                                 total.n_read, total.n_dropped, dropped, aliased, kept, timings, mode)
    else:
        if aliased:
            owners = client.map(_owner_subset_fixed, owners, kept=kept, pure=False)
        groups = DistributedGroups(client, owners, [g for g, _ in info])
        backend = DistributedBackend(client, owners, groups, len(kept), q, XtX, Xty, total.yty, total.N)
        build = DistributedBuild(None, backend, design, groups, scaling.subset_fixed(kept),
                                 total.n_read, total.n_dropped, dropped, aliased, kept, timings, mode)
    timings["gather" if mode == "gathered" else "persist"] = time.perf_counter() - t2
    return build
