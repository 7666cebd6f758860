"""Fitted model: estimates on the user's scale and their inference.

The fit runs on transformed statistics (:class:`~bigmixed.scaling.Scaling`); every number here
is mapped back exactly (per term k, with S_k its columns' transform):

    beta  = s_y T beta~ (+ m_y on the intercept)     Cov(beta) = s_y^2 sigma~^2 T F~^-1 T'
    Psi_k = sigma^2 S_k Lambda~_k Lambda~_k' S_k'    b_ki = s_y S_k b~_ki

Conditional modes, predictions and their output live in :mod:`bigmixed.blups`; text in
:mod:`bigmixed.summary`, which reads only the public accessors below.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
# scipy.special rather than scipy.stats: importing scipy.stats costs ~0.35 s per process,
# a tenth of a 10M-row CLI fit. norm.sf(x) = ndtr(-x).
from scipy.special import ndtr, ndtri

from . import blups
from .data import GROUP_COLUMN
from .names import r_name, sm_names
from .objective import R2_FLOOR, Objective
from .optimize import OptimizerState
from .terms import TermTheta, lme4_bar_order

__all__ = ["MixedLMResults", "theta_to_scaled", "safe_cholesky", "theta_order"]

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


def theta_to_scaled(theta: np.ndarray, tt: TermTheta, scaling) -> np.ndarray:
    """One term's lme4 theta on the user's scale -> theta of the transformed problem (``scaling``: the term's)."""
    lam = tt.lam(np.asarray(theta, dtype=float))
    Sinv = np.linalg.inv(scaling.z_matrix())
    return tt.theta(safe_cholesky(Sinv @ lam @ lam.T @ Sinv.T))


def _bars(terms) -> list[tuple[int, int]]:
    """(term, bar) of every bar of the model, in formula order within each term."""
    return [(k, b) for k, t in enumerate(terms) for b in range(max(t.bar_of) + 1)]


def _lme4_bars(terms) -> list[tuple[int, int]]:
    bars = _bars(terms)
    return [bars[i] for i in lme4_bar_order([terms[k].n_levels for k, _ in bars])]


def theta_order(terms, tmap) -> np.ndarray:
    """Positions of the model's theta entries in lme4's order (lme4 sorts bars by their levels)."""
    out = []
    for k, b in _lme4_bars(terms):
        cols = {j for j, bb in enumerate(terms[k].bar_of) if bb == b}
        tt = tmap.terms[k]
        out += [int(tmap.offsets[k] + i) for i in range(tt.size) if int(tt.cols[i]) in cols]
    return np.asarray(out, dtype=np.int64)


class MixedLMResults:
    """Results of a fit; statsmodels' attribute names plus lme4's.

    statsmodels: ``fe_params``, ``bse_fe``, ``tvalues``, ``pvalues``, ``conf_int()``, ``cov_re``,
    ``scale``, ``llf``, ``aic``, ``bic``, ``converged``, ``random_effects``, ``fittedvalues``,
    ``resid``, ``predict()``, ``summary()``.  lme4: ``objective`` (REML criterion or deviance),
    ``theta``, ``sigma``, ``fixef``, ``ranef()``, ``VarCorr``, ``ngroups``, ``is_singular``,
    ``print(res)``.  Several terms: ``terms``, ``cov_re_terms``, ``ranef(term)``.
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
        self._terms = list(model.built.terms)
        self.exog_names = list(model.exog_names)
        self.exog_re_names = list(model.exog_re_names)
        self.nobs = int(objective.N)
        self.n_groups = int(model.n_groups)

        T = scaling.x_matrix()
        sy = scaling.y_scale
        self._T = T
        self._S = [self._term_scaling(k).z_matrix() for k in range(len(self._terms))]
        self.scale = float(sy**2 * sol.sigma2)
        beta = sy * (T @ sol.beta)
        if scaling.x_intercept >= 0:
            beta[scaling.x_intercept] += scaling.y_shift
        self._beta = beta
        Finv = np.linalg.inv(sol.F) if sol.F.size else np.zeros((0, 0))
        self._cov_fe = sy**2 * sol.sigma2 * (T @ Finv @ T.T)
        rels = [S @ L @ L.T @ S.T for S, L in zip(self._S, sol.lams)]  # Psi_k / sigma^2
        self._lams = [safe_cholesky(r) for r in rels]
        self._covs = [self.scale * r for r in rels]
        self.objective = float(sol.deviance + objective.offset)
        self.llf = -0.5 * self.objective
        self.unidentified = self._degenerate(sol, objective)

    def _term_scaling(self, k: int):
        t = self._terms[k]
        if len(self._terms) == 1:
            return self.scaling
        return self.scaling.term(t.offset, t.q)

    def _degenerate(self, sol, objective) -> str | None:
        """Why the variance parameters are not identified (lme4's theta test misses these), or None."""
        n_re = sum((t.q - len(tt.zero)) * t.n_levels for t, tt in zip(self._terms, self.tmap.terms))
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
        return "; and ".join(problems) or None

    # -- fixed effects -------------------------------------------------------------

    @property
    def fe_params(self) -> pd.Series:
        return pd.Series(self._beta, index=self.exog_names, name="fe_params")

    @property
    def fixef(self) -> pd.Series:
        """lme4's name for the fixed effects (``(Intercept)`` spelled as in R)."""
        return pd.Series(self._beta, index=self.lme4_names(), name="fixef")

    def lme4_names(self, term: int | str | None = None) -> list[str]:
        """lme4's spellings of the model-matrix columns: the fixed effects (``term=None``) or the
        random effects of one term (``(Intercept)``, ``recipeB``, ``SexMale:age`` as R orders it)."""
        if term is None:
            return [r_name(n, self._factor_vars, self.model.spec.fixed) for n in self.exog_names]
        t = self._terms[self._term_index(term)]
        return [r_name(n, self._factor_vars, " + ".join(t.spec.exprs)) for n in t.re_names]

    @cached_property
    def _factor_vars(self) -> frozenset:
        text = self.model.formula if isinstance(self.model.formula, str) else ""
        return frozenset(re.findall(r"(?<![\w.])factor\(\s*([\w.]+)\s*\)", text))

    def cov_params(self) -> pd.DataFrame:
        """Covariance of the fixed-effect estimates, sigma^2 (X'V^-1X)^-1."""
        return pd.DataFrame(self._cov_fe, index=self.exog_names, columns=self.exog_names)

    @property
    def bse_fe(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self._cov_fe)), index=self.exog_names, name="bse_fe")

    @property
    def bse(self) -> pd.Series:
        """Standard errors of the fixed effects (those of the variance parameters: :attr:`bse_re`)."""
        return self.bse_fe

    @property
    def params(self) -> pd.Series:
        """statsmodels' ``params``: the fixed effects, then every variance parameter relative to the
        residual variance, in statsmodels' order and names (``Pig Var``, ``Pig x Time Cov``, ``Time
        Var``, then ``<component> Var``): the entries of Psi / sigma^2."""
        vt = self.variance_table(se=False)
        rel = pd.Series(vt["estimate"].to_numpy() / self.scale, index=vt["name"].to_list())
        return pd.concat([self.fe_params, rel]).rename("params")

    @property
    def k_fe(self) -> int:
        """Fixed effects (statsmodels' ``k_fe``)."""
        return self.model.k_fe

    @property
    def k_re(self) -> int:
        """Random effects of the groups (statsmodels' ``k_re``: the size of ``cov_re``)."""
        return self.model.k_re

    @property
    def k_re2(self) -> int:
        """Parameters of ``cov_re`` (statsmodels' ``k_re2``)."""
        return sum(1 for t in self.variance_table(se=False).term if self._group_re and t == self._terms[0].name)

    @property
    def k_vc(self) -> int:
        """Variance parameters beyond ``cov_re`` (statsmodels' variance components; other terms)."""
        return len(self.variance_table(se=False)) - self.k_re2

    @property
    def vcomp(self) -> np.ndarray:
        """statsmodels' ``vcomp``: the variance parameters beyond ``cov_re`` (the ``vc_formula``
        components', in order), on the scale of the data as ``cov_re``."""
        return self.variance_table(se=False)["estimate"].to_numpy()[self.k_re2:]

    @property
    def df_resid(self) -> int:
        """Observations less fixed effects (statsmodels' ``df_resid``)."""
        return int(self.nobs) - self.k_fe

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

    def coef_table(self, alpha: float = 0.05, ddf: str | None = None) -> pd.DataFrame:
        """The fixed-effects table as a DataFrame (columns as in statsmodels' summary).

        ``ddf="Satterthwaite"`` or ``"Kenward-Roger"``: lmerTest's table instead (Estimate, Std. Error,
        df, t value, Pr(>|t|); :func:`bigmixed.inference.coef_table`).
        """
        if ddf is not None:
            from .inference import coef_table

            return coef_table(self, ddf)
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
    def terms(self) -> list[str]:
        """Names of the grouping factors, in the model's order (lme4's names: ``Pig``, ``cask:batch``)."""
        return [t.name for t in self._terms]

    @property
    def ngroups(self) -> dict[str, int]:
        """Levels per grouping factor (lme4's ``ngrps``), in lme4's order (most levels first, as lme4 sorts)."""
        order = list(dict.fromkeys(self._terms[k].name for k, _ in _lme4_bars(self._terms)))
        levels = {t.name: int(t.n_levels) for t in self._terms}
        return {n: levels[n] for n in order}

    def re_names(self, term: int | str = 0) -> list[str]:
        """Random-effect columns of a term (``Intercept``, ``Time``)."""
        return list(self._terms[self._term_index(term)].re_names)

    def _term_index(self, term: int | str) -> int:
        if isinstance(term, (int, np.integer)):
            return int(term)
        names = self.terms
        if term not in names:
            raise KeyError(f"no random-effects term {term!r}; the terms are {names}")
        return names.index(term)

    @property
    def cov_re(self) -> pd.DataFrame:
        """Random-effects covariance Psi of the first term (statsmodels' ``cov_re``; the intercept named
        by the groups' column, as statsmodels: ``Pig``, or ``Group`` for groups given as an array).

        0 x 0 for statsmodels' variance components alone (``vc_formula`` without ``re_formula``).
        """
        names = sm_names(self.exog_re_names, self._sm_group)
        return pd.DataFrame(self._covs[0] if self._group_re else np.zeros((0, 0)), index=names, columns=names)

    @property
    def _group_re(self) -> bool:
        """Whether the first term is statsmodels' groups with their own random effects."""
        return self.model.spec.group_re

    @property
    def _sm_group(self) -> str:
        """statsmodels' name of the groups' intercept: their column (``Group`` for an array)."""
        factors = self._terms[0].factors
        return factors[0] if len(factors) == 1 and factors[0] != GROUP_COLUMN else "Group"

    @property
    def cov_re_terms(self) -> dict[str, pd.DataFrame]:
        """Psi of every term, named by grouping factor."""
        return {t.name: pd.DataFrame(c, index=t.re_names, columns=t.re_names) for t, c in zip(self._terms, self._covs)}

    @property
    def sigma(self) -> float:
        return float(np.sqrt(self.scale))

    @property
    def theta(self) -> np.ndarray:
        """lme4's theta: the free entries of each chol(Psi_k / sigma^2), column by column, in lme4's term order."""
        th = self.tmap.theta(self._lams)
        return th[theta_order(self._terms, self.tmap)]

    @property
    def is_singular(self) -> bool:
        """lme4's ``isSingular``: a diagonal theta below 1e-4 (variance 0 or correlation +-1).

        Also True when the variance parameters are not identified: no more rows than random
        effects in total (lme4 refuses to fit these), or a residual variance of 0 (the model
        reproduces the response exactly, e.g. a constant response).
        """
        th = self.tmap.theta(self._lams)
        held = any(tt.zero for tt in self.tmap.terms)
        return bool(np.any(th[self.tmap.is_diag] < SINGULAR_TOL)) or held or self.unidentified is not None

    def structural(self, a: int, b: int, term: int | str = 0) -> bool:
        """Whether Psi_term[a, b] is a parameter (not fixed at 0 by the structure)."""
        return self.tmap.terms[self._term_index(term)].structural(a, b)

    @property
    def VarCorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(fit))``: grp, var1, var2, vcov, sdcor (lme4's order of terms)."""
        rows = []
        for k, b in _lme4_bars(self._terms):
            t, cov = self._terms[k], self._covs[k]
            grp = t.bar_names()[b]
            cols = [j for j, bb in enumerate(t.bar_of) if bb == b]
            names = self.lme4_names(k)
            sd = np.sqrt(np.diag(cov))
            rows += [(grp, names[a], None, cov[a, a], sd[a]) for a in cols]
            for i, bcol in enumerate(cols):
                for a in cols[i + 1:]:
                    if self.structural(a, bcol, k):
                        denom = sd[a] * sd[bcol]
                        corr = cov[a, bcol] / denom if denom > 0 else np.nan
                        rows.append((grp, names[bcol], names[a], cov[a, bcol], corr))
        rows.append(("Residual", None, None, self.scale, self.sigma))
        return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

    def _pairs(self) -> list[tuple[int, int, int]]:
        """(term, a, b) of every entry of vech(Psi_k), term by term."""
        return [(k, a, b) for k, t in enumerate(self._terms) for b in range(t.q) for a in range(b, t.q)]

    @cached_property
    def _var_cov(self) -> np.ndarray:
        """Covariance of (vech Psi_k for every k, sigma^2) (:func:`bigmixed.variance.parameter_cov`)."""
        from .variance import parameter_cov

        return parameter_cov(self)

    def variance_table(self, se: bool = True) -> pd.DataFrame:
        """One row per variance-component parameter: term, statsmodels' name, estimate, standard error.

        Names as statsmodels prints them: ``Pig Var``, ``Pig x Time Cov``, ``Time Var`` for the
        first term, ``<term> Var`` (``<term> <effect> Var`` ...) for the others.  The standard errors
        need the Hessian of the deviance (k + 1 gradient passes over the levels, k = len(theta) + 1);
        ``se=False`` leaves them NaN and costs nothing.
        """
        from .variance import variance_table

        return variance_table(self, se)

    @property
    def bse_re(self) -> pd.Series:
        """Standard errors of the variance components (Var, Cov rows), from the observed information.

        Unlike statsmodels (which reports the SE of Psi/sigma^2 times sigma), these are Wald SEs
        of the entries of Psi themselves; NaN on the boundary.
        """
        vt = self.variance_table()
        return pd.Series(vt["se"].to_numpy(), index=vt["name"].to_list(), name="bse_re", dtype=float)

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

    # -- conditional modes, predictions (bigmixed.blups) ----------------------------------

    @cached_property
    def _modes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return blups.conditional_modes(self)

    def random_effects_frame(self, backend: str = "pandas", term: int | str = 0):
        """Conditional modes (BLUPs) of a term, one row per level: the key column(s) and one column per effect."""
        return blups.frame(self, self._term_index(term), backend)

    @cached_property
    def random_effects(self) -> dict:
        """statsmodels' ``random_effects``: {group: Series of BLUPs} of the first term.

        Several terms: the other terms' BLUPs are in :meth:`ranef` (one frame per term); with
        variance components alone each group's Series is empty.
        """
        idx = pd.Index(sm_names(self.exog_re_names, self._sm_group))
        if not self._group_re:
            return {k: pd.Series(np.zeros(0), index=idx) for k in self.group_labels}
        b = self._modes[0][0]
        return {k: pd.Series(b[i], index=idx) for i, k in enumerate(self.group_labels)}

    @cached_property
    def random_effects_cov(self) -> dict:
        """{group: conditional covariance of its BLUPs} (statsmodels' ``random_effects_cov``), first term."""
        names = sm_names(self.exog_re_names, self._sm_group)
        if not self._group_re:
            return {k: pd.DataFrame(np.zeros((0, 0)), index=names, columns=names) for k in self.group_labels}
        K = blups.conditional_covariances(self, 0)
        return {k: pd.DataFrame(K[i], index=names, columns=names) for i, k in enumerate(self.group_labels)}

    def conditional_variances(self, term: int | str = 0) -> np.ndarray:
        """Conditional covariances of a term's BLUPs, (levels, q, q): lme4's ``ranef(condVar = TRUE)``."""
        return blups.conditional_covariances(self, self._term_index(term))

    @property
    def group_labels(self) -> list:
        """statsmodels' groups: the first term's levels (variance components alone: the groups they are in)."""
        index = self.model.built.terms[0].index
        return index.to_list() if self._group_re else index.parts[0].keys.to_list()

    def ranef(self, term: int | str | None = None):
        """lme4's ``ranef(fit)``: BLUPs indexed by level; one term: a DataFrame, several: {term: DataFrame}."""
        if term is None and len(self._terms) > 1:
            return {t.name: blups.ranef_frame(self, k) for k, t in enumerate(self._terms)}
        return blups.ranef_frame(self, 0 if term is None else self._term_index(term))

    def write_random_effects(self, out_dir, term: int | str = 0) -> list:
        """Write a term's BLUPs (as :meth:`random_effects_frame`) to parquet in ``out_dir`` (see :func:`blups.write`)."""
        return blups.write(self, out_dir, self._term_index(term))

    def predict(self, newdata: Any = None, include_random: bool = True) -> np.ndarray:
        """Predictions for ``newdata`` (default: the fitted data), one per row.

        ``X beta + offset + sum_k Z_k b_k``, with each term's BLUPs for levels seen in the fit;
        a level not seen, a term whose grouping columns ``newdata`` lacks (lme4 would need
        ``re.form``), and ``include_random=False`` contribute 0 for that term.  Keys match the
        fitted levels by value across integer and string types (308 is level "308").  Rows with
        missing values in a used column give NaN.
        """
        return blups.predict(self, newdata, include_random)

    def write_predictions(self, data: Any, out, *, keys: list[str] | None = None,
                          include_random: bool = True, chunk_rows: int | None = None,
                          progress: bool | None = False):
        """Stream predictions for ``data`` (paths/globs, LazyFrame, DataFrame) to one parquet file.

        Columns: ``keys`` (default: the grouping columns), ``fitted`` and, when the response is
        in the data, ``resid``; rows in input order; memory is one chunk.  Written to a hidden
        temporary name and renamed, so ``out`` is never partial.  ``data=None`` uses the fitted
        data.  Returns the path.
        """
        from ._io import write_predictions

        return write_predictions(self, data, out, keys=keys, chunk_rows=chunk_rows,
                                 include_random=include_random, progress=progress)

    @cached_property
    def fittedvalues(self) -> np.ndarray:
        """Fitted values X beta + offset + Z b for the rows of the fitted data (NaN for dropped rows)."""
        return blups.predict(self, None, True, fitted=True)  # NaN for the rows the fit dropped

    @cached_property
    def resid(self) -> np.ndarray:
        """Response minus fitted values (NaN for dropped rows)."""
        return blups.response(self) - self.fittedvalues

    # -- rendering ----------------------------------------------------------------------

    def summary(self, alpha: float = 0.05, variance_se: bool = True, ddf: str | None = None):
        """statsmodels-layout summary (``print(res.summary())``); ``variance_se=False`` skips the Hessian.

        ``ddf="Satterthwaite"`` or ``"Kenward-Roger"``: lme4/lmerTest's layout with df and p-values.
        """
        from .summary import Summary

        return Summary(self, alpha, variance_se, ddf=ddf)

    def __str__(self) -> str:
        from .summary import lme4_text

        return lme4_text(self)

    def __repr__(self) -> str:
        return f"<bigmixed.MixedLMResults {self.method} objective={self.objective:.4f} converged={self.converged}>"

    def group_sizes(self, term: int | str | None = None) -> np.ndarray:
        """Rows per level of a term; by default per group of statsmodels' ``groups`` (the first
        term's levels, or with variance components alone the groups their levels are in)."""
        b = self.model.built
        k = 0 if term is None else self._term_index(term)
        if b.stats is None and b.backend is not None:
            n = np.asarray(b.backend.group_sizes(k))  # resident on Dask workers (bigmixed.distributed)
        else:
            n = np.asarray(b.stats.terms[k].n)
        if term is not None or self._group_re:
            return n
        groups = b.terms[0].index.frame().get_column(b.terms[0].factors[0])
        codes = np.unique(groups.to_numpy(), return_inverse=True)[1]
        return np.bincount(codes, weights=n).astype(n.dtype)

    @property
    def n_dropped(self) -> int:
        return int(self.model.built.n_dropped)

    @property
    def aliased(self) -> list[str]:
        return list(self.model.built.aliased)

    def to_dict(self, variance_se: bool = True) -> dict:
        """Everything estimated, as plain JSON-able types (``variance_se=False``: no Hessian, bse_re null)."""
        from .record import fit_record

        return fit_record(self, variance_se)

    # -- inference (bigmixed.inference, profile, bootstrap, plots) --------------------------------

    def contest(self, L, ddf: str = "Satterthwaite", joint: bool = True, rhs=0.0) -> pd.DataFrame:
        """lmerTest's ``contest``: F test (``joint``) or t tests of the contrasts ``L beta = rhs``."""
        from .inference import contest

        return contest(self, L, ddf, joint, rhs)

    def vcov_adjusted(self) -> pd.DataFrame:
        """pbkrtest's ``vcovAdj``: the Kenward-Roger adjusted covariance of the fixed effects (REML)."""
        from .inference import adjusted_vcov

        return adjusted_vcov(self)

    def confint(self, parm=None, level: float = 0.95, method: str = "profile", nsim: int = 500,
                seed: int | None = None, boot_type: str = "perc") -> pd.DataFrame:
        """lme4's ``confint(fit, method = "profile" | "Wald" | "boot", oldNames = FALSE)``."""
        from .profile import confint

        return confint(self, parm, level, method, nsim, seed, boot_type)

    def bootstrap(self, nsim: int = 1000, seed: int | None = None, threads: int | None = None) -> pd.DataFrame:
        """Parametric bootstrap from the statistics (lme4's ``bootMer``): one row of parameters per replicate."""
        from .bootstrap import bootstrap

        return bootstrap(self, nsim, seed, threads=threads)

    def plot_ranef(self, term: int | str | None = None, path=None, **kwargs: Any):
        """Caterpillar plot of the BLUPs with conditional intervals (:func:`bigmixed.plots.plot_ranef`)."""
        from .plots import plot_ranef

        return plot_ranef(self, term, path, **kwargs)

    def plot_residuals(self, path=None, **kwargs: Any):
        """Residuals vs fitted and a normal QQ plot (:func:`bigmixed.plots.plot_residuals`)."""
        from .plots import plot_residuals

        return plot_residuals(self, path, **kwargs)

