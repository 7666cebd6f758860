"""Benchmark of models with several random-effects terms: bigmixed vs mixedlm vs lme4.

Three benchmarks, run side by side in one run, every fit in its own fresh
process (lme4 through Rscript), REML:

1. **insteval** - lme4's ``InstEval`` (73,421 ratings, 2,972 students, 1,128
   lecturers, 14 departments), ``y ~ 1 + service + (1|s) + (1|d) + (1|dept)``.
   Data: ``tests/data/datasets/InstEval.csv`` when present, otherwise exported
   from lme4 by Rscript into ``bench/data/InstEval.csv``.  Libraries: lme4,
   mixedlm, bigmixed.
2. **nested** - :func:`bigmixed.simulate.simulate_nested`, ``y ~ t + (t | child)
   + (t | school)`` at ``--nested`` sizes (children:schools; default 1e5:1e3
   and 1e6:1e4).  bigmixed in memory, and bigmixed's single-factor fit
   ``y ~ t + (t | child)`` of the same data (*bigmixed-single*: the ratio
   nested / single is reported); mixedlm and lme4 up to
   ``--nested-peer-max`` children.
3. **crossed** - :func:`bigmixed.simulate.simulate_crossed_to_parquet`, ``y ~ x
   + (1|user) + (1|item)`` (or ``--crossed-formula``) at ``--crossed`` sizes (users:items:rows; default
   1e5:2000:1e6 and 1e6:2000:1e7) in ``--files`` parquet files.  bigmixed in
   memory (the files read into one frame before timing) and *bigmixed-parquet*
   (given the files' glob: reading is inside its fit time); the two criteria
   must agree to 1e-10 relative.  mixedlm and lme4 up to ``--crossed-peer-max``
   users.

bigmixed is called through its public API only: ``bigmixed.lmer(formula,
data, REML=True)`` and the result's ``objective``, ``theta``, ``fixef``,
``converged``.  A library that cannot fit a model is reported with its error.

Every Python child first fits a small warm-up problem of the same model in the
same process (so *fit s* is steady state, for every library alike); *job s* is
the whole process, *peak RSS* its maximum resident set size (GNU ``time -v``).
Before the timed runs of each benchmark, an untimed run of every bigmixed variant
fills numba's on-disk cache (so no timed process compiles).  A run longer than ``--budget`` seconds is killed ("> budget"), and a library
is not run at a larger size after that, nor when its time at the previous size
scaled by the rows predicts more than the budget.

Usage::

    python bench/multiterm.py                      # full run -> bench/multiterm.md, bench/multiterm.json
    python bench/multiterm.py --trial              # small sizes -> bench/data/multiterm-trial/
    python bench/multiterm.py --benches nested --nested 1e4:100 --libs mixedlm,lme4

Only a run with the default sizes of all three benchmarks writes to
``bench/`` by default; any other run writes to ``bench/data/multiterm-trial``
unless ``--out-dir`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))        # for _competitors
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bigmixed.simulate

from _competitors import (  # noqa: E402
    BENCH_DIR,
    REPO_ROOT,
    atomic_write_text,
    child_env,
    finish_record,
    lme4_available,
    lme4_cmd,
    parquet_files,
    python_cmd,
    run_budgeted,
)

FORMULAS = {
    "insteval": "y ~ 1 + service + (1|s) + (1|d) + (1|dept)",
    "nested": "y ~ t + (t | child) + (t | school)",
    "nested-single": "y ~ t + (t | child)",
    "crossed": "y ~ x + (1|user) + (1|item)",
}
FACTORS = {"insteval": ("s", "d", "dept", "service"), "nested": ("child", "school"),
           "crossed": ("user", "item")}
BENCH_LIBS = {
    "insteval": ("bigmixed", "mixedlm", "lme4"),
    "nested": ("bigmixed", "bigmixed-single", "mixedlm", "lme4"),
    "crossed": ("bigmixed", "bigmixed-parquet", "mixedlm", "lme4"),
}
ALL_LIBS = ("bigmixed", "bigmixed-single", "bigmixed-parquet", "mixedlm", "lme4")
PEERS = ("mixedlm", "lme4")
DEFAULTS = {"nested": "1e5:1e3,1e6:1e4", "crossed": "1e5:2000:1e6,1e6:2000:1e7"}
TRIAL = {"nested": "1e4:100", "crossed": "1e4:200:1e5"}
INSTEVAL_CANDIDATES = (REPO_ROOT / "tests" / "data" / "datasets" / "InstEval.csv",)
CROSSED_RTOL = 1e-10       # bigmixed in memory vs from parquet files
SAME_OPT_RTOL = 1e-8       # "the same optimum"


def _sizes(text: str, parts: int) -> list[tuple[int, ...]]:
    """``"1e5:1e3,1e6:1e4"`` -> ``[(100000, 1000), (1000000, 10000)]`` (sorted)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        vals = tuple(int(float(v)) for v in item.split(":"))
        if len(vals) != parts:
            raise ValueError(f"size {item!r} needs {parts} ':'-separated numbers")
        out.append(vals)
    return sorted(set(out))


