"""The driver's view of statistics resident on Dask workers: level indexes and the backend.

:class:`DistributedBackend` is the :class:`~bigmixed.backends.StatsBackend` of statistics that stay
on the workers (see :mod:`bigmixed.distributed`, which builds them): every evaluation is a map
over the owners running the single-machine backend on their groups, added in owner order.
:class:`DistributedTermIndex` stands for a term's level index there.
"""

from __future__ import annotations

import os

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from dask.distributed import Client, Future

from . import backends
from .backends import Evaluation, subsample_backend
from .keys import TermIndex
from .start import ols_moments, theta_from_moments
from .stats import PairStats, SampleSums, Statistics, TermStats
from ._dist_worker import (
    _codes,
    _evaluate_task,
    _gradient_task,
    _modes_task,
    _moment_task,
    _owner_apply,
    _owner_get,
    _prefixed,
    _remove_stale,
    _rows,
    _sample_task,
    _write_task,
    index_from_frame,
    packed_size,
)

__all__ = ["DistributedTermIndex", "DistributedGroups", "DistributedBackend", "merge_owned"]


class DistributedTermIndex:
    """The levels of one term whose statistics stay on the workers, like :class:`~bigmixed.keys.TermIndex`.

    ``n_groups`` is known; ``frame()``, ``keys``, ``to_list()`` and ``codes()`` gather all
    owners' keys of the term on first use: fine for BLUP frames and predictions of moderate
    size, not for 1e8 levels (use ``MixedLMResults.write_random_effects`` there).
    """

    def __init__(self, client: Client, owners: list[Future], term: int, factors: tuple[str, ...],
                 n_groups: int) -> None:
        self._client, self._owners, self._term = client, owners, int(term)
        self.factors = tuple(factors)
        self.n_groups = int(n_groups)

    @cached_property
    def _sorted(self) -> tuple[pl.DataFrame, np.ndarray]:
        parts = self._client.gather(self._client.map(_owner_get, self._owners, what="keys", k=self._term, pure=False))
        cat = pl.concat(parts)
        order = cat.with_row_index("__i").sort(list(self.factors)).get_column("__i").to_numpy().astype(np.int64)
        return _rows(cat, order), order

    def frame(self) -> pl.DataFrame:
        """One row per level, in sorted-key order (as the single-machine path codes them): the key column(s)."""
        return self._sorted[0]

    @property
    def order(self) -> np.ndarray:
        """Permutation from owner-concatenated order to sorted-key order."""
        return self._sorted[1]

    @cached_property
    def _index(self) -> TermIndex:
        return index_from_frame(self.frame(), self.factors)

    @property
    def keys(self) -> pl.Series:
        """All levels as one Series (``"a:b"`` labels for an interaction), sorted."""
        return self._index.keys

    def codes(self, chunk: pl.DataFrame) -> np.ndarray:
        """Codes of the rows of ``chunk`` (positions in sorted-key order); -1 for unknown keys."""
        return self._index.codes(chunk)

    def to_list(self) -> list:
        return self.keys.to_list()

    def sampling_levels(self) -> np.ndarray:
        return self._index.sampling_levels()

    def subset(self, keep: np.ndarray) -> TermIndex:
        return self._index.subset(keep)


DistributedGroups = DistributedTermIndex  # the one-term name of earlier versions


