"""statsmodels' parameter record, ``free`` patterns and the array form of the model.

:class:`MixedLMParams` is statsmodels' start / ``free`` record; :func:`structure_from_free`
turns a ``free`` pattern into the covariance template of the first term (blocks, effects
held at zero or at a value); :func:`frame_from_arrays` turns statsmodels' array form
``MixedLM(endog, exog, groups, exog_re)`` into a data frame and formulas.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from .columns import is_pandas

__all__ = ["MixedLMParams", "structure_from_free", "frame_from_arrays"]


class MixedLMParams:
    """Fixed effects and random-effects covariance, statsmodels' parameter record.

    As in statsmodels, ``cov_re`` is relative to the residual variance
    (Psi / sigma^2) when used as a start; as ``free`` its entries are 1 for
    an estimated parameter and 0 for one held at its start value.
    """

    def __init__(self, fe_params: np.ndarray, cov_re: np.ndarray) -> None:
        self.fe_params = np.atleast_1d(np.asarray(fe_params, dtype=float))
        self.cov_re = np.atleast_2d(np.asarray(cov_re, dtype=float))
        if self.cov_re.shape[0] != self.cov_re.shape[1]:
            raise ValueError(f"cov_re must be square, got shape {self.cov_re.shape}")

    @classmethod
    def from_components(cls, fe_params=None, cov_re=None, cov_re_sqrt=None, vcomp=None) -> "MixedLMParams":
        """Build from ``fe_params`` and ``cov_re`` (or its square root ``cov_re_sqrt``)."""
        if vcomp is not None and np.size(vcomp):
            raise NotImplementedError("variance-component start values (vcomp) are not supported; give "
                                      "start values for the random effects as lme4's theta instead")
        if cov_re is None and cov_re_sqrt is not None:
            r = np.atleast_2d(np.asarray(cov_re_sqrt, dtype=float))
            cov_re = r @ r.T
        if cov_re is None:
            raise ValueError("give cov_re or cov_re_sqrt")
        return cls(np.zeros(0) if fe_params is None else fe_params, cov_re)

    def __repr__(self) -> str:
        return f"MixedLMParams(fe_params={self.fe_params!r}, cov_re={self.cov_re!r})"


def structure_from_free(free: MixedLMParams | None, start: MixedLMParams | None, design_blocks,
                        names: list[str]) -> tuple[tuple, tuple, dict]:
    """``(blocks, zero, held)`` of the first term from statsmodels' ``free`` (and the start values).

    A zero off-diagonal of ``free.cov_re`` makes two effects independent (block-diagonal
    pattern); a zero diagonal holds that effect's variance at its start value: at 0 when the
    start is 0 (or absent) - the effect is dropped - else at ``start.cov_re[j, j]`` (relative to
    the residual variance, as statsmodels), which needs the effect independent of the others.
    ``held`` maps such columns to their relative variance.
    """
    q = len(names)
    if free is None:
        return tuple(tuple(b) for b in design_blocks), (), {}
    if free.fe_params.size and not np.all(free.fe_params != 0):
        raise NotImplementedError(
            "holding fixed effects at their start values (zeros in free.fe_params) is not supported; "
            "move them to an offset instead (offset= or offset(...) in the formula)"
        )
    fc = free.cov_re
    if fc.shape != (q, q):
        raise ValueError(f"free.cov_re must be {q}x{q} for random effects {names}")
    start_cov = start.cov_re if isinstance(start, MixedLMParams) else None
    zero, held = [], {}
    for j in range(q):
        if fc[j, j] != 0:
            continue
        v = 0.0 if start_cov is None else float(start_cov[j, j])
        if v == 0.0:
            zero.append(j)
        elif v < 0 or not np.isfinite(v):
            raise ValueError(f"start_params.cov_re[{j}, {j}] = {v} cannot be held as a variance")
        else:
            held[j] = v
    block_of = {j: k for k, blk in enumerate(design_blocks) for j in blk}
    comp = list(range(q))  # connected components of "may covary"

    def find(a):
        while comp[a] != a:
            comp[a] = comp[comp[a]]
            a = comp[a]
        return a

    for a in range(q):
        for b in range(a):
            if fc[a, b] != 0 and fc[b, a] != 0 and block_of[a] == block_of[b]:
                comp[find(a)] = find(b)
    blocks: dict[int, list[int]] = {}
    for j in range(q):
        blocks.setdefault(find(j), []).append(j)
    out = tuple(tuple(v) for v in blocks.values())
    for blk in out:
        for a in blk:
            for b in blk:
                if a != b and fc[a, b] == 0:
                    raise NotImplementedError(
                        "free.cov_re must give a block-diagonal pattern (every pair inside a block free); "
                        f"random effects {names[a]!r} and {names[b]!r} are linked through others but not free "
                        "themselves")
        for j in blk:
            if j in held and len(blk) > 1:
                raise NotImplementedError(
                    f"holding the variance of {names[j]!r} at its start value while it covaries with other "
                    "random effects is not supported; make it independent (zero off-diagonals in free.cov_re)")
    return out, tuple(zero), held


def _names(obj: Any, prefix: str, k: int) -> list[str] | None:
    if is_pandas(obj):
        return [str(c) for c in obj.columns]
    if isinstance(obj, pl.DataFrame):
        return list(obj.columns)
    if is_pandas(obj, "Series") and obj.name is not None:
        return [str(obj.name)]
    return None


def _matrix(obj: Any, what: str) -> np.ndarray:
    try:
        arr = obj.to_numpy() if hasattr(obj, "to_numpy") else np.asarray(obj)
        arr = np.asarray(arr, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numeric (an array or a DataFrame of numbers)") from None
    return arr.reshape(-1, 1) if arr.ndim == 1 else arr


def _quote(name: str) -> str:
    return name if name.isidentifier() else f"`{name}`"


def frame_from_arrays(endog: Any, exog: Any, groups: Any, exog_re: Any = None) -> tuple[pl.DataFrame, str, str, str]:
    """statsmodels' array form as ``(frame, formula, re_formula, group column)``.

    Names follow statsmodels: DataFrame columns (or a named Series) are kept; otherwise
    the response is ``y``, a constant column of ``exog`` is ``const`` and the others
    ``x1, x2, ...``, and the random-effects columns ``x_re1, x_re2, ...``.  No intercept is
    added: the columns are the model, as in statsmodels.  ``exog_re=None`` is a random
    intercept per group.
    """
    y = _matrix(endog, "endog")
    if y.shape[1] != 1:
        raise ValueError(f"endog must be one column, not {y.shape[1]}")
    X = _matrix(exog, "exog")
    n = y.shape[0]
    if X.shape[0] != n:
        raise ValueError(f"exog has {X.shape[0]} rows but endog has {n}")
    yname = (_names(endog, "y", 1) or ["y"])[0]
    xnames = _names(exog, "x", X.shape[1])
    if xnames is None:
        xnames, k = [], 0
        for j in range(X.shape[1]):
            col = X[:, j]
            if np.all(col == col[0]) and np.isfinite(col[0]) and col[0] != 0:
                xnames.append("const")
            else:
                k += 1
                xnames.append(f"x{k}")
    data: dict[str, Any] = {yname: y[:, 0]}
    for name, col in zip(xnames, X.T):
        data[name] = col
    re_names: list[str] = []
    if exog_re is not None:
        Z = _matrix(exog_re, "exog_re")
        if Z.shape[0] != n:
            raise ValueError(f"exog_re has {Z.shape[0]} rows but endog has {n}")
        given = _names(exog_re, "x_re", Z.shape[1]) or [f"x_re{k + 1}" for k in range(Z.shape[1])]
        for name, col in zip(given, Z.T):
            if name in data and not np.array_equal(np.asarray(data[name]), col, equal_nan=True):
                name = f"{name}_re"  # a different column under the same name
            data[name] = col
            re_names.append(name)
    series = isinstance(groups, pl.Series) or is_pandas(groups, "Series")
    g = groups.to_numpy() if series else np.asarray(groups)
    if g.shape[0] != n:
        raise ValueError(f"groups has {g.shape[0]} values but endog has {n}")
    gname = "__group__"
    data[gname] = g
    frame = pl.DataFrame(data)
    formula = f"{_quote(yname)} ~ 0 + " + " + ".join(_quote(c) for c in xnames) if xnames else f"{_quote(yname)} ~ 0"
    re_formula = ("0 + " + " + ".join(_quote(c) for c in re_names)) if re_names else "1"
    return frame, formula, re_formula, gname
