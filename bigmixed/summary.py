"""Text rendering of results: statsmodels' summary layout and lme4's print.

Rendering only: every number comes from :class:`~bigmixed.results.MixedLMResults`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["Summary", "lme4_text"]


def _fmt(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return f"{v:.{digits}f}"


def _header_block(pairs_left, pairs_right) -> list[str]:
    wl = max(len(k) for k, _ in pairs_left) + 1
    wv = max(len(v) for _, v in pairs_left) + 1
    wr = max(len(k) for k, _ in pairs_right) + 1
    lines = []
    for i in range(max(len(pairs_left), len(pairs_right))):
        kl, vl = pairs_left[i] if i < len(pairs_left) else ("", "")
        kr, vr = pairs_right[i] if i < len(pairs_right) else ("", "")
        lines.append(f"{kl:<{wl}}{vl:<{wv}}{kr:<{wr}}{vr}")
    return lines


class Summary:
    """statsmodels-style summary: header block, coefficient table, variance rows.

    ``str(summary)`` gives the text; ``tables`` holds the header and the
    coefficient table as DataFrames.
    """

    def __init__(self, res, alpha: float = 0.05, variance_se: bool = True, ddf: str | None = None) -> None:
        self.res = res
        self.alpha = alpha
        self.ddf = ddf
        if ddf is not None:  # lme4/lmerTest's layout, with df and p-values (lme4_text)
            self.coef = res.coef_table(ddf=ddf)
            self.header, self.var_rows, self.tables = [], [], [self.coef]
            return
        sizes = res.group_sizes()
        groups = res.ngroups
        left = [
            ("Model:", "MixedLM"),
            ("No. Observations:", str(res.nobs)),
            ("No. Groups:", str(res.n_groups) if len(groups) == 1 else
             ", ".join(f"{k} {v}" for k, v in groups.items())),
            ("Min. group size:", str(int(sizes.min())) if sizes.size else ""),
            ("Max. group size:", str(int(sizes.max())) if sizes.size else ""),
            ("Mean group size:", f"{sizes.mean():.1f}" if sizes.size else ""),
        ]
        right = [
            ("Dependent Variable:", str(res.model.endog_name)),
            ("Method:", res.method),
            ("Scale:", f"{res.scale:.4f}"),
            ("Log-Likelihood:", f"{res.llf:.4f}"),
            ("Converged:", "Yes" if res.converged else "No"),
        ]
        dropped = res.n_dropped
        if dropped:
            right.append(("Dropped rows:", str(dropped)))
        if res.is_singular:
            right.append(("Singular fit:", "Yes"))
        self.header = _header_block(left, right)
        table = res.coef_table(alpha)
        self.coef = table
        vt = res.variance_table(se=variance_se)
        self.var_rows = list(zip(vt["name"], vt["estimate"], vt["se"]))
        self.tables = [pd.DataFrame(left + right, columns=["item", "value"]), table, vt]

    def as_text(self) -> str:
        if self.ddf is not None:
            return lme4_text(self.res, ddf=self.ddf, table=self.coef) + "\n"
        t = self.coef
        names = list(t.index) + [r[0] for r in self.var_rows]
        wn = max(len(n) for n in names) + 1
        cols = list(t.columns)
        body = []
        for name, row in t.iterrows():
            body.append([name, _fmt(row["Coef."]), _fmt(row["Std.Err."]), _fmt(row["z"]),
                         _fmt(row["P>|z|"]), _fmt(row[cols[4]]), _fmt(row[cols[5]])])
        for name, val, se in self.var_rows:
            body.append([name, _fmt(val), _fmt(se), "", "", "", ""])
        heads = ["", "Coef.", "Std.Err.", "z", "P>|z|", cols[4], cols[5]]
        widths = [wn] + [max(len(heads[j]), *(len(r[j]) for r in body)) for j in range(1, 7)]

        def line(cells):
            out = f"{cells[0]:<{widths[0]}}"
            for j in range(1, 7):
                out += " " + f"{cells[j]:>{widths[j]}}"
            return out

        table_lines = [line(heads)] + [line(r) for r in body]
        width = max(max(len(s) for s in table_lines), max(len(s) for s in self.header))
        title = "Mixed Linear Model Regression Results"
        out = [title.center(width).rstrip(), "=" * width]
        out += [h.ljust(width) for h in self.header]
        out += ["-" * width, table_lines[0], "-" * width]
        out += table_lines[1:]
        out.append("=" * width)
        if self.res.aliased:
            out.append(f"Dropped aliased columns: {', '.join(self.res.aliased)}")
        out.append("")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.as_text()

    def __repr__(self) -> str:
        return self.as_text()

    def _repr_html_(self) -> str:
        return "<pre>" + self.as_text().replace("&", "&amp;").replace("<", "&lt;") + "</pre>"


def _random_rows(res) -> list[list[str]]:
    """lme4's ``Groups Name Variance Std.Dev. Corr`` rows from VarCorr."""
    vc = res.VarCorr
    rows: list[list[str]] = []
    grps = [g for g in dict.fromkeys(vc["grp"]) if g != "Residual"]
    for g in grps:
        sub = vc[vc["grp"] == g]
        var = sub[sub["var2"].isna()]
        names = var["var1"].tolist()
        corr = {(r.var1, r.var2): r.sdcor for r in sub[sub["var2"].notna()].itertuples()}
        for i, r in enumerate(var.itertuples()):
            cs = []
            for j in range(i):
                v = corr.get((names[j], r.var1))
                cs.append("" if v is None else ("  NaN" if not np.isfinite(v) else f"{v:5.2f}"))
            rows.append([g if i == 0 else "", r.var1, f"{r.vcov:.4g}", f"{r.sdcor:.4g}", " ".join(cs)])
    rows.append(["Residual", "", f"{res.scale:.4g}", f"{res.sigma:.4g}", ""])
    return rows


