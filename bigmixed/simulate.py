"""Simulate random-intercept-and-slope data for tests, benchmarks and demos.

The model is

.. math::

    y_{ij} = \\beta_0 + \\beta_1 x_{ij} + \\beta_2 x2_{ij}
             + u_{0i} + u_{1i} x_{ij} + \\varepsilon_{ij},

with :math:`(u_{0i}, u_{1i})` bivariate normal (standard deviations
``sd_intercept``, ``sd_slope``, correlation ``corr``) and
:math:`\\varepsilon_{ij} \\sim N(0, \\sigma^2)`, i.e. the data generating
process of ``y ~ x + x2 + (x | subject)``.  ``x_dist`` chooses the
covariates' layout: ``"normal"`` (independent standard normal, centred: the
friendly case) or ``"uniform10"`` (independent ``U(0, 10)``, raw and
uncentred, like ``Time`` in dietox: what users' data look like).

The multi-term generators live in :mod:`bigmixed.simulate_multi` and are
re-exported here (``from bigmixed.simulate import simulate_nested`` works):

* :func:`simulate_nested`: ``y ~ t + (t | child) + (t | school)``, every
  child in exactly one school;
* :func:`simulate_crossed` / :func:`simulate_crossed_to_parquet`:
  ``y ~ x + (1 | user) + (1 | item)`` with Zipf-like item popularity.

Design notes
------------
Groups are generated in fixed *chunks* of consecutive groups, each chunk
drawing from its own independent random stream (``SeedSequence(seed,
spawn_key=(chunk,))``).  This buys three things:

* generation is vectorised per chunk, so temporaries are bounded by one chunk
  rather than by the whole output (the output arrays are preallocated);
* :func:`simulate_to_parquet` can produce any range of groups without
  generating the groups before it, so memory is bounded by one file;
* for ``shuffle=False`` the rows written by :func:`simulate_to_parquet`, read
  back in file order, are *identical* to :func:`simulate` with the same
  arguments, whatever the number of files.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

__all__ = ["simulate", "simulate_to_parquet", "write_parquet", "simulate_nested", "simulate_crossed",
           "simulate_crossed_to_parquet", "X_DISTS"]

# Target number of rows per generation chunk.  ~256k rows keeps numpy calls
# well above their fixed overhead while keeping chunk temporaries (~10 MB)
# negligible next to the output.
_CHUNK_ROWS = 1 << 18
# spawn_key used for the global row permutation of ``simulate(shuffle=True)``;
# chosen far away from any chunk index so the streams never collide.
_SHUFFLE_KEY = 2**62
# Covariate layouts of simulate(): name -> description.
X_DISTS = {
    "normal": "x, x2 ~ N(0, 1), centred (the friendly case)",
    "uniform10": "x, x2 ~ U(0, 10), raw and uncentred (like Time in dietox)",
}


# --------------------------------------------------------------------------
# core generator
# --------------------------------------------------------------------------


def _check_args(groups: int, obs_per_group: int, sd_intercept: float, sd_slope: float,
                corr: float, sigma: float, beta: Sequence[float], x_dist: str = "normal") -> None:
    """Validate simulation arguments (raise ``ValueError`` on nonsense)."""
    if x_dist not in X_DISTS:
        raise ValueError(f"x_dist must be one of {sorted(X_DISTS)}, got {x_dist!r}")
    if int(groups) < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if int(obs_per_group) < 1:
        raise ValueError(f"obs_per_group must be >= 1, got {obs_per_group}")
    if sd_intercept < 0 or sd_slope < 0 or sigma < 0:
        raise ValueError("standard deviations must be non-negative")
    if not -1.0 <= corr <= 1.0:
        raise ValueError(f"corr must lie in [-1, 1], got {corr}")
    if len(beta) != 3:
        raise ValueError(f"beta must have 3 entries (intercept, x, x2), got {len(beta)}")


class _Sim:
    """Chunked generator shared by :func:`simulate` and :func:`simulate_to_parquet`.

    Parameters mirror :func:`simulate`.  Chunk ``c`` covers groups
    ``[c * chunk_groups, min((c + 1) * chunk_groups, groups))``.
    """

    def __init__(self, groups: int, obs_per_group: int, seed: int, unbalanced: bool,
                 beta: Sequence[float], sd_intercept: float, sd_slope: float,
                 corr: float, sigma: float, x_dist: str = "normal") -> None:
        _check_args(groups, obs_per_group, sd_intercept, sd_slope, corr, sigma, beta, x_dist)
        self.x_dist = x_dist
        self.groups = int(groups)
        self.obs = int(obs_per_group)
        self.seed = int(seed)
        self.unbalanced = bool(unbalanced)
        self.beta = tuple(float(b) for b in beta)
        self.sd0, self.sd1 = float(sd_intercept), float(sd_slope)
        self.corr, self.sigma = float(corr), float(sigma)
        self.chunk_groups = max(1, _CHUNK_ROWS // self.obs)
        self.n_chunks = -(-self.groups // self.chunk_groups)

    def chunk_bounds(self, c: int) -> tuple[int, int]:
        """Return the group range ``[lo, hi)`` of chunk ``c``."""
        lo = c * self.chunk_groups
        return lo, min(lo + self.chunk_groups, self.groups)

    def _rng(self, c: int) -> np.random.Generator:
        # Equivalent to the c-th child of SeedSequence(seed).spawn(), but
        # addressable directly, so any chunk can be generated on its own.
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(c,)))

    def _sizes(self, rng: np.random.Generator, ng: int) -> np.ndarray:
        # Draw order within a chunk is part of the reproducibility contract:
        # sizes first, then random effects, then x, x2, eps, then shuffle slots.
        if self.unbalanced:
            # uniform on 1..2*obs-1 -> mean obs
            return rng.integers(1, 2 * self.obs, size=ng, dtype=np.int64)
        return np.full(ng, self.obs, dtype=np.int64)

    def sizes(self) -> np.ndarray:
        """Group sizes of all groups (cheap: only the first draw of each chunk)."""
        out = np.empty(self.groups, dtype=np.int64)
        for c in range(self.n_chunks):
            lo, hi = self.chunk_bounds(c)
            out[lo:hi] = self._sizes(self._rng(c), hi - lo)
        return out

    def chunk(self, c: int, slots: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Generate chunk ``c``.

        Returns
        -------
        sizes, subject, x, x2, y, slot
            ``sizes`` per group of the chunk; row arrays grouped by subject;
            ``slot`` is a per-row integer in ``[0, slots)`` (``None`` when
            ``slots == 0``) used by the streaming shuffle to scatter rows
            across a window of files.
        """
        lo, hi = self.chunk_bounds(c)
        ng = hi - lo
        rng = self._rng(c)
        sizes = self._sizes(rng, ng)
        z = rng.standard_normal((2, ng))
        u0 = self.sd0 * z[0]
        u1 = self.sd1 * (self.corr * z[0] + np.sqrt(1.0 - self.corr**2) * z[1])
        n = int(sizes.sum())
        local = np.repeat(np.arange(ng, dtype=np.int64), sizes)
        if self.x_dist == "uniform10":
            x = rng.uniform(0.0, 10.0, n)
            x2 = rng.uniform(0.0, 10.0, n)
        else:
            x = rng.standard_normal(n)
            x2 = rng.standard_normal(n)
        # Build y in place in the eps buffer to avoid extra n-length temporaries.
        y = rng.standard_normal(n)
        y *= self.sigma
        b0, b1, b2 = self.beta
        y += b0
        y += (b1 + u1[local]) * x
        y += b2 * x2
        y += u0[local]
        slot = rng.integers(0, slots, size=n, dtype=np.int64) if slots else None
        local += lo  # local index -> global subject id, in place
        return sizes, local, x, x2, y, slot


