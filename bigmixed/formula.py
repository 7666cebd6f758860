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
_GROUP_NAME = r"(?:[^\W\d][\w.]*|`[^`]+`)"
_GROUPING = re.compile(rf"{_GROUP_NAME}(?:\s*:\s*{_GROUP_NAME})*|{_GROUP_NAME}(?:\s*/\s*{_GROUP_NAME})+")
_OFFSET = re.compile(r"offset\((.*)\)")


@dataclass(frozen=True)
class RandomTerm:
    """One lme4 random-effect bar as written: ``(expr | group)`` or ``(expr || group)``.

    ``group`` is the grouping side as written: a column, ``a:b`` (the interaction of
    columns) or ``a/b`` (nested: expands to ``a`` and ``b:a``, see :func:`expand_group`).
    """

    expr: str
    group: str
    independent: bool


@dataclass(frozen=True)
class TermSpec:
    """One grouping factor and the random effects it carries (the bars that name it, merged).

    ``factors`` are the data columns whose interaction is the grouping factor (one for a
    plain column); ``name`` is lme4's name for it (``"Pig"``, ``"cask:batch"``); ``exprs`` /
    ``independent`` are the bars' left-hand sides and whether each is ``||``.
    """

    factors: tuple[str, ...]
    exprs: tuple[str, ...]
    independent: tuple[bool, ...]
    name: str

    def __post_init__(self) -> None:
        if not self.factors or not all(isinstance(f, str) and f for f in self.factors):
            raise ValueError("TermSpec.factors must be one or more column names")
        if not self.exprs or len(self.independent) != len(self.exprs):
            raise ValueError("TermSpec needs one independent flag per random-effect expression")

    def bars(self) -> str:
        """The term in lme4 syntax, e.g. ``'(Time | Pig)'`` (several bars joined by ``+``)."""
        grp = ":".join(self.factors)
        return " + ".join(f"({r} {'||' if ind else '|'} {grp})" for r, ind in zip(self.exprs, self.independent))


@dataclass(frozen=True)
class ModelSpec:
    """Spelling-independent description of a linear mixed model.

    ``terms`` holds one :class:`TermSpec` per grouping factor, in the order they first
    appear; ``offset`` the expressions of ``offset(...)`` terms; ``weights`` a column name.
    ``group_re``: the first term is statsmodels' ``groups`` with its ``re_formula`` (what
    ``cov_re``, ``random_effects`` and ``free`` describe); False for statsmodels' variance
    components alone (``vc_formula`` without ``re_formula``: no random effect of the groups).
    """

    response: str
    fixed: str
    terms: tuple[TermSpec, ...]
    offset: tuple[str, ...] = ()
    weights: str | None = None
    group_re: bool = True

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("a mixed model needs at least one random-effect term, e.g. '(1 | g)'")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"ModelSpec.terms name a grouping factor twice: {names}")

    @property
    def group(self) -> str:
        """The grouping column of a one-term model on a plain column (statsmodels' ``groups``)."""
        if len(self.terms) != 1 or len(self.terms[0].factors) != 1:
            raise AttributeError("this model has no single grouping column; see ModelSpec.terms")
        return self.terms[0].factors[0]

    @property
    def random(self) -> tuple[str, ...]:
        """The random-effect expressions of the first term."""
        return self.terms[0].exprs

    @property
    def independent(self) -> tuple[bool, ...]:
        return self.terms[0].independent

    @property
    def key_columns(self) -> tuple[str, ...]:
        """Every column a grouping factor uses, in order of first use."""
        return tuple(dict.fromkeys(f for t in self.terms for f in t.factors))

    def lmer_formula(self) -> str:
        """The model written in lme4 syntax, e.g. ``'Weight ~ Time + (Time | Pig)'`` (for display)."""
        parts = [self.fixed] + [f"offset({o})" for o in self.offset] + [t.bars() for t in self.terms]
        return f"{self.response} ~ " + " + ".join(parts)


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
    if not _GROUPING.fullmatch(grp):
        raise ValueError(f"random-effect term {shown!r}: the grouping side {grp!r} is not a column name, an "
                         "interaction of columns ('a:b') or a nesting ('a/b'); write e.g. '(1 | school/class)'")
    if re.fullmatch(_GROUP_NAME, grp):
        grp = grp.strip("`")  # one column: its name
    elif "`" not in grp:
        grp = re.sub(r"\s+", "", grp)
    return RandomTerm(lhs, grp, len(runs[0]) == 2)


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


