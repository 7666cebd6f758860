"""Worker-side tasks of :mod:`bigmixed.distributed`: reading, reducing, combining, per-owner calls.

Everything here runs on Dask workers (or, in tests, in-process).  A partition is reduced by
the single-machine :class:`~bigmixed.reduce.Reducer` (the same kernels, weights, offsets,
dropped-row accounting, nested pair blocks or crossed pair lists) with that partition's own
level indexes; its statistics leave the task as flat frames keyed by key *values* (one row per
level, or per pair of levels, and partition), which are shuffled to owners and summed there in
(key, partition) order, so every recomputation gives the same bits.  An owner answers the
driver's per-evaluation calls with the single-machine backends (:class:`LocalBackend`,
:class:`NestedBackend`) on its complete outer groups, returning small sums only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd
import polars as pl

from .backends import LocalBackend, NestedBackend
from .data import Source, open_source
from .design import Design
from .keys import _GOLDEN, GroupIndex, TermIndex, _hash_keys, frame_levels, group_levels
from .pipeline import Plan, _check_finite, _prototype
from .reduce import NotNested, Reducer
from .scaling import Scaling, canonical_scaling, same_scaling, transform_statistics, z_may_centre
from .start import term_moments
from .stats import PairStats, SampleSums, Statistics, TermStats

PART, NROUTE, CROUTE, COUNT = "__part", "__nroute", "__croute", "__n"


# ---------------------------------------------------------------------------
# what every task knows
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """The model and the layout every task works to (small; pickled into the graph, so lineage holds it).

    ``layout`` is ``"single"``, ``"nested"`` (``chain`` finest to coarsest, the outer term
    ``chain[-1]``) or ``"crossed"``; ``key_dtypes`` one dtype per key column for every partition.
    """

    design: Design
    schema: dict
    key_dtypes: dict
    missing: str
    chunk_rows: int
    scaling: Scaling
    layout: str
    chain: tuple

    @property
    def K(self) -> int:
        return len(self.design.terms)

    @property
    def p(self) -> int:
        return self.design.p

    @property
    def qs(self) -> list[int]:
        return [t.q for t in self.design.terms]

    @property
    def root(self) -> int | None:
        """The outer term (whose levels are the owners' and the warm start's units), None if crossed."""
        return None if self.layout == "crossed" else self.chain[-1]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The pairs of terms (k, j) the Reducer keeps, in its order (k finer than j in the chain)."""
        ch = self.chain
        if self.layout == "single":
            return []
        return [(ch[a], ch[b]) for a in range(len(ch)) for b in range(a + 1, len(ch))]

    def factors(self, k: int) -> tuple[str, ...]:
        return self.design.terms[k].factors

    def crossed(self) -> "_Job":
        return replace(self, layout="crossed")


def key_dtype(dt: Any) -> Any:
    """One dtype per key column whatever the file (int32 in one file, int64 in another)."""
    if dt == pl.UInt64:
        return dt
    if dt.is_integer():
        return pl.Int64
    if dt.is_float():
        return pl.Float64
    if dt == pl.String or dt == pl.Categorical or isinstance(dt, (pl.Categorical, pl.Enum)):
        return pl.String
    return dt


def _cast_keys(frame: pl.DataFrame, dtypes: dict, prefix: str = "") -> pl.DataFrame:
    return frame.with_columns([pl.col(c).cast(dtypes[c[len(prefix):]]) for c in frame.columns])


