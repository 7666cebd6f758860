"""Model formulas: lme4 / statsmodels spellings -> one frozen :class:`ModelSpec`.

``parse_lmer`` splits the lme4 random-effect bars off a formula (formulaic rejects them), and
``spec_from_lmer`` / ``spec_from_statsmodels`` normalise both spellings into one :class:`ModelSpec`.
:mod:`bigmixed.design` turns a spec into arrays.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_CLOSERS = {")": "(", "]": "[", "}": "{"}
_QUOTED = re.compile(r"""('(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"|`[^`]*`)""")
_GROUP_NAME = re.compile(r"[^\W\d][\w.]*|`[^`]+`")


@dataclass(frozen=True)
class RandomTerm:
    """One lme4 random-effect term ``(expr | group)`` or ``(expr || group)``."""

    expr: str
    group: str
    independent: bool


@dataclass(frozen=True)
class ModelSpec:
    """Spelling-independent description of a one-grouping-factor linear mixed model."""

    response: str
    fixed: str
    random: tuple[str, ...]
    group: str
    independent: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not self.random:
            raise ValueError("a mixed model needs at least one random-effect block, e.g. random=('1',)")
        if len(self.independent) != len(self.random):
            raise ValueError("ModelSpec.independent needs one flag per entry of ModelSpec.random")
        if not isinstance(self.group, str) or not self.group:
            raise ValueError("ModelSpec.group must be a non-empty column name")

    def lmer_formula(self) -> str:
        """The model written in lme4 syntax, e.g. ``'Weight ~ Time + (Time | Pig)'`` (for display)."""
        bars = [f"({r} {'||' if ind else '|'} {self.group})" for r, ind in zip(self.random, self.independent)]
        return f"{self.response} ~ {self.fixed} + " + " + ".join(bars)


# ----------------------------------------------------------------------------------------- parsing
def _scan(text: str) -> list[tuple[int, str, int]]:
    """Non-blank characters outside quotes as ``(position, char, bracket depth)``.

    Brackets are tracked so operators inside calls such as ``I(x + 1)`` or ``C(s, levels=['a|b'])``
    are never mistaken for formula operators. Brackets report the depth outside themselves.
    """
    out: list[tuple[int, str, int]] = []
    stack: list[tuple[str, int]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"`":
            j = i + 1
            while j < n and text[j] != ch:
                j += 2 if (text[j] == "\\" and ch != "`") else 1
            if j >= n:
                raise ValueError(f"unterminated {ch} quote at position {i} in formula {text!r}")
            i = j + 1
            continue
        if ch in "([{":
            out.append((i, ch, len(stack)))
            stack.append((ch, i))
        elif ch in _CLOSERS:
            if not stack or stack[-1][0] != _CLOSERS[ch]:
                raise ValueError(f"unbalanced parentheses in formula {text!r}: unexpected {ch!r} at position {i}")
            stack.pop()
            out.append((i, ch, len(stack)))
        elif not ch.isspace():
            out.append((i, ch, len(stack)))
        i += 1
    if stack:
        raise ValueError(f"unbalanced parentheses in formula {text!r}: {stack[-1][0]!r} at position "
                         f"{stack[-1][1]} is never closed")
    return out


def _squash(text: str) -> str:
    """Collapse whitespace runs outside quoted text, so whitespace variants parse identically."""
    parts = _QUOTED.split(text)
    return "".join(p if k % 2 else re.sub(r"\s+", " ", p) for k, p in enumerate(parts)).strip()


def _bar_term(piece: str, chars: list[tuple[int, str, int]], op: str) -> RandomTerm:
    """Turn one top-level '+' piece that contains '|' into a RandomTerm (``chars`` relative to piece)."""
    shown = _squash(piece)
    closes = [i for i, ch, d in chars if d == 0 and ch in _CLOSERS]
    wrapped = chars[0][1] == "(" and closes == [chars[-1][0]] and chars[-1][1] == ")"
    bars = [(i, d) for i, ch, d in chars if ch == "|"]
    if not wrapped:
        if any(d == 0 for _, d in bars):
            raise ValueError(f"random-effect term {shown!r} must be in parentheses, e.g. '(1 | g)', "
                             "and added to the formula with '+'")
        raise ValueError(f"term {shown!r} uses '|' inside a function or interaction; write random effects "
                         "as separate '+ (expr | group)' terms")
    if any(d > 1 for _, d in bars):
        raise ValueError(f"nested bars in term {shown!r} are not supported; write one '(expr | group)' term "
                         "per random-effect block, added with '+'")
    runs: list[list[int]] = []
    for i, _ in bars:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    if len(runs) > 1 or len(runs[0]) > 2:
        raise ValueError(f"random-effect term {shown!r} has more than one bar (nested bars are not "
                         "supported); write '(expr | group)' or '(expr || group)'")
    if op == "-":
        raise ValueError(f"random-effect term {shown!r} is subtracted; random-effect terms can only be added with '+'")
    lhs = _squash(piece[chars[0][0] + 1:runs[0][0]])
    grp = _squash(piece[runs[0][-1] + 1:chars[-1][0]])
    if not lhs:
        raise ValueError(f"random-effect term {shown!r} has nothing left of the bar; write e.g. "
                         f"'(1 | {grp or 'g'})' for a random intercept")
    if not grp:
        raise ValueError(f"random-effect term {shown!r} has no grouping column right of the bar; "
                         f"write e.g. '({lhs} | g)'")
    if not _GROUP_NAME.fullmatch(grp):
        raise ValueError(f"random-effect term {shown!r}: the grouping side {grp!r} is not a plain column name; "
                         "interactions like (1|a:b) and nested groupings like (1|a/b) are not supported yet: "
                         "build a combined grouping column in the data and use (1 | that_column)")
    return RandomTerm(lhs, grp.strip("`"), len(runs[0]) == 2)


def _split_tilde(formula: str, chars: list[tuple[int, str, int]]) -> tuple[str, int]:
    """Return (squashed response, position of '~'), validating the '~' structure."""
    tildes = [i for i, ch, d in chars if ch == "~" and d == 0]
    if not tildes:
        raise ValueError(f"formula {formula!r} has no '~'; write it as 'response ~ terms', e.g. 'y ~ x + (1 | g)'")
    if len(tildes) > 1:
        raise ValueError(f"formula {formula!r} has more than one '~'; write exactly one 'response ~ terms'")
    response = _squash(formula[:tildes[0]])
    if not response:
        raise ValueError(f"formula {formula!r} has an empty response; put the response column left of '~'")
    if any(ch == "|" and i < tildes[0] for i, ch, _ in chars):
        raise ValueError(f"the response of formula {formula!r} contains '|'; bars belong right of '~'")
    return response, tildes[0]


def parse_lmer(formula: str) -> tuple[str, str, tuple[RandomTerm, ...]]:
    """Split an lme4 formula into its response, fixed-effects RHS and random-effect terms.

    Parameters
    ----------
    formula : str
        lme4 formula such as ``'Weight ~ Time + (Time | Pig)'`` or ``'y ~ x + (x || g)'``.

    Returns
    -------
    tuple
        ``(response, fixed_rhs, random_terms)``; ``fixed_rhs`` is ``'1'`` when only bars remain and
        keeps intercept removal (``'0 + x'``, ``'x - 1'``).

    Raises
    ------
    ValueError
        On a malformed formula or an unsupported bar term; the message names the offending text.
    """
    if not isinstance(formula, str):
        raise TypeError(f"formula must be a string, not {type(formula).__name__}")
    chars = _scan(formula)
    response, t = _split_tilde(formula, chars)
    rhs = formula[t + 1:]
    rchars = [(i - t - 1, ch, d) for i, ch, d in chars if i > t]
    if not rchars:
        raise ValueError(f"formula {formula!r} has no terms right of '~'")
    # Split at top-level '+'/'-': a bar term is a whole '+' piece; everything else goes back verbatim.
    cuts = [(i, ch) for i, ch, d in rchars if d == 0 and ch in "+-"]
    bounds = [("", 0)] + [(ch, i + 1) for i, ch in cuts]
    ends = [i for i, _ in cuts] + [len(rhs)]
    tokens: list[str] = []
    terms: list[RandomTerm] = []
    for (op, start), end in zip(bounds, ends):
        piece = rhs[start:end]
        pchars = [(i - start, ch, d) for i, ch, d in rchars if start <= i < end]
        if any(ch == "|" for _, ch, _ in pchars):
            terms.append(_bar_term(piece, pchars, op))
            continue
        if op and not pchars and end == len(rhs):
            raise ValueError(f"formula {formula!r} ends with {op!r}; remove it or add a term after it")
        tokens += [x for x in (op, _squash(piece)) if x]
    if tokens and tokens[0] == "+":  # a bar term was removed from the front
        tokens = tokens[1:]
    return response, " ".join(tokens) or "1", tuple(terms)


def spec_from_lmer(formula: str) -> ModelSpec:
    """Build a :class:`ModelSpec` from an lme4 formula with exactly one grouping column.

    Raises
    ------
    ValueError
        If the formula is malformed or has no ``(expr | group)`` term.
    NotImplementedError
        If the random terms name two or more distinct grouping columns.
    """
    response, fixed, terms = parse_lmer(formula)
    if not terms:
        raise ValueError(f"an lmer formula needs a random-effect term '(expr | group)', e.g. "
                         f"'{response} ~ {fixed} + (1 | g)'; {formula!r} has none")
    groups = list(dict.fromkeys(t.group for t in terms))
    if len(groups) > 1:
        raise NotImplementedError(
            f"crossed/nested random effects with several grouping factors ({', '.join(groups)}) are not "
            f"supported yet; fit one grouping factor, e.g. keep only the '(... | {groups[0]})' terms")
    return ModelSpec(response, fixed, tuple(t.expr for t in terms), groups[0],
                     tuple(t.independent for t in terms))


def spec_from_statsmodels(formula: str, re_formula: str | None, group: str) -> ModelSpec:
    """Build a :class:`ModelSpec` from statsmodels ``MixedLM.from_formula`` arguments.

    Parameters
    ----------
    formula : str
        Fixed-effects formula ``'y ~ x'`` (no bars).
    re_formula : str or None
        Random-effects RHS, with or without the leading ``'~'``; None means a random intercept.
        Like statsmodels, an intercept is included unless ``'0 +'`` / ``'- 1'`` removes it.
    group : str
        Grouping column name.
    """
    if not isinstance(formula, str):
        raise TypeError(f"formula must be a string, not {type(formula).__name__}")
    if any(ch == "|" for _, ch, _ in _scan(formula)):
        raise ValueError(f"formula {formula!r} contains a '|' random-effect term; with the statsmodels spelling "
                         "give random effects via re_formula= and groups=, or use bm.lmer for lme4 formulas")
    response, fixed, _ = parse_lmer(formula)
    re_text = "1" if re_formula is None else re_formula
    if not isinstance(re_text, str):
        raise TypeError(f"re_formula must be a string or None, not {type(re_formula).__name__}")
    re_text = _squash(re_text)
    re_text = re_text[1:].strip() if re_text.startswith("~") else re_text
    if not re_text or any((ch == "~" and d == 0) or ch == "|" for _, ch, d in _scan(re_text)):
        raise ValueError(f"re_formula {re_formula!r} must be a right-hand side such as '~Time' or '~0 + Time'")
    if not isinstance(group, str) or not group:
        raise ValueError("group must be the name of the grouping column")
    return ModelSpec(response, fixed, (re_text,), group, (False,))