def _string_keys(ids: np.ndarray, groups: int, name: str = "subject", prefix: str = "s") -> pl.Series:
    """Map integer ids to zero-padded strings ``"s000123"`` (``prefix`` + digits).

    Keys are formatted once per id in ``[ids.min(), ids.max()]`` (a file or
    frame covers a contiguous id range) and then gathered per row, far
    cheaper than formatting every row.  The width depends on ``groups`` only,
    so every file of a streamed data set uses the same width.
    """
    width = max(6, len(str(groups - 1)))
    if len(ids) == 0:
        return pl.Series(name, [], dtype=pl.String)
    lo, hi = int(ids.min()), int(ids.max())
    keys = pl.Series(name, np.arange(lo, hi + 1, dtype=np.int64)).cast(pl.String).str.zfill(width)
    keys = (prefix + keys).alias(name)
    return keys.gather(pl.Series(ids - lo if lo else ids))


def _frame(subject: np.ndarray, x: np.ndarray, x2: np.ndarray, y: np.ndarray,
           string_keys: bool, groups: int) -> pl.DataFrame:
    """Assemble the output frame with the documented column order and dtypes."""
    subj = _string_keys(subject, groups) if string_keys else pl.Series("subject", subject)
    return pl.DataFrame([subj, pl.Series("x", x), pl.Series("x2", x2), pl.Series("y", y)])


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def simulate(groups: int, obs_per_group: int = 10, *, seed: int = 0, unbalanced: bool = True,
             string_keys: bool = False, shuffle: bool = False,
             beta: Sequence[float] = (1.0, 2.0, -0.5), sd_intercept: float = 1.0,
             sd_slope: float = 0.5, corr: float = 0.3, sigma: float = 1.0,
             x_dist: str = "normal") -> pl.DataFrame:
    """Simulate data from ``y ~ x + x2 + (x | subject)``.

    Parameters
    ----------
    groups : int
        Number of subjects (grouping levels), ``>= 1``.
    obs_per_group : int, default 10
        Mean number of rows per subject.
    seed : int, default 0
        Seed; the same arguments always give the same frame.
    unbalanced : bool, default True
        If True, group sizes are uniform on ``1 .. 2*obs_per_group - 1``
        (mean ``obs_per_group``); otherwise every group has exactly
        ``obs_per_group`` rows.
    string_keys : bool, default False
        If True, ``subject`` holds strings ``"s000123"`` (zero-padded to at
        least 6 digits) instead of int64 ids ``0 .. groups-1``.
    shuffle : bool, default False
        If True, rows are randomly permuted; otherwise they are grouped by
        subject in increasing subject order.
    beta : sequence of 3 floats, default (1.0, 2.0, -0.5)
        Fixed effects: intercept, ``x``, ``x2``.
    sd_intercept, sd_slope : float, default 1.0, 0.5
        Standard deviations of the random intercept and random ``x`` slope.
    corr : float, default 0.3
        Correlation between random intercept and slope.
    sigma : float, default 1.0
        Residual standard deviation.
    x_dist : {"normal", "uniform10"}, default "normal"
        Layout of the covariates ``x`` and ``x2``: independent standard
        normal (centred), or independent ``U(0, 10)``, raw and uncentred
        (like ``Time`` in dietox; the random slope then dominates the
        between-subject variance at large ``x``).  The realistic layout users
        have is ``shuffle=True, x_dist="uniform10"`` (optionally
        ``string_keys=True``).  ``"normal"`` reproduces earlier releases'
        frames exactly.

    Returns
    -------
    polars.DataFrame
        Columns ``subject`` (int64 or string), ``x``, ``x2``, ``y``
        (float64).

    Notes
    -----
    Vectorised in chunks of ~256k rows into preallocated arrays, so peak
    memory is about the size of the output plus one chunk (plus one copy
    of the output when ``shuffle`` or ``string_keys`` is set).

    Examples
    --------
    >>> df = simulate(100, 5, seed=1)
    >>> df.columns
    ['subject', 'x', 'x2', 'y']
    """
    sim = _Sim(groups, obs_per_group, seed, unbalanced, beta, sd_intercept, sd_slope, corr, sigma, x_dist)
    n = int(sim.sizes().sum())
    subject = np.empty(n, dtype=np.int64)
    x = np.empty(n)
    x2 = np.empty(n)
    y = np.empty(n)
    pos = 0
    for c in range(sim.n_chunks):
        _, s, a, b, v, _ = sim.chunk(c)
        k = len(s)
        subject[pos:pos + k], x[pos:pos + k], x2[pos:pos + k], y[pos:pos + k] = s, a, b, v
        pos += k
    if shuffle:
        perm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SHUFFLE_KEY,))).permutation(n)
        subject, x, x2, y = subject[perm], x[perm], x2[perm], y[perm]
    return _frame(subject, x, x2, y, string_keys, sim.groups)