class DistributedBackend:
    """A backend (:class:`~bigmixed.backends.StatsBackend`) whose statistics stay on Dask workers.

    Each call maps a task over the owner futures (Dask runs it where the owner lives): the
    owner answers with the single-machine backend over its outer groups, and the driver adds
    the results in owner order.  A task gets the Lambdas (and beta, F^-1) and returns
    O(sum_k q_k^2 p^2) numbers, whatever the number of groups.
    """

    information = False  # one term or nested: the subsample warm start serves instead

    def __init__(self, client: Client, owners: list[Future], indexes: list[DistributedTermIndex], *, layout: str,
                 chain: list[int], p: int, qs: list[int], XtX: np.ndarray, Xty: np.ndarray, yty: float, N: int,
                 sample: SampleSums | None, sum_log_w: float, nbytes: int) -> None:
        self.client, self.owners, self.indexes = client, owners, indexes
        self.layout, self.chain = layout, list(chain)
        self.p, self.qs = int(p), [int(q) for q in qs]
        self.q = self.qs[0]
        self.root = self.chain[-1]
        # as NestedBackend: the warm start's size in levels of the finest term, its sample in outer levels
        self.n_groups = int(indexes[self.chain[0]].n_groups)
        self.n_units = int(indexes[self.root].n_groups)
        self.XtX, self.Xty, self.yty, self.N = XtX, Xty, float(yty), int(N)
        self.sample, self.sum_log_w, self._nbytes = sample, float(sum_log_w), int(nbytes)

    @property
    def groups(self) -> DistributedTermIndex:
        return self.indexes[0]

    def _map(self, fn, *iterables, **kwargs) -> list:
        return self.client.gather(self.client.map(fn, self.owners, *iterables, pure=False, **kwargs))

    @staticmethod
    def _lams(lams) -> list[np.ndarray]:
        return [np.ascontiguousarray(L, dtype=float) for L in lams]

    def evaluate(self, lams, grad: bool) -> Evaluation:
        """Pass-1 sums (and the gradient tensors): one round trip per evaluation."""
        parts = self._map(_evaluate_task, lams=self._lams(lams), grad=bool(grad))
        acc = parts[0].copy()
        for part in parts[1:]:  # owner order: the same sums every time
            acc += part
        p, qs = self.p, self.qs
        assert acc.size == packed_size(p, qs, grad)
        SF = acc[1:1 + p * p].reshape(p, p)
        Sg = acc[1 + p * p:1 + p * p + p]
        Sh = float(acc[1 + p * p + p])
        if not grad:
            return Evaluation(float(acc[0]), SF, Sg, Sh)
        at = 2 + p * p + p
        GA, S = [], []
        for q in qs:
            GA.append(acc[at:at + q * q].reshape(q, q))
            at += q * q
        for q in qs:
            n = q * q * (p + 1) ** 2
            S.append(acc[at:at + n].reshape(q, q, p + 1, p + 1))
            at += n
        return Evaluation(float(acc[0]), SF, Sg, Sh, GA, S)

    def gradient(self, lams, beta, Finv, kappa, reml) -> list:
        parts = self._map(_gradient_task, lams=self._lams(lams), beta=np.ascontiguousarray(beta, dtype=float),
                          Finv=np.ascontiguousarray(Finv, dtype=float), kappa=float(kappa), reml=bool(reml))
        acc = parts[0].copy()
        for part in parts[1:]:
            acc += part
        out, at = [], 0
        for q in self.qs:
            out.append(acc[at:at + q * q].reshape(q, q))
            at += q * q
        return out

    def conditional_modes(self, lams, beta) -> list:
        """Every term's BLUPs and K_i, gathered (O(levels) to the driver) in sorted-key order."""
        parts = self._map(_modes_task, lams=self._lams(lams), beta=np.ascontiguousarray(beta, dtype=float))
        out = []
        for k, ix in enumerate(self.indexes):
            b = np.concatenate([m[k][0] for m in parts])[ix.order]
            K = np.concatenate([m[k][1] for m in parts])[ix.order]
            out.append((np.ascontiguousarray(b), np.ascontiguousarray(K)))
        return out

    def moment_start(self, tmap, floor: float = 1e-2) -> np.ndarray:
        """:func:`bigmixed.start.moment_start` from the owners' per-level sums (one map, O(q^2) numbers each)."""
        beta, s2 = ols_moments(self.XtX, self.Xty, self.yty, self.N)
        parts = self._map(_moment_task, beta=np.ascontiguousarray(beta, dtype=float))
        acc = parts[0].copy()
        for part in parts[1:]:
            acc += part
        moments, at = [], 0
        for q in self.qs:
            moments.append((acc[at:at + q * q].reshape(q, q), acc[at + q * q:at + 2 * q * q].reshape(q, q),
                            float(acc[at + 2 * q * q])))
            at += 2 * q * q + 1
        return theta_from_moments(moments, s2, tmap, floor)

    def subsample(self, level: int):
        """The warm-start subsample (outer levels of sampling level >= ``level`` with all nested in them).

        Gathered to the driver, in the same (sorted-key) order and with the same exact sums as
        the single-machine fit uses (:class:`~bigmixed.stats.SampleSums`), so both take the same
        optimiser path.  About G / 2^level outer levels: a few % of the statistics.
        """
        if self.sample is None:
            return None
        parts = self._map(_sample_task, level=int(level))
        factors = [ix.factors for ix in self.indexes]
        _, sub = merge_owned([pt[0] for pt in parts], [pt[1] for pt in parts], factors, _pairs(self.layout, self.chain))
        if len(self.chain) > 1 and sub.terms[self.root].n_groups < backends.MIN_SAMPLE_UNITS:
            return None  # too few outer groups to stand for the others (as NestedBackend)
        sub = Statistics(sub.terms, self.XtX, self.Xty, self.yty, self.N, sub.pairs, None, self.root)
        return subsample_backend(sub, self.sample, level, None)

    def transform_z(self, Ms) -> "DistributedBackend":
        """Backend for the random-effects designs Z_k M_k, transformed on the workers (lineage kept)."""
        Ms = [Ms] if isinstance(Ms, np.ndarray) else list(Ms)
        owners = self.client.map(_owner_apply, self.owners, method="transform_z",
                                 arg=[np.asarray(M, float) for M in Ms], pure=False)
        return self._with(owners)

    def _with(self, owners: list[Future]) -> "DistributedBackend":
        return DistributedBackend(self.client, owners, self.indexes, layout=self.layout, chain=self.chain, p=self.p,
                                  qs=self.qs, XtX=self.XtX, Xty=self.Xty, yty=self.yty, N=self.N, sample=self.sample,
                                  sum_log_w=self.sum_log_w, nbytes=self._nbytes)

    def group_sizes(self, term: int = 0) -> np.ndarray:
        """Rows per level of a term, in sorted-key order."""
        return np.concatenate(self._map(_owner_get, what="n", k=int(term)))[self.indexes[term].order]

    @property
    def nbytes(self) -> int:
        """Bytes of per-level statistics (and pair blocks) held on the workers."""
        return self._nbytes

    def write_random_effects(self, out_dir: str | os.PathLike, lams, beta: np.ndarray, S: list, y_scale: float,
                             names: list[str], term: Any = None, k: int = 0) -> list[Path]:
        """Term k's BLUPs written by each owner's worker: ``out_dir/part-00000.parquet``, ...

        ``S`` holds each term's random-effects transform (``res._S``), ``term`` the term (unused:
        the owners know their keys).  ``out_dir`` must be writable by the workers (a shared file
        system).  Part files of an earlier run with more partitions are removed afterwards.
        """
        out = os.path.abspath(os.fspath(out_dir))
        Sk = np.asarray(S[k] if isinstance(S, (list, tuple)) else S, float)
        paths = self._map(_write_task, range(len(self.owners)), out_dir=out, lams=self._lams(lams),
                          beta=np.asarray(beta, float), S=Sk, y_scale=float(y_scale), names=list(names), k=int(k))
        self.client.submit(_remove_stale, out, paths, pure=False).result()
        return [Path(p) for p in paths]


