"""Fitted model: estimates on the user's scale, inference, BLUPs, predictions.

The fit runs on transformed statistics (:class:`~bigmixed.stats.Scaling`);
every number here is mapped back exactly:

    beta = s_y T beta~ (+ m_y on the intercept)     Cov(beta) = s_y^2 sigma~^2 T F~^-1 T'
    Psi  = sigma^2 S Lambda~ Lambda~' S'           b_i = s_y S b~_i
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
# scipy.special (already loaded by scipy.optimize) rather than scipy.stats: importing
# scipy.stats costs ~0.35 s per process, a tenth of a 10M-row CLI fit. norm.sf(x) = ndtr(-x).
from scipy.special import ndtr, ndtri

from . import _kernels
from .objective import R2_FLOOR, NumericalError, Objective, ThetaMap
from .optimize import OptimizerState, hessian

__all__ = ["MixedLMResults", "theta_to_scaled", "safe_cholesky"]

SINGULAR_TOL = 1e-4  # lme4's isSingular() default


def safe_cholesky(S: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Lower Cholesky factor of a positive semi-definite matrix (zero pivots give zero columns)."""
    q = S.shape[0]
    L = np.zeros_like(S, dtype=float)
    scale = max(float(np.max(np.abs(np.diag(S)))) if q else 0.0, 1e-300)
    for j in range(q):
        d = S[j, j] - L[j, :j] @ L[j, :j]
        if d <= tol * scale:
            continue
        L[j, j] = np.sqrt(d)
        for i in range(j + 1, q):
            L[i, j] = (S[i, j] - L[i, :j] @ L[j, :j]) / L[j, j]
    return L


def theta_to_scaled(theta: np.ndarray, tmap: ThetaMap, scaling) -> np.ndarray:
    """lme4's theta on the user's scale -> theta of the transformed problem."""
    lam = tmap.lam(np.asarray(theta, dtype=float))
    Sinv = np.linalg.inv(scaling.z_matrix())
    return tmap.theta(safe_cholesky(Sinv @ lam @ lam.T @ Sinv.T))


