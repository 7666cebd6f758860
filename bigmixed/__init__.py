"""bigmixed: linear mixed-effects models for millions of groups.

Fits the same REML/ML optimum as lme4 from per-level sufficient statistics
(one streaming pass over the rows), through statsmodels' and lme4's APIs::

    import bigmixed as bm
    data = bm.datasets.dietox()
    res = bm.mixedlm("Weight ~ Time", data, groups="Pig", re_formula="~Time").fit()
    print(res.summary())
    print(bm.lmer("Weight ~ Time + (Time | Pig)", data))

``import bigmixed`` loads nothing heavy: numba, polars, pandas, scipy and formulaic are imported
when a model is first built (module ``__getattr__`` below), so the command line's ``--help``
and scripts that only import are instant.
"""

import importlib as _importlib
import os as _os

# numba's OpenMP threading layer (libgomp): after each parallel kernel its threads spin
# GOMP_SPINCOUNT times before sleeping.  The default (300k, ~8 ms of spinning) competes with
# the main thread's work between kernels on small machines; OMP_WAIT_POLICY=PASSIVE (no spin)
# costs ~300 us per kernel call to wake the threads (measured on a 2-core VM: a 1e5-group fit
# 0.13 s passive, 0.10 s default, 0.08-0.10 s with 3k-30k spins, i.e. ~0.3 ms of spinning per call).
# Only a default: an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# OpenBLAS's worker threads likewise spin after each threaded call, by default 2^28 cycles
# (~0.1 s) before sleeping.  Crossed terms alternate LAPACK on the dense block with numba
# kernels, which then share the two cores with a spinning BLAS thread: the kernels ran 2-5x
# slower in sequence than alone.  2^17 cycles still bridges the gaps between the BLAS calls
# inside one LAPACK routine (InstEval's fit, medians of 7 fits in a process, three processes each
# way, alternating: 0.22-0.23 s against 0.36-0.42 s at the default).  OpenBLAS reads it when it
# loads, so it takes effect when bigmixed is imported before scipy.linalg (numpy's own OpenBLAS
# does no dense work here).
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "17")

__version__ = "0.2.0"

# public name -> module that defines it (imported on first use)
_LAZY = {
    "mixedlm": "model",
    "lmer": "model",
    "MixedLM": "model",
    "ConvergenceWarning": "model",
    "SingularFitWarning": "model",
    "MixedLMParams": "params",
    "MixedLMResults": "results",
    "DroppedRowsWarning": "pipeline",
    "anova": "anova",
}
_SUBMODULES = {
    "datasets", "formula", "design", "data", "keys", "terms", "pipeline", "stats", "scaling", "backends",
    "objective", "optimize", "results", "blups", "summary", "model", "params", "simulate", "cli", "distributed",
    "inference", "profile", "bootstrap", "plots", "anova", "simulate_multi",
}

__all__ = [
    "mixedlm",
    "lmer",
    "anova",
    "MixedLM",
    "MixedLMParams",
    "MixedLMResults",
    "ConvergenceWarning",
    "SingularFitWarning",
    "DroppedRowsWarning",
    "datasets",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'bigmixed' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