def _peer_max(text: str) -> dict[str, int]:
    """``"mixedlm=1e6,lme4=1e5"`` -> ``{"mixedlm": 1000000, "lme4": 100000}``."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        lib, _, v = item.partition("=")
        out[lib.strip()] = int(float(v))
    return out


def _write_csv(df: Any, path: Path) -> Path:
    tmp = path.with_name("." + path.name + ".tmp")
    df.write_csv(tmp)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def insteval_data(data_dir: Path) -> tuple[Path, Path, Path, int, str]:
    """InstEval as parquet (Python), CSV (R) and a 5,000-row warm-up parquet; rows; source."""
    import polars as pl

    src = next((p for p in INSTEVAL_CANDIDATES if p.exists()), None)
    how = f"{src.relative_to(REPO_ROOT)}" if src else ""
    if src is None:
        src = data_dir / "InstEval.csv"
        if not src.exists():
            tmp = src.with_name(".InstEval.csv.tmp")
            code = ("data(InstEval, package = 'lme4'); "
                    f"write.csv(InstEval, '{tmp}', row.names = FALSE, quote = FALSE)")
            subprocess.run(["Rscript", "-e", code], check=True, capture_output=True, timeout=300)
            os.replace(tmp, src)
        how = "exported from lme4::InstEval by Rscript (bench/data/InstEval.csv)"
    # the grouping factors and service are read as strings, as users would hold
    # them (keys, not numbers); service is then a two-level factor ("0", "1") in
    # every library: an intercept and a service1 indicator, the same design in all
    keys = ("s", "d", "dept", "service")
    df = pl.read_csv(src, schema_overrides={c: pl.String for c in keys}, infer_schema_length=None)
    missing = {*keys, "y"} - set(df.columns)
    if missing:
        raise ValueError(f"{src} lacks column(s) {sorted(missing)}")
    df = df.select(*keys, pl.col("y").cast(pl.Float64))
    pq = data_dir / "mt_insteval.parquet"
    df.write_parquet(pq)
    warm = data_dir / "mt_insteval_warm.parquet"
    df.head(5000).write_parquet(warm)
    csv = _write_csv(df, data_dir / "mt_insteval.csv")
    return pq, csv, warm, df.height, how


def nested_data(children: int, schools: int, seed: int, data_dir: Path) -> tuple[Path, int]:
    from bigmixed.simulate import simulate_nested

    df = simulate_nested(children, schools, seed=seed)
    pq = data_dir / f"mt_nested_c{children}_s{schools}_seed{seed}.parquet"
    tmp = pq.with_name("." + pq.name + ".tmp")
    df.write_parquet(tmp)
    os.replace(tmp, pq)
    rows = df.height
    del df
    gc.collect()
    return pq, rows


def crossed_data(users: int, items: int, rows: int, files: int, seed: int, data_dir: Path) -> Path:
    from bigmixed.simulate import simulate_crossed_to_parquet

    d = data_dir / f"mt_crossed_u{users}_i{items}_r{rows}_f{files}_seed{seed}"
    simulate_crossed_to_parquet(d, users, items, rows, files=files, seed=seed)
    return d


def csv_of(pq: Path) -> Path:
    """CSV twin of a parquet file or directory (for R), written on first use."""
    import polars as pl

    csv = pq.with_suffix(".csv") if pq.is_file() else pq.with_name(pq.name + ".csv")
    if not csv.exists():
        _write_csv(pl.read_parquet(parquet_files(pq)), csv)
    return csv


# --------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------


def run_one(bench: str, lib: str, size: str, data: Path, warm: Path | None, rows: int,
            budget: float, work: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """One library on one benchmark data set, in a fresh budgeted process."""
    tag = f"{bench}_{lib}_{size}".replace(":", "-")
    out = work / f"{tag}.json"
    out.unlink(missing_ok=True)
    log = work / f"{tag}.log"
    formula = FORMULAS["nested-single"] if lib == "bigmixed-single" else FORMULAS[bench]
    if lib == "lme4":
        cmd = lme4_cmd(csv_of(data), out, formula=formula, factors=FACTORS[bench])
    else:
        runner = "bigmixed" if lib.startswith("bigmixed") else lib
        cmd = python_cmd(runner, data, out, formula=formula, warmup=warm,
                         from_path=(lib == "bigmixed-parquet"))
    run = run_budgeted(cmd, budget, log, env=child_env())
    rec: dict[str, Any] = {"bench": bench, "library": lib, "size": size, "rows": rows, "formula": formula,
                           "status": run.status, "job_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb,
                           "log": str(log), **extra}
    rec = finish_record(rec, run, out, log)
    rec["library"] = lib  # the child's record names its runner
    nan = float("nan")
    crit = rec.get("criterion")
    print(f"[multiterm]   {bench:8s} {size:18s} {lib:16s} {rec['status']:8s} fit={rec.get('fit_s', nan):.3f} s "
          f"job={rec['job_s']:.1f} s rss={rec.get('peak_rss_mb') or nan:.0f} MB "
          f"crit={nan if crit is None else crit:.8f} conv={rec.get('converged')}"
          + (f" [{rec['error'][:120]}]" if rec.get("error") else ""), flush=True)
    return rec


def skipped(bench: str, lib: str, size: str, rows: int, why: str, extra: dict[str, Any]) -> dict[str, Any]:
    print(f"[multiterm]   {bench:8s} {size:18s} {lib:16s} skipped ({why})", flush=True)
    return {"bench": bench, "library": lib, "size": size, "rows": rows, "status": "skipped", "why": why, **extra}


class Budget:
    """Per (benchmark, library): skip after a timeout, or when the rows-scaled time predicts one."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.last: dict[tuple[str, str], tuple[int, float]] = {}
        self.dead: set[tuple[str, str]] = set()

    def why_not(self, bench: str, lib: str, rows: int) -> str | None:
        if (bench, lib) in self.dead:
            return "> budget at a smaller size"
        if (bench, lib) in self.last:
            r0, t0 = self.last[(bench, lib)]
            pred = t0 * rows / r0
            if pred > self.budget:
                return f"predicted {pred:.0f} s > budget (rows-scaled from the smaller size)"
        return None

    def record(self, rec: dict[str, Any]) -> None:
        key = (rec["bench"], rec["library"])
        if rec["status"] == "timeout":
            self.dead.add(key)
        elif rec["status"] == "ok":
            self.last[key] = (rec["rows"], rec["job_s"])


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def _rel(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (a - b) / abs(b)


def _fmt_rel(v: float | None) -> str:
    return "—" if v is None else f"{v:+.1e}"


def _cell(rec: dict[str, Any], key: str, fmt: str, budget: float) -> str:
    st = rec["status"]
    if st == "timeout":
        return f"> {budget:g} s" if key in ("fit_s", "job_s") else "—"
    if st == "skipped":
        return "skipped" if key == "fit_s" else "—"
    if st != "ok":
        return ("error" if key == "fit_s" else "—") if key != "job_s" else format(rec["job_s"], fmt)
    v = rec.get(key)
    return "—" if v is None else format(v, fmt)


def _table(runs: list[dict[str, Any]], budget: float, ref: float | None, ref_name: str) -> list[str]:
    lines = [f"| library | fit s | job s | peak RSS MB | criterion | rel. to {ref_name} | converged | note |",
             "|---|---:|---:|---:|---:|---:|:-:|---|"]
    for r in runs:
        conv = {True: "yes", False: "**no**"}.get(r.get("converged"), "—") if r["status"] == "ok" else "—"
        note = r.get("error") or r.get("why") or ""
        lines.append(f"| {r['library']} | {_cell(r, 'fit_s', '.3g', budget)} | {_cell(r, 'job_s', '.3g', budget)} | "
                     f"{_cell(r, 'peak_rss_mb', '.0f', budget)} | {_cell(r, 'criterion', '.6f', budget)} | "
                     f"{_fmt_rel(_rel(r.get('criterion'), ref)) if r['status'] == 'ok' else '—'} | {conv} | "
                     f"{note[:160].replace('|', '/')} |")
    return lines


def _ok(runs: list[dict[str, Any]], lib: str) -> dict[str, Any] | None:
    return next((r for r in runs if r["library"] == lib and r["status"] == "ok"
                 and r.get("criterion") is not None), None)


def _speedups(runs: list[dict[str, Any]], base: str, budget: float) -> str:
    b = _ok(runs, base)
    if b is None:
        return f"{base} did not fit: no speed-ups"
    parts = []
    for r in runs:
        if r["library"] in PEERS:
            if r["status"] == "ok":
                parts.append(f"{r['fit_s'] / b['fit_s']:.1f}x vs {r['library']}")
            elif r["status"] == "timeout":
                parts.append(f">{budget / b['fit_s']:.0f}x vs {r['library']}")
    return "speed-up of bigmixed (peer fit / bigmixed fit): " + (", ".join(parts) or "no peer ran")


def _optimum(runs: list[dict[str, Any]], libs: tuple[str, ...]) -> tuple[str, float | None]:
    ok = [r for r in runs if r["library"] in libs and r["status"] == "ok" and r.get("criterion") is not None]
    if not ok:
        return "no criterion to compare", None
    best = min(r["criterion"] for r in ok)
    if len(ok) == 1:
        return f"only {ok[0]['library']} fitted", best
    short = [(r["library"], _rel(r["criterion"], best)) for r in ok
             if r["criterion"] - best > SAME_OPT_RTOL * abs(best)]
    same = [r["library"] for r in ok if r["library"] not in {s for s, _ in short}]
    if not short:
        return f"same optimum ({SAME_OPT_RTOL:g} relative) for {', '.join(same)}", best
    return (f"same optimum for {', '.join(same)}; stops short: "
            + ", ".join(f"{lib} ({v:+.1e})" for lib, v in short)), best


def render_markdown(data: dict[str, Any]) -> str:
    meta, results = data["meta"], data["runs"]
    budget = meta["budget_s"]
    lines = ["# bigmixed benchmark: several random-effects terms (REML)", "",
             f"Generated {meta['date']} by `python bench/multiterm.py {meta['argv']}` on {meta['machine']} "
             f"({meta['cpus']} CPUs, {meta['mem_gb']:.0f} GB RAM), Python {meta['python']}; load average "
             f"{meta['load_avg_start'][0]:.1f} at the start.", "",
             "Every fit runs in a fresh process (lme4 via Rscript, reading CSV; Python children read parquet "
             "and fit a small warm-up problem of the same model first). *fit s*: the fit call alone, from "
             "formula and in-memory data to fitted model (for *bigmixed-parquet*: from the files' glob, so "
             "reading is included). *job s*: the whole process. *peak RSS*: its maximum resident set size "
             f"(GNU `time -v`). *criterion*: REML criterion (lme4's `REMLcrit`), lower is better. Budget {budget:g} s "
             "per run; a library is not run at a larger size after a timeout, nor when its job time at the "
             "smaller size scaled by the rows predicts more than the budget.", ""]
    if meta.get("notes"):
        lines += ["Notes: " + "; ".join(meta["notes"]), ""]

    def bench_runs(bench: str) -> list[dict[str, Any]]:
        return [r for r in results if r["bench"] == bench]

    if "insteval" in meta["benches"]:
        runs = bench_runs("insteval")
        lme4 = _ok(runs, "lme4")
        info = meta.get("insteval", {})
        opt, _ = _optimum(runs, ALL_LIBS)
        lines += ["## 1. InstEval: `" + FORMULAS["insteval"] + "`", "",
                  f"Data: {info.get('source', '?')}; {info.get('rows', 0):,} rows (2,972 students `s`, "
                  "1,128 lecturers `d`, 14 departments `dept`; `s`, `d`, `dept` and `service` read as strings, so `service` is a two-level factor).", ""]
        lines += _table(runs, budget, lme4["criterion"] if lme4 else None, "lme4")
        lines += ["", f"Optimum: {opt}. {_speedups(runs, 'bigmixed', budget)}.", ""]

    if "nested" in meta["benches"]:
        runs = bench_runs("nested")
        lines += ["## 2. Nested: `" + FORMULAS["nested"] + "`", "",
                  "Data: `simulate_nested(children, schools, seed=" + str(meta["seed"]) + ")` (1-19 rows per "
                  "child, mean 10; t ~ U(0, 10) raw; rows shuffled; every child in one school). "
                  "*bigmixed-single*: `" + FORMULAS["nested-single"] + "` on the same data (one grouping "
                  "factor), for the cost of the second term.", ""]
        for size in meta["nested_sizes"]:
            sr = [r for r in runs if r["size"] == size]
            if not sr:
                continue
            rows = sr[0]["rows"]
            c, s = size.split(":")
            opt, best = _optimum(sr, ("bigmixed", "mixedlm", "lme4"))
            lines += [f"### {int(c):,} children, {int(s):,} schools, {rows:,} rows", ""]
            lines += _table(sr, budget, best, "lowest")
            nb, sb = _ok(sr, "bigmixed"), _ok(sr, "bigmixed-single")
            ratio = (f"{nb['fit_s'] / sb['fit_s']:.2f} (nested {nb['fit_s']:.3g} s / single {sb['fit_s']:.3g} s)"
                     if nb and sb else "n/a (" + ("bigmixed nested did not fit" if not nb else
                                                  "bigmixed single did not fit") + ")")
            lines += ["", f"bigmixed nested / single fit time: **{ratio}**. Optimum (nested model): {opt}. "
                      f"{_speedups(sr, 'bigmixed', budget)}.", ""]

    if "crossed" in meta["benches"]:
        runs = bench_runs("crossed")
        lines += ["## 3. Crossed: `" + FORMULAS["crossed"] + "`", "",
                  "Data: `simulate_crossed_to_parquet(dir, users, items, rows, files="
                  f"{meta['files']}, seed={meta['seed']})` (each row a uniformly random user and a Zipf(1) "
                  "popular item; x ~ U(0, 10) raw; rows in random order; every file has rows of almost every "
                  "user and item). *bigmixed*: the files read into one polars frame before timing; "
                  "*bigmixed-parquet*: `bigmixed.lmer(formula, 'DIR/*.parquet')`.", ""]
        for size in meta["crossed_sizes"]:
            sr = [r for r in runs if r["size"] == size]
            if not sr:
                continue
            u, i, n = size.split(":")
            opt, best = _optimum(sr, ("bigmixed", "bigmixed-parquet", "mixedlm", "lme4"))
            lines += [f"### {int(u):,} users, {int(i):,} items, {int(n):,} rows", ""]
            lines += _table(sr, budget, best, "lowest")
            mem, pq = _ok(sr, "bigmixed"), _ok(sr, "bigmixed-parquet")
            if mem and pq:
                rel = abs(pq["criterion"] - mem["criterion"]) / abs(mem["criterion"])
                check = (f"{rel:.1e} ({'PASS' if rel <= CROSSED_RTOL else 'FAIL'}: <= {CROSSED_RTOL:g}); "
                         f"fit {mem['fit_s']:.3g} s in memory, {pq['fit_s']:.3g} s from parquet; peak RSS "
                         f"{mem.get('peak_rss_mb') or float('nan'):.0f} / {pq.get('peak_rss_mb') or float('nan'):.0f} MB")
            else:
                check = "n/a (bigmixed did not fit both ways)"
            lines += ["", f"bigmixed in memory vs from parquet, relative criterion difference: **{check}**. "
                      f"Optimum: {opt}. {_speedups(sr, 'bigmixed', budget)}.", ""]

    extra, seen = [], set()
    for r in results:
        for w in r.get("warnings", []) + r.get("messages", []):
            line = f"- {r['bench']} {r['size']} / {r['library']}: {w}"
            if line not in seen:
                seen.add(line)
                extra.append(line)
    if extra:
        lines += ["## Warnings", ""] + extra + [""]
    vers = {r["library"].split("-")[0]: r["version"] for r in results if r.get("version")}
    if vers:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(vers.items()))]
    return "\n".join(lines) + "\n"


