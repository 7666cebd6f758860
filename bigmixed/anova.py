"""Likelihood-ratio tests between nested models: lme4's ``anova(m0, m1, ...)``.

As ``anova.merMod``: REML fits are first refitted by maximum likelihood (``refit = TRUE``; the
statistics are reused, no pass over the rows), the models are ordered by their number of
parameters, and consecutive models are compared by ``Chisq = 2 max(0, diff(logLik))`` on
``Df = diff(npar)`` degrees of freedom.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import special

__all__ = ["anova"]


def _label(res) -> str:
    f = res.model.formula
    return f if isinstance(f, str) else res.model.spec.lmer_formula()


def anova(*models, refit: bool = True, names: list[str] | None = None) -> pd.DataFrame:
    """lme4's ``anova(m0, m1, ...)``: npar, AIC, BIC, logLik, deviance, Chisq, Df, Pr(>Chisq).

    Parameters
    ----------
    *models
        Two or more fitted :class:`~bigmixed.results.MixedLMResults` of the same data.
    refit
        Refit REML fits by maximum likelihood first (lme4's default, and the only meaningful
        comparison of models with different fixed effects).
    names
        Row names (default: the formulas; ``model 1``, ``model 2``... if two are equal).

    Returns
    -------
    pandas.DataFrame
        One row per model, ordered by the number of parameters (``npar`` = fixed effects +
        variance parameters + sigma); the first row's Chisq, Df and p are NaN.
    """
    from .results import MixedLMResults

    if len(models) == 1 and isinstance(models[0], (list, tuple)):
        models = tuple(models[0])
    if len(models) < 2:
        raise ValueError("anova compares two or more fitted models: anova(m0, m1, ...); for tests of fixed "
                         "effects within one model use m.contest(L)")
    for m in models:
        if not isinstance(m, MixedLMResults):
            raise ValueError(f"anova takes fitted bigmixed models, not {type(m).__name__}")
    nobs = {m.nobs for m in models}
    if len(nobs) > 1:
        raise ValueError(f"the models were fitted to different numbers of observations ({sorted(nobs)}); "
                         "compare models of the same rows")
    if names is None:
        names = [_label(m) for m in models]
        if len(set(names)) < len(names):
            names = [f"model {i + 1}" for i in range(len(models))]
    elif len(names) != len(models):
        raise ValueError(f"{len(names)} names for {len(models)} models")
    fits = list(models)
    if refit and any(m.reml for m in fits):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits = [m.model.fit(reml=False, warn=False) if m.reml else m for m in fits]
    npar = np.array([m.df_modelwc for m in fits], dtype=float)
    order = np.argsort(npar, kind="stable")
    fits = [fits[i] for i in order]
    names = [names[i] for i in order]
    npar = npar[order]
    llk = np.array([m.llf for m in fits])
    n = float(fits[0].nobs)
    dev = -2.0 * llk
    chisq = np.concatenate(([np.nan], 2.0 * np.maximum(0.0, np.diff(llk))))
    df = np.concatenate(([np.nan], np.diff(npar)))
    with np.errstate(invalid="ignore"):
        p = np.where(df > 0, special.chdtrc(np.where(df > 0, df, 1.0), chisq), np.nan)
    p[0] = np.nan
    return pd.DataFrame({"npar": npar.astype(int), "AIC": dev + 2.0 * npar, "BIC": dev + np.log(n) * npar,
                         "logLik": llk, "deviance": dev, "Chisq": chisq, "Df": df, "Pr(>Chisq)": p}, index=names)