def _atomic_write(df: pl.DataFrame, path: Path, row_group_size: int | None) -> None:
    """Write ``df`` to ``path`` via a temp file in the same directory + ``os.replace``.

    Readers therefore never see a half-written file, and a crash leaves at
    most a hidden ``.*.tmp`` file, never a truncated ``path``.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        df.write_parquet(tmp, row_group_size=row_group_size)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _remove_stale_parts(out_dir: Path, keep: set[Path]) -> None:
    """Delete ``part-*.parquet`` left by an earlier, larger write to ``out_dir``.

    Otherwise a reader globbing the directory would silently mix old rows in.
    """
    for p in out_dir.glob("part-*.parquet"):
        if p not in keep:
            p.unlink(missing_ok=True)


def write_parquet(df: pl.DataFrame, out: str | Path, files: int = 1,
                  row_group_size: int | None = None) -> list[Path]:
    """Write a frame to parquet atomically, as one file or a directory of parts.

    Parameters
    ----------
    df : polars.DataFrame
        Data to write.
    out : str or Path
        ``files == 1``: the output file path.  ``files > 1``: a directory
        (created if needed) that receives ``part-00000.parquet``, ...
    files : int, default 1
        Number of files.  Rows are split into ``files`` contiguous slices of
        (almost) equal length, so a subject may straddle two adjacent files.
    row_group_size : int, optional
        Rows per parquet row group (polars' default if None).

    Returns
    -------
    list of Path
        The files written, in row order.

    Notes
    -----
    Each file is written to a temporary name in its target directory and then
    renamed with :func:`os.replace`.  With ``files > 1``, ``part-*.parquet``
    files in ``out`` that were not written by this call are removed.
    """
    if files < 1:
        raise ValueError(f"files must be >= 1, got {files}")
    out = Path(out)
    if files == 1:
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(df, out, row_group_size)
        return [out]
    out.mkdir(parents=True, exist_ok=True)
    n = df.height
    bounds = [i * n // files for i in range(files + 1)]
    paths = []
    for i in range(files):
        p = out / _part_name(i)
        _atomic_write(df.slice(bounds[i], bounds[i + 1] - bounds[i]), p, row_group_size)
        paths.append(p)
    _remove_stale_parts(out, set(paths))
    return paths


def simulate_to_parquet(out_dir: str | Path, groups: int, obs_per_group: int = 10,
                        files: int = 8, seed: int = 0, *, unbalanced: bool = True,
                        string_keys: bool = False, shuffle: bool = False,
                        shuffle_window: int = 4, row_group_size: int | None = None,
                        beta: Sequence[float] = (1.0, 2.0, -0.5), sd_intercept: float = 1.0,
                        sd_slope: float = 0.5, corr: float = 0.3,
                        sigma: float = 1.0, x_dist: str = "normal") -> list[Path]:
    """Simulate straight to a directory of parquet files, one file at a time.

    For data larger than memory: peak memory is about one output file plus
    one generation chunk (~256k rows), independent of ``groups``.

    Parameters
    ----------
    out_dir : str or Path
        Directory receiving ``part-00000.parquet``, ... (created if needed;
        stale ``part-*.parquet`` files from earlier runs are removed).
    groups, obs_per_group, seed, unbalanced, string_keys, beta, sd_intercept, sd_slope, corr, sigma, x_dist
        As in :func:`simulate`.
    files : int, default 8
        Number of files.  File ``f`` owns the contiguous group range
        ``[f*groups//files, (f+1)*groups//files)``.
    shuffle : bool, default False
        If False, file ``f`` holds exactly its own groups, grouped by subject,
        and concatenating the files in order reproduces
        ``simulate(groups, obs_per_group, seed=seed, ...)`` row for row.
        If True, files are processed in windows of ``shuffle_window``
        consecutive files: every row of the window's groups is sent to a
        uniformly random file of the window and rows are permuted within each
        file, so a subject is typically spread over several files.
    shuffle_window : int, default 4
        Width of the shuffle window (ignored unless ``shuffle``).  Memory
        stays bounded by one file: each file of a window re-generates the
        window's chunks and keeps only its own rows, trading
        ``shuffle_window`` times the generation work for bounded memory.
    row_group_size : int, optional
        Rows per parquet row group.

    Returns
    -------
    list of Path
        Files written, in order.

    Notes
    -----
    With ``shuffle=True`` the row multiset equals the unshuffled one (same
    groups, same values), only the placement differs; it does not match
    ``simulate(..., shuffle=True)``, which permutes globally.
    """
    if files < 1:
        raise ValueError(f"files must be >= 1, got {files}")
    if shuffle_window < 1:
        raise ValueError(f"shuffle_window must be >= 1, got {shuffle_window}")
    sim = _Sim(groups, obs_per_group, seed, unbalanced, beta, sd_intercept, sd_slope, corr, sigma, x_dist)
    files = min(int(files), sim.groups)  # never write empty files
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gb = [f * sim.groups // files for f in range(files + 1)]  # group bounds per file
    width = shuffle_window if shuffle else 1

    paths: list[Path] = []
    for w0 in range(0, files, width):
        w1 = min(w0 + width, files)
        for f in range(w0, w1):
            # shuffle: this file takes the rows of window [w0, w1) whose slot is
            # f - w0; otherwise it takes the rows of its own groups.
            lo, hi = (gb[w0], gb[w1]) if shuffle else (gb[f], gb[f + 1])
            parts = _collect(sim, lo, hi, slots=(w1 - w0) if shuffle else 0, slot=f - w0)
            subject, x, x2, y = (np.concatenate(col) for col in zip(*parts))
            if shuffle:
                perm = np.random.default_rng(
                    np.random.SeedSequence(seed, spawn_key=(_SHUFFLE_KEY, f))).permutation(len(y))
                subject, x, x2, y = subject[perm], x[perm], x2[perm], y[perm]
            p = out_dir / _part_name(f)
            _atomic_write(_frame(subject, x, x2, y, string_keys, sim.groups), p, row_group_size)
            paths.append(p)
    _remove_stale_parts(out_dir, set(paths))
    return paths


def _collect(sim: _Sim, lo: int, hi: int, slots: int, slot: int
             ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Rows of groups ``[lo, hi)`` (restricted to ``slot`` when ``slots``), chunk by chunk."""
    parts = []
    for c in range(lo // sim.chunk_groups, (hi - 1) // sim.chunk_groups + 1):
        sizes, s, a, b, v, sl = sim.chunk(c, slots)
        clo, _ = sim.chunk_bounds(c)
        # rows of the chunk that belong to groups [lo, hi): groups are
        # contiguous within a chunk, so this is a row slice.
        ends = np.concatenate(([0], np.cumsum(sizes)))
        r0 = int(ends[max(lo - clo, 0)])
        r1 = int(ends[min(hi - clo, len(sizes))])
        sel: slice | np.ndarray = slice(r0, r1)
        if slots:
            sel = r0 + np.flatnonzero(sl[r0:r1] == slot)
        parts.append((s[sel], a[sel], b[sel], v[sel]))
    return parts


# --------------------------------------------------------------------------
# several random-effects terms: re-exported from bigmixed.simulate_multi
# --------------------------------------------------------------------------

if TYPE_CHECKING:  # for type checkers and linters; at run time see __getattr__
    from .simulate_multi import simulate_crossed, simulate_crossed_to_parquet, simulate_nested

_MULTI = frozenset({"simulate_nested", "simulate_crossed", "simulate_crossed_to_parquet"})


def __getattr__(name: str):
    # Lazy re-export (PEP 562): simulate_multi imports this module's helpers,
    # so importing it eagerly here would be circular when simulate_multi is
    # imported first.
    if name in _MULTI:
        from . import simulate_multi

        return getattr(simulate_multi, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _MULTI)