def write_reports(data: dict[str, Any], out_dir: Path) -> None:
    atomic_write_text(out_dir / "multiterm.json", json.dumps(data, indent=1, default=str))
    atomic_write_text(out_dir / "multiterm.md", render_markdown(data))


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benches", default="insteval,nested,crossed", help="subset of insteval,nested,crossed")
    ap.add_argument("--libs", default=",".join(ALL_LIBS), help=f"subset of {','.join(ALL_LIBS)}")
    ap.add_argument("--nested", default=None, help=f"children:schools sizes (default {DEFAULTS['nested']})")
    ap.add_argument("--crossed", default=None, help=f"users:items:rows sizes (default {DEFAULTS['crossed']})")
    ap.add_argument("--nested-peer-max", default="mixedlm=1e5,lme4=1e5",
                    help="largest number of children each peer is run at (default mixedlm=1e5,lme4=1e5; "
                         "bigmixed runs at all sizes)")
    ap.add_argument("--crossed-peer-max", default="mixedlm=1e5,lme4=1e5",
                    help="largest number of users each peer is run at (default mixedlm=1e5,lme4=1e5)")
    ap.add_argument("--crossed-formula", default=FORMULAS["crossed"],
                    help=f"model of the crossed benchmark (default {FORMULAS['crossed']!r}; e.g. with "
                         "'(x || user)': a slope variance at 0 on these data)")
    ap.add_argument("--files", type=int, default=8, help="parquet files of the crossed data")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--trial", action="store_true",
                    help=f"small sizes (nested {TRIAL['nested']}, crossed {TRIAL['crossed']})")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where multiterm.md/.json go (default: bench/ for a full run, else bench/data/multiterm-trial)")
    ap.add_argument("--data-dir", type=Path, default=BENCH_DIR / "data", help="data files and child logs")
    a = ap.parse_args(argv)

    benches = [b.strip() for b in a.benches.split(",") if b.strip()]
    if set(benches) - set(BENCH_LIBS):
        ap.error(f"unknown benchmark(s) {sorted(set(benches) - set(BENCH_LIBS))}")
    libs = {s.strip() for s in a.libs.split(",") if s.strip()}
    if libs - set(ALL_LIBS):
        ap.error(f"unknown librar(y/ies) {sorted(libs - set(ALL_LIBS))}; choose from {list(ALL_LIBS)}")
    nested_txt = a.nested or (TRIAL if a.trial else DEFAULTS)["nested"]
    crossed_txt = a.crossed or (TRIAL if a.trial else DEFAULTS)["crossed"]
    nested_sizes, crossed_sizes = _sizes(nested_txt, 2), _sizes(crossed_txt, 3)
    default_crossed = FORMULAS["crossed"]
    FORMULAS["crossed"] = a.crossed_formula  # this run's model (the children and the report read it)
    full = (not a.trial and set(benches) == set(BENCH_LIBS) and libs == set(ALL_LIBS)
            and a.crossed_formula == default_crossed
            and nested_sizes == _sizes(DEFAULTS["nested"], 2) and crossed_sizes == _sizes(DEFAULTS["crossed"], 3))
    out_dir = a.out_dir or (BENCH_DIR if full else BENCH_DIR / "data" / "multiterm-trial")
    nested_max, crossed_max = _peer_max(a.nested_peer_max), _peer_max(a.crossed_peer_max)
    notes: list[str] = []
    if "lme4" in libs:
        ok, info = lme4_available()
        if not ok:
            libs.discard("lme4")
            notes.append(f"lme4 skipped: {info}")
    import psutil

    meta: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "mem_gb": psutil.virtual_memory().total / 2**30, "python": platform.python_version(),
        "budget_s": a.budget, "seed": a.seed, "files": a.files, "benches": benches, "libs": sorted(libs),
        "formulas": FORMULAS, "full_run": full,
        "nested_sizes": [f"{c}:{s}" for c, s in nested_sizes],
        "crossed_sizes": [f"{u}:{i}:{n}" for u, i, n in crossed_sizes],
        "nested_peer_max": nested_max, "crossed_peer_max": crossed_max,
        "load_avg_start": os.getloadavg(), "notes": notes,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = a.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    work = data_dir / "multiterm-runs"
    work.mkdir(parents=True, exist_ok=True)
    print(f"[multiterm] {'full run' if full else 'trial'}: reports -> {out_dir}", flush=True)
    data: dict[str, Any] = {"meta": meta, "runs": []}
    budget = Budget(a.budget)

    def go(bench: str, lib: str, size: str, path: Path, warm: Path | None, rows: int,
           extra: dict[str, Any], cap: int | None = None, n: int = 0) -> None:
        if lib not in libs:
            return
        why = f"peer capped at {cap:,} (option)" if cap is not None and n > cap else budget.why_not(bench, lib, rows)
        if why:
            rec = skipped(bench, lib, size, rows, why, extra)
        else:
            rec = run_one(bench, lib, size, path, warm, rows, a.budget, work, extra)
            budget.record(rec)
        data["runs"].append(rec)
        write_reports(data, out_dir)

    def warm_cache(bench: str, warm: Path, rows: int) -> None:
        # An untimed run of every bigmixed variant of this benchmark on its warm-up data first, so
        # numba's on-disk cache holds the kernels before any timed process: a cold compile would
        # add tens of seconds and ~0.7 GB to the first run's job time and peak RSS.
        for lib in BENCH_LIBS[bench]:
            if lib in libs and lib.startswith("bigmixed"):
                run_one(bench, lib, "cache-warm-up", warm, warm, rows, max(a.budget, 900.0), work, {})
        notes.append(f"{bench}: bigmixed's numba cache warmed by an untimed run before timing")

    if "insteval" in benches:
        pq, _, warm, rows, how = insteval_data(data_dir)
        meta["insteval"] = {"source": how, "rows": rows}
        print(f"[multiterm] insteval: {rows:,} rows ({how})", flush=True)
        warm_cache("insteval", warm, 5000)
        for lib in BENCH_LIBS["insteval"]:
            go("insteval", lib, "InstEval", pq, warm, rows, {})

    if "nested" in benches:
        from bigmixed.simulate import simulate_nested

        warm = data_dir / "mt_nested_warm.parquet"
        simulate_nested(300, 10, seed=99).write_parquet(warm)
        warm_cache("nested", warm, 0)
        for c, s in nested_sizes:
            pq, rows = nested_data(c, s, a.seed, data_dir)
            size = f"{c}:{s}"
            print(f"[multiterm] nested: {c:,} children, {s:,} schools, {rows:,} rows -> {pq}", flush=True)
            extra = {"children": c, "schools": s}
            for lib in BENCH_LIBS["nested"]:
                cap = nested_max.get(lib, 0) if lib in PEERS else None
                go("nested", lib, size, pq, warm, rows, extra, cap, c)

    if "crossed" in benches:
        from bigmixed.simulate import simulate_crossed_to_parquet

        warm = data_dir / "mt_crossed_warm"
        simulate_crossed_to_parquet(warm, 300, 30, 3000, files=2, seed=99)
        warm_cache("crossed", warm, 3000)
        for u, i, n in crossed_sizes:
            d = crossed_data(u, i, n, a.files, a.seed, data_dir)
            size = f"{u}:{i}:{n}"
            print(f"[multiterm] crossed: {u:,} users, {i:,} items, {n:,} rows in {a.files} files -> {d}", flush=True)
            extra = {"users": u, "items": i}
            for lib in BENCH_LIBS["crossed"]:
                cap = crossed_max.get(lib, 0) if lib in PEERS else None
                go("crossed", lib, size, d, warm, n, extra, cap, u)

    meta["load_avg_end"] = os.getloadavg()
    write_reports(data, out_dir)
    print(f"[multiterm] wrote {out_dir / 'multiterm.md'}", flush=True)
    # the CSV twins of the large data sets are big and cheap to rebuild
    for p in data_dir.glob("mt_*.csv"):
        if p.stat().st_size > 200 * 2**20:
            p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
