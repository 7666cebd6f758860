"""Small example data sets shipped with bigmixed (copies of R data sets).

- :func:`dietox`: pig growth, 861 rows, 72 pigs (R package geepack).
- :func:`sleepstudy`: reaction times under sleep deprivation, 180 rows, 18 subjects (R package lme4).
- :func:`dyestuff`: yield by batch, 30 rows, 6 batches (R package lme4).
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas is imported when a data set is read, not with bigmixed
    import pandas as pd

__all__ = ["dietox", "sleepstudy", "dyestuff", "path"]


def path(name: str) -> str:
    """File path of an embedded data set's CSV (``"dietox"``, ``"sleepstudy"``, ``"dyestuff"``)."""
    return str(resources.files(__name__).joinpath(f"{name}.csv"))


def _read(name: str, keys: dict) -> "pd.DataFrame":
    import pandas as pd

    return pd.read_csv(path(name), dtype=keys)


def dietox() -> "pd.DataFrame":
    """Pig growth data: Weight by Time (week) for 72 pigs; Pig, Evit, Cu, Litter as strings."""
    return _read("dietox", {"Pig": str, "Evit": str, "Cu": str, "Litter": str})


def sleepstudy() -> "pd.DataFrame":
    """Reaction (ms) by Days of sleep deprivation for 18 subjects; Subject as string."""
    return _read("sleepstudy", {"Subject": str})


def dyestuff() -> "pd.DataFrame":
    """Yield of dyestuff by Batch (A-F)."""
    return _read("dyestuff", {"Batch": str})
