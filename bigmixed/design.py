"""Design matrices: a frozen recipe that turns data chunks into ``(y, X, Z)`` arrays.

:class:`Design` freezes the encoding (columns, categorical levels, transform state) once so that
every chunk of a streamed data set yields identical columns.  Plain parts - the intercept, numeric
and categorical data columns and their interactions, one categorical column a term - are computed
with numpy from the columns' values and level codes (the fast path: named as formulaic names them,
and checked against formulaic's columns on the first rows); anything else goes through formulaic
with a frozen model spec.

formulaic and pandas are loaded only when a part needs them: a right-hand side of bare numeric
columns (``y ~ x + x2``, ``(x | g)``) is parsed and filled without either (formulaic's import,
and pandas' under it, is most of a small command-line job's start-up).
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from .columns import is_pandas, level_codes, numeric_column
from .formula import ModelSpec
from .rhs import INTERCEPT, Factor, missing_column, one_line, parse_rhs, split_bar, variables
from .terms import ReTerm

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Design"]


def _numeric(df: Any, col: str) -> bool:
    if isinstance(df, pl.DataFrame):
        return df.schema[col].is_numeric()
    import pandas as pd  # df is a pandas frame: pandas is loaded

    dt = df[col].dtype
    return pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_bool_dtype(dt)


def _sorted_levels(values: Any) -> list:
    vals = list(dict.fromkeys(values))
    try:
        return sorted(vals)
    except TypeError:  # mixed types: still deterministic
        return sorted(vals, key=lambda v: (type(v).__name__, repr(v)))


def _observed_levels(df: Any, col: str) -> list:
    if isinstance(df, pl.DataFrame):
        s = df.get_column(col)
        if isinstance(s.dtype, (pl.Categorical, pl.Enum)):
            s = s.cast(pl.String)
        return s.drop_nulls().unique().to_list()
    return df[col].dropna().drop_duplicates().tolist()


def _frame(data: Any) -> bool:
    """True for polars, False for pandas; anything else is a TypeError."""
    if isinstance(data, pl.DataFrame):
        return True
    if is_pandas(data):
        return False
    raise TypeError(f"expected a pandas or polars DataFrame, got {type(data).__name__}")


@dataclass
class _Part:
    """One model-matrix block: plain columns copied with numpy, or a frozen formulaic spec."""

    text: str
    formula: list[tuple[Factor, ...]]
    used: list[str]
    # None: the intercept; "c": numeric column c copied; a tuple of (column, level or None, "T." for
    # treatment coding): the product of those numeric columns and level dummies (an interaction)
    plain: list | None = None
    spec: Any = None
    names: tuple[str, ...] = ()
    cats: tuple[str, ...] = ()


class Design:
    """Frozen recipe turning data chunks into float64 ``(y, X, Z)`` with the same columns every time.

    Parameters
    ----------
    spec : ModelSpec
        The model.
    prototype : pandas.DataFrame or polars.DataFrame
        The whole data, or a sample / first chunk when streaming; stateful transforms
        (``center``, ``scale``, ...) learn their state from it.
    levels : dict, optional
        Known levels of categorical columns (e.g. gathered over all files); other categorical
        columns learn their levels from ``prototype``. Levels are stored sorted.
    """

    def __init__(self, spec: ModelSpec, prototype: Any, levels: dict[str, list] | None = None) -> None:
        is_pl = _frame(prototype)
        self.spec, self.response_name = spec, spec.response
        columns = list(prototype.columns)
        colset = set(columns)
        resp_f = parse_rhs(spec.response, "response", colset)
        resp_terms = [t for t in resp_f if t != INTERCEPT]
        if len(resp_terms) != 1 or len(resp_terms[0]) != 1:
            raise ValueError(f"response {spec.response!r} must be one column or expression, e.g. 'y' or 'np.log(y)'")
        parts = [_Part(f"0 + {spec.response}", resp_f, [])]
        parts.append(_Part(spec.fixed, parse_rhs(spec.fixed, "fixed effects", colset), []))
        bar_terms = []  # (term index, bar index) of each random part
        for k, term in enumerate(spec.terms):
            grp = ":".join(term.factors)
            for b, r in enumerate(term.exprs):
                what = f"random effects '({r} {'||' if term.independent[b] else '|'} {grp})'"
                f = parse_rhs(r, what, colset)
                for text, pf in split_bar(f, what, colset) if term.independent[b] else [(r, f)]:
                    parts.append(_Part(text, pf, []))  # one part a bar of lme4's
                    bar_terms.append((k, b))
        n_random = len(bar_terms)
        parts += [_Part(f"0 + {o}", parse_rhs(f"0 + {o}", f"offset '{o}'", colset), []) for o in spec.offset]
        cwrapped: set[str] = set()
        for p in parts:
            p.used, cw = variables(p.formula, columns)
            cwrapped |= cw
        for key in spec.key_columns:
            if key not in set(columns):
                raise ValueError(missing_column(key, columns).replace("formula term", "grouping column", 1))
        extra = [spec.weights] if spec.weights else []
        for w in extra:
            if w not in set(columns):
                raise ValueError(missing_column(w, columns).replace("formula term", "weights column", 1))
        used = list(dict.fromkeys(c for p in parts for c in p.used))
        self.columns: tuple[str, ...] = tuple(dict.fromkeys(used + list(spec.key_columns) + extra))
        nested = [f"{c!r} ({prototype.schema[c]})" for c in self.columns
                  if is_pl and prototype.schema[c].is_nested()]
        if nested:
            raise ValueError(f"column(s) {', '.join(nested)} hold lists/structs, which a formula cannot use; "
                             "give numbers, strings, categoricals or booleans")
        # Categorical: columns with given levels, non-numeric (string, categorical, boolean) columns and
        # anything wrapped in C(...); given levels win so an all-missing prototype column still works.
        levels = levels or {}
        self.categorical: dict[str, list] = {}
        for c in used:
            if c in levels or c in cwrapped or not _numeric(prototype, c):
                lv = _sorted_levels(levels[c] if c in levels else _observed_levels(prototype, c))
                if not lv:
                    raise ValueError(f"categorical column {c!r} has no non-missing values, so its levels are "
                                     "unknown; pass them via levels=")
                self.categorical[c] = lv
        if resp_terms[0][0].expr in self.categorical:
            raise ValueError(f"response column {spec.response!r} is not numeric")
        for k, p in enumerate(parts):
            p.cats = tuple(c for c in p.used if c in self.categorical)
            p.plain = self._plain(resp_terms if k == 0 else list(p.formula), columns)
            if p.plain is not None:
                p.names = tuple(self._plain_name(c) for c in p.plain)
                if any(isinstance(c, tuple) for c in p.plain) and p.names != self._formulaic_names(p, prototype):
                    p.plain, p.names = None, ()
        self._fml_cols = [c for c in self.columns if any(c in p.used for p in parts if p.plain is None)]
        if self._fml_cols:  # freeze formulaic's encoding/transform state on the whole prototype
            import formulaic

            pdf, _ = self._pandas(prototype, is_pl)
            for p in parts:
                if p.plain is None:
                    mm = self._formulaic(lambda: formulaic.model_matrix(
                        p.text, pdf, na_action="ignore", context={}, output="numpy"), p.text)
                    p.spec, p.names = mm.model_spec, tuple(mm.model_spec.column_names)
        if len(parts[0].names) != 1:
            raise ValueError(f"response {spec.response!r} must give one numeric column, not {list(parts[0].names)}")
        self._resp, self._fixed = parts[0], parts[1]
        self._random = parts[2:2 + n_random]
        self._offsets = parts[2 + n_random:]
        for o, p in zip(spec.offset, self._offsets):
            if len(p.names) != 1:
                raise ValueError(f"offset({o}) must give one numeric column, not {list(p.names)}")
        self.fe_names: list[str] = list(self._fixed.names)
        self.terms: list[ReTerm] = []
        offset = 0
        for k, term in enumerate(spec.terms):
            grp = ":".join(term.factors)
            names: list[str] = []
            blocks: list[tuple[int, ...]] = []
            bar_of: list[int] = []
            for (kk, _), p in zip(bar_terms, self._random):
                if kk != k:
                    continue
                if not p.names:
                    raise ValueError(f"random-effect term '({p.text} | {grp})' has no columns; use '1' for "
                                     "a random intercept")
                # each part is a bar of lme4's ((x || g) is (1 | g) + (0 + x | g)): one block
                blocks.append(tuple(range(len(names), len(names) + len(p.names))))
                names += p.names
                bar_of += [max(bar_of) + 1 if bar_of else 0] * len(p.names)
            dup = [n for n, c in Counter(names).items() if c > 1]
            if dup:
                raise ValueError(f"random-effect column(s) {dup} appear in more than one '(... | {grp})' term")
            self.terms.append(ReTerm(term, names, tuple(blocks), tuple(bar_of), offset))
            offset += len(names)
        self.re_names: list[str] = [n for t in self.terms for n in t.re_names]
        self.blocks: tuple[tuple[int, ...], ...] = self.terms[0].blocks
        self.fast_path: bool = all(p.plain is not None for p in parts)

    @property
    def p(self) -> int:
        """Number of fixed-effect columns."""
        return len(self.fe_names)

    @property
    def q(self) -> int:
        """Number of random-effect columns (all terms together; per term: ``terms[k].q``)."""
        return len(self.re_names)

    def __repr__(self) -> str:
        return (f"Design({self.spec.lmer_formula()!r}, fe_names={self.fe_names}, re_names={self.re_names}, "
                f"terms={[t.name for t in self.terms]}, fast_path={self.fast_path})")

    def _plain(self, terms: list, columns: list) -> list | None:
        """Columns of a part whose terms are the intercept, data columns and their interactions (at
        most one categorical column a term), else None: such a part needs no formula engine per chunk.

        A categorical factor is coded by treatment contrasts (a dummy per level but the first) when
        the rest of its term is an earlier term (the intercept for a main effect), else by a dummy
        per level, as formulaic does; the names are checked against formulaic's on the first rows.
        """
        seen: set[frozenset] = set()
        out: list = []
        for f in terms:
            if f == INTERCEPT:
                out.append(None)
                seen.add(frozenset())
                continue
            if not all(x.kind == "lookup" and x.expr in columns for x in f):
                return None
            names = [x.expr for x in f]
            cats = [c for c in names if c in self.categorical]
            if len(cats) > 1:
                return None
            if not cats:
                out.append(names[0] if len(names) == 1 else tuple((c, None, "") for c in names))
            else:
                reduced = frozenset(names) - {cats[0]} in seen
                for lv in range(1 if reduced else 0, len(self.categorical[cats[0]])):
                    out.append(tuple((c, lv if c == cats[0] else None, "T." if reduced else "") for c in names))
            seen.add(frozenset(names))
        return out

    def _plain_name(self, c) -> str:
        if c is None:
            return "Intercept"
        if isinstance(c, tuple):
            return ":".join(col if lv is None else f"{col}[{tag}{self.categorical[col][lv]}]" for col, lv, tag in c)
        return c

    def _formulaic_names(self, part: _Part, prototype: Any) -> tuple[str, ...]:
        """formulaic's column names for ``part`` on the first rows: the dummies above must be named
        (hence ordered and coded) as formulaic would, or the part goes through formulaic."""
        import formulaic

        head = prototype.head(64) if _frame(prototype) else prototype.iloc[:64]
        pdf, _ = self._pandas(head, _frame(prototype), part.used)
        mm = self._formulaic(lambda: formulaic.model_matrix(part.text, pdf, na_action="ignore", context={},
                                                            output="numpy"), part.text)
        return tuple(mm.model_spec.column_names)

    @staticmethod
    def _formulaic(fn: Any, text: str) -> Any:
        from formulaic.errors import DataMismatchWarning

        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                # missing categorical values trigger this; they are turned into NaN rows in _fill
                warnings.simplefilter("ignore", DataMismatchWarning)
                # e.g. np.log(0): the non-finite rows are counted and reported by the pipeline
                return fn()
        except Exception as e:  # never leak a deep formulaic traceback
            raise ValueError(f"cannot evaluate formula {text!r}: {one_line(e)}") from None

    def _pandas(self, chunk: Any, is_pl: bool, cols: list | None = None) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
        """The columns formulaic needs as pandas, categoricals cast to the stored levels, plus null masks."""
        import pandas as pd

        cols = self._fml_cols if cols is None else cols
        pdf = chunk.select(cols).to_pandas() if is_pl else chunk[cols].copy(deep=False)
        nulls: dict[str, np.ndarray] = {}
        for c in cols:
            s, lv = pdf[c], self.categorical.get(c)
            if lv is None:
                if isinstance(s.dtype, pd.api.extensions.ExtensionDtype) and _numeric(pdf, c):
                    pdf[c] = s.to_numpy(dtype=np.float64, na_value=np.nan)  # pd.NA -> NaN for formulaic
                continue
            codes = pd.Index(lv).get_indexer(s)  # -1 for missing values and for unknown levels
            nulls[c] = s.isna().to_numpy()
            bad = np.flatnonzero((codes < 0) & ~nulls[c])
            if bad.size:
                raise ValueError(f"column {c!r} has level {s.iloc[bad[0]]!r} that is not among the levels known "
                                 f"when the design was built ({lv[:10]}{' ...' if len(lv) > 10 else ''}); "
                                 "pass all levels via levels=")
            pdf[c] = pd.Categorical.from_codes(codes, categories=lv)
        return pdf, nulls

    def _fill(self, part: _Part, out: np.ndarray, off: int, chunk: Any, is_pl: bool,
              pdf: pd.DataFrame | None, nulls: dict[str, np.ndarray]) -> None:
        k = len(part.names)
        if part.plain is not None:
            self._fill_plain(part, out[:, off:off + k], chunk, is_pl)
            return
        mm = self._formulaic(lambda: part.spec.get_model_matrix(pdf, context={}), part.text)
        arr = np.asarray(mm, dtype=np.float64)
        if arr.shape != (out.shape[0], k):
            raise ValueError(f"formula {part.text!r} gave a {arr.shape} matrix, expected {(out.shape[0], k)}")
        out[:, off:off + k] = arr
        # na_action="ignore" encodes a missing categorical as the reference level; make it NaN instead
        # so the downstream missing-row filter drops the row, exactly as for a missing number.
        for c in part.cats:
            if nulls[c].any():
                out[nulls[c], off:off + k] = np.nan

    def _fill_plain(self, part: _Part, out: np.ndarray, chunk: Any, is_pl: bool) -> None:
        """The columns of a plain part (see :meth:`_plain`) into ``out`` (n, k), with numpy."""
        codes: dict[str, np.ndarray] = {}
        values: dict[str, np.ndarray] = {}
        for j, c in enumerate(part.plain):
            if c is None:
                out[:, j] = 1.0
            elif not isinstance(c, tuple):
                numeric_column(chunk, c, is_pl, out[:, j])
            else:  # a product of numeric columns and (at most one) level dummy
                col = out[:, j]
                col[:] = 1.0
                for name, lv, _ in c:
                    if lv is None:
                        if name not in values:
                            values[name] = numeric_column(chunk, name, is_pl, np.empty(col.shape[0]))
                        col *= values[name]
                    else:
                        if name not in codes:
                            codes[name] = level_codes(chunk, name, self.categorical[name], is_pl)
                        col *= codes[name] == lv
        for cc in codes.values():  # a missing level makes the row's part NaN, as formulaic's in _fill
            out[cc < 0] = np.nan

    def matrices(self, chunk: Any, reuse: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encode one chunk.

        Parameters
        ----------
        chunk : pandas.DataFrame or polars.DataFrame
            Data with (at least) ``self.columns``. Rows are never dropped.
        reuse : dict, optional
            Buffers of an earlier call with as many rows, overwritten (a pass over many chunks
            of one size: fresh arrays per chunk cost page faults, more than the copies into
            them); the caller must be done with the arrays of that call.

        Returns
        -------
        tuple of numpy.ndarray
            ``y`` (n,), ``X`` (n, p), ``Z`` (n, q): float64, Fortran-ordered (column-contiguous), row-aligned with ``chunk``.
        """
        n = chunk.height if _frame(chunk) else len(chunk)
        bufs = None
        if reuse is not None:
            if reuse.get("n") != n:
                reuse.clear()
                reuse.update(n=n, y=np.empty((n, 1)), X=np.empty((self.p, n)).T, Z=np.empty((self.q, n)).T)
            bufs = reuse
        y = self.response(chunk, None if bufs is None else bufs["y"])
        X, Z = self.predictor_matrices(chunk, None if bufs is None else (bufs["X"], bufs["Z"]))
        return y, X, Z

    @property
    def group_column(self) -> str:
        """Name of the grouping column (one-term models on a plain column)."""
        return self.spec.group

    @property
    def key_columns(self) -> tuple[str, ...]:
        """Columns the grouping factors use."""
        return self.spec.key_columns

    @property
    def predictor_columns(self) -> tuple[str, ...]:
        """Data columns the fixed, random and offset parts use (no response, no keys): what predict needs."""
        used = [c for p in [self._fixed, *self._random, *self._offsets] for c in p.used]
        return tuple(dict.fromkeys(used))

    def _prepare(self, chunk: Any, needed: tuple[str, ...]) -> tuple[bool, int, Any, dict]:
        is_pl = _frame(chunk)
        missing = [c for c in needed if c not in set(chunk.columns)]
        if missing:
            raise ValueError(f"data chunk lacks column(s) {missing} needed by the model")
        n = chunk.height if is_pl else len(chunk)
        cols = [c for c in self._fml_cols if c in set(chunk.columns)]
        if self._fml_cols and cols != self._fml_cols:  # predicting without the response column
            saved, self._fml_cols = self._fml_cols, cols
            try:
                pdf, nulls = self._pandas(chunk, is_pl)
            finally:
                self._fml_cols = saved
        else:
            pdf, nulls = self._pandas(chunk, is_pl) if self._fml_cols else (None, {})
        return is_pl, n, pdf, nulls

    def response(self, chunk: Any, out: np.ndarray | None = None) -> np.ndarray:
        """The response ``y`` (n,) of one chunk (into ``out``, (n, 1), if given)."""
        is_pl, n, pdf, nulls = self._prepare(chunk, tuple(self._resp.used))
        y = np.empty((n, 1)) if out is None else out
        self._fill(self._resp, y, 0, chunk, is_pl, pdf, nulls)
        return y.reshape(n)

    def predictor_matrices(self, chunk: Any, out: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``X`` (n, p) and ``Z`` (n, q) of one chunk (into ``out``, if given); the response column need not be present."""
        is_pl, n, pdf, nulls = self._prepare(chunk, self.predictor_columns)
        # Fortran order: each column is filled by one contiguous copy, and the
        # statistics kernel reads X.T (p, n) without another copy.
        X, Z = (np.empty((self.p, n)).T, np.empty((self.q, n)).T) if out is None else out
        self._fill(self._fixed, X, 0, chunk, is_pl, pdf, nulls)
        off = 0
        for part in self._random:
            self._fill(part, Z, off, chunk, is_pl, pdf, nulls)
            off += len(part.names)
        return X, Z

    def z_leads_x(self) -> bool:
        """One term whose Z columns are X's first columns, in order: both the intercept, or both a
        plain copy of one numeric data column (so the values are equal)."""
        if len(self.terms) != 1 or self._fixed.plain is None or any(p.plain is None for p in self._random):
            return False
        zcols = [c for p in self._random for c in p.plain]
        return list(self._fixed.plain[:len(zcols)]) == zcols

    def term_matrices(self, Z: np.ndarray) -> list[np.ndarray]:
        """The columns of each term in ``Z`` (views)."""
        return [Z[:, t.offset:t.offset + t.q] for t in self.terms]

    def offset(self, chunk: Any) -> np.ndarray | None:
        """The sum of the ``offset(...)`` terms (n,) of one chunk, or None without offsets."""
        if not self._offsets:
            return None
        is_pl, n, pdf, nulls = self._prepare(chunk, self.offset_columns)
        out = np.zeros(n)
        col = np.empty((n, 1))
        for part in self._offsets:
            self._fill(part, col, 0, chunk, is_pl, pdf, nulls)
            out += col[:, 0]
        return out

    def weights(self, chunk: Any) -> np.ndarray | None:
        """The observation weights (n,) of one chunk, or None without weights."""
        w = self.spec.weights
        if w is None:
            return None
        try:
            if _frame(chunk):
                return chunk.get_column(w).cast(pl.Float64).to_numpy()
            return chunk[w].to_numpy(dtype=np.float64, na_value=np.nan)
        except (ValueError, TypeError, pl.exceptions.PolarsError):
            raise ValueError(f"weights column {w!r} must be numeric") from None

    @property
    def response_columns(self) -> tuple[str, ...]:
        """Data columns the response uses."""
        return tuple(self._resp.used)

    @property
    def offset_columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for p in self._offsets for c in p.used))
