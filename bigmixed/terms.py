"""Random-effects terms: one object per grouping factor, and the map from theta to their Lambdas.

A :class:`ReTerm` is what MixedModels.jl calls a ``ReMat``: a grouping factor (its key
columns and level index), its random-effect columns, and the covariance template of its
relative factor Lambda_k (blocks from ``||``, effects held at zero or at a value).  A
:class:`ThetaMap` lays the free entries of all Lambda_k out as one vector theta, term by
term, column by column within a term (lme4's order inside a term).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import os

import numpy as np

from .formula import TermSpec

__all__ = ["ReTerm", "TermTheta", "ThetaMap", "lme4_bar_order", "crossed_lead", "dense_bytes", "check_crossed_memory"]


class TermTheta:
    """Which entries of one term's lower-triangular Lambda are free parameters.

    ``blocks`` partitions the term's q columns into independent blocks (block-diagonal
    Psi, lme4's ``||``); ``zero`` lists columns whose random effect is held at zero
    variance; ``held`` maps a column that is a block of its own to the value its
    diagonal is held at (statsmodels' ``free`` with a non-zero start).  theta lists the
    free entries column by column, like lme4.
    """

    def __init__(self, q: int, blocks=None, zero=(), held: dict[int, float] | None = None) -> None:
        self.q = int(q)
        blocks = blocks if blocks is not None else (tuple(range(self.q)),)
        zero = {int(z) for z in zero}
        held = {int(k): float(v) for k, v in (held or {}).items()}
        block_of = np.empty(self.q, dtype=np.int64)
        for k, blk in enumerate(blocks):
            for j in blk:
                block_of[j] = k
        for j in held:
            if sum(block_of == block_of[j]) != 1:
                raise NotImplementedError("a variance can only be held at a non-zero value for a random effect "
                                          "that is independent of the others")
        rows, cols = [], []
        for b in range(self.q):  # column-major order, as lme4 orders theta
            for a in range(b, self.q):
                if block_of[a] != block_of[b] or a in zero or b in zero or (a == b and a in held):
                    continue
                rows.append(a)
                cols.append(b)
        self.blocks = tuple(tuple(int(j) for j in blk) for blk in blocks)
        self.zero = tuple(sorted(zero))
        self.held = held
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cols = np.asarray(cols, dtype=np.int64)
        self.is_diag = self.rows == self.cols

    @property
    def size(self) -> int:
        return int(self.rows.size)

    def lam(self, theta: np.ndarray) -> np.ndarray:
        L = np.zeros((self.q, self.q))
        L[self.rows, self.cols] = theta
        for j, v in self.held.items():
            L[j, j] = v
        return L

    def theta(self, lam: np.ndarray) -> np.ndarray:
        return np.asarray(lam)[self.rows, self.cols].copy()

    def start(self) -> np.ndarray:
        """lme4's default start: Lambda = identity."""
        return self.is_diag.astype(float)

    def rectify(self, theta: np.ndarray) -> np.ndarray:
        """The same Psi up to column signs of Lambda, with every diagonal >= 0."""
        theta = np.array(theta, dtype=float)
        for k in np.flatnonzero(self.is_diag):
            if theta[k] < 0.0:
                theta[self.cols == self.cols[k]] *= -1.0
        return theta + 0.0  # no negative zeros

    def structural(self, a: int, b: int) -> bool:
        """Whether Psi[a, b] is a parameter (not fixed at 0 by the structure)."""
        for blk in self.blocks:
            if a in blk and b in blk:
                return a not in self.zero and b not in self.zero
        return False


class ThetaMap:
    """theta <-> the Lambda of every term.

    ``ThetaMap(q, blocks, zero)`` for one term (as before several terms existed), or
    ``ThetaMap([q1, q2, ...], [blocks1, ...], [zero1, ...], [held1, ...])`` for several.
    """

    def __init__(self, q: int | Sequence[int], blocks=None, zero=(), held=None) -> None:
        if isinstance(q, (int, np.integer)):
            self.terms = [TermTheta(int(q), blocks, zero, held)]
        else:
            K = len(q)
            blocks = blocks if blocks is not None else [None] * K
            zero = zero if zero else [()] * K
            held = held if held else [None] * K
            self.terms = [TermTheta(qk, b, z, h) for qk, b, z, h in zip(q, blocks, zero, held)]
        sizes = [t.size for t in self.terms]
        self.offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.is_diag = np.concatenate([t.is_diag for t in self.terms]) if self.terms else np.zeros(0, bool)
        self.term_of = np.concatenate([np.full(t.size, k, dtype=np.int64) for k, t in enumerate(self.terms)])

    # -- one-term conveniences (the single-factor code paths and their tests)
    @property
    def q(self) -> int:
        return self.terms[0].q

    @property
    def blocks(self):
        return self.terms[0].blocks

    @property
    def zero(self):
        return self.terms[0].zero

    @property
    def rows(self) -> np.ndarray:
        return self.terms[0].rows

    @property
    def cols(self) -> np.ndarray:
        return self.terms[0].cols

    def lam(self, theta: np.ndarray) -> np.ndarray:
        """Lambda of a one-term model (see :meth:`lams`)."""
        if len(self.terms) != 1:
            raise ValueError("this model has several terms: use ThetaMap.lams")
        return self.terms[0].lam(theta)

    # -- all terms
    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_terms(self) -> int:
        return len(self.terms)

    def split(self, theta: np.ndarray) -> list[np.ndarray]:
        theta = np.asarray(theta, dtype=float)
        return [theta[self.offsets[k]:self.offsets[k + 1]] for k in range(len(self.terms))]

    def lams(self, theta: np.ndarray) -> list[np.ndarray]:
        return [t.lam(th) for t, th in zip(self.terms, self.split(theta))]

    def theta(self, lam) -> np.ndarray:
        lams = [lam] if isinstance(lam, np.ndarray) else list(lam)
        return np.concatenate([t.theta(L) for t, L in zip(self.terms, lams)]) if lams else np.zeros(0)

    def start(self) -> np.ndarray:
        return np.concatenate([t.start() for t in self.terms])

    def bounds(self) -> list[tuple[float | None, float | None]]:
        """No bounds: theta is optimised unconstrained and then :meth:`rectify`-ed.

        The deviance is even in each column of Lambda (DESIGN.md section 9), so a negative
        diagonal is as good as its mirror image; bounding the diagonal at 0 instead lets a
        bounded gradient method stop on the bound, where the gradient along that diagonal is
        0 for any data (a false "singular" fit).
        """
        return [(None, None)] * self.size

    def rectify(self, theta: np.ndarray) -> np.ndarray:
        return np.concatenate([t.rectify(th) for t, th in zip(self.terms, self.split(theta))]) \
            if self.terms else np.zeros(0)

    def grad(self, Glam) -> np.ndarray:
        """theta's gradient from d(deviance)/d(Lambda_k) (one matrix, or one per term)."""
        G = [Glam] if isinstance(Glam, np.ndarray) else list(Glam)
        return np.concatenate([g[t.rows, t.cols] for t, g in zip(self.terms, G)]) if G else np.zeros(0)


@dataclass
class ReTerm:
    """One grouping factor of a fitted model: key, level index, columns, covariance template.

    ``offset`` is the term's first column in the concatenated random-effects design;
    ``bar_of`` the bar (``(expr | g)`` as written) each column came from, for lme4's
    display names (``Subject``, ``Subject.1``).
    """

    spec: TermSpec
    re_names: list[str]
    blocks: tuple[tuple[int, ...], ...]
    bar_of: tuple[int, ...]
    offset: int
    index: object = None  # bigmixed.keys.TermIndex once the data are indexed

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def factors(self) -> tuple[str, ...]:
        return self.spec.factors

    @property
    def q(self) -> int:
        return len(self.re_names)

    @property
    def n_levels(self) -> int:
        return int(self.index.n_groups) if self.index is not None else 0

    def bar_names(self) -> list[str]:
        """lme4's group names of this term's bars: ``g``, ``g.1``, ``g.2`` ..."""
        n = max(self.bar_of) + 1 if self.bar_of else 1
        return [self.name if b == 0 else f"{self.name}.{b}" for b in range(n)]


def lme4_bar_order(n_levels: Sequence[int]) -> list[int]:
    """The order lme4 gives random-effect bars: by decreasing number of levels, only if not already so.

    lme4's ``mkReTrms``: ``if (any(diff(nl) > 0)) ord <- rev(order(nl))`` - a stable ascending
    sort, reversed (so ties come out in reverse formula order).
    """
    nl = list(n_levels)
    if not any(b > a for a, b in zip(nl, nl[1:])):
        return list(range(len(nl)))
    asc = sorted(range(len(nl)), key=lambda i: nl[i])
    return asc[::-1]


# ------------------------------------------------------------------------- crossed terms: memory
def crossed_lead(levels_q: list[tuple[int, int]]) -> int:
    """The crossed term fitted in closed form: the one with the most random effects (levels x q)."""
    return max(range(len(levels_q)), key=lambda k: (levels_q[k][0] * levels_q[k][1], -k))


def dense_bytes(levels_q: list[tuple[int, int]]) -> int:
    """Bytes the dense block of the other crossed terms needs: one m x m matrix (the factor, then in
    its place the inverse the gradient needs), m = sum of levels x q."""
    m = sum(int(lv) * int(q) for lv, q in levels_q)
    return 8 * m * m


def memory_limit() -> int:
    """What a fit may use: 60% of the machine's physical memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        total = 16 * 2**30
    return int(0.6 * total)


def check_crossed_memory(levels_q: list[tuple[int, int]], names: list[str], limit: int | None = None) -> None:
    """Raise ``MemoryError`` naming the terms when crossed terms' dense block would not fit in memory.

    Called before the rows of a crossed model are reduced (levels from the key index) and again by
    the backend (levels after dropped rows).
    """
    lead = crossed_lead(levels_q)
    rest = [k for k in range(len(levels_q)) if k != lead]
    need = dense_bytes([levels_q[k] for k in rest])
    limit = memory_limit() if limit is None else int(limit)
    if need <= limit:
        return
    desc = ", ".join(f"'{names[k]}' ({levels_q[k][0]:,} levels x {levels_q[k][1]})" for k in rest)
    m = sum(levels_q[k][0] * levels_q[k][1] for k in rest)
    raise MemoryError(
        f"crossed random effects: the terms {desc} form a dense block of ({m:,})^2 x 8 bytes "
        f"({_size(need)}), more than this machine's memory allows "
        f"({_size(limit)}); fit fewer levels (e.g. drop or merge rare ones), or make the "
        "term with the most levels the only crossed one")


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
