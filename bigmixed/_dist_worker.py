"""Worker-side tasks of :mod:`bigmixed.distributed`: reading, reducing, and per-owner calls.

Everything here runs on Dask workers (or in tests, in-process): it reads one input partition
into partial per-group statistics with the same numba kernels as the single-machine path,
combines partials into an *owner*'s statistics, and answers the driver's per-evaluation calls
with small partial sums only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd
import polars as pl

from . import _kernels
from .data import GroupIndex, Source, group_levels, open_source
from .design import Design
from .pipeline import (
    _missing_exprs,
    _prototype,
    canonical_scaling,
    transform_statistics,
)
from .scaling import same_scaling
from .stats import SampleSums, Scaling, Statistics

_NON_FINITE = "(non-finite after transformation)"


@dataclass(frozen=True)
class _Plan:
    """What every task needs to know (small; pickled into the graph, so lineage holds it)."""

    design: Design
    schema: dict
    key_dtype: Any
    missing: str
    chunk_rows: int
    scaling: Scaling | None = None

    group = property(lambda self: self.design.group_column)
    p = property(lambda self: self.design.p)
    q = property(lambda self: self.design.q)


@dataclass
class _Totals:
    """Global sums and row accounting of one partition (or of all)."""

    XtX: np.ndarray
    Xty: np.ndarray
    ZtZ: np.ndarray  # sum of the groups' A_i: the canonical transform needs Z's moments
    yty: float = 0.0
    N: int = 0
    n_read: int = 0
    n_dropped: int = 0
    dropped: dict = field(default_factory=dict)
    sample: SampleSums | None = None  # global sums over the rows of the hash-sampled groups

    @classmethod
    def zero(cls, plan: _Plan) -> _Totals:
        d = dict.fromkeys([*plan.design.columns, _NON_FINITE], 0)
        return cls(np.zeros((plan.p, plan.p)), np.zeros(plan.p), np.zeros((plan.q, plan.q)), dropped=d,
                   sample=SampleSums.zeros(plan.p))

    def add(self, o: _Totals) -> None:
        self.XtX, self.Xty, self.ZtZ = self.XtX + o.XtX, self.Xty + o.Xty, self.ZtZ + o.ZtZ
        self.sample = self.sample.merge(o.sample)
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
    # Parallelism comes from Dask (one task per partition/owner and worker thread); kernels
    # fanning out to every core from every worker thread would oversubscribe the machine.
    old = numba.get_num_threads()
    numba.set_num_threads(1)  # thread-local in numba
    try:
        yield
    finally:
        numba.set_num_threads(old)


# ---------------------------------------------------------------------------
# worker-side tasks: reading and reducing
# ---------------------------------------------------------------------------


def _inspect_files(data: Any) -> tuple[list[str], dict, pl.DataFrame, dict]:
    """On a worker: expand globs, validate every footer and schema, read the prototype."""
    source = open_source(data)
    return ([str(f) for f in source.files], dict(source.schema), _prototype(source, list(source.schema)),
            source.partial)


def _part_source(part: str | pd.DataFrame | pl.DataFrame) -> Source:
    return open_source([part]) if isinstance(part, str) else open_source(part)


def _part_levels(part: str | pd.DataFrame | pl.DataFrame, columns: list[str]) -> dict[str, list]:
    lf = _part_source(part).lazy()
    return {c: lf.select(pl.col(c).drop_nulls().unique()).collect().to_series().to_list() for c in columns}


def _complete_rows(chunk: pl.DataFrame, label: str, plan: _Plan, tot: _Totals):
    """``(y, X, Z, chunk)`` of the complete rows; the others are counted (or raise) as in pipeline."""
    exprs = _missing_exprs(plan.design.columns, plan.schema)
    tot.n_read += chunk.height
    where = "" if label == "data" else f" in {label}"
    counts = chunk.select([e.sum().alias(c) for c, e in exprs.items()]).row(0)
    if any(counts):
        if plan.missing == "raise":
            bad = ", ".join(repr(c) for c, k in zip(exprs, counts) if k)
            raise ValueError(f"column(s) {bad} hold null/NaN/inf values{where} ({sum(counts)} cells); "
                             "use missing='drop' to leave such rows out")
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
        y, X, Z, chunk = y[ok], X[ok], Z[ok], chunk.filter(pl.Series(ok))
    return y, X, Z, chunk


def _partial_frame(keys: pl.Series, s: Statistics, index: int, plan: _Plan) -> pd.DataFrame:
    """Per-group statistics as a flat frame: key, part, n, v0..v{k-1} (A, B, c flattened)."""
    G, p, q = s.n_groups, plan.p, plan.q
    vals = np.concatenate([s.A.reshape(G, q * q), s.B.reshape(G, q * p), s.c.reshape(G, q)], axis=1)
    # One float block, no copy (going through polars cost a third of the task).
    frame = pd.DataFrame(vals, columns=[f"v{j}" for j in range(vals.shape[1])], copy=False)
    keys = keys.cast(plan.key_dtype)
    frame.insert(0, "key", keys.to_numpy() if keys.dtype.is_numeric() else keys.to_pandas().array)
    frame.insert(1, "part", np.full(G, index, dtype=np.int32))
    frame.insert(2, "n", s.n)
    return frame


def _reduce_part(part: str | pd.DataFrame | pl.DataFrame, index: int,
                 plan: _Plan) -> tuple[pd.DataFrame, _Totals]:
    """One input partition -> partial statistics of its groups, and its global sums."""
    with _single_thread():
        source = _part_source(part)
        groups = GroupIndex.from_source(source, plan.group)  # this partition's keys only
        stats = Statistics.empty(groups.n_groups, plan.p, plan.q, levels=group_levels(groups.keys))
        tot = _Totals.zero(plan)
        for label, chunk in source.batches(plan.design.columns, plan.chunk_rows):
            y, X, Z, chunk = _complete_rows(chunk, f"partition {index}" if label == "data" else label, plan, tot)
            if y.size:
                # the transform is applied inside the kernel, as on a single machine
                stats.add_rows(groups.codes(chunk.get_column(plan.group)), X, Z, y, 1, plan.scaling)
    tot.XtX, tot.Xty, tot.ZtZ, tot.yty, tot.N = stats.XtX, stats.Xty, stats.A.sum(axis=0), stats.yty, stats.N
    tot.sample = stats.sample
    keep = stats.n > 0  # a group whose rows were all dropped is no group of the fit
    return _partial_frame(groups.keys.filter(pl.Series(keep)), stats.subset_groups(keep), index, plan), tot


def _canonical(totals: list[_Totals], plan: _Plan) -> tuple[_Totals, Scaling]:
    """All partitions' sums (in partition order) under the canonical transform, and that transform."""
    total = _Totals.zero(plan)
    for t in totals:
        total.add(t)
    if total.N == 0:  # no moments to take; the driver reports it
        return total, plan.scaling
    glob = Statistics(total.ZtZ[None].copy(), np.zeros((1, plan.q, plan.p)), np.zeros((1, plan.q)),
                      np.zeros(1, dtype=np.int64), total.XtX, total.Xty, total.yty, total.N,
                      np.zeros(1, dtype=np.int8), total.sample)
    canon = canonical_scaling(glob, plan.scaling, len(plan.design.blocks) == 1)
    if not same_scaling(canon, plan.scaling):
        transform_statistics(glob, plan.scaling, canon)
        total.XtX, total.Xty, total.yty, total.ZtZ = glob.XtX, glob.Xty, glob.yty, glob.A[0]
        total.sample = glob.sample
    return total, canon


