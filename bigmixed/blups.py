"""Conditional modes (BLUPs) per term, their conditional covariances, predictions, and their output.

The backend gives each term's modes of the transformed problem, ``b~`` and ``K~`` (the
conditional covariance of ``b~`` over sigma~^2); here they are mapped to the user's scale,
``b = s_y S_k b~`` and ``Cov(b | y) = s_y^2 sigma~^2 S_k K~ S_k'`` (DESIGN.md section 4), and
combined with the rows for predictions: ``X beta + offset + sum_k Z_k b_k[level]``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

from . import _kernels

__all__ = ["conditional_modes", "conditional_covariances", "frame", "ranef_frame", "write", "predict",
           "predict_chunk", "response"]


def conditional_modes(res) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per term: BLUPs on the user's scale (levels, q) and the kernel's unscaled K~ (levels, q, q).

    K~ is mapped to the conditional covariances only when they are asked for
    (:func:`conditional_covariances`): at 1e7 levels that mapping is ~1 GB of temporaries.
    """
    be = res.objective_fn.backend
    sol = res._sol
    modes = be.conditional_modes(sol.lams, sol.beta)
    sy = res.scaling.y_scale
    return [(np.ascontiguousarray(sy * (bt @ S.T)), Kt) for (bt, Kt), S in zip(modes, res._S)]


def conditional_covariances(res, k: int) -> np.ndarray:
    """Conditional covariances of term k's BLUPs, sigma^2 S K~_i S' (levels, q, q), user's scale."""
    S, sy = res._S[k], res.scaling.y_scale
    return (sy**2 * res._sol.sigma2) * np.einsum("ab,gbc,dc->gad", S, res._modes[k][1], S, optimize=True)


def frame(res, k: int, backend: str = "pandas"):
    """Term k's BLUPs, one row per level: the key column(s) and one column per effect."""
    term = res.model.built.terms[k]
    b = res._modes[k][0]
    keys = term.index.frame()
    data = {c: keys.get_column(c) for c in keys.columns}
    for j, name in enumerate(term.re_names):
        data[name if name not in data else f"{name}_re"] = b[:, j]
    df = pl.DataFrame(data)
    return df if backend == "polars" else df.to_pandas()


def ranef_frame(res, k: int) -> pd.DataFrame:
    """lme4's ``ranef(fit)[[term]]``: BLUPs indexed by level (``"a:b"`` labels for an interaction)."""
    term = res.model.built.terms[k]
    b = res._modes[k][0]
    cols = res.lme4_names(k)
    idx = pd.Index(term.index.keys.to_list(), name=term.name)
    return pd.DataFrame(b, index=idx, columns=cols)


def write(res, out_dir, k: int) -> list[Path]:
    """Write term k's BLUPs to parquet in ``out_dir``, atomically.

    Statistics resident on Dask workers: each worker writes its partition, ``part-00000.parquet``
    ... (nothing is gathered to the driver).  Otherwise one file, ``part-00000.parquet``.  Files
    are written to a temporary name and renamed, so a reader never sees a partial file.
    """
    b = res.model.built
    if b.mode == "resident":
        sol = res._sol
        return b.backend.write_random_effects(out_dir, sol.lams, sol.beta, res._S, res.scaling.y_scale,
                                              list(b.terms[k].re_names), b.terms[k], k)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "part-00000.parquet"
    tmp = out / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        frame(res, k, "polars").write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in out.glob("part-*.parquet"):  # from an earlier run written in more parts
        if stale != path:
            stale.unlink()
    return [path]


def _needed(design, source) -> list[str]:
    cols = [c for c in design.predictor_columns if c in source.schema]
    cols += [c for c in design.key_columns if c in source.schema and c not in cols]
    return cols


