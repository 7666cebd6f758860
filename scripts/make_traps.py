"""Synthetic "trap" data sets with known truth (deterministic, fixed seeds).

usage (from the repository root):  python scripts/make_traps.py
writes tests/data/traps/<case>.csv and tests/data/traps/cases.json (formula, REML, truth, seed, ...)

Each case is data on which a bounded gradient optimiser can stop at a false boundary (a theta
diagonal at 0, "singular") while the REML optimum (lme4's) is interior (DESIGN.md section 9).
scripts/ref_traps.R fits them with lme4 -> tests/data/lme4/traps.json;
scripts/bigmixed_traps.py fits them with an installed bigmixed -> tests/data/traps/bigmixed_0_1.json.
Values are rounded to 6 decimals, so the CSV text is exact and R and Python parse the same numbers.
"""
from __future__ import annotations

import argparse
import inspect
import json
import pathlib

import numpy as np
import pandas as pd

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "traps"
DIGITS = 6


def _labels(ids: np.ndarray) -> np.ndarray:
    return np.array([f"g{i:04d}" for i in ids])


def _re(rng, n_groups, sds, rho=0.0):
    """Random effects (n_groups x q) with standard deviations sds and, for q = 2, correlation rho."""
    sds = np.asarray(sds, float)
    cov = np.diag(sds ** 2)
    if sds.size == 2:
        cov[0, 1] = cov[1, 0] = rho * sds[0] * sds[1]
    return rng.multivariate_normal(np.zeros(sds.size), cov, size=n_groups)


def _balanced(rng, n_groups, n_per):
    return np.repeat(np.arange(n_groups), n_per)


# ------------------------------------------------------------------------------------------ cases
def small_slope(seed, n_groups=40, n_per=6, sigma=1.0, sd_int=1.0, sd_slope=0.05, beta=(1.0, 0.5)):
    """Slope SD 0.05 sigma next to the residual: the slope's theta is small but interior."""
    rng = np.random.default_rng(seed)
    g = _balanced(rng, n_groups, n_per)
    x = rng.uniform(0, 5, g.size)
    b = _re(rng, n_groups, [sd_int, sd_slope])
    y = beta[0] + beta[1] * x + b[g, 0] + b[g, 1] * x + rng.normal(0, sigma, g.size)
    truth = dict(beta={"(Intercept)": beta[0], "x": beta[1]}, sigma=sigma, sd={"(Intercept)": sd_int, "x": sd_slope}, corr=0.0)
    return pd.DataFrame({"y": y, "x": x, "g": _labels(g)}), "y ~ x + (x | g)", truth


def strong_corr(seed, n_groups=30, n_per=5, sigma=1.0, sd_int=1.0, sd_slope=0.3, rho=0.95, beta=(2.0, -1.0)):
    """Intercept and slope correlated at 0.95: Lambda's second diagonal is small."""
    rng = np.random.default_rng(seed)
    g = _balanced(rng, n_groups, n_per)
    x = rng.uniform(-1, 1, g.size)
    b = _re(rng, n_groups, [sd_int, sd_slope], rho)
    y = beta[0] + beta[1] * x + b[g, 0] + b[g, 1] * x + rng.normal(0, sigma, g.size)
    truth = dict(beta={"(Intercept)": beta[0], "x": beta[1]}, sigma=sigma, sd={"(Intercept)": sd_int, "x": sd_slope}, corr=rho)
    return pd.DataFrame({"y": y, "x": x, "g": _labels(g)}), "y ~ x + (x | g)", truth


def uncentred(seed, n_groups=40, n_per=6, sigma=1.0, sd_int=1.0, sd_slope=0.1, beta=(5.0, 0.3)):
    """Slope covariate x in 100..110 (random effects defined at x = 0, as lme4 parametrises them)."""
    rng = np.random.default_rng(seed)
    g = _balanced(rng, n_groups, n_per)
    x = rng.uniform(100, 110, g.size)
    b = _re(rng, n_groups, [sd_int, sd_slope])
    y = beta[0] + beta[1] * x + b[g, 0] + b[g, 1] * x + rng.normal(0, sigma, g.size)
    truth = dict(beta={"(Intercept)": beta[0], "x": beta[1]}, sigma=sigma, sd={"(Intercept)": sd_int, "x": sd_slope}, corr=0.0)
    return pd.DataFrame({"y": y, "x": x, "g": _labels(g)}), "y ~ x + (x | g)", truth