def _names(group: str, sep: str) -> list[str]:
    """Split a grouping side at ``sep`` outside backticks, unquoting the names."""
    out, cur, quoted = [], "", False
    for ch in group:
        if ch == "`":
            quoted = not quoted
        elif ch == sep and not quoted:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return [n.strip("`") for n in out]


def expand_group(group: str) -> list[tuple[tuple[str, ...], str]]:
    """The grouping factors a bar's right side stands for, as ``(columns, lme4 name)`` pairs.

    ``g`` -> ``[(("g",), "g")]``; ``a:b`` -> ``[(("a", "b"), "a:b")]``; ``a/b`` ->
    ``[(("a",), "a"), (("b", "a"), "b:a")]`` (lme4 expands ``(1 | a/b)`` to ``(1 | a) + (1 | b:a)``
    and names the inner factor ``b:a``, its levels ``"b_level:a_level"``); ``a/b/c`` adds the
    columns ``(c, b, a)`` named, as lme4 does, ``c:(b:a)``.
    """
    if "/" in group:
        levels = _names(group, "/")
        if len(levels) > 1:
            out, name = [], ""
            for k in range(len(levels)):
                cols = tuple(reversed(levels[: k + 1]))
                name = levels[k] if k == 0 else f"{levels[k]}:{name if k == 1 else '(' + name + ')'}"
                out.append((cols, name))
            return out
    cols = tuple(_names(group, ":"))
    return [(cols, ":".join(cols))]


def r_spelling(text: str) -> str:
    """lme4 / R spellings as formulaic reads them.

    ``^`` inside a function call (``I(x^2)``, ``log(x^2)``) is R's power, not Python's
    xor: it becomes ``**``; at the top level ``(a + b)^2`` keeps formulaic's (and R's)
    meaning, interactions up to order 2.  ``factor(x)`` becomes ``C(x)``.
    """
    chars = _scan(text)
    out = list(text)
    for i, ch, d in chars:
        if ch == "^" and d > 0:
            out[i] = "**"
    res = "".join(out)
    return re.sub(r"(?<![\w.])factor\(", "C(", res)


def _split_offsets(fixed: str) -> tuple[str, tuple[str, ...]]:
    """Take ``offset(expr)`` terms out of a fixed-effects right-hand side."""
    chars = _scan(fixed)
    cuts = [(i, ch) for i, ch, d in chars if d == 0 and ch in "+-"]
    bounds = [("", 0)] + [(ch, i + 1) for i, ch in cuts]
    ends = [i for i, _ in cuts] + [len(fixed)]
    keep: list[str] = []
    offsets: list[str] = []
    for (op, start), end in zip(bounds, ends):
        piece = _squash(fixed[start:end])
        m = _OFFSET.fullmatch(piece)
        if m is not None:
            if op == "-":
                raise ValueError(f"offset term {piece!r} is subtracted; write 'offset(-{m.group(1)})' instead")
            offsets.append(_squash(m.group(1)))
            continue
        keep += [x for x in (op, piece) if x]
    if keep and keep[0] == "+":
        keep = keep[1:]
    rest = " ".join(keep)
    if not rest or rest in ("-", "+"):
        rest = "1"
    elif rest.startswith("- "):
        rest = "1 " + rest
    return rest, tuple(offsets)


def terms_from_bars(bars: tuple[RandomTerm, ...]) -> tuple[TermSpec, ...]:
    """Merge bars by grouping factor (after expanding ``a/b``), in order of first appearance."""
    merged: dict[tuple[str, ...], list] = {}
    names: dict[tuple[str, ...], str] = {}
    for bar in bars:
        for cols, name in expand_group(bar.group):
            merged.setdefault(cols, []).append((r_spelling(bar.expr), bar.independent))
            names[cols] = name
    return tuple(TermSpec(cols, tuple(e for e, _ in v), tuple(i for _, i in v), names[cols])
                 for cols, v in merged.items())


def spec_from_lmer(formula: str, weights: str | None = None) -> ModelSpec:
    """Build a :class:`ModelSpec` from an lme4 formula.

    Bars ``(expr | g)``, ``(expr || g)``, ``(expr | a:b)`` and ``(expr | a/b)``; bars naming the
    same grouping factor are merged into one term; ``offset(expr)`` terms become ``offset``.

    Raises
    ------
    ValueError
        If the formula is malformed or has no ``(expr | group)`` term.
    """
    response, fixed, bars = parse_lmer(formula)
    if not bars:
        raise ValueError(f"an lmer formula needs a random-effect term '(expr | group)', e.g. "
                         f"'{response} ~ {fixed} + (1 | g)'; {formula!r} has none")
    fixed, offsets = _split_offsets(fixed)
    return ModelSpec(r_spelling(response), r_spelling(fixed), terms_from_bars(bars),
                     tuple(r_spelling(o) for o in offsets), weights)


