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

# numba's OpenMP threading layer with libgomp's default (active) waiting cost
# ~30 ms per parallel call on the 2-core machines measured here; passive
# waiting costs ~45 us.  Only a default: an explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
