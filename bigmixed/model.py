"""The user API: statsmodels' ``mixedlm(...).fit()`` and lme4's ``lmer(...)``.

A :class:`MixedLM` builds its statistics once (the one pass over the rows)
and every ``fit`` call (REML or ML, other constraints, other starts) reuses
them; only the factor Lambda changes per evaluation.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from .data import GROUP_COLUMN, open_source
from .formula import ModelSpec, spec_from_lmer, spec_from_statsmodels
from .objective import LocalBackend, Objective, ThetaMap
from .optimize import minimize
from .pipeline import BuildResult, build_statistics
from .results import MixedLMResults, theta_to_scaled
from .stats import one_blas_thread

__all__ = ["MixedLM", "MixedLMParams", "mixedlm", "lmer", "ConvergenceWarning", "SingularFitWarning"]


class ConvergenceWarning(UserWarning):
    """The optimiser stopped before the first-order conditions held."""


class SingularFitWarning(UserWarning):
    """The fit is on the boundary: a variance at 0 or a correlation at +-1."""


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
            raise NotImplementedError("variance components (vcomp) are not supported; use one grouping factor")
        if cov_re is None and cov_re_sqrt is not None:
            r = np.atleast_2d(np.asarray(cov_re_sqrt, dtype=float))
            cov_re = r @ r.T
        if cov_re is None:
            raise ValueError("give cov_re or cov_re_sqrt")
        return cls(np.zeros(0) if fe_params is None else fe_params, cov_re)

    def __repr__(self) -> str:
        return f"MixedLMParams(fe_params={self.fe_params!r}, cov_re={self.cov_re!r})"


class MixedLM:
    """A linear mixed model with one grouping factor.

    Parameters
    ----------
    formula
        Fixed-effects formula ``"y ~ x + C(site)"`` (statsmodels spelling), or
        an lme4 formula with bar terms when ``spec`` comes from :func:`lmer`.
    data
        pandas/polars DataFrame, polars LazyFrame, parquet path(s) or glob(s).
    groups
        Grouping column name, or an array of labels (one per row, in-memory data only).
    re_formula
        Random-effects formula, e.g. ``"~Time"`` (intercept and slope);
        ``None`` gives a random intercept.
    missing
        ``"drop"`` (count and warn) or ``"raise"``.
    chunk_rows, levels, nthreads, progress
        Streaming controls: rows per chunk, known categorical levels, numba
        threads, progress bar (``None``: when stderr is a terminal).
    client
        A ``dask.distributed.Client``: statistics are built and kept on the
        workers (see :mod:`bigmixed.distributed`).
    distributed_mode, distributed_options
        With ``client``: ``"auto"``, ``"resident"`` or ``"gathered"``, and further
        keyword arguments of :func:`bigmixed.distributed.build_distributed`
        (e.g. ``{"n_owners": 64}``).
    """

    @one_blas_thread
    def __init__(
        self,
        formula: str,
        data: Any,
        groups: Any = None,
        re_formula: str | None = None,
        missing: str = "drop",
        *,
        spec: ModelSpec | None = None,
        chunk_rows: int | None = None,
        levels: dict | None = None,
        nthreads: int | None = None,
        progress: bool | None = None,
        client: Any = None,
        distributed_mode: str = "auto",
        distributed_options: dict | None = None,
    ) -> None:
        if spec is None:
            if groups is None:
                raise ValueError("groups is required: a column name or one label per row")
            gname = groups if isinstance(groups, str) else GROUP_COLUMN
            spec = spec_from_statsmodels(formula, re_formula, gname)
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
            self.data = open_source(data, groups)
            self._built = build_statistics(
                self.data, spec, missing=missing, chunk_rows=chunk_rows, levels=levels,
                nthreads=nthreads, progress=progress,
            )
        self._timings.update(self._built.timings)
        self._timings["build"] = time.perf_counter() - t0
        d = self._built.design
        self.exog_names = [d.fe_names[j] for j in self._built.kept_fe]
        self.exog_re_names = list(d.re_names)
        self.endog_name = d.response_name

    @classmethod
    def from_formula(cls, formula: str, data: Any, re_formula: str | None = None, groups: Any = None,
                     missing: str = "drop", **kwargs) -> "MixedLM":
        """statsmodels' constructor spelling."""
        return cls(formula, data, groups=groups, re_formula=re_formula, missing=missing, **kwargs)

    # -- sizes ----------------------------------------------------------------

    @property
    def built(self) -> BuildResult:
        return self._built

    @property
    def nobs(self) -> int:
        b = self._built  # statistics resident on Dask workers: only the backend holds N
        return int(b.stats.N if b.stats is not None else b.backend.N)

    @property
    def n_groups(self) -> int:
        return int(self._built.groups.n_groups)

    @property
    def k_fe(self) -> int:
        return len(self.exog_names)

    @property
    def k_re(self) -> int:
        return len(self.exog_re_names)

    # -- fitting ----------------------------------------------------------------

    def _structure(self, free: MixedLMParams | None) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        """Covariance blocks and zeroed effects from the design's bars and statsmodels' ``free``."""
        q = self.k_re
        design_blocks = self._built.design.blocks
        if free is None:
            return tuple(tuple(b) for b in design_blocks), ()
        if free.fe_params.size and not np.all(free.fe_params != 0):
            raise NotImplementedError(
                "holding fixed effects at their start values (zeros in free.fe_params) is not supported; "
                "move them to an offset in the response instead"
            )
        fc = free.cov_re
        if fc.shape != (q, q):
            raise ValueError(f"free.cov_re must be {q}x{q} for random effects {self.exog_re_names}")
        zero = tuple(j for j in range(q) if fc[j, j] == 0)
        block_of = {j: k for k, blk in enumerate(design_blocks) for j in blk}
        # connected components of "may covary"
        comp = list(range(q))

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
                            f"random effects {self.exog_re_names[a]!r} and {self.exog_re_names[b]!r} are linked "
                            "through others but not free themselves"
                        )
        return out, zero

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
            :class:`MixedLMParams` of 0/1: which covariance entries are
            estimated; zero off-diagonals give independent random effects, a
            zero diagonal with a zero start drops that random effect.
        start_params
            :class:`MixedLMParams` (``cov_re`` relative to the residual
            variance, as statsmodels) or an array of lme4's theta.
        maxiter
            Iteration limit for L-BFGS-B.
        method
            Only ``"lbfgs"`` (L-BFGS-B with the analytic gradient); statsmodels'
            other names are accepted for compatibility and mean the same.
        gtol
            Convergence threshold on the projected gradient, relative to the deviance.
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
        blocks, zero = self._structure(free)
        scaling = b.scaling
        backend = getattr(b, "backend", None) or LocalBackend(b.stats, self.nthreads)
        if len(blocks) > 1 and np.any(scaling.z_shift != 0):
            # Centring Z is only harmless with one unstructured block: undo it exactly.
            M, scaling = _uncentre_z(scaling)
            backend = backend.transform_z(M)
        tmap = ThetaMap(self.k_re, blocks, zero)
        dof = backend.N - backend.p if reml else backend.N
        logdetT = np.linalg.slogdet(scaling.x_matrix())[1]
        offset = dof * np.log(scaling.y_scale**2) - (2.0 * logdetT if reml else 0.0)
        obj = Objective(backend, tmap, reml, offset)
        with np.errstate(all="ignore"):  # an absurd start overflows: reported just below
            theta0 = self._start(start_params, tmap, scaling)
        if not np.all(np.isfinite(theta0)):
            raise ValueError("start_params give a non-finite covariance factor; give smaller values")
        # A diagonal theta at exactly 0 (with its column) is a stationary point of the deviance
        # that a gradient method never leaves: start just inside the bound instead.
        theta0 = np.where(tmap.is_diag & (theta0 <= 0.0), 1e-3, theta0)
        state = minimize(obj, theta0, maxiter=maxiter, gtol=gtol, warm_start=start_params is None)
        res = MixedLMResults(self, obj, state, scaling)
        if warn:
            if not state.converged:
                warnings.warn(
                    f"the optimiser did not converge ({state.message}); largest projected gradient "
                    f"{state.projected_grad_norm:.3g} after {state.n_iter} iterations. Try a larger maxiter, "
                    "other start_params, or a simpler random-effects structure",
                    ConvergenceWarning,
                    stacklevel=2,
                )
            if res._unidentified is not None:
                warnings.warn(
                    f"singular fit: {res._unidentified}; check the response and the group sizes, and "
                    "consider a simpler random-effects structure (see results.is_singular)",
                    SingularFitWarning,
                    stacklevel=2,
                )
            elif res.is_singular:
                warnings.warn(
                    "boundary (singular) fit: a random-effect variance is estimated at 0 or a correlation at "
                    "+-1; consider a simpler random-effects structure (see results.is_singular)",
                    SingularFitWarning,
                    stacklevel=2,
                )
        return res

    def _start(self, start_params, tmap: ThetaMap, scaling) -> np.ndarray:
        if start_params is None:
            return tmap.start()
        if isinstance(start_params, MixedLMParams):
            cov = start_params.cov_re
            if cov.shape != (self.k_re, self.k_re):
                raise ValueError(f"start_params.cov_re must be {self.k_re}x{self.k_re}")
            lam = np.linalg.cholesky(cov + 1e-12 * np.eye(self.k_re))
            return theta_to_scaled(tmap.theta(lam), tmap, scaling)
        th = np.asarray(start_params, dtype=float).ravel()
        if th.size != tmap.size:
            raise ValueError(f"start_params has {th.size} values; theta has {tmap.size} for this model")
        if not np.all(np.isfinite(th)):
            raise ValueError(f"start_params must be finite, got {th.tolist()}")
        return theta_to_scaled(th, tmap, scaling)


