"""The user API: statsmodels' ``mixedlm(...).fit()`` / ``MixedLM(endog, exog, groups)`` and lme4's ``lmer(...)``.

A :class:`MixedLM` builds its statistics once (the one pass over the rows) and every
``fit`` call (REML or ML, other constraints, other starts) reuses them; only the factors
Lambda_k change per evaluation.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends import make_backend
from .data import GROUP_COLUMN, open_source
from .formula import ModelSpec, spec_from_lmer, spec_from_statsmodels
from .objective import Objective
from .optimize import minimize
from .params import MixedLMParams, frame_from_arrays, structure_from_free
from .pipeline import BuildResult, build_statistics
from .scaling import Scaling
from .stats import one_blas_thread
from .terms import ThetaMap

if TYPE_CHECKING:
    from .results import MixedLMResults

__all__ = ["MixedLM", "MixedLMParams", "mixedlm", "lmer", "ConvergenceWarning", "SingularFitWarning"]


class ConvergenceWarning(UserWarning):
    """The optimiser stopped before the first-order conditions held."""


class SingularFitWarning(UserWarning):
    """The fit is on the boundary: a variance at 0 or a correlation at +-1."""


_SM_MISSING = {"none": "raise", "drop": "drop", "raise": "raise"}


class MixedLM:
    """A linear mixed model: one or more random-effects terms (grouping factors).

    Parameters
    ----------
    formula
        Fixed-effects formula ``"y ~ x + C(site)"`` (statsmodels spelling), or an lme4 formula
        with bar terms when ``spec`` comes from :func:`lmer`.  statsmodels' array form is also
        accepted: ``MixedLM(endog, exog, groups, exog_re)`` (no intercept is added).
    data
        pandas/polars DataFrame, polars LazyFrame, parquet path(s) or glob(s); in the array
        form, ``exog``.
    groups
        Grouping column name, or an array of labels (one per row, in-memory data only).
    re_formula
        Random-effects formula, e.g. ``"~Time"`` (intercept and slope); ``None`` gives a random
        intercept.  In the array form: ``exog_re``.
    missing
        ``"drop"`` (count and warn) or ``"raise"`` (statsmodels' ``"none"`` means ``"raise"``).
    vc_formula
        statsmodels' variance components, ``{"class": "0 + C(class)"}``: a random intercept per
        level of ``class`` within each group (lme4's ``(1 | group:class)``).
    weights, offset
        Column names (or arrays, in-memory data) of observation weights and a known offset.
    chunk_rows, levels, nthreads, progress
        Streaming controls: rows per chunk, known categorical levels, numba threads, progress
        bar (``None``: when stderr is a terminal).
    client
        A ``dask.distributed.Client``: statistics are built and kept on the workers (see
        :mod:`bigmixed.distributed`).
    distributed_mode, distributed_options
        With ``client``: ``"auto"``, ``"resident"`` or ``"gathered"``, and further keyword
        arguments of :func:`bigmixed.distributed.build_distributed` (e.g. ``{"n_owners": 64}``).
    keep_xx
        Also keep each outer level's X'X (p x p per level): what the parametric bootstrap needs.
    """

    @one_blas_thread
    def __init__(
        self,
        formula: Any = None,
        data: Any = None,
        groups: Any = None,
        re_formula: Any = None,
        missing: str = "drop",
        *,
        endog: Any = None,
        exog: Any = None,
        exog_re: Any = None,
        vc_formula: dict | None = None,
        weights: Any = None,
        offset: Any = None,
        use_sqrt: bool = True,
        spec: ModelSpec | None = None,
        chunk_rows: int | None = None,
        levels: dict | None = None,
        nthreads: int | None = None,
        progress: bool | None = None,
        client: Any = None,
        distributed_mode: str = "auto",
        distributed_options: dict | None = None,
        keep_xx: bool = False,
    ) -> None:
        if formula is None and endog is not None:  # MixedLM(endog=..., exog=..., groups=...)
            formula, data = endog, exog
        if exog_re is None and re_formula is not None and not isinstance(re_formula, str):
            re_formula, exog_re = None, re_formula
        if spec is None and not isinstance(formula, str):
            if formula is None or data is None or groups is None:
                raise ValueError("give a formula and data (MixedLM(formula, data, groups=...)), or the arrays "
                                 "MixedLM(endog, exog, groups, exog_re)")
            data, formula, re_formula, groups = frame_from_arrays(formula, data, groups, exog_re)
            missing = _SM_MISSING.get(missing, missing)
        data, weights, offset = _array_columns(data, weights, offset)
        if spec is None:
            if groups is None:
                raise ValueError("groups is required: a column name or one label per row")
            gname = groups if isinstance(groups, str) else GROUP_COLUMN
            spec = spec_from_statsmodels(formula, re_formula, gname, vc_formula, weights, offset)
        elif weights is not None or offset is not None:
            spec = ModelSpec(spec.response, spec.fixed, spec.terms,
                             spec.offset + ((offset,) if offset is not None else ()), weights or spec.weights,
                             spec.group_re)
        self.formula = formula
        self.spec = spec
        self.missing = missing
        self.nthreads = nthreads
        self._timings: dict[str, float] = {}
        self.client = client
        t0 = time.perf_counter()
        if client is not None:
            from .distributed import build_distributed

            self._built = build_distributed(
                client, data, spec, missing=missing, chunk_rows=chunk_rows, levels=levels, mode=distributed_mode,
                **(distributed_options or {}),
            )
            self.data = None
        else:
            self.data = open_source(data, groups if not isinstance(groups, str) else None)
            self._built = build_statistics(
                self.data, spec, missing=missing, chunk_rows=chunk_rows, levels=levels,
                nthreads=nthreads, progress=progress, keep_xx=keep_xx,
            )
        self._timings.update(self._built.timings)
        self._timings["build"] = time.perf_counter() - t0
        d = self._built.design
        self.exog_names = [d.fe_names[j] for j in self._built.kept_fe]
        # statsmodels' exog_re: the groups' own random effects (none with variance components alone)
        self.exog_re_names = list(d.terms[0].re_names) if self.spec.group_re else []
        self.endog_name = d.response_name

    @classmethod
    def from_formula(cls, formula: str, data: Any, re_formula: str | None = None, vc_formula: dict | None = None,
                     subset: Any = None, use_sparse: bool = False, missing: str = "drop", *args, **kwargs) -> "MixedLM":
        """statsmodels' constructor spelling: ``MixedLM.from_formula("y ~ x", data, groups="g", re_formula="~x")``."""
        if subset is not None:
            raise NotImplementedError("subset= is not supported; filter the data first")
        groups = kwargs.pop("groups", args[0] if args else None)
        return cls(formula, data, groups=groups, re_formula=re_formula, missing=missing, vc_formula=vc_formula,
                   **kwargs)

    # -- sizes ----------------------------------------------------------------

    @property
    def built(self) -> BuildResult:
        return self._built

    @property
    def terms(self) -> list:
        """The random-effects terms (:class:`bigmixed.terms.ReTerm`), one per grouping factor."""
        return self._built.terms

    @property
    def nobs(self) -> int:
        b = self._built  # statistics resident on Dask workers: only the backend holds N
        return int(b.stats.N if b.stats is not None else b.backend.N)

    @property
    def n_groups(self) -> int:
        """Levels of the first term (statsmodels' number of groups; with variance components
        alone, the groups their levels are nested in)."""
        t = self._built.terms[0]
        return int(t.n_levels if self.spec.group_re else t.index.parts[0].n_groups)

    @property
    def ngroups(self) -> dict[str, int]:
        """Levels per grouping factor (lme4's ``ngrps``)."""
        return {t.name: int(t.n_levels) for t in self._built.terms}

    @property
    def k_fe(self) -> int:
        return len(self.exog_names)

    @property
    def k_re(self) -> int:
        return len(self.exog_re_names)

    # -- fitting ----------------------------------------------------------------

    def _sum_log_w(self) -> float:
        b = self._built
        return float(b.stats.sum_log_w if b.stats is not None else getattr(b.backend, "sum_log_w", 0.0))

    def _backend(self):
        b = self._built
        if b.backend is not None:
            return b.backend
        return make_backend(b.stats, b.layout, b.chain, [t.name for t in b.terms], self.nthreads)

    @one_blas_thread
    def fit(
        self,
        reml: bool = True,
        free: MixedLMParams | None = None,
        start_params: MixedLMParams | np.ndarray | None = None,
        maxiter: int = 1000,
        method: str = "lbfgs",
        gtol: float = 1e-6,
        warn: bool = True,
        **kwargs: Any,
    ) -> MixedLMResults:
        """Fit by REML (default) or ML.

        Parameters
        ----------
        reml
            REML (True) or maximum likelihood (False).
        free
            :class:`MixedLMParams` of 0/1 (first term): which covariance entries are estimated;
            zero off-diagonals give independent random effects, a zero diagonal holds that
            variance at its start value (0 drops the effect).
        start_params
            :class:`MixedLMParams` (``cov_re`` relative to the residual variance, as statsmodels)
            or an array of lme4's theta (in lme4's order of the terms).
        maxiter
            Iteration limit (of the Newton steps that come first, and of L-BFGS-B).
        method
            Only ``"lbfgs"``: the analytic gradient, with L-BFGS-B, after Newton steps where they
            pay (from a subsample fit for many groups; with the average-information matrix for
            crossed terms; :mod:`bigmixed.optimize`); statsmodels' other names are accepted for
            compatibility and mean the same.
        gtol
            Convergence threshold on the gradient, relative to the deviance.
        """
        if kwargs:
            unknown = sorted(set(kwargs) - {"full_output", "disp", "niter_sa", "do_cg", "fit_kwargs"})
            if unknown:
                raise TypeError(f"fit() got unexpected keyword argument(s): {', '.join(unknown)}")
        if not maxiter >= 1:
            raise ValueError(f"maxiter must be a positive number of iterations, not {maxiter!r}")
        if isinstance(method, (list, tuple)):
            method = method[0]
        if str(method).lower() not in ("lbfgs", "l-bfgs-b", "bfgs", "cg", "nm", "powell", "newton"):
            raise ValueError(f"unknown method {method!r}; bigmixed uses 'lbfgs' (L-BFGS-B, analytic gradient)")
        b = self._built
        terms = b.terms
        if not self.spec.group_re and (free is not None or isinstance(start_params, MixedLMParams)):
            raise ValueError("free= and MixedLMParams start values describe cov_re, the groups' own random effects; "
                             "this model has none (vc_formula without re_formula): give start_params as theta")
        blocks0, zero0, held0 = structure_from_free(free, start_params, terms[0].blocks, terms[0].re_names)
        scaling = b.scaling
        backend = self._backend()
        if len(terms) == 1 and len(blocks0) > 1 and np.any(scaling.z_shift != 0):
            # Centring Z is only harmless with one unstructured block: undo it exactly.
            M, scaling = _uncentre_z(scaling)
            backend = backend.transform_z([M])
        held = {j: float(np.sqrt(v) / scaling.z_scale[j]) for j, v in held0.items()}
        tmap = ThetaMap([t.q for t in terms], [blocks0] + [t.blocks for t in terms[1:]],
                        [zero0] + [()] * (len(terms) - 1), [held] + [None] * (len(terms) - 1))
        dof = backend.N - backend.p if reml else backend.N
        logdetT = np.linalg.slogdet(scaling.x_matrix())[1]
        # -2 log-likelihood of y = that of W^(1/2) y (the rows the statistics hold) - log|W|
        offset = dof * np.log(scaling.y_scale**2) - (2.0 * logdetT if reml else 0.0) - self._sum_log_w()
        obj = Objective(backend, tmap, reml, offset)
        with np.errstate(all="ignore"):  # an absurd start overflows: reported just below
            theta0 = self._start(start_params, tmap, scaling, backend)
        if not np.all(np.isfinite(theta0)):
            raise ValueError("start_params give a non-finite covariance factor; give smaller values")
        # A diagonal theta at exactly 0 (with its column) is a stationary point of the deviance
        # that a gradient method never leaves: start just off it instead.
        theta0 = np.where(tmap.is_diag & (theta0 == 0.0), 1e-3, theta0)
        state = minimize(obj, theta0, maxiter=maxiter, gtol=gtol, warm_start=start_params is None)
        from .results import MixedLMResults  # pandas comes with the results, not with the model

        res = MixedLMResults(self, obj, state, scaling)
        if warn:
            _warn(res, state)
        return res

    def _start(self, start_params, tmap: ThetaMap, scaling: Scaling, backend) -> np.ndarray:
        if start_params is None:
            # several terms: lme4's Lambda = I can be far off (see bigmixed.start)
            return backend.moment_start(tmap) if len(self._built.terms) > 1 else tmap.start()
        from .results import theta_order, theta_to_scaled

        terms = self._built.terms
        if isinstance(start_params, MixedLMParams):
            cov = start_params.cov_re
            if cov.shape != (self.k_re, self.k_re):
                raise ValueError(f"start_params.cov_re must be {self.k_re}x{self.k_re}")
            lam = np.linalg.cholesky(cov + 1e-12 * np.eye(self.k_re))
            th0 = theta_to_scaled(tmap.terms[0].theta(lam), tmap.terms[0], scaling.term(0, terms[0].q))
            rest = [t.start() for t in tmap.terms[1:]]
            return np.concatenate([th0] + rest)
        th = np.asarray(start_params, dtype=float).ravel()
        if th.size != tmap.size:
            raise ValueError(f"start_params has {th.size} values; theta has {tmap.size} for this model")
        if not np.all(np.isfinite(th)):
            raise ValueError(f"start_params must be finite, got {th.tolist()}")
        internal = np.empty_like(th)
        internal[theta_order(terms, tmap)] = th  # lme4's order -> the model's
        parts = [theta_to_scaled(p, tt, scaling.term(t.offset, t.q))
                 for p, tt, t in zip(tmap.split(internal), tmap.terms, terms)]
        return np.concatenate(parts)


def _warn(res: MixedLMResults, state) -> None:
    if not state.converged:
        warnings.warn(
            f"the optimiser did not converge ({state.message}); largest gradient "
            f"{state.projected_grad_norm:.3g} after {state.n_iter} iterations. Try a larger maxiter, "
            "other start_params, or a simpler random-effects structure",
            ConvergenceWarning,
            stacklevel=3,
        )
    if res.unidentified is not None:
        warnings.warn(
            f"singular fit: {res.unidentified}; check the response and the group sizes, and "
            "consider a simpler random-effects structure (see results.is_singular)",
            SingularFitWarning,
            stacklevel=3,
        )
    elif res.is_singular:
        warnings.warn(
            "boundary (singular) fit: a random-effect variance is estimated at 0 or a correlation at "
            "+-1 (the likelihood is highest on the boundary); consider a simpler random-effects structure, "
            "e.g. without the correlation ('||') or without that term (see results.is_singular)",
            SingularFitWarning,
            stacklevel=3,
        )


def _array_columns(data: Any, weights: Any, offset: Any) -> tuple[Any, str | None, str | None]:
    """Arrays given as ``weights=`` / ``offset=`` become columns of in-memory data."""
    import polars as pl

    from .columns import is_pandas

    cols = {}
    for name, val in (("__weights__", weights), ("__offset__", offset)):
        if val is not None and not isinstance(val, str):
            cols[name] = np.asarray(val.to_numpy() if hasattr(val, "to_numpy") else val, dtype=float)
    if not cols:
        return data, weights, offset
    if is_pandas(data):
        data = pl.from_pandas(data.reset_index(drop=True))
    if not isinstance(data, pl.DataFrame):
        raise ValueError("weights/offset given as arrays need in-memory data; with files give column names")
    for name, v in cols.items():
        if v.shape != (data.height,):
            raise ValueError(f"{name.strip('_')} has {v.shape[0]} values but the data has {data.height} rows")
        data = data.with_columns(pl.Series(name, v))
    return (data, "__weights__" if "__weights__" in cols else weights,
            "__offset__" if "__offset__" in cols else offset)


def _uncentre_z(scaling: Scaling) -> tuple[np.ndarray, Scaling]:
    """The map M with Z_new = Z_old M from centred-and-scaled Z to only-scaled Z, and the new scaling."""
    new = Scaling(scaling.x_shift, scaling.x_scale, np.zeros_like(scaling.z_shift), scaling.z_scale,
                  scaling.y_shift, scaling.y_scale, scaling.x_intercept, scaling.z_intercept)
    return np.linalg.solve(scaling.z_matrix(), new.z_matrix()), new


def mixedlm(formula: str, data: Any, groups: Any, re_formula: str | None = None,
            missing: str = "drop", **kwargs: Any) -> MixedLM:
    """statsmodels-style model: ``mixedlm("y ~ x", data, groups="g", re_formula="~x").fit()``.

    ``vc_formula={"class": "0 + C(class)"}`` adds statsmodels' variance components;
    ``weights=`` and ``offset=`` take column names.
    """
    return MixedLM(formula, data, groups=groups, re_formula=re_formula, missing=missing, **kwargs)


def lmer(formula: str, data: Any, REML: bool = True, *, missing: str = "drop", start=None,
         maxiter: int = 1000, weights: Any = None, **kwargs: Any) -> MixedLMResults:
    """lme4-style fit: ``lmer("y ~ x + (x | g)", data, REML=True)``.

    Bar terms ``(1|g)``, ``(x|g)``, ``(0+x|g)``, ``(x||g)``, ``(1|a:b)`` (interaction of
    columns), ``(1|a/b)`` (nested) and any number of grouping factors, nested or crossed;
    ``offset(x)`` in the formula and ``weights=`` (a column name or array) as in lme4.
    ``start`` is lme4's theta.  Returns the fitted results.
    """
    spec = spec_from_lmer(formula)
    model = MixedLM(formula, data, spec=spec, missing=missing, weights=weights, **kwargs)
    return model.fit(reml=REML, start_params=start, maxiter=maxiter)
