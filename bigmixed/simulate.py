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

Two multi-term generators sit beside it:

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
# several random-effects terms: nested and crossed
# --------------------------------------------------------------------------

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
