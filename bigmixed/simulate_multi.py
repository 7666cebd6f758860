"""Simulate data with several random-effects terms: nested and crossed.

* :func:`simulate_nested`: ``y ~ t + (t | child) + (t | school)``, every
  child in exactly one school, rows shuffled;
* :func:`simulate_crossed` / :func:`simulate_crossed_to_parquet`:
  ``y ~ x + (1 | user) + (1 | item)`` with Zipf-like item popularity,
  written to several parquet files with memory bounded by one file.

Both are re-exported by :mod:`bigmixed.simulate`.  Covariates are
``U(0, 10)``, raw and uncentred (the realistic layout).  The one-term
simulator, :func:`bigmixed.simulate.simulate`, and the parquet helpers
(atomic writes, part names) are in :mod:`bigmixed.simulate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from .simulate import _atomic_write, _part_name, _remove_stale_parts, _string_keys

__all__ = ["simulate_nested", "simulate_crossed", "simulate_crossed_to_parquet"]

# spawn_keys of the multi-term generators, far from chunk indices and from
# _SHUFFLE_KEY, so their streams never coincide with simulate()'s.
_NESTED_KEY = 2**62 + 1
_CROSSED_KEY = 2**62 + 2
# Rows per generation chunk of simulate_crossed (part of its stream layout:
# changing it changes the rows a seed gives).
_CROSSED_CHUNK = 1 << 20


def _key_column(ids: np.ndarray, n_levels: int, name: str, prefix: str, string_keys: bool) -> pl.Series:
    return _string_keys(ids, n_levels, name, prefix) if string_keys else pl.Series(name, ids)


def _bivariate(rng: np.random.Generator, n: int, sd: Sequence[float], corr: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws of a bivariate normal (intercept, slope) with SDs ``sd`` and correlation ``corr``."""
    z = rng.standard_normal((2, n))
    u0 = sd[0] * z[0]
    u1 = sd[1] * (corr * z[0] + np.sqrt(1.0 - corr**2) * z[1])
    return u0, u1