def _combine(pdf: pd.DataFrame, plan: _Plan, canon: tuple[_Totals, Scaling]) -> _Owner:
    """Sum an owner's partial rows per group in (key, partition) order, so the bits never vary."""
    p, q = plan.p, plan.q
    if len(pdf) == 0:
        return _Owner(pl.Series("key", [], dtype=plan.key_dtype), Statistics.empty(0, p, q))
    df = pl.from_pandas(pdf).with_columns(pl.col("key").cast(plan.key_dtype)).sort(["key", "part"])
    keys = df.get_column("key")
    starts = np.flatnonzero(np.r_[True, keys.ne_missing(keys.shift(1)).to_numpy()[1:]])
    vals = np.ascontiguousarray(df.select([f"v{j}" for j in range(q * q + q * p + q)]).to_numpy())
    summed = np.add.reduceat(vals, starts, axis=0)
    G = starts.size
    owner_keys = keys.gather(starts).rename("key")
    st = Statistics.empty(G, p, q)
    st.levels = group_levels(owner_keys)
    st.A = np.ascontiguousarray(summed[:, : q * q].reshape(G, q, q))
    st.B = np.ascontiguousarray(summed[:, q * q: q * q + q * p].reshape(G, q, p))
    st.c = np.ascontiguousarray(summed[:, q * q + q * p:])
    st.n = np.add.reduceat(df.get_column("n").to_numpy().astype(np.int64), starts)
    if not same_scaling(canon[1], plan.scaling):  # the per-group map build_statistics applies
        transform_statistics(st, plan.scaling, canon[1])
    return _Owner(owner_keys, st)


