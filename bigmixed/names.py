"""Display names of parameters: lme4's spellings and statsmodels' (used by results, BLUPs, profiles)."""

from __future__ import annotations

import re

__all__ = ["r_name", "r_order", "sm_names", "sm_var_name"]


_LEVEL = re.compile(r"(?<=[\w)])\[(?:T\.)?([^\]]*)\]")
_POLY = re.compile(r"(poly\([^()]*\))\[(\d+)\]")


def _split_colons(name: str) -> list[str]:
    """The factors of an interaction column: ``name`` split at the colons outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(name):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == ":" and depth == 0:
            parts.append(name[start:i])
            start = i + 1
    return parts + [name[start:]]


def r_order(name: str, text: str) -> str:
    """An interaction column's factors in R's order: by where each factor's variable first appears
    in the formula ``text`` (R's ``terms()``): ``age:Sex[T.Male]`` of ``Sex + age:Sex`` is
    ``Sex[T.Male]:age`` (formulaic keeps the order written in the term)."""
    parts = _split_colons(name)
    if len(parts) < 2:
        return name
    flat = text.replace(" ", "")

    def first(part: str) -> int:
        var = re.escape(_LEVEL.sub("", part).replace(" ", ""))
        m = re.search(rf"(?<![\w.]){var}(?![\w.])", flat)
        return m.start() if m else len(flat)

    return ":".join(sorted(parts, key=first))


def r_name(name: str, factor_vars: frozenset = frozenset(), order_text: str | None = None) -> str:
    """R's spelling of a model-matrix column: ``(Intercept)``, ``recipeB``, ``poly(x, 2)1``, ``I(x^2)``.

    formulaic writes ``recipe[T.B]``, ``poly(x, 2)[1]`` and ``I(x ** 2)``; ``factor(x)`` was read
    as ``C(x)`` (``factor_vars``: the variables the user wrapped in ``factor``).  With the
    formula's ``order_text`` an interaction's factors come in R's order (:func:`r_order`).
    """
    if name == "Intercept":
        return "(Intercept)"
    if order_text is not None:
        name = r_order(name, order_text)
    out = _POLY.sub(r"\1\2", name)
    out = _LEVEL.sub(r"\1", out)
    out = out.replace(" ** ", "^")
    for v in factor_vars:
        out = out.replace(f"C({v})", f"factor({v})")
    return out


def sm_names(names: list[str], group: str = "Group") -> list[str]:
    """statsmodels' names of the random effects: the intercept is called by the groups' column
    (``groups="Pig"``: ``Pig``), or ``Group`` when the groups were given as an array."""
    return [group if n == "Intercept" else n for n in names]


def sm_var_name(names: list[str], a: int, b: int, term: str | None = None, group: str = "Group") -> str:
    """statsmodels' row names: 'Pig Var', 'Pig x Time Cov', 'Time Var' (other terms: '<term> Var')."""
    if term is not None:
        lab = ["" if n == "Intercept" else f" {n}" for n in names]
        if a == b:
            return f"{term}{lab[a]} Var"
        return f"{term}{lab[b]} x{lab[a] or ' Intercept'} Cov"
    lab = sm_names(names, group)
    if a == b:
        return f"{lab[a]} Var"
    return f"{lab[b]} x {lab[a]} Cov"
