"""bigmixed: linear mixed-effects models for millions of groups.

Fits the same REML/ML optimum as lme4 from per-group sufficient statistics
(one streaming pass over the rows), through statsmodels' and lme4's APIs::

    import bigmixed as bm
    data = bm.datasets.dietox()
    res = bm.mixedlm("Weight ~ Time", data, groups="Pig", re_formula="~Time").fit()
    print(res.summary())
    print(bm.lmer("Weight ~ Time + (Time | Pig)", data))
"""

import os as _os

# numba's OpenMP threading layer (libgomp): after each parallel kernel its threads spin
# GOMP_SPINCOUNT times before sleeping.  The default (300k, ~8 ms of spinning) competes with
# the main thread's work between kernels on small machines; OMP_WAIT_POLICY=PASSIVE (no spin)
# costs ~300 us per kernel call to wake the threads (measured on a 2-core VM: a 1e5-group fit
# 0.13 s passive, 0.10 s default, 0.08-0.10 s with 3k-30k spins, i.e. ~0.3 ms of spinning per call).
# Only a default: an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from . import datasets  # noqa: E402
from .model import (  # noqa: E402
    ConvergenceWarning,
    MixedLM,
    MixedLMParams,
    SingularFitWarning,
    lmer,
    mixedlm,
)
from .pipeline import DroppedRowsWarning  # noqa: E402
from .results import MixedLMResults  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "mixedlm",
    "lmer",
    "MixedLM",
    "MixedLMParams",
    "MixedLMResults",
    "ConvergenceWarning",
    "SingularFitWarning",
    "DroppedRowsWarning",
    "datasets",
    "__version__",
]