def predict(res, newdata: Any = None, include_random: bool = True, fitted: bool = False) -> np.ndarray:
    """Predictions for ``newdata`` (default: the fitted data), one per row (see ``MixedLMResults.predict``).

    ``fitted``: NaN also for the rows the fit dropped (a missing response, key or weight), in the
    same pass: the fitted values of the fitted data.
    """
    from .data import open_source

    if newdata is None:
        if res.model.data is None:
            raise ValueError("the fitted data are not held in this process; pass newdata")
        source = res.model.data
    else:
        source = open_source(newdata)
    design = res.model.built.design
    missing = [c for c in design.predictor_columns if c not in source.schema]
    if missing:
        raise ValueError(f"the data to predict lack column(s) {missing} used by the model")
    cols = list(design.columns) if fitted else _needed(design, source)
    out = [predict_chunk(res, chunk, include_random, fitted) for _, chunk in source.batches(cols, 1_000_000)]
    return np.concatenate(out) if out else np.zeros(0)


def predict_chunk(res, chunk: pl.DataFrame, include_random: bool, fitted: bool = False) -> np.ndarray:
    """``X beta + offset + sum_k Z_k b_k`` for the rows of one chunk; NaN where a predictor is missing
    (``fitted``: where any column of the model is, as for the rows the fit dropped)."""
    from .pipeline import _missing_exprs

    built = res.model.built
    design = built.design
    okmask = np.ones(chunk.height, dtype=bool)  # an intercept-only model: no predictor can be missing
    cols = [c for c in design.predictor_columns if c in chunk.columns]
    if cols:
        okmask = ~chunk.select(pl.any_horizontal([pl.col(c).is_null() for c in cols])).to_series().to_numpy()
    if fitted:
        miss = list(_missing_exprs(list(design.columns), dict(chunk.schema)).values())
        okmask &= ~chunk.select(pl.any_horizontal(miss)).to_series().to_numpy()
    out = np.full(chunk.height, np.nan)
    if not okmask.any():
        return out
    sub = chunk.filter(pl.Series(okmask))
    X, Z = design.predictor_matrices(sub)
    X = np.ascontiguousarray(X[:, built.kept_fe])
    none = np.full(sub.height, -1, dtype=np.int64)
    pred = _kernels.linear_predictor(X, np.zeros((sub.height, 0)), res._beta, np.zeros((1, 0)), none, 1)
    off = design.offset(sub)
    if off is not None:
        pred = pred + off
    if include_random:
        for k, term in enumerate(built.terms):
            if not all(c in sub.columns for c in term.factors):
                continue  # no keys: the population level for this term
            codes = term.index.codes(_keys_as_fitted(term, sub))
            Zk = np.ascontiguousarray(Z[:, term.offset:term.offset + term.q])
            pred = pred + _kernels.linear_predictor(np.zeros((sub.height, 0)), Zk, np.zeros(0), res._modes[k][0],
                                                    codes, 1)
    out[okmask] = pred
    return out


def _keys_as_fitted(term, chunk: pl.DataFrame) -> pl.DataFrame:
    """``chunk`` with the term's key columns cast to the fitted keys' type where one is a string and
    the other not (keys read as strings in the fit, integers in the new data, or the reverse):
    level 308 is level "308", as R matches a factor's levels."""
    parts = getattr(term.index, "parts", None)  # on a Dask cluster: the keys' frame
    fitted = [p.keys.dtype for p in parts] if parts is not None else list(term.index.frame().schema.values())
    casts = []
    for col, want in zip(term.factors, fitted):
        have = chunk.schema[col]
        if (want != have and pl.String in (want, have)) or isinstance(have, (pl.Categorical, pl.Enum)):
            casts.append(pl.col(col).cast(pl.String).cast(want, strict=False))
    return chunk.with_columns(casts) if casts else chunk


def response(res) -> np.ndarray:
    """The response of the fitted rows, in row order (NaN where missing)."""
    design = res.model.built.design
    ys = [design.response(chunk) for _, chunk in res.model.data.batches(design.columns, 1_000_000)]
    return np.concatenate(ys) if ys else np.zeros(0)