def route(frame: pl.DataFrame) -> np.ndarray:
    """A 64-bit hash of each row's key values (int64): the same for the same key in every partition."""
    h = np.zeros(frame.height, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in frame.columns:
            h = (h ^ _hash_keys(frame.get_column(col), 0)) * _GOLDEN
    return h.view(np.int64)


@dataclass
class _Totals:
    """Global sums and row accounting of one partition (or of all)."""

    XtX: np.ndarray
    Xty: np.ndarray
    ZtZ: list  # per term, the sum of its levels' A (the canonical transform needs Z's moments)
    yty: float = 0.0
    N: int = 0
    n_read: int = 0
    n_dropped: int = 0
    dropped: dict = field(default_factory=dict)
    sample: SampleSums | None = None  # global sums over the rows of the hash-sampled outer levels
    sum_log_w: float = 0.0
    not_nested: bool = False  # this partition had to be reduced as crossed

    @classmethod
    def zero(cls, job: _Job) -> "_Totals":
        return cls(np.zeros((job.p, job.p)), np.zeros(job.p), [np.zeros((q, q)) for q in job.qs],
                   sample=SampleSums.zeros(job.p) if job.root is not None else None)

    def add(self, o: "_Totals") -> None:
        self.XtX, self.Xty = self.XtX + o.XtX, self.Xty + o.Xty
        self.ZtZ = [a + b for a, b in zip(self.ZtZ, o.ZtZ)]
        self.sample = self.sample.merge(o.sample) if (self.sample is not None and o.sample is not None) else None
        self.yty += o.yty
        self.N += o.N
        self.n_read += o.n_read
        self.n_dropped += o.n_dropped
        self.sum_log_w += o.sum_log_w
        self.not_nested |= o.not_nested
        for k, v in o.dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + v

    def globals_stats(self, job: _Job) -> Statistics:
        """A Statistics with one pseudo-level per term (its sum of A): what the canonical transform reads."""
        terms = [TermStats(Z[None].copy(), np.zeros((1, q, job.p)), np.zeros((1, q)), np.zeros(1, dtype=np.int64))
                 for Z, q in zip(self.ZtZ, job.qs)]
        return Statistics(terms, self.XtX, self.Xty, self.yty, self.N, [], self.sample, 0, self.sum_log_w)


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
# worker-side tasks: inspecting and reading
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


def _part_columns(part: str | pd.DataFrame | pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    return _part_source(part).lazy().select(columns).collect()


def _nesting_part(part, factors: list[tuple[str, ...]], dtypes: dict) -> tuple[list[int], np.ndarray]:
    """This partition's levels per term, and ``inside[a, b]``: every level of term a has one level of b here.

    Over the rows with every key present (the rows the fit can use are among them), so a
    partition that passes is reduced as nested without conflicts.
    """
    source = _part_source(part)
    cols = list(dict.fromkeys(c for f in factors for c in f))
    keep = [pl.col(c).is_not_null() for c in cols] + [pl.col(c).is_finite() for c in cols if dtypes[c].is_float()]
    exprs = [pl.col(c).cast(pl.String) if source.schema[c] == pl.Categorical
             or isinstance(source.schema[c], pl.Enum) else pl.col(c) for c in cols]
    try:
        combos = source.lazy().select(exprs).filter(pl.all_horizontal(keep)).unique().collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        raise ValueError(f"cannot read the grouping columns {cols} of {source.parts[0][0]}: "
                         f"{str(exc).splitlines()[0]}") from None
    counts = [combos.select(list(f)).unique().height for f in factors]
    K = len(factors)
    inside = np.ones((K, K), dtype=bool)
    for a in range(K):
        for b in range(K):
            if a != b:
                both = list(dict.fromkeys(factors[a] + factors[b]))
                inside[a, b] = combos.select(both).unique().height == counts[a]
    return counts, inside


def _reduce_part(part: str | pd.DataFrame | pl.DataFrame, index: int, job: _Job) -> tuple[dict, _Totals]:
    """One input partition -> its statistics as flat frames keyed by key values, and its global sums."""
    with _single_thread():
        source = _part_source(part)
        terms = [replace(t, index=TermIndex.from_source(source, t.factors)) for t in job.design.terms]
        try:
            red = _run_reducer(source, terms, index, job)
        except NotNested:  # the nesting seen in the key columns does not hold on the rows used (rare)
            job = job.crossed()
            red = _run_reducer(source, terms, index, job)
            red.not_nested = True
    st = red.stats
    tot = _Totals(st.XtX, st.Xty, [np.einsum("gab->ab", t.A) for t in st.terms], st.yty, st.N, red.n_read,
                  red.n_dropped, dict(red.dropped), st.sample, st.sum_log_w, getattr(red, "not_nested", False))
    return _frames(red, terms, index, job), tot


def _run_reducer(source: Source, terms: list, index: int, job: _Job) -> Reducer:
    root = job.root
    plan = Plan(job.design, terms, job.scaling, job.layout, list(job.chain), root, job.missing, job.chunk_rows)
    red = Reducer(plan, 1)
    for label, chunk in source.batches(job.design.columns, job.chunk_rows):
        red.add(chunk, f"partition {index}" if label == "data" else label)
    red.stats  # noqa: B018 - built here: terms summed from the finest term's records may raise NotNested
    return red


def _flat(df: pl.DataFrame, vals: np.ndarray, extra: dict) -> pd.DataFrame:
    """Key columns, partition, routes (and counts) and one float block of values, as pandas (no copy of the block)."""
    frame = pd.DataFrame(vals, columns=[f"__v{j}" for j in range(vals.shape[1])], copy=False)
    at = 0
    for c in df.columns:
        s = df.get_column(c)
        frame.insert(at, c, s.to_numpy() if s.dtype.is_numeric() and not s.null_count() else s.to_pandas().array)
        at += 1
    for name, v in extra.items():
        frame.insert(at, name, v)
        at += 1
    return frame


def term_frame(keys: pl.DataFrame, t: TermStats, index: int, nroute: np.ndarray, croute: np.ndarray) -> pd.DataFrame:
    G, q, p = t.A.shape[0], t.A.shape[1], t.B.shape[2]
    vals = np.concatenate([t.A.reshape(G, q * q), t.B.reshape(G, q * p), t.c.reshape(G, q)], axis=1)
    return _flat(keys, vals, {PART: np.full(G, index, dtype=np.int32), NROUTE: nroute, CROUTE: croute,
                              COUNT: np.asarray(t.n, dtype=np.int64)})


def pair_frame(kkeys: pl.DataFrame, jkeys: pl.DataFrame, vals: np.ndarray, index: int, nroute: np.ndarray,
               croute: np.ndarray) -> pd.DataFrame:
    n = vals.shape[0]
    keys = pl.concat([kkeys, jkeys], how="horizontal")
    flat = vals.reshape(n, vals.shape[1] * vals.shape[2])
    return _flat(keys, flat, {PART: np.full(n, index, dtype=np.int32), NROUTE: nroute, CROUTE: croute})


def _prefixed(frame: pl.DataFrame, prefix: str) -> pl.DataFrame:
    return frame.rename({c: prefix + c for c in frame.columns})


def _frames(red: Reducer, terms: list, index: int, job: _Job) -> dict[str, pd.DataFrame]:
    """``t{k}``: one row per level of term k (with rows here); ``p{k}_{j}``: one per pair of levels.

    Every row carries two routes: ``__nroute`` the hash of the outer term's key of its level (the
    owner of a nested model), ``__croute`` the hash of its own key (of term k's level for a pair:
    the owner of a crossed model, and the global nesting check).
    """
    st, pairs = red.stats, red.pairs()
    keyframes = [_cast_keys(t.index.frame(), job.key_dtypes) for t in terms]
    own = [route(kf) for kf in keyframes]
    root, layout = job.root, job.layout
    pair_of = {(pr.k, pr.j): pr for pr in pairs}
    outer = []
    for k in range(job.K):
        if layout == "nested" and k != root:
            parent = pair_of[(k, root)].jcodes
            outer.append(np.where(parent >= 0, own[root][np.maximum(parent, 0)], 0))
        else:
            outer.append(own[k])
    out = {}
    for k, t in enumerate(st.terms):
        keep = t.n > 0  # a level whose rows were all dropped is no level of the fit
        out[f"t{k}"] = term_frame(_prefixed(keyframes[k].filter(pl.Series(keep)), "k:"), t.subset(keep), index,
                                  outer[k][keep], own[k][keep])
    for pr in pairs:
        kc, jc, vals = pr.kcodes, pr.jcodes, pr.vals
        if layout == "nested":  # one block per level of k; levels without rows have no parent
            sel = jc >= 0
            kc, jc, vals = kc[sel], jc[sel], vals[sel]
        out[f"p{pr.k}_{pr.j}"] = pair_frame(_prefixed(_rows(keyframes[pr.k], kc), "k:"),
                                            _prefixed(_rows(keyframes[pr.j], jc), "j:"),
                                            np.ascontiguousarray(vals), index, outer[pr.k][kc], own[pr.k][kc])
    return out


def _rows(frame: pl.DataFrame, idx: np.ndarray) -> pl.DataFrame:
    return frame.select(pl.all().gather(idx))


def _frame_of(reduced: tuple, name: str) -> pd.DataFrame:
    return reduced[0][name]


def _totals_of(reduced: tuple) -> _Totals:
    return reduced[1]


def empty_frames(job: _Job) -> dict[str, pd.DataFrame]:
    """Frames with no rows: the ``meta`` of the shuffles."""
    d, p = job.design, job.p
    keys = [pl.DataFrame({c: pl.Series(c, [], dtype=job.key_dtypes[c]) for c in job.factors(k)})
            for k in range(job.K)]
    z = np.zeros(0, dtype=np.int64)
    out = {f"t{k}": term_frame(_prefixed(keys[k], "k:"), TermStats.empty(0, p, t.q), 0, z, z)
           for k, t in enumerate(d.terms)}
    for k, j in job.pairs:
        out[f"p{k}_{j}"] = pair_frame(_prefixed(keys[k], "k:"), _prefixed(keys[j], "j:"),
                                      np.zeros((0, job.qs[j], job.qs[k])), 0, z, z)
    return out


def _canonical(totals: list[_Totals], job: _Job) -> tuple[_Totals, Scaling]:
    """All partitions' sums (in partition order) under the canonical transform, and that transform."""
    total = _Totals.zero(job)
    for t in totals:
        total.add(t)
    if total.not_nested:
        total.sample = None
    if total.N == 0:  # no moments to take; the driver reports it
        return total, job.scaling
    glob = total.globals_stats(job)
    canon = canonical_scaling(glob, job.scaling, z_may_centre(job.design))
    if not same_scaling(canon, job.scaling):
        transform_statistics(glob, job.scaling, canon)
        total.XtX, total.Xty, total.yty, total.sample = glob.XtX, glob.Xty, glob.yty, glob.sample
        total.ZtZ = [t.A[0] for t in glob.terms]
    _check_finite(glob, job.design)
    return total, canon


# ---------------------------------------------------------------------------
# worker-side tasks: owners
# ---------------------------------------------------------------------------


@dataclass
class _Owner:
    """One owner partition: its levels' keys (sorted, per term) and their statistics.

    Nested (and one-term) owners hold complete outer groups: every level of every term whose
    outer level hashed here, with their pair blocks in owner codes; ``backend()`` answers
    evaluations with the single-machine backend.  Crossed owners hold the levels hashed by
    their own key and the pairs of those levels, whose other level is named by ``jkeys``.
    """

    keys: list[pl.DataFrame]
    stats: Statistics
    layout: str
    chain: list
    violations: int = 0
    jkeys: list | None = None
    _backend: Any = None

    def __getstate__(self) -> dict:  # the backend's layout is rebuilt where the owner lands
        state = dict(self.__dict__)
        state["_backend"] = None
        return state

    @property
    def empty(self) -> bool:
        return all(t.n_groups == 0 for t in self.stats.terms)

    def backend(self):
        if self._backend is None:
            self._backend = (LocalBackend(self.stats, 1) if self.layout == "single"
                             else NestedBackend(self.stats, self.chain, 1))
        return self._backend


def _sum_rows(pdf: pd.DataFrame, cols: list[str], dtypes: dict, count: bool):
    """Rows summed per distinct key in (key, partition) order: (distinct keys, value sums, count sums)."""
    df = pl.from_pandas(pdf)
    df = df.with_columns([pl.col(c).cast(dtypes[c.split(":", 1)[1]]) for c in cols]).sort([*cols, PART])
    vcols = [c for c in df.columns if c.startswith("__v")]
    if df.height == 0:
        return df.select(cols), np.zeros((0, len(vcols))), np.zeros(0, dtype=np.int64)
    new = pl.any_horizontal([pl.col(c).ne_missing(pl.col(c).shift(1)) for c in cols])
    first = df.select(new.alias("f")).to_series().to_numpy().copy()
    first[0] = True
    starts = np.flatnonzero(first)
    vals = np.add.reduceat(np.ascontiguousarray(df.select(vcols).to_numpy()), starts, axis=0)
    n = np.add.reduceat(df.get_column(COUNT).to_numpy().astype(np.int64), starts) if count else None
    return df.select(cols)[starts], vals, n


def _terms_of(term_parts: list[pd.DataFrame], job: _Job) -> tuple[list[pl.DataFrame], list[TermStats]]:
    keys, stats = [], []
    p = job.p
    for k, pdf in enumerate(term_parts):
        q = job.qs[k]
        cols = [f"k:{c}" for c in job.factors(k)]
        kf, v, n = _sum_rows(pdf, cols, job.key_dtypes, True)
        G = kf.height
        kf = kf.rename({c: c[2:] for c in cols})
        lv = None
        if k == job.root:
            lv = (group_levels(kf.get_column(kf.columns[0])) if kf.width == 1 else frame_levels(kf)) if G \
                else np.zeros(0, dtype=np.int8)
        stats.append(TermStats(np.ascontiguousarray(v[:, :q * q].reshape(G, q, q)),
                               np.ascontiguousarray(v[:, q * q:q * q + q * p].reshape(G, q, p)),
                               np.ascontiguousarray(v[:, q * q + q * p:]), n, lv))
        keys.append(kf)
    return keys, stats


def _codes(keys: pl.DataFrame, of: pl.DataFrame, prefix: str) -> np.ndarray:
    """Position of each row of ``keys`` (columns ``prefix + factor``) in ``of`` (-1 when absent)."""
    idx = _prefixed(of, prefix).with_row_index("__code")
    j = keys.join(idx, on=list(idx.columns[1:]), how="left", maintain_order="left")
    return j.get_column("__code").fill_null(-1).cast(pl.Int64).to_numpy()


def _combine(term_parts: list[pd.DataFrame], pair_parts: list[pd.DataFrame], job: _Job,
             canon: tuple[_Totals, Scaling]) -> _Owner:
    """Sum an owner's partial rows per level (and per pair of levels) in (key, partition) order."""
    keys, terms = _terms_of(term_parts, job)
    p = job.p
    pairs, jkeys, bad = [], [], 0
    for (k, j), pdf in zip(job.pairs, pair_parts):
        kcols = [f"k:{c}" for c in job.factors(k)]
        jcols = [f"j:{c}" for c in job.factors(j)]
        both, v, _ = _sum_rows(pdf, kcols + jcols, job.key_dtypes, False)
        vals = np.ascontiguousarray(v.reshape(-1, job.qs[j], job.qs[k]))
        kc = _codes(both.select(kcols), keys[k], "k:")
        if job.layout == "crossed":  # the level of j may live on another owner: keep its key
            jc = np.arange(both.height, dtype=np.int64)
            jkeys.append(both.select(jcols).rename({c: c[2:] for c in jcols}))
        else:
            jc = _codes(both.select(jcols), keys[j], "j:")
            # nested: each level of k once, with its parent among this owner's levels of j
            if both.height != terms[k].n_groups or not np.array_equal(kc, np.arange(both.height)) or (jc < 0).any():
                bad += 1
        pairs.append(PairStats(k, j, kc, np.maximum(jc, 0), vals))
    st = Statistics(terms, np.zeros((p, p)), np.zeros(p), 0.0, 0, pairs, None,
                    job.root if job.root is not None else 0)
    if not same_scaling(canon[1], job.scaling):  # the per-level map finalise applies
        transform_statistics(st, job.scaling, canon[1])
    return _Owner(keys, st, job.layout, list(job.chain), bad, jkeys if job.layout == "crossed" else None)


def _check_nesting(pdf: pd.DataFrame) -> int:
    """Levels (by their own key's hash) seen under more than one outer level: 0 when nested."""
    df = pl.from_pandas(pdf[[CROUTE, NROUTE]]).unique()
    return int(df.height - df.get_column(CROUTE).n_unique())


def _owner_get(o: _Owner, what: str, k: int = 0) -> Any:
    if what == "keys":
        return o.keys[k]
    if what == "n":
        return o.stats.terms[k].n
    return {"levels": [t.n_groups for t in o.stats.terms], "nbytes": o.stats.nbytes, "violations": o.violations}


def _owner_apply(o: _Owner, method: str, arg: Any) -> _Owner:
    """A new owner from ``Statistics.<method>(arg)`` (subset_fixed, transform_z)."""
    return _Owner(o.keys, getattr(o.stats, method)(arg), o.layout, o.chain, o.violations, o.jkeys)


def _evaluate_task(o: _Owner, lams: list, grad: bool) -> np.ndarray:
    """This owner's sums at Lambda, packed in one array: logdet, SF, Sg, Sh (and GA, S per term)."""
    p, qs = o.stats.p, [t.q for t in o.stats.terms]
    if o.empty:
        return np.zeros(packed_size(p, qs, grad))
    with _single_thread():
        ev = o.backend().evaluate(lams, grad)
    parts = [np.atleast_1d(ev.logdet), ev.SF.ravel(), ev.Sg.ravel(), np.atleast_1d(ev.Sh)]
    if grad:
        parts += [a.ravel() for a in ev.GA] + [s.ravel() for s in ev.S]
    return np.concatenate(parts)


def packed_size(p: int, qs: list[int], grad: bool) -> int:
    return 2 + p * p + p + (sum(q * q + q * q * (p + 1) ** 2 for q in qs) if grad else 0)


def _gradient_task(o: _Owner, lams: list, beta: np.ndarray, Finv: np.ndarray, kappa: float,
                   reml: bool) -> np.ndarray:
    if o.empty:
        return np.zeros(sum(t.q ** 2 for t in o.stats.terms))
    with _single_thread():
        g = o.backend().gradient(lams, beta, Finv, kappa, reml)
    return np.concatenate([a.ravel() for a in g])


def _modes_task(o: _Owner, lams: list, beta: np.ndarray) -> list:
    if o.empty:
        return [(np.zeros((0, t.q)), np.zeros((0, t.q, t.q))) for t in o.stats.terms]
    with _single_thread():
        return o.backend().conditional_modes(lams, beta)


def _moment_task(o: _Owner, beta: np.ndarray) -> np.ndarray:
    """Per term, :func:`bigmixed.start.term_moments` of this owner's levels, packed."""
    out = []
    for t in o.stats.terms:
        Sbb, SA, n = term_moments(t, beta)
        out += [Sbb.ravel(), SA.ravel(), np.array([n])]
    return np.concatenate(out)


def _sample_task(o: _Owner, level: int) -> tuple[list, Statistics]:
    """This owner's share of the warm-start subsample: outer levels of sampling level >= ``level``
    with everything nested in them."""
    st = o.stats
    root = st.sample_term
    keep_root = st.terms[root].levels >= level
    pair = {(pr.k, pr.j): pr for pr in st.pairs}
    keeps = [keep_root if k == root else keep_root[pair[(k, root)].jcodes] for k in range(len(st.terms))]
    return [kf.filter(pl.Series(kp)) for kf, kp in zip(o.keys, keeps)], st.subset_levels(keeps)


def _write_task(o: _Owner, part: int, out_dir: str, lams: list, beta: np.ndarray, S: np.ndarray,
                y_scale: float, names: list[str], k: int) -> str:
    """Term k's BLUPs of this owner on the user's scale to ``out_dir/part-<part>.parquet``, via a temp file."""
    b = y_scale * (_modes_task(o, lams, beta)[k][0] @ S.T)
    keys = o.keys[k]
    data = {c: keys.get_column(c) for c in keys.columns}
    for j, n in enumerate(names):
        data[n if n not in data else f"{n}_re"] = b[:, j]
    frame = pl.DataFrame(data)
    path = Path(out_dir) / f"part-{part:05d}.parquet"
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


def index_from_frame(frame: pl.DataFrame, factors: tuple[str, ...]) -> TermIndex:
    """A :class:`TermIndex` over the distinct, sorted key rows ``frame`` (as ``TermIndex.from_source`` codes them)."""
    if len(factors) == 1:
        return TermIndex(factors, [GroupIndex(frame.get_column(factors[0]), sorted_unique=True)])
    parts = [GroupIndex(frame.get_column(c)) for c in factors]
    tmp = TermIndex(factors, parts, GroupIndex(pl.Series("key", [], dtype=pl.Int64)))
    return TermIndex(factors, parts, GroupIndex(pl.Series("key", tmp._combine(frame))))