class MixedLMResults:
    """Results of a fit; statsmodels' attribute names plus lme4's.

    statsmodels: ``fe_params``, ``bse_fe``, ``tvalues``, ``pvalues``, ``conf_int()``, ``cov_re``,
    ``scale``, ``llf``, ``aic``, ``bic``, ``converged``, ``random_effects``, ``fittedvalues``,
    ``resid``, ``predict()``, ``summary()``.  lme4: ``objective`` (REML criterion or deviance),
    ``theta``, ``sigma``, ``fixef``, ``ranef()``, ``VarCorr``, ``is_singular``, ``print(res)``.
    """

    def __init__(self, model, objective: Objective, state: OptimizerState, scaling) -> None:
        self.model = model
        self.objective_fn = objective
        self.optimizer = state
        self.scaling = scaling
        self.reml = objective.reml
        self.method = "REML" if self.reml else "ML"
        self.converged = bool(state.converged)
        self.n_iter = int(state.n_iter)
        self.tmap = objective.map
        sol = objective.solve(state.theta)
        self._sol = sol
        self.exog_names = list(model.exog_names)
        self.exog_re_names = list(model.exog_re_names)
        self.nobs = int(objective.N)
        self.n_groups = int(model.n_groups)

        T = scaling.x_matrix()
        S = scaling.z_matrix()
        sy = scaling.y_scale
        self._T, self._S = T, S
        self.scale = float(sy**2 * sol.sigma2)
        beta = sy * (T @ sol.beta)
        if scaling.x_intercept >= 0:
            beta[scaling.x_intercept] += scaling.y_shift
        self._beta = beta
        Finv = np.linalg.inv(sol.F) if sol.F.size else np.zeros((0, 0))
        self._cov_fe = sy**2 * sol.sigma2 * (T @ Finv @ T.T)
        rel = S @ sol.lam @ sol.lam.T @ S.T  # Psi / sigma^2
        self._lam = safe_cholesky(rel)
        self._cov_re = self.scale * rel
        self.objective = float(sol.deviance + objective.offset)
        self.llf = -0.5 * self.objective
        # Degenerate fits that lme4's theta test misses (is_singular reports them too).
        n_re = (len(self.exog_re_names) - len(self.tmap.zero)) * self.n_groups
        problems = []
        # r^2 at (or just above) its floor: the residual variance cannot be told from 0 and the
        # likelihood grows without bound towards it (see objective.R2_FLOOR).
        if sol.exact or sol.r2 <= 2.0 * R2_FLOOR * max(abs(float(objective.backend.yty)), float(self.nobs)):
            problems.append(
                "the residual variance is 0 to working precision: the fixed and random effects reproduce the "
                "response exactly (e.g. a response that is constant, or constant within groups), so the "
                "likelihood is unbounded and the variance estimates are not meaningful")
        if self.nobs <= n_re:
            problems.append(
                f"number of observations ({self.nobs}) <= number of random effects ({n_re}): the random-effects "
                "variances and the residual variance are probably unidentifiable")
        self._unidentified: str | None = "; and ".join(problems) or None

    # -- fixed effects -------------------------------------------------------------

    @property
    def fe_params(self) -> pd.Series:
        return pd.Series(self._beta, index=self.exog_names, name="fe_params")

    @property
    def fixef(self) -> pd.Series:
        """lme4's name for the fixed effects (``(Intercept)`` spelled as in R)."""
        return pd.Series(self._beta, index=[_r_name(n) for n in self.exog_names], name="fixef")

    def cov_params(self) -> pd.DataFrame:
        """Covariance of the fixed-effect estimates, sigma^2 (X'V^-1X)^-1."""
        return pd.DataFrame(self._cov_fe, index=self.exog_names, columns=self.exog_names)

    @property
    def bse_fe(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self._cov_fe)), index=self.exog_names, name="bse_fe")

    @property
    def bse(self) -> pd.Series:
        return self.bse_fe

    @property
    def tvalues(self) -> pd.Series:
        return pd.Series(self._beta / self.bse_fe.to_numpy(), index=self.exog_names, name="tvalues")

    @property
    def pvalues(self) -> pd.Series:
        """Two-sided Wald p-values (normal reference, as statsmodels)."""
        return pd.Series(2.0 * ndtr(-np.abs(self.tvalues.to_numpy())), index=self.exog_names, name="pvalues")

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Wald confidence intervals of the fixed effects."""
        z = ndtri(1.0 - alpha / 2.0)
        se = self.bse_fe.to_numpy()
        return pd.DataFrame({0: self._beta - z * se, 1: self._beta + z * se}, index=self.exog_names)

    def coef_table(self, alpha: float = 0.05) -> pd.DataFrame:
        """The fixed-effects table as a DataFrame (columns as in statsmodels' summary)."""
        ci = self.conf_int(alpha)
        lo, hi = f"[{alpha / 2:g}", f"{1 - alpha / 2:g}]"
        return pd.DataFrame(
            {
                "Coef.": self._beta,
                "Std.Err.": self.bse_fe.to_numpy(),
                "z": self.tvalues.to_numpy(),
                "P>|z|": self.pvalues.to_numpy(),
                lo: ci[0].to_numpy(),
                hi: ci[1].to_numpy(),
            },
            index=self.exog_names,
        )

    # -- variance components ---------------------------------------------------------

    @property
    def cov_re(self) -> pd.DataFrame:
        """Random-effects covariance Psi (statsmodels' ``cov_re``; the intercept is named ``Group``)."""
        names = self._sm_names
        return pd.DataFrame(self._cov_re, index=names, columns=names)

    @property
    def _sm_names(self) -> list[str]:
        """statsmodels' names of the random effects: the intercept is called ``Group``."""
        return ["Group" if n == "Intercept" else n for n in self.exog_re_names]

    @property
    def sigma(self) -> float:
        return float(np.sqrt(self.scale))

    @property
    def theta(self) -> np.ndarray:
        """lme4's theta: the free entries of chol(Psi / sigma^2), column by column."""
        return self.tmap.theta(self._lam)

    @property
    def is_singular(self) -> bool:
        """lme4's ``isSingular``: a diagonal theta below 1e-4 (variance 0 or correlation +-1).

        Also True when the variance parameters are not identified: no more rows than random
        effects in total (lme4 refuses to fit these), or a residual variance of 0 (the model
        reproduces the response exactly, e.g. a constant response).
        """
        th = self.theta
        return (bool(np.any(th[self.tmap.is_diag] < SINGULAR_TOL)) or bool(self.tmap.zero)
                or self._unidentified is not None)

    @property
    def VarCorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(fit))``: grp, var1, var2, vcov, sdcor."""
        g = self.model.spec.group
        names = [_r_name(n) for n in self.exog_re_names]
        sd = np.sqrt(np.diag(self._cov_re))
        rows = [(g, names[a], None, self._cov_re[a, a], sd[a]) for a in range(len(names))]
        for b in range(len(names)):
            for a in range(b + 1, len(names)):
                if self._structural(a, b):
                    denom = sd[a] * sd[b]
                    corr = self._cov_re[a, b] / denom if denom > 0 else np.nan
                    rows.append((g, names[b], names[a], self._cov_re[a, b], corr))
        rows.append(("Residual", None, None, self.scale, self.sigma))
        return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

    def _structural(self, a: int, b: int) -> bool:
        """Whether Psi[a, b] is a parameter (not fixed at 0 by the structure)."""
        for blk in self.tmap.blocks:
            if a in blk and b in blk:
                return a not in self.tmap.zero and b not in self.tmap.zero
        return False

    @cached_property
    def _var_cov(self) -> np.ndarray:
        """Covariance of (vech Psi, sigma^2) from the Hessian of the deviance (delta method).

        The Hessian is taken in the transformed problem's (theta, sigma^2) by
        forward differences of the analytic gradient, then mapped to Psi.
        """
        obj = self.objective_fn
        th = self._sol.theta
        x0 = np.append(th, self._sol.sigma2)
        try:
            with np.errstate(all="ignore"):  # degenerate fits (sigma^2 ~ 0) give NaN, reported as NaN
                H = hessian(lambda x: obj.unprofiled(x[:-1], x[-1]), x0)
                cov_phi = 2.0 * np.linalg.inv(H)
        except (np.linalg.LinAlgError, NumericalError):
            cov_phi = np.full((x0.size, x0.size), np.nan)
        if np.any(np.diag(cov_phi) < 0):
            cov_phi = np.full_like(cov_phi, np.nan)
        q = len(self.exog_re_names)
        S, sy2 = self._S, self.scaling.y_scale**2
        lam = self._sol.lam
        s2 = self._sol.sigma2
        pairs = [(a, b) for b in range(q) for a in range(b, q)]
        J = np.zeros((len(pairs) + 1, x0.size))
        for k in range(self.tmap.size):
            E = np.zeros((q, q))
            E[self.tmap.rows[k], self.tmap.cols[k]] = 1.0
            dPsi = sy2 * s2 * S @ (E @ lam.T + lam @ E.T) @ S.T
            J[:-1, k] = [dPsi[a, b] for a, b in pairs]
        dPsi = sy2 * S @ lam @ lam.T @ S.T
        J[:-1, -1] = [dPsi[a, b] for a, b in pairs]
        J[-1, -1] = sy2
        return J @ cov_phi @ J.T

    @property
    def bse_re(self) -> pd.Series:
        """Standard errors of the variance components (Var, Cov rows), from the observed information.

        Unlike statsmodels (which reports the SE of Psi/sigma^2 times sigma),
        these are Wald SEs of the entries of Psi themselves; NaN on the boundary.
        """
        q = len(self.exog_re_names)
        C = self._var_cov
        pairs = [(a, b) for b in range(q) for a in range(b, q)]
        se = np.sqrt(np.clip(np.diag(C)[:-1], 0.0, None))
        out = {}
        for k, (a, b) in enumerate(pairs):
            if not self._structural(a, b):
                continue
            out[_sm_var_name(self.exog_re_names, a, b)] = se[k] if np.isfinite(C[k, k]) else np.nan
        return pd.Series(out, name="bse_re", dtype=float)

    @property
    def bse_scale(self) -> float:
        return float(np.sqrt(max(self._var_cov[-1, -1], 0.0)))

    # -- information criteria -------------------------------------------------------

    @property
    def df_modelwc(self) -> int:
        """Parameters counted by AIC/BIC: fixed effects, theta, sigma."""
        return len(self.exog_names) + self.tmap.size + 1

    @property
    def aic(self) -> float:
        return self.objective + 2.0 * self.df_modelwc

    @property
    def bic(self) -> float:
        return self.objective + np.log(self.nobs) * self.df_modelwc

    # -- conditional modes -------------------------------------------------------------

    @cached_property
    def _modes(self) -> tuple[np.ndarray, np.ndarray]:
        """BLUPs on the user's scale, and the kernel's (transformed, unscaled) K_i.

        K_i is mapped to the conditional covariances only when they are asked for
        (:attr:`random_effects_cov`): at 1e7 groups that mapping is ~1 GB of temporaries.
        """
        be = self.objective_fn.backend
        bt, Kt = be.conditional_modes(self._sol.lam, self._sol.beta)
        S, sy = self._S, self.scaling.y_scale
        return np.ascontiguousarray(sy * (bt @ S.T)), Kt

    @cached_property
    def _cond_cov(self) -> np.ndarray:
        """Conditional covariances of the BLUPs, sigma^2 S K~_i S' (G, q, q), user's scale."""
        S, sy = self._S, self.scaling.y_scale
        return (sy**2 * self._sol.sigma2) * np.einsum("ab,gbc,dc->gad", S, self._modes[1], S, optimize=True)

    @property
    def group_labels(self) -> list:
        return self.model.built.groups.to_list()

    def random_effects_frame(self, backend: str = "pandas"):
        """Conditional modes (BLUPs), one row per group: the group key and one column per effect."""
        b = self._modes[0]
        data = {self.model.spec.group: self.model.built.groups.keys}
        for j, name in enumerate(self.exog_re_names):
            data[name] = b[:, j]
        df = pl.DataFrame(data)
        return df if backend == "polars" else df.to_pandas()

    @cached_property
    def random_effects(self) -> dict:
        """statsmodels' ``random_effects``: {group: Series of BLUPs} (use random_effects_frame at scale)."""
        b = self._modes[0]
        idx = pd.Index(self._sm_names)
        return {k: pd.Series(b[i], index=idx) for i, k in enumerate(self.group_labels)}

    @cached_property
    def random_effects_cov(self) -> dict:
        """{group: conditional covariance of its BLUPs} (statsmodels' ``random_effects_cov``)."""
        K = self._cond_cov
        names = self._sm_names
        return {k: pd.DataFrame(K[i], index=names, columns=names) for i, k in enumerate(self.group_labels)}

    def write_random_effects(self, out_dir) -> list:
        """Write the BLUPs (as :meth:`random_effects_frame`) to parquet files in ``out_dir``.

        Statistics resident on Dask workers: each worker writes its partition,
        ``part-00000.parquet`` ... (nothing is gathered to the driver).  Otherwise
        one file, ``part-00000.parquet``.  Files are written to a temporary name
        and renamed, so a reader never sees a partial file.  Returns the paths.
        """
        import os
        import uuid
        from pathlib import Path

        be = self.objective_fn.backend
        if hasattr(be, "write_random_effects"):
            return be.write_random_effects(out_dir, self._sol.lam, self._sol.beta, self._S,
                                           self.scaling.y_scale, self.exog_re_names, self.model.spec.group)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "part-00000.parquet"
        tmp = out / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.random_effects_frame("polars").write_parquet(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        for stale in out.glob("part-*.parquet"):  # from an earlier run written in more parts
            if stale != path:
                stale.unlink()
        return [path]

    def ranef(self) -> pd.DataFrame:
        """lme4's ``ranef(fit)[[group]]``: BLUPs indexed by group level."""
        df = self.random_effects_frame()
        df = df.set_index(self.model.spec.group)
        df.columns = [_r_name(n) for n in self.exog_re_names]
        return df

    # -- fitted values and predictions ---------------------------------------------------

    def predict(self, newdata: Any = None, include_random: bool = True) -> np.ndarray:
        """Predictions for ``newdata`` (default: the fitted data), one per row.

        Conditional on the group's BLUPs for groups seen in the fit; groups not
        seen (and ``include_random=False``) get the population-level X beta.
        Rows with missing values in a used column give NaN.
        """
        from .data import open_source

        if newdata is None:
            if self.model.data is None:
                raise ValueError("the fitted data are not held in this process; pass newdata")
            source = self.model.data
        else:
            source = open_source(newdata)
        design = self.model.built.design
        out = []
        for _, chunk in source.batches(_needed_for_predict(design, source), 1_000_000):
            out.append(self._predict_chunk(chunk, include_random))
        return np.concatenate(out) if out else np.zeros(0)

    def _predict_chunk(self, chunk: pl.DataFrame, include_random: bool) -> np.ndarray:
        design = self.model.built.design
        cols = [c for c in design.predictor_columns if c in chunk.columns]
        bad = pl.any_horizontal([pl.col(c).is_null() for c in cols]) if cols else pl.lit(False)
        okmask = ~chunk.select(bad.alias("b")).to_series().to_numpy()
        res = np.full(chunk.height, np.nan)
        if not okmask.any():
            return res
        sub = chunk.filter(pl.Series(okmask))
        X, Z = design.predictor_matrices(sub)
        X = np.ascontiguousarray(X[:, self.model.built.kept_fe])
        if include_random:
            codes = self.model.built.groups.codes(sub.get_column(self.model.spec.group)) \
                if self.model.spec.group in sub.columns else np.full(sub.height, -1, dtype=np.int64)
            b = self._modes[0]
        else:
            codes = np.full(sub.height, -1, dtype=np.int64)
            b = np.zeros((1, Z.shape[1]))
        pred = _kernels.linear_predictor(X, np.ascontiguousarray(Z), self._beta, b, codes, 1)
        res[okmask] = pred
        return res

    def write_predictions(self, data: Any, out, *, keys: list[str] | None = None,
                          include_random: bool = True, chunk_rows: int | None = None,
                          progress: bool | None = False):
        """Stream predictions for ``data`` (paths/globs, LazyFrame, DataFrame) to one parquet file.

        Columns: ``keys`` (default: the grouping column), ``fitted`` and, when the
        response is in the data, ``resid``; rows in input order; memory is one
        chunk.  Written to ``.<name>.tmp-<pid>`` and renamed, so ``out`` is never
        partial.  ``data=None`` uses the fitted data.  Returns the path.
        """
        from ._io import write_predictions

        return write_predictions(self, data, out, keys=keys, chunk_rows=chunk_rows,
                                 include_random=include_random, progress=progress)

    @cached_property
    def fittedvalues(self) -> np.ndarray:
        """Fitted values X beta + Z b for the rows of the fitted data (NaN for dropped rows)."""
        return self.predict()

    @cached_property
    def resid(self) -> np.ndarray:
        """Response minus fitted values (NaN for dropped rows)."""
        design = self.model.built.design
        ys = [design.response(chunk) for _, chunk in self.model.data.batches(design.columns, 1_000_000)]
        return np.concatenate(ys) - self.fittedvalues

    # -- rendering ----------------------------------------------------------------------

    def summary(self, alpha: float = 0.05):
        """statsmodels-layout summary (``print(res.summary())``)."""
        from .summary import Summary

        return Summary(self, alpha)

    def __str__(self) -> str:
        from .summary import lme4_text

        return lme4_text(self)

    def __repr__(self) -> str:
        return f"<bigmixed.MixedLMResults {self.method} objective={self.objective:.4f} converged={self.converged}>"

    def group_sizes(self) -> np.ndarray:
        b = self.model.built
        if getattr(b, "stats", None) is None and getattr(b, "backend", None) is not None:
            return b.backend.group_sizes()  # resident on Dask workers (bigmixed.distributed)
        return np.asarray(b.stats.n) if hasattr(b, "stats") else np.zeros(0)

    def to_dict(self) -> dict:
        """Everything estimated, as plain JSON-able types."""
        b = self.model.built
        vc = self.VarCorr
        return {
            "formula": self.model.formula,
            "method": self.method,
            "nobs": self.nobs,
            "n_groups": self.n_groups,
            "group": self.model.spec.group,
            "objective": self.objective,
            "llf": self.llf,
            "aic": self.aic,
            "bic": self.bic,
            "converged": self.converged,
            "singular": self.is_singular,
            "n_iter": self.n_iter,
            "fe_params": _jsonable(self.fe_params.to_dict()),
            "bse_fe": _jsonable(self.bse_fe.to_dict()),
            "pvalues": _jsonable(self.pvalues.to_dict()),
            "cov_re": self._cov_re.tolist(),
            "re_names": self.exog_re_names,
            "bse_re": _jsonable(self.bse_re.to_dict()),
            "scale": self.scale,
            "sigma": self.sigma,
            "theta": self.theta.tolist(),
            "varcorr": json.loads(vc.to_json(orient="records")),
            "rows_read": int(b.n_rows_read),
            "rows_dropped": int(b.n_dropped),
            "dropped_by_column": {k: int(v) for k, v in b.dropped_by_column.items()},
            "aliased_columns": list(b.aliased),
            "optimizer": self.optimizer.to_dict(),
            "timings": dict(self.model._timings, optimize=self.optimizer.seconds),
        }


def _needed_for_predict(design, source) -> list[str]:
    cols = [c for c in design.predictor_columns if c in source.schema]
    g = design.group_column
    if g in source.schema and g not in cols:
        cols.append(g)
    return cols


def _jsonable(d: dict) -> dict:
    return {str(k): (None if v is None or (isinstance(v, float) and not np.isfinite(v)) else float(v))
            for k, v in d.items()}


def _r_name(name: str) -> str:
    return "(Intercept)" if name == "Intercept" else name


def _sm_var_name(names: list[str], a: int, b: int) -> str:
    """statsmodels' row names: 'Group Var', 'Group x Time Cov', 'Time Var'."""
    lab = ["Group" if n == "Intercept" else n for n in names]
    if len(names) == 1:
        return "Group Var"
    if a == b:
        return f"{lab[a]} Var"
    return f"{lab[b]} x {lab[a]} Cov"