def _uncentre_z(scaling):
    """The map M with Z_new = Z_old M from centred-and-scaled Z to only-scaled Z, and the new scaling."""
    from .stats import Scaling

    new = Scaling(scaling.x_shift, scaling.x_scale, np.zeros_like(scaling.z_shift), scaling.z_scale,
                  scaling.y_shift, scaling.y_scale, scaling.x_intercept, scaling.z_intercept)
    return np.linalg.solve(scaling.z_matrix(), new.z_matrix()), new


def mixedlm(formula: str, data: Any, groups: Any, re_formula: str | None = None,
            missing: str = "drop", **kwargs: Any) -> MixedLM:
    """statsmodels-style model: ``mixedlm("y ~ x", data, groups="g", re_formula="~x").fit()``."""
    return MixedLM(formula, data, groups=groups, re_formula=re_formula, missing=missing, **kwargs)


def lmer(formula: str, data: Any, REML: bool = True, *, missing: str = "drop", start=None,
         maxiter: int = 1000, **kwargs: Any) -> MixedLMResults:
    """lme4-style fit: ``lmer("y ~ x + (x | g)", data, REML=True)``.

    Bar terms: ``(1|g)``, ``(x|g)``, ``(0+x|g)``, ``(x||g)`` and sums of them
    over one grouping factor.  Returns the fitted results.
    """
    spec = spec_from_lmer(formula)
    model = MixedLM(formula, data, spec=spec, missing=missing, **kwargs)
    return model.fit(reml=REML, start_params=start, maxiter=maxiter)