def _pairs(layout: str, chain: list[int]) -> list[tuple[int, int]]:
    ch = list(chain)
    return [] if layout == "single" else [(ch[a], ch[b]) for a in range(len(ch)) for b in range(a + 1, len(ch))]


def merge_owned(keys: list[list[pl.DataFrame]], stats: list[Statistics], factors: list[tuple[str, ...]],
                pairs: list[tuple[int, int]], jkeys: list[list[pl.DataFrame]] | None = None
                ) -> tuple[list[pl.DataFrame], Statistics]:
    """Owners' levels merged into sorted-key order per term (the single-machine coding), pairs recoded.

    Nested owners give their pairs in owner codes; crossed owners (``jkeys``) name the level of
    the coarser term of each pair by its key.  Returns the sorted key frames and a Statistics
    without global sums.
    """
    K = len(factors)
    frames, invs, offs, terms = [], [], [], []
    for k in range(K):
        cat = pl.concat([ks[k] for ks in keys])
        order = cat.with_row_index("__i").sort(list(factors[k])).get_column("__i").to_numpy().astype(np.int64)
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        invs.append(inv)
        offs.append(np.concatenate(([0], np.cumsum([ks[k].height for ks in keys]))).astype(np.int64))
        frames.append(_rows(cat, order))
        ts = [s.terms[k] for s in stats]
        lv = None if any(t.levels is None for t in ts) else np.concatenate([t.levels for t in ts])[order]
        terms.append(TermStats(*(np.ascontiguousarray(np.concatenate([getattr(t, a) for t in ts])[order])
                                 for a in ("A", "B", "c", "n")), lv))
    out = []
    for e, (k, j) in enumerate(pairs):
        kc, jc, vals = [], [], []
        for o, s in enumerate(stats):
            pr = s.pairs[e]
            kc.append(invs[k][offs[k][o] + pr.kcodes])
            if jkeys is None:
                jc.append(invs[j][offs[j][o] + pr.jcodes])
            else:
                jc.append(_codes(_prefixed(jkeys[o][e], "j:"), frames[j], "j:"))
            vals.append(pr.vals)
        kc, jc, v = np.concatenate(kc), np.concatenate(jc), np.concatenate(vals)
        order = np.lexsort((jc, kc))
        out.append(PairStats(k, j, np.ascontiguousarray(kc[order]), np.ascontiguousarray(jc[order]),
                             np.ascontiguousarray(v[order])))
    return frames, Statistics(terms, np.zeros((0, 0)), np.zeros(0), 0.0, 0, out, None, 0)


def _local_chain(n_levels: list[int], factors: list[tuple[str, ...]]) -> list[int]:
    """The single-machine order of the terms (pipeline._chain): most levels first."""
    return sorted(range(len(n_levels)), key=lambda k: (-n_levels[k], -len(factors[k]), k))


def _orient(pairs: list[PairStats], chain: list[int]) -> list[PairStats]:
    """Pair statistics as (finer, coarser) in ``chain``'s order, as the single-machine Reducer keeps them."""
    have = {(pr.k, pr.j): pr for pr in pairs}
    out = []
    for k, j in _pairs("crossed", chain):
        pr = have.get((k, j))
        if pr is None:
            f = have[(j, k)]
            order = np.lexsort((f.kcodes, f.jcodes))
            pr = PairStats(k, j, np.ascontiguousarray(f.jcodes[order]), np.ascontiguousarray(f.kcodes[order]),
                           np.ascontiguousarray(np.swapaxes(f.vals, 1, 2)[order]))
        out.append(pr)
    return out
