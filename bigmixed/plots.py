"""Diagnostic plots: a caterpillar plot of the BLUPs and residual plots (matplotlib, the ``plot`` extra).

matplotlib is imported inside the functions, so ``import bigmixed`` never needs it.  Both plots stay
readable at any size: the caterpillar plot shows every level up to ``max_levels``, beyond that the
``n_extreme`` lowest and highest levels and a random sample of the rest (the title says how many of
how many); the residual plots use a systematic sample of at most ``max_points`` rows, read in chunks
(memory is one chunk).  Files are written to a temporary name and renamed: a reader never sees a
partial image.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special

__all__ = ["plot_ranef", "plot_residuals", "ranef_intervals", "save_figure"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt  # without a display matplotlib picks Agg itself
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'bigmixed[plot]'") from None
    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".") or "png"
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fig.savefig(tmp, dpi=dpi, format=fmt, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ranef_intervals(res, term: int | str = 0, level: float = 0.95) -> dict[str, pd.DataFrame]:
    """Per effect of a term: each level's BLUP and its conditional interval ``b -+ z sqrt(condVar)``.

    The conditional variances are lme4's ``ranef(condVar = TRUE)`` (``res.conditional_variances``).
    Returns ``{effect: DataFrame(level, estimate, lower, upper)}`` in the levels' order.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, not {level!r}")
    k = res._term_index(term)
    frame = res.ranef(k) if len(res.terms) > 1 else res.ranef()
    K = res.conditional_variances(k)
    z = float(special.ndtri(0.5 + level / 2.0))
    out = {}
    for j, col in enumerate(frame.columns):
        b = frame[col].to_numpy(dtype=float)
        h = z * np.sqrt(np.maximum(K[:, j, j], 0.0))
        out[col] = pd.DataFrame({"level": frame.index.astype(str), "estimate": b, "lower": b - h, "upper": b + h})
    return out