def simulate_nested(children: int, schools: int, obs_per_child: int = 10, *, seed: int = 0,
                    shuffle: bool = True, string_keys: bool = False,
                    beta: Sequence[float] = (10.0, 1.0),
                    child_sd: Sequence[float] = (1.0, 0.2), child_corr: float = 0.3,
                    school_sd: Sequence[float] = (0.8, 0.1), school_corr: float = -0.2,
                    sigma: float = 1.0) -> pl.DataFrame:
    """Simulate nested data from ``y ~ t + (t | child) + (t | school)``.

    The model is

    .. math::

        y_{ij} = \\beta_0 + \\beta_1 t_{ij} + a_{0i} + a_{1i} t_{ij}
                 + b_{0s(i)} + b_{1s(i)} t_{ij} + \\varepsilon_{ij}

    for row ``j`` of child ``i`` in school ``s(i)``.  True parameters (the
    defaults):

    * fixed effects ``beta = (10.0, 1.0)`` (intercept, ``t``);
    * child: ``(a_0, a_1)`` bivariate normal, SDs ``child_sd = (1.0, 0.2)``,
      correlation ``child_corr = 0.3``;
    * school: ``(b_0, b_1)`` bivariate normal, SDs ``school_sd = (0.8, 0.1)``,
      correlation ``school_corr = -0.2``;
    * residual SD ``sigma = 1.0``.

    So lme4's ``VarCorr`` should come out near child (Intercept) 1.0, t 0.2,
    corr 0.3; school (Intercept) 0.8, t 0.1, corr -0.2; residual 1.0.

    Parameters
    ----------
    children : int
        Number of children, ``>= 1``.  Child keys are unique across
        schools: a child belongs to exactly one school, so ``(t | child)``
        and ``(t | child:school)`` are the same term.
    schools : int
        Number of schools, ``1 <= schools <= children``.  Each child gets a
        uniformly random school; every school has at least one child
        (mean ``children / schools`` children per school).
    obs_per_child : int, default 10
        Mean rows per child: child sizes are uniform on
        ``1 .. 2*obs_per_child - 1`` (1-19 for the default).
    seed : int, default 0
        Seed; the same arguments always give the same frame.
    shuffle : bool, default True
        Rows in random order (the default, as users' data arrive);
        otherwise grouped by child in increasing child id.
    string_keys : bool, default False
        Keys as strings ``"c000123"`` (child) and ``"s000012"`` (school)
        instead of int64 ids ``0 .. children-1`` and ``0 .. schools-1``.
    beta, child_sd, child_corr, school_sd, school_corr, sigma
        The true parameters (see above).

    Returns
    -------
    polars.DataFrame
        Columns ``child``, ``school`` (int64 or string), ``t`` (``U(0, 10)``,
        raw and uncentred), ``y`` (float64).

    Notes
    -----
    Vectorised numpy over all rows at once: peak memory is a few times the
    output (1e6 children, 1e7 rows: about 1 GB).
    """
    children, schools, obs = int(children), int(schools), int(obs_per_child)
    if children < 1:
        raise ValueError(f"children must be >= 1, got {children}")
    if not 1 <= schools <= children:
        raise ValueError(f"schools must lie in [1, children={children}], got {schools}")
    if obs < 1:
        raise ValueError(f"obs_per_child must be >= 1, got {obs_per_child}")
    if len(beta) != 2:
        raise ValueError(f"beta must have 2 entries (intercept, t), got {len(beta)}")
    for name, sd, corr in (("child", child_sd, child_corr), ("school", school_sd, school_corr)):
        if len(sd) != 2 or min(sd) < 0:
            raise ValueError(f"{name}_sd must be 2 non-negative SDs (intercept, t), got {sd}")
        if not -1.0 <= corr <= 1.0:
            raise ValueError(f"{name}_corr must lie in [-1, 1], got {corr}")
    if sigma < 0:
        raise ValueError("sigma must be non-negative")

    # Draw order is part of the reproducibility contract: schools, sizes,
    # child effects, school effects, t, eps, permutation.
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_NESTED_KEY,)))
    school_of = rng.integers(0, schools, size=children, dtype=np.int64)
    # every school non-empty: a random set of `schools` children, one per school
    school_of[rng.permutation(children)[:schools]] = np.arange(schools, dtype=np.int64)
    sizes = rng.integers(1, 2 * obs, size=children, dtype=np.int64)
    a0, a1 = _bivariate(rng, children, child_sd, child_corr)
    b0, b1 = _bivariate(rng, schools, school_sd, school_corr)
    # per-child totals of intercept and slope (child + its school), so each
    # row needs one gather per coefficient
    c0 = a0 + b0[school_of]
    c0 += beta[0]
    c1 = a1 + b1[school_of]
    c1 += beta[1]
    n = int(sizes.sum())
    child = np.repeat(np.arange(children, dtype=np.int64), sizes)
    t = rng.uniform(0.0, 10.0, n)
    y = rng.standard_normal(n)
    y *= sigma
    y += c0[child]
    y += c1[child] * t
    if shuffle:
        perm = rng.permutation(n)
        child, t, y = child[perm], t[perm], y[perm]
        del perm
    school = school_of[child]
    return pl.DataFrame([
        _key_column(child, children, "child", "c", string_keys),
        _key_column(school, schools, "school", "s", string_keys),
        pl.Series("t", t),
        pl.Series("y", y),
    ])