def spec_from_statsmodels(formula: str, re_formula: str | None, group: str,
                          vc_formula: dict[str, str] | None = None, weights: str | None = None,
                          offset: str | None = None) -> ModelSpec:
    """Build a :class:`ModelSpec` from statsmodels ``MixedLM.from_formula`` arguments.

    Parameters
    ----------
    formula : str
        Fixed-effects formula ``'y ~ x'`` (no bars).
    re_formula : str or None
        Random-effects RHS, with or without the leading ``'~'``; None means a random intercept,
        or, as in statsmodels, no random effect of the groups when ``vc_formula`` is given
        (``'0'`` says the same).  Like statsmodels, an intercept is included unless ``'0 +'`` /
        ``'- 1'`` removes it.
    group : str
        Grouping column name.
    vc_formula : dict, optional
        statsmodels' variance components: ``{"name": "0 + C(col)"}`` is a random intercept per
        level of ``col`` within each group, with its own variance (lme4's ``(1 | group:col)``);
        ``"0 + C(col):x"`` a random slope of ``x`` per level (``(0 + x | group:col)``).
    weights, offset : str, optional
        Columns of observation weights and of a known offset.
    """
    if not isinstance(formula, str):
        raise TypeError(f"formula must be a string, not {type(formula).__name__}")
    if any(ch == "|" for _, ch, _ in _scan(formula)):
        raise ValueError(f"formula {formula!r} contains a '|' random-effect term; with the statsmodels spelling "
                         "give random effects via re_formula= and groups=, or use bm.lmer for lme4 formulas")
    response, fixed, _ = parse_lmer(formula)
    fixed, offsets = _split_offsets(fixed)
    if offset is not None:
        offsets = offsets + (offset,)
    # statsmodels: without re_formula the groups get a random intercept, unless vc_formula is given
    re_text = ("0" if vc_formula else "1") if re_formula is None else re_formula
    if not isinstance(re_text, str):
        raise TypeError(f"re_formula must be a string or None, not {type(re_formula).__name__}")
    re_text = _squash(re_text)
    re_text = re_text[1:].strip() if re_text.startswith("~") else re_text
    if not re_text or any((ch == "~" and d == 0) or ch == "|" for _, ch, d in _scan(re_text)):
        raise ValueError(f"re_formula {re_formula!r} must be a right-hand side such as '~Time' or '~0 + Time'")
    if not isinstance(group, str) or not group:
        raise ValueError("group must be the name of the grouping column")
    group_re = re_text not in ("0", "-1")  # '0': no random effect of the groups (statsmodels)
    if not group_re and not vc_formula:
        raise ValueError(f"re_formula {re_formula!r} leaves no random effects; give a random intercept ('1'), "
                         "slopes ('~x') or variance components (vc_formula=)")
    terms = [TermSpec((group,), (r_spelling(re_text),), (False,), group)] if group_re else []
    for name, text in (vc_formula or {}).items():
        terms.append(_vc_term(name, text, group))
    return ModelSpec(r_spelling(response), r_spelling(fixed), tuple(terms), tuple(r_spelling(o) for o in offsets),
                     weights, group_re)


_VC = re.compile(r"(?:0\s*\+\s*)?C\((\w+)\)(?:\s*:\s*(.+))?|(?:0\s*\+\s*)?(.+?)\s*:\s*C\((\w+)\)")


def _vc_term(name: str, text: str, group: str) -> TermSpec:
    """One statsmodels variance component as a nested term ``(1 | group:col)`` or ``(0 + x | group:col)``."""
    if not isinstance(text, str):
        raise TypeError(f"vc_formula[{name!r}] must be a string such as '0 + C(class)'")
    t = _squash(text)
    t = t[1:].strip() if t.startswith("~") else t
    m = _VC.fullmatch(t)
    if m is None:
        raise NotImplementedError(
            f"vc_formula[{name!r}] = {text!r}: bigmixed fits variance components of the forms '0 + C(col)' "
            "(a random intercept per level of col within each group) and '0 + C(col):x' (a random slope); "
            "write other ones as lme4 terms with bm.lmer")
    col = m.group(1) or m.group(4)
    slope = m.group(2) or m.group(3)
    expr = "1" if slope is None else f"0 + {slope}"
    return TermSpec((group, col), (r_spelling(expr),), (False,), name)