# ---------------------------------------------------------------------------
# worker-side tasks: one per owner and call
# ---------------------------------------------------------------------------


def _owner_get(o: _Owner, what: str) -> Any:
    return {"keys": lambda: o.keys, "n": lambda: o.stats.n,
            "info": lambda: (o.stats.n_groups, o.stats.nbytes)}[what]()


def _owner_apply(o: _Owner, method: str, arg: np.ndarray) -> _Owner:
    """A new owner from ``Statistics.<method>(arg)`` (subset_fixed, transform_z)."""
    return _Owner(o.keys, getattr(o.stats, method)(arg))


def _sample_task(o: _Owner, level: int) -> tuple:
    """This owner's share of the warm-start subsample (groups of sampling level >= ``level``)."""
    s = o.stats
    keep = s.levels >= level
    return o.keys.filter(pl.Series(keep)), s.A[keep], s.B[keep], s.c[keep], s.n[keep]


def _pass1_task(o: _Owner, lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
    s = o.stats
    with _single_thread():
        ld, SF, Sg, Sh = _kernels.objective_pass1(s.A, s.B, s.c, lam, 1)
    return float(ld.sum()), SF.sum(axis=0), Sg.sum(axis=0), float(Sh.sum())


def _fused_task(o: _Owner, lam: np.ndarray) -> tuple:
    s = o.stats
    with _single_thread():
        return tuple(x.sum(axis=0) for x in _kernels.objective_fused(s.A, s.B, s.c, lam, 1, True))


def _pass2_task(o: _Owner, lam: np.ndarray, beta: np.ndarray, Finv: np.ndarray,
                kappa: float, reml: bool) -> np.ndarray:
    s = o.stats
    with _single_thread():
        return _kernels.objective_pass2(s.A, s.B, s.c, lam, beta, Finv, kappa, reml, 1).sum(axis=0)


def _modes_task(o: _Owner, lam: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = o.stats
    with _single_thread():
        return _kernels.conditional_modes(s.A, s.B, s.c, lam, beta, 1)


def _write_task(o: _Owner, k: int, out_dir: str, lam: np.ndarray, beta: np.ndarray, S: np.ndarray,
                y_scale: float, names: list[str], group: str) -> str:
    """This owner's BLUPs on the user's scale to ``out_dir/part-k.parquet``, via a temp file."""
    b = y_scale * (_modes_task(o, lam, beta)[0] @ S.T)
    frame = pl.DataFrame({group: o.keys, **{n: b[:, j] for j, n in enumerate(names)}})
    path = Path(out_dir) / f"part-{k:05d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:  # a reader, or a re-run after a crash, never sees a half-written file
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


def _remove_stale(out_dir: str, keep: list[str]) -> None:
    """Drop part files of an earlier run with more partitions (they would be read as ours)."""
    keep_set = {os.path.abspath(k) for k in keep}
    for f in Path(out_dir).glob("part-*.parquet"):
        if os.path.abspath(f) not in keep_set:
            f.unlink()