def _shown(n: int, est: np.ndarray, max_levels: int, n_extreme: int, rng) -> tuple[np.ndarray, str]:
    """Indices to draw (sorted by estimate) and the note saying what was left out."""
    order = np.argsort(est, kind="stable")
    if n <= max_levels:
        return order, f"{n:,} levels"
    ext = min(n_extreme, max_levels // 4)
    middle = order[ext:n - ext]
    k = max(max_levels - 2 * ext, 0)
    pick = np.sort(rng.choice(middle.size, size=min(k, middle.size), replace=False))
    idx = np.concatenate([order[:ext], middle[pick], order[n - ext:]])
    return idx, f"{idx.size:,} of {n:,} levels\n({ext} lowest, {ext} highest, {pick.size:,} at random)"


def plot_ranef(res, term: int | str | None = None, path: str | os.PathLike | None = None, *, level: float = 0.95,
               max_levels: int = 400, n_extreme: int = 20, seed: int = 0):
    """Caterpillar plot: each level's BLUP with its conditional interval, levels sorted by BLUP.

    Parameters
    ----------
    res
        A fitted :class:`~bigmixed.results.MixedLMResults`.
    term
        Grouping factor (name or position); ``None`` for all terms (one row of panels each).
    path
        Write the figure there (atomically); the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
    level
        Coverage of the conditional intervals (``b -+ qnorm((1 + level)/2) sqrt(condVar)``).
    max_levels, n_extreme, seed
        Above ``max_levels`` levels a panel shows the ``n_extreme`` lowest and highest and a seeded
        random sample of the others, and says so in its title.

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.bigmixed_data`` holds the plotted values: ``{(term, effect): DataFrame}``.
    """
    plt = _pyplot()
    terms = range(len(res.terms)) if term is None else [res._term_index(term)]
    panels = [(k, eff, frame) for k in terms for eff, frame in ranef_intervals(res, k, level).items()]
    rows = {k: [p for p in panels if p[0] == k] for k in terms}
    ncol = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncol, figsize=(4.2 * ncol, 4.8 * len(rows)), squeeze=False)
    data = {}
    rng = np.random.default_rng(seed)
    for r, (k, items) in enumerate(rows.items()):
        for c in range(ncol):
            ax = axes[r][c]
            if c >= len(items):
                ax.set_visible(False)
                continue
            _, eff, fr = items[c]
            idx, note = _shown(len(fr), fr["estimate"].to_numpy(), max_levels, n_extreme, rng)
            sub = fr.iloc[idx].reset_index(drop=True)
            y = np.arange(len(sub))
            est = sub["estimate"].to_numpy()
            ax.errorbar(est, y, xerr=np.vstack([est - sub["lower"].to_numpy(), sub["upper"].to_numpy() - est]),
                        fmt="o", ms=2.5, lw=0.8, color="#1f4e79", ecolor="#7aa6d6", label=eff)
            ax.axvline(0.0, color="grey", lw=0.8, ls="--")
            if len(sub) < len(fr):  # where the extremes end and the random sample begins
                ext = min(n_extreme, max_levels // 4)
                for yy in (ext - 0.5, len(sub) - ext - 0.5):
                    ax.axhline(yy, color="#c0504d", lw=0.6, ls=":")
            if len(sub) <= 60:
                ax.set_yticks(y, sub["level"].tolist(), fontsize=7)
            else:
                ax.set_yticks([])
                ax.set_ylabel("levels, sorted by BLUP")
            ax.set_title(f"{res.terms[k]}: {eff}\n{note}", fontsize=9)
            ax.set_xlabel(f"BLUP, {100 * level:g}% conditional interval")
            data[(res.terms[k], eff)] = sub
    fig.tight_layout()
    fig.bigmixed_data = data
    if path is not None:
        save_figure(fig, path)
    return fig


def residual_sample(res, data=None, max_points: int = 100_000, chunk_rows: int = 1_000_000) -> pd.DataFrame:
    """Fitted values and residuals of a systematic sample of at most ``max_points`` rows (one chunk in memory).

    Every ``ceil(n / max_points)``-th row of ``data`` (default: the fitted data) is kept.  Rows with a
    missing value are skipped.
    """
    from .blups import predict_chunk
    from .data import open_source

    source = res.model.data if data is None else open_source(data)
    if source is None:
        raise ValueError("the fitted data are not held in this process; pass data= (the same files)")
    design = res.model.built.design
    step = max(1, int(np.ceil((res.nobs + res.n_dropped) / max(int(max_points), 1))))
    fitted, resid, seen = [], [], 0
    for _, chunk in source.batches(design.columns, chunk_rows):
        n = chunk.height
        take = np.arange((-seen) % step, n, step)
        seen += n
        if not take.size:
            continue
        part = chunk[take]
        f = predict_chunk(res, part, True)
        y = design.response(part)
        ok = np.isfinite(f) & np.isfinite(y)
        fitted.append(f[ok])
        resid.append(y[ok] - f[ok])
    f = np.concatenate(fitted) if fitted else np.zeros(0)
    r = np.concatenate(resid) if resid else np.zeros(0)
    return pd.DataFrame({"fitted": f, "resid": r})


def plot_residuals(res, path: str | os.PathLike | None = None, *, data=None, max_points: int = 100_000):
    """Residuals against fitted values, and a normal QQ plot of the residuals over sigma.

    Parameters
    ----------
    res
        A fitted :class:`~bigmixed.results.MixedLMResults`.
    path
        Write the figure there (atomically).
    data
        The rows to use when the fit's data are not held in this process (files: the same paths).
    max_points
        At most this many rows are drawn (a systematic sample, stated in the title).

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.bigmixed_data`` holds the plotted sample (``fitted``, ``resid``).
    """
    plt = _pyplot()
    smp = residual_sample(res, data, max_points)
    n = len(smp)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    a1.scatter(smp["fitted"], smp["resid"], s=3, alpha=0.4 if n > 2000 else 0.8, color="#1f4e79", linewidths=0)
    a1.axhline(0.0, color="grey", lw=0.8, ls="--")
    a1.set_xlabel("fitted (with BLUPs)")
    a1.set_ylabel("residual")
    total = res.nobs
    a1.set_title(f"residuals vs fitted ({n:,} of {total:,} rows)" if n < total else f"residuals vs fitted ({n:,} rows)",
                 fontsize=9)
    std = np.sort(smp["resid"].to_numpy() / res.sigma)
    q = special.ndtri((np.arange(1, n + 1) - 0.5) / max(n, 1))
    a2.scatter(q, std, s=3, color="#1f4e79", linewidths=0)
    lim = [float(min(q.min(initial=0), std.min(initial=0))), float(max(q.max(initial=0), std.max(initial=0)))]
    a2.plot(lim, lim, color="grey", lw=0.8, ls="--")
    a2.set_xlabel("normal quantile")
    a2.set_ylabel("residual / sigma")
    a2.set_title("normal QQ plot of the residuals", fontsize=9)
    fig.tight_layout()
    fig.bigmixed_data = smp
    if path is not None:
        save_figure(fig, path)
    return fig
