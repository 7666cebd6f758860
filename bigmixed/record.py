"""A fit as one JSON-able record: what ``MixedLMResults.to_dict`` returns and the command line
writes as ``fit.json`` (estimates by statsmodels' and lme4's names, the optimiser's record, timings)."""

from __future__ import annotations

import json

import numpy as np

__all__ = ["fit_record"]


def fit_record(res, variance_se: bool = True) -> dict:
    """Everything estimated, as plain JSON-able types (``variance_se=False``: no Hessian, bse_re null)."""
    b = res.model.built
    vc = res.VarCorr
    one = len(res._terms) == 1
    return {
        "formula": res.model.formula if isinstance(res.model.formula, str) else res.model.spec.lmer_formula(),
        "method": res.method,
        "weights": res.model.spec.weights,  # the column of precision weights (or None)
        "offset": list(res.model.spec.offset),
        "nobs": res.nobs,
        "n_groups": res.n_groups,
        "ngroups": res.ngroups,
        "group": res.model.spec.group if one and len(res._terms[0].factors) == 1 else None,
        "terms": [{"name": t.name, "factors": list(t.factors), "levels": int(t.n_levels), "re_names": t.re_names,
                   "cov_re": c.tolist()} for t, c in zip(res._terms, res._covs)],
        "layout": b.layout,
        "objective": res.objective,
        "llf": res.llf,
        "aic": res.aic,
        "bic": res.bic,
        "converged": res.converged,
        "singular": res.is_singular,
        "n_iter": res.n_iter,
        "fe_params": _jsonable(res.fe_params.to_dict()),
        "fixef": _jsonable(res.fixef.to_dict()),  # the same, by lme4's names
        "bse_fe": _jsonable(res.bse_fe.to_dict()),
        "pvalues": _jsonable(res.pvalues.to_dict()),
        "cov_re": res.cov_re.to_numpy().tolist(),
        "re_names": res.exog_re_names,
        "bse_re": _jsonable(res.bse_re.to_dict()) if variance_se else None,
        "scale": res.scale,
        "sigma": res.sigma,
        "theta": res.theta.tolist(),
        "varcorr": json.loads(vc.to_json(orient="records")),
        "rows_read": int(b.n_rows_read),
        "rows_dropped": int(b.n_dropped),
        "dropped_by_column": {k: int(v) for k, v in b.dropped_by_column.items()},
        "aliased_columns": list(b.aliased),
        "optimizer": res.optimizer.to_dict(),
        "timings": dict(res.model._timings, optimize=res.optimizer.seconds),
    }


def _jsonable(d: dict) -> dict:
    return {str(k): (None if v is None or (isinstance(v, float) and not np.isfinite(v)) else float(v))
            for k, v in d.items()}