def interactions_p8(seed, n_groups=50, n_per=6, sigma=1.0, sd_int=0.8, sd_slope=0.08):
    """p = 8 fixed effects (x1 * x2 * x3) and a random intercept and x1 slope; small slope SD."""
    rng = np.random.default_rng(seed)
    g = _balanced(rng, n_groups, n_per)
    x1, x2, x3 = (rng.normal(0, 1, g.size) for _ in range(3))
    beta = {"(Intercept)": 1.0, "x1": 0.5, "x2": -0.5, "x3": 0.25, "x1:x2": 0.2, "x1:x3": -0.2, "x2:x3": 0.1, "x1:x2:x3": 0.05}
    X = np.column_stack([np.ones(g.size), x1, x2, x3, x1 * x2, x1 * x3, x2 * x3, x1 * x2 * x3])
    b = _re(rng, n_groups, [sd_int, sd_slope])
    y = X @ np.array(list(beta.values())) + b[g, 0] + b[g, 1] * x1 + rng.normal(0, sigma, g.size)
    truth = dict(beta=beta, sigma=sigma, sd={"(Intercept)": sd_int, "x1": sd_slope}, corr=0.0)
    return (pd.DataFrame({"y": y, "x1": x1, "x2": x2, "x3": x3, "g": _labels(g)}),
            "y ~ x1 * x2 * x3 + (x1 | g)", truth)


def singletons(seed, n_single=150, n_multi=10, n_per=3, sigma=1.0, sd_int=0.5, beta=(0.0, 1.0)):
    """Most groups have one row (random intercept confounded with the residual there)."""
    rng = np.random.default_rng(seed)
    sizes = np.r_[np.ones(n_single, int), np.full(n_multi, n_per)]
    g = np.repeat(np.arange(sizes.size), sizes)
    x = rng.normal(0, 1, g.size)
    b = rng.normal(0, sd_int, sizes.size)
    y = beta[0] + beta[1] * x + b[g] + rng.normal(0, sigma, g.size)
    truth = dict(beta={"(Intercept)": beta[0], "x": beta[1]}, sigma=sigma, sd={"(Intercept)": sd_int})
    return pd.DataFrame({"y": y, "x": x, "g": _labels(g)}), "y ~ x + (1 | g)", truth


def heavy_tailed(seed, n_groups=20, n_per=20, spread=5.0, sd_int=1.0, n_out=8, out=120.0, mu=10.0):
    """y ~ 1 + (1 | g): a spread of ~5 plus a few outliers of +-120 (heavy tails inflate sigma)."""
    rng = np.random.default_rng(seed)
    g = _balanced(rng, n_groups, n_per)
    e = rng.normal(0, spread, g.size)
    idx = rng.choice(g.size, n_out, replace=False)
    e[idx] += out * rng.choice([-1.0, 1.0], n_out)
    b = rng.normal(0, sd_int, n_groups)
    y = mu + b[g] + e
    truth = dict(beta={"(Intercept)": mu}, sigma_core=spread, outliers={"count": n_out, "size": out},
                 sd={"(Intercept)": sd_int}, note="errors: N(0, spread^2) plus n_out outliers of +-size")
    return pd.DataFrame({"y": y, "g": _labels(g)}), "y ~ 1 + (1 | g)", truth


def no_intercept(seed, n_groups=30, n_per=6, sigma=1.0, sd_int=0.25, beta=(1.0, -0.5)):
    """y ~ 0 + x1 + x2 + (1 | g): no fixed intercept, a random intercept (its mean is fixed at 0)."""
    rng = np.random.default_rng(seed)
    g = _balanced(rng, n_groups, n_per)
    x1 = rng.uniform(0, 2, g.size)
    x2 = rng.normal(0, 1, g.size)
    b = rng.normal(0, sd_int, n_groups)
    y = beta[0] * x1 + beta[1] * x2 + b[g] + rng.normal(0, sigma, g.size)
    truth = dict(beta={"x1": beta[0], "x2": beta[1]}, sigma=sigma, sd={"(Intercept)": sd_int})
    return pd.DataFrame({"y": y, "x1": x1, "x2": x2, "g": _labels(g)}), "y ~ 0 + x1 + x2 + (1 | g)", truth