def _pval(p: float) -> str:
    """R's ``format.pval`` as ``printCoefmat`` shows it (3 significant digits, ``< 2e-16``)."""
    if not np.isfinite(p):
        return "NA"
    if p < 2.2e-16:
        return "< 2e-16"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.2e}"


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "." if p < 0.1 else ""


def _ddf_lines(table: pd.DataFrame) -> list[str]:
    """lmerTest's fixed-effects block: Estimate, Std. Error, df, t value, Pr(>|t|) and stars."""
    rows = [[str(n), f"{r['Estimate']:.4g}", f"{r['Std. Error']:.4g}", f"{r['df']:.2f}", f"{r['t value']:.3f}",
             _pval(float(r["Pr(>|t|)"])), _stars(float(r["Pr(>|t|)"]))] for n, r in table.iterrows()]
    head = ["", "Estimate", "Std. Error", "df", "t value", "Pr(>|t|)", ""]
    w = [max(len(head[j]), *(len(r[j]) for r in rows)) for j in range(7)]
    fmt = lambda r: (f"{r[0]:<{w[0]}}" + "".join(f" {r[j]:>{w[j]}}" for j in range(1, 6)) + f" {r[6]}").rstrip()
    out = [fmt(head)] + [fmt(r) for r in rows]
    if any(r[6] for r in rows):
        out += ["---", "Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1"]
    return out


def lme4_text(res, ddf: str | None = None, table: pd.DataFrame | None = None) -> str:
    """lme4's ``summary(fit)``-like text: criterion, random effects, fixed effects.

    With ``ddf`` (``"Satterthwaite"``, ``"Kenward-Roger"``) lmerTest's layout: the fixed effects get
    df and p-values (``table``: a precomputed ``res.coef_table(ddf=ddf)``).
    """
    kind = "REML" if res.reml else "maximum likelihood"
    if ddf is not None:
        from .inference import ddf_method

        method = ddf_method(ddf)
        out = [f"Linear mixed model fit by {kind}. t-tests use {method}'s method ['lmerModLmerTest' via bigmixed]"]
    else:
        out = [f"Linear mixed model fit by {kind} ['lmerMod' via bigmixed]"]
    out.append(f"Formula: {res.model.formula if isinstance(res.model.formula, str) else res.model.spec.lmer_formula()}")
    if res.reml:
        out.append(f"REML criterion at convergence: {res.objective:.4f}")
    else:
        out.append("     AIC      BIC   logLik deviance")
        out.append(f"{res.aic:8.1f} {res.bic:8.1f} {res.llf:8.1f} {res.objective:8.1f}")
    out.append("")
    out.append("Random effects:")
    rows = _random_rows(res)
    corr = any(r[4] for r in rows)
    head = ["Groups", "Name", "Variance", "Std.Dev.", "Corr" if corr else ""]
    w = [max(len(head[j]), *(len(r[j]) for r in rows)) for j in range(5)]
    fmt = lambda r: " " + "  ".join(f"{r[j]:<{w[j]}}" if j < 2 else f"{r[j]:>{w[j]}}" if j < 4 else r[j]
                                     for j in range(5)).rstrip()
    out.append(fmt(head))
    out += [fmt(r) for r in rows]
    groups = "; ".join(f"{k}, {v}" for k, v in res.ngroups.items())
    out.append(f"Number of obs: {res.nobs}, groups:  {groups}")
    out.append("")
    out.append("Fixed effects:")
    if ddf is not None:
        out += _ddf_lines(table if table is not None else res.coef_table(ddf=ddf))
        if res.is_singular:
            out.append("boundary (singular) fit: see results.is_singular")
        if not res.converged:
            out.append(f"optimizer (L-BFGS-B) convergence code: {res.optimizer.message}")
        return "\n".join(out)
    t = pd.DataFrame(
        {"Estimate": res.fe_params.to_numpy(), "Std. Error": res.bse_fe.to_numpy(), "t value": res.tvalues.to_numpy()},
        index=list(res.fixef.index),
    )
    out.append(t.to_string(float_format=lambda v: f"{v:.4f}"))
    if res.is_singular:
        out.append("boundary (singular) fit: see results.is_singular")
    if not res.converged:
        out.append(f"optimizer (L-BFGS-B) convergence code: {res.optimizer.message}")
    return "\n".join(out)