class _Crossed:
    """Chunked row generator of :func:`simulate_crossed` (rows are i.i.d.).

    Chunk ``c`` covers rows ``[c*_CROSSED_CHUNK, (c+1)*_CROSSED_CHUNK)`` and
    draws from its own stream, so any row range can be generated on its own
    (the parquet writer produces one file at a time).
    """

    def __init__(self, users: int, items: int, rows: int, seed: int, zipf: float,
                 beta: Sequence[float], sd_user: float, sd_item: float, sigma: float,
                 min_rows_per_item: int) -> None:
        self.users, self.items, self.rows = int(users), int(items), int(rows)
        if self.users < 1 or self.items < 1:
            raise ValueError(f"users and items must be >= 1, got {users}, {items}")
        if zipf < 0:
            raise ValueError(f"zipf must be >= 0, got {zipf}")
        if len(beta) != 2:
            raise ValueError(f"beta must have 2 entries (intercept, x), got {len(beta)}")
        if sd_user < 0 or sd_item < 0 or sigma < 0:
            raise ValueError("standard deviations must be non-negative")
        self.min_rows = int(min_rows_per_item)
        if self.min_rows < 0:
            raise ValueError(f"min_rows_per_item must be >= 0, got {min_rows_per_item}")
        if self.rows < max(1, self.items * self.min_rows):
            raise ValueError(f"rows must be >= items * min_rows_per_item = {self.items * self.min_rows} "
                             f"(and >= 1), got {rows}")
        self.seed = int(seed)
        self.beta = (float(beta[0]), float(beta[1]))
        self.sigma = float(sigma)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_CROSSED_KEY, 0)))
        self.u = sd_user * rng.standard_normal(self.users)
        self.v = sd_item * rng.standard_normal(self.items)
        # popularity rank -> item id: ids carry no information about popularity
        self.item_of_rank = rng.permutation(self.items).astype(np.int64)
        w = 1.0 / np.arange(1, self.items + 1, dtype=np.float64) ** float(zipf)
        self.cdf = np.cumsum(w) / w.sum()
        # guaranteed rows: row j*stride gets the item of rank j % items, for
        # j < items*min_rows, so every item has at least min_rows rows
        self.n_forced = self.items * self.min_rows
        self.stride = self.rows // self.n_forced if self.n_forced else 0

    def popularity(self) -> np.ndarray:
        """Probability of each item id under the Zipf-like draw (excluding the forced rows)."""
        p = np.diff(np.concatenate(([0.0], self.cdf)))
        out = np.empty(self.items)
        out[self.item_of_rank] = p
        return out

    def fill(self, lo: int, hi: int, user: np.ndarray, item: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Write rows ``[lo, hi)`` into the given arrays (each of length ``hi - lo``)."""
        ch = _CROSSED_CHUNK
        for c in range(lo // ch, (hi - 1) // ch + 1 if hi > lo else lo // ch):
            c_lo, c_hi = c * ch, min((c + 1) * ch, self.rows)
            m = c_hi - c_lo
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_CROSSED_KEY, 1, c)))
            # draw order: user, item uniform, x, eps
            cu = rng.integers(0, self.users, size=m, dtype=np.int64)
            rank = np.searchsorted(self.cdf, rng.random(m), side="right")
            np.minimum(rank, self.items - 1, out=rank)  # guards cdf[-1] rounding below 1
            if self.n_forced:
                j0 = -(-c_lo // self.stride)
                j1 = min(self.n_forced, -(-c_hi // self.stride))
                if j1 > j0:
                    j = np.arange(j0, j1, dtype=np.int64)
                    rank[j * self.stride - c_lo] = j % self.items
            ci = self.item_of_rank[rank]
            cx = rng.uniform(0.0, 10.0, m)
            cy = rng.standard_normal(m)
            cy *= self.sigma
            cy += self.beta[0]
            cy += self.beta[1] * cx
            cy += self.u[cu]
            cy += self.v[ci]
            # the part of the chunk inside [lo, hi)
            a, b = max(lo, c_lo), min(hi, c_hi)
            s = slice(a - c_lo, b - c_lo)
            d = slice(a - lo, b - lo)
            user[d], item[d], x[d], y[d] = cu[s], ci[s], cx[s], cy[s]

    def frame(self, lo: int, hi: int, string_keys: bool) -> pl.DataFrame:
        n = hi - lo
        user = np.empty(n, dtype=np.int64)
        item = np.empty(n, dtype=np.int64)
        x = np.empty(n)
        y = np.empty(n)
        self.fill(lo, hi, user, item, x, y)
        return pl.DataFrame([
            _key_column(user, self.users, "user", "u", string_keys),
            _key_column(item, self.items, "item", "i", string_keys),
            pl.Series("x", x),
            pl.Series("y", y),
        ])


def simulate_crossed(users: int, items: int, rows: int, *, seed: int = 0, zipf: float = 1.0,
                     string_keys: bool = False, beta: Sequence[float] = (1.0, 0.5),
                     sd_user: float = 1.0, sd_item: float = 0.5, sigma: float = 1.0,
                     min_rows_per_item: int = 3) -> pl.DataFrame:
    """Simulate crossed data from ``y ~ x + (1 | user) + (1 | item)``.

    The model is ``y = beta_0 + beta_1 x + u_user + v_item + eps`` with
    ``u ~ N(0, sd_user^2)``, ``v ~ N(0, sd_item^2)``, ``eps ~ N(0,
    sigma^2)``.  True parameters (the defaults): ``beta = (1.0, 0.5)``,
    ``sd_user = 1.0``, ``sd_item = 0.5``, ``sigma = 1.0``.

    Each row is an independent draw: a uniformly random user (so about
    ``rows / users`` rows per user, Poisson; with 10 rows per user about
    ``users * e^-10`` users get no row and do not appear), an item drawn
    with Zipf-like popularity, probability proportional to
    ``1 / rank^zipf`` (ranks assigned to item ids at random), and
    ``x ~ U(0, 10)`` (raw, uncentred).  Rows are therefore in random order.
    Every item gets at least ``min_rows_per_item`` rows: row ``j * stride``
    (``stride = rows // (items * min_rows_per_item)``) is given the item of
    rank ``j % items`` for ``j < items * min_rows_per_item``.

    Parameters
    ----------
    users, items, rows : int
        Numbers of users, items and rows (``rows >= items * min_rows_per_item``).
    seed : int, default 0
        Seed; the same arguments always give the same frame.
    zipf : float, default 1.0
        Popularity exponent: 0 is uniform; 1 makes the top item about
        ``items / H_items`` times as popular as the average one (2000 items:
        ~245x) and the least popular 1/items as popular as the top one.
    string_keys : bool, default False
        Keys as strings ``"u000123"``, ``"i000012"`` instead of int64 ids.
    beta, sd_user, sd_item, sigma
        The true parameters (see above).
    min_rows_per_item : int, default 3
        Rows guaranteed to every item.

    Returns
    -------
    polars.DataFrame
        Columns ``user``, ``item`` (int64 or string), ``x``, ``y`` (float64).

    Notes
    -----
    Vectorised in chunks of 2^20 rows into preallocated arrays: peak memory
    is the output (32 bytes per row) plus one chunk (1e7 rows, 1e6 users:
    ~0.4 GB, ~1 s).  :func:`simulate_crossed_to_parquet` writes the same rows
    to several files with memory bounded by one file.
    """
    gen = _Crossed(users, items, rows, seed, zipf, beta, sd_user, sd_item, sigma, min_rows_per_item)
    return gen.frame(0, gen.rows, string_keys)


def simulate_crossed_to_parquet(out_dir: str | Path, users: int, items: int, rows: int,
                                files: int = 8, *, seed: int = 0, zipf: float = 1.0,
                                string_keys: bool = False, beta: Sequence[float] = (1.0, 0.5),
                                sd_user: float = 1.0, sd_item: float = 0.5, sigma: float = 1.0,
                                min_rows_per_item: int = 3,
                                row_group_size: int | None = None) -> list[Path]:
    """Stream :func:`simulate_crossed` to ``files`` parquet files, one file at a time.

    File ``f`` holds rows ``[f*rows//files, (f+1)*rows//files)``; read back
    in file order the files equal ``simulate_crossed(users, items, rows,
    ...)`` with the same arguments row for row.  Every file has rows of
    (almost) every user and item, in random order.  Peak memory is one file
    plus one generation chunk, whatever ``rows``.  Files are written
    atomically; stale ``part-*.parquet`` files in ``out_dir`` are removed.

    Returns
    -------
    list of Path
        ``out_dir/part-00000.parquet``, ... in row order.
    """
    if files < 1:
        raise ValueError(f"files must be >= 1, got {files}")
    gen = _Crossed(users, items, rows, seed, zipf, beta, sd_user, sd_item, sigma, min_rows_per_item)
    files = min(int(files), gen.rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = [f * gen.rows // files for f in range(files + 1)]
    paths = []
    for f in range(files):
        p = out_dir / _part_name(f)
        _atomic_write(gen.frame(bounds[f], bounds[f + 1], string_keys), p, row_group_size)
        paths.append(p)
    _remove_stale_parts(out_dir, set(paths))
    return paths
