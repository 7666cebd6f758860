"""A formula's right-hand side as terms of factors: bare column names without formulaic, the rest by it.

:func:`parse_rhs` gives each part of a model (response, fixed effects, each random-effects bar,
offsets) as formulaic orders its terms; :func:`variables` the data columns they use;
:func:`split_bar` lme4's reading of ``(expr || g)``.  :class:`bigmixed.design.Design` builds the
model matrices from these.  formulaic is imported only for right-hand sides beyond bare names.
"""
from __future__ import annotations

import ast
import difflib
import keyword
import re
from dataclasses import dataclass

__all__ = ["Factor", "INTERCEPT", "bare_terms", "parse_rhs", "split_bar", "variables", "one_line", "missing_column"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m|[⧛⧚]")
# Builtins worth allowing inside I(...) etc.; anything else called by name must be a formulaic transform.
_BUILTIN_FUNCS = frozenset({"abs", "round", "min", "max", "pow", "float", "int"})


def one_line(exc: BaseException) -> str:
    lines = _ANSI.sub("", str(exc)).strip().splitlines()
    msg = lines[0].strip() if lines else type(exc).__name__
    return msg if len(msg) <= 240 else msg[:237] + "..."


@dataclass(frozen=True)
class Factor:
    """One factor of a formula term: formulaic's evaluation method (``"literal"``, ``"lookup"``,
    ``"python"``) and expression."""

    kind: str
    expr: str


INTERCEPT = (Factor("literal", "1"),)
_BARE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def bare_terms(text: str, columns: set) -> list[tuple[Factor, ...]] | None:
    """The terms of a right-hand side made of data columns' bare names, ``0`` and ``1`` joined by
    ``+``, as formulaic orders them (the intercept first unless the last of ``0``/``1`` is ``0``,
    then each column once, in order of appearance); None for anything else (formulaic parses it).
    """
    intercept, names = True, []
    for tok in text.split("+"):
        tok = tok.strip()
        if tok in ("0", "1"):
            intercept = tok == "1"
        elif _BARE_NAME.fullmatch(tok) and not keyword.iskeyword(tok) and tok in columns:
            names.append(tok)
        else:
            return None
    return ([INTERCEPT] if intercept else []) + [(Factor("lookup", n),) for n in dict.fromkeys(names)]


def parse_rhs(text: str, what: str, columns: set) -> list[tuple[Factor, ...]]:
    """Parse one right-hand side into its terms, hiding formulaic's exceptions behind a one-line ValueError."""
    bare = bare_terms(text, columns)
    if bare is not None:
        return bare
    import formulaic
    from formulaic.formula import SimpleFormula

    try:
        f = formulaic.Formula(text)
    except Exception as e:  # formulaic raises many exception types; users get one clear line
        msg = one_line(e)
        if "`.` operator" in msg:
            msg = "the '.' (all columns) shorthand is not supported; list the columns explicitly"
        raise ValueError(f"cannot parse {what} {text!r}: {msg}") from None
    if not isinstance(f, SimpleFormula):
        raise ValueError(f"{what} {text!r} must be a plain right-hand side (no '~' or '|')")
    return [tuple(Factor(fac.eval_method.value, fac.expr) for fac in term.factors) for term in f]


def _term_text(term: tuple[Factor, ...]) -> str:
    """A formula term written back as formula text (``x``, ``x:f``, ``poly(x, 2)``, `` `a b` ``)."""
    def one(f: Factor) -> str:
        bare = f.kind != "lookup" or (_BARE_NAME.fullmatch(f.expr) and not keyword.iskeyword(f.expr))
        return f.expr if bare else f"`{f.expr}`"
    return ":".join(one(f) for f in term)


def split_bar(f: list[tuple[Factor, ...]], what: str, columns: set) -> list[tuple[str, list]]:
    """lme4's reading of ``(expr || g)``: ``(1 | g)`` for the intercept and ``(0 + term | g)`` for
    every other term of ``expr`` (lme4's ``expandDoubleVerts``).  The terms are independent of
    each other; a term's own columns (a factor's dummies, ``poly(x, 2)``) form one block."""
    return [("1", [INTERCEPT]) if t == INTERCEPT else
            (f"0 + {_term_text(t)}", parse_rhs(f"0 + {_term_text(t)}", what, columns)) for t in f]


def _inspect_python(expr: str) -> tuple[set[str], set[str], set[str]]:
    """Variable names, called function names and ``C(column)`` columns of a Python factor."""
    quoted: dict[str, str] = {}

    def _sub(m: re.Match) -> str:  # backtick names are not Python identifiers
        quoted[f"_bm_q{len(quoted)}_"] = m.group(1)
        return f"_bm_q{len(quoted) - 1}_"

    try:
        tree = ast.parse(re.sub(r"`([^`]*)`", _sub, expr), mode="eval")
    except SyntaxError:
        raise ValueError(f"formula term {expr!r} is not a valid Python expression") from None
    names, funcs, cwrapped, callees = set(), set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn, parts = node.func, []
            while isinstance(fn, ast.Attribute):
                parts.append(fn.attr)
                fn = fn.value
            if isinstance(fn, ast.Name):
                funcs.add(".".join([quoted.get(fn.id, fn.id)] + parts[::-1]))
                if not parts:
                    callees.add(id(fn))
                    arg = node.args[0] if node.args else None
                    if fn.id == "C" and isinstance(arg, ast.Name):
                        cwrapped.add(quoted.get(arg.id, arg.id))
                    elif fn.id == "Q" and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        names.add(arg.value)  # Q('name') looks a column up by string
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and id(node) not in callees:
            names.add(quoted.get(node.id, node.id))
    return names, funcs, cwrapped


def missing_column(name: str, columns: list) -> str:
    cols = [str(c) for c in columns]
    close = difflib.get_close_matches(name, cols, n=3)
    hint = ("close matches: " + ", ".join(map(repr, close)) if close else
            "the data has columns: " + ", ".join(map(repr, cols[:20])) + (", ..." if len(cols) > 20 else ""))
    return f"formula term {name!r} names no column of the data; {hint}"


def variables(f: list[tuple[Factor, ...]], columns: list) -> tuple[list[str], set[str]]:
    """Data columns a parsed formula uses (ordered) and the columns it wraps in ``C(...)``."""
    colset, used, cwrapped = set(columns), [], set()
    for term in f:
        for fac in term:
            kind = fac.kind
            if kind == "literal":
                continue
            if kind == "lookup" and fac.expr in colset:
                used.append(fac.expr)
                continue
            from formulaic.transforms import TRANSFORMS

            names, funcs, cw = ({fac.expr}, set(), set()) if kind == "lookup" else _inspect_python(fac.expr)
            for fn in sorted(funcs):
                root, *attrs = fn.split(".")
                if root in colset or (not attrs and fn in _BUILTIN_FUNCS):
                    continue
                obj = TRANSFORMS.get(root)
                for a in attrs:
                    obj = getattr(obj, a, None)
                if obj is None or not callable(obj):
                    raise ValueError(f"formula term {fac.expr!r} calls unknown function {fn!r}; available are "
                                     "formulaic transforms (C, I, log, exp, center, scale, poly, bs, ...), "
                                     "np.* functions and abs/round/min/max/pow")
            for name in sorted(names):
                if name in colset:
                    used.append(name)
                elif name not in TRANSFORMS:
                    raise ValueError(missing_column(name, columns))
            cwrapped |= cw & colset
    return list(dict.fromkeys(used)), cwrapped