def constant_column(seed, n_groups=30, n_per=6, sigma=1.0, sd_c=0.15, beta=1.0):
    """y ~ 0 + x1 + (0 + c | g) with c == 2: a random intercept spelled through a constant column."""
    rng = np.random.default_rng(seed)
    g = _balanced(rng, n_groups, n_per)
    x1 = rng.uniform(0, 2, g.size)
    c = np.full(g.size, 2.0)
    b = rng.normal(0, sd_c, n_groups)        # coefficient of c, so the group shift is 2 b
    y = beta * x1 + b[g] * c + rng.normal(0, sigma, g.size)
    truth = dict(beta={"x1": beta}, sigma=sigma, sd={"c": sd_c})
    return pd.DataFrame({"y": y, "x1": x1, "c": c, "g": _labels(g)}), "y ~ 0 + x1 + (0 + c | g)", truth


def tiny_intercept(seed, n_groups=20, n_per=10, sigma=1.0, sd_int=0.12, beta=(0.0, 1.0)):
    """Random-intercept SD 0.12 sigma with few groups: interior but close to the boundary."""
    rng = np.random.default_rng(seed)
    g = _balanced(rng, n_groups, n_per)
    x = rng.normal(0, 1, g.size)
    b = rng.normal(0, sd_int, n_groups)
    y = beta[0] + beta[1] * x + b[g] + rng.normal(0, sigma, g.size)
    truth = dict(beta={"(Intercept)": beta[0], "x": beta[1]}, sigma=sigma, sd={"(Intercept)": sd_int})
    return pd.DataFrame({"y": y, "x": x, "g": _labels(g)}), "y ~ x + (1 | g)", truth


GENERATORS = {f.__name__: f for f in (small_slope, strong_corr, uncentred, interactions_p8, singletons,
                                      heavy_tailed, no_intercept, constant_column, tiny_intercept)}

# case name -> (generator, seed, REML, keyword overrides). Seeds chosen (scripts/README.md) so that
# bigmixed 0.1.0 (commit d58e879) stops at a false boundary while lme4's optimum is interior.
# Each case is fitted by REML and by ML (scripts/ref_traps.R, scripts/bigmixed_traps.py).
CASES: dict[str, tuple[str, int, dict]] = {
    "small_slope": ("small_slope", 1, {"n_groups": 150, "n_per": 10, "sd_slope": 0.05}),
    "strong_corr": ("strong_corr", 4, {"n_groups": 100, "n_per": 8, "sd_slope": 0.3, "rho": 0.95}),
    "uncentred": ("uncentred", 4, {"n_groups": 100, "n_per": 8, "sd_slope": 0.05}),
    "interactions_p8": ("interactions_p8", 0, {"n_groups": 150, "n_per": 8, "sd_slope": 0.12}),
    "singletons": ("singletons", 0, {}),
    "heavy_tailed": ("heavy_tailed", 0, {"sd_int": 3.2}),
    "no_intercept": ("no_intercept", 1, {}),
    "constant_column": ("constant_column", 1, {}),
    "tiny_intercept": ("tiny_intercept", 0, {}),
}


def _params(gen, kwargs):
    """All keyword parameters of the generator as used (defaults plus the case's overrides)."""
    sig = inspect.signature(GENERATORS[gen])
    out = {k: v.default for k, v in sig.parameters.items() if k != "seed"}
    out.update(kwargs)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def build(name, gen, seed, kwargs):  # noqa: ARG001 (name kept for callers' logs)
    df, formula, truth = GENERATORS[gen](seed, **kwargs)
    for col in df.columns:
        if df[col].dtype.kind == "f":
            df[col] = df[col].round(DIGITS)
    return df, formula, truth


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {}
    for name, (gen, seed, kwargs) in CASES.items():
        df, formula, truth = build(name, gen, seed, kwargs)
        df.to_csv(out / f"{name}.csv", index=False)
        meta[name] = dict(description=GENERATORS[gen].__doc__.strip(), data=f"traps/{name}.csv", formula=formula, bigmixed_formula=formula,
                          factors=["g"], generator=gen, seed=seed, params=_params(gen, kwargs), nrow=len(df),
                          ngroups=int(df["g"].nunique()), truth=truth)
    (out / "cases.json").write_text(json.dumps({"generated_by": "scripts/make_traps.py", "numpy": np.__version__,
                                                "rounding": f"floats rounded to {DIGITS} decimals",
                                                "cases": meta}, indent=1) + "\n")
    print(f"wrote {len(meta)} cases to {out}")


if __name__ == "__main__":
    main()
