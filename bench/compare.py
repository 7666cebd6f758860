"""Side-by-side benchmark: bigmixed vs statsmodels vs mixedlm vs lme4.

Fits the REML model ``y ~ x + x2 + (x | subject)`` to simulated data
(:func:`bigmixed.simulate.simulate`, unbalanced 1..19 rows per subject,
mean 10) at several numbers of subjects, each library in its own fresh
process on the same data file, and writes

* ``bench/results.json`` - every run, machine readable;
* ``bench/results.md``   - tables: times, peak RSS, criteria, speed-ups;
* ``bench/scaling.png``  - log-log fit time vs number of subjects.

Usage::

    python bench/compare.py                         # 1e3 .. 1e6 subjects, 300 s budget
    python bench/compare.py --sizes 1e3,1e4 --libs statsmodels,mixedlm,lme4

A run longer than ``--budget`` seconds is killed and reported as "> budget";
that library is then skipped (also "> budget") at all larger sizes, since
the fits only get slower.  Outputs are rewritten after every size, so an
interrupted long run still leaves a valid report of what finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))        # for _competitors
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bigmixed.simulate

from _competitors import (  # noqa: E402
    BENCH_DIR,
    FORMULA,
    child_env,
    lme4_available,
    lme4_cmd,
    python_cmd,
    run_budgeted,
)

ALL_LIBS = ("bigmixed", "statsmodels", "mixedlm", "lme4")
COMPETITORS = ("statsmodels", "mixedlm", "lme4")
COLORS = {"bigmixed": "tab:red", "statsmodels": "tab:blue", "mixedlm": "tab:orange", "lme4": "tab:green"}
# bigmixed must reach lme4's REML criterion or better, up to this relative slack
CRIT_RTOL = 1e-6


def parse_sizes(text: str) -> list[int]:
    """Parse ``"1e3,1e4,20000"`` into sorted unique ints."""
    return sorted({int(float(t)) for t in text.split(",") if t.strip()})


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_data(groups: int, obs: int, seed: int, data_dir: Path, csv: bool) -> tuple[Path, Path | None, int]:
    """Simulate once per size; write parquet (Python children) and CSV (R has no parquet reader)."""
    from bigmixed.simulate import simulate, write_parquet

    df = simulate(groups, obs, seed=seed)
    stem = data_dir / f"sim_g{groups}_o{obs}_s{seed}"
    pq = write_parquet(df, stem.with_suffix(".parquet"))[0]
    csv_path = None
    if csv:
        csv_path = stem.with_suffix(".csv")
        tmp = csv_path.with_name("." + csv_path.name + ".tmp")
        df.write_csv(tmp)
        os.replace(tmp, csv_path)
    return pq, csv_path, df.height


def _progress(rec: dict[str, Any]) -> None:
    nan = float("nan")
    print(f"[compare]   {rec['library']:12s} {rec['status']:8s} fit={rec.get('fit_s', nan):.3f} s "
          f"job={rec.get('job_s', nan):.2f} s rss={rec.get('peak_rss_mb') or nan:.0f} MB "
          f"crit={rec.get('criterion', nan):.6f} conv={rec.get('converged')}", flush=True)


def warm_up_bigmixed(work: Path, data_dir: Path) -> str:
    """Fit a tiny model once so bigmixed's on-disk numba cache is warm.

    Every library is timed on its first fit in a fresh process; for bigmixed
    that would otherwise include JIT compilation on the very first size only
    (afterwards the cache is warm anyway), which is a one-off install cost,
    not fitting speed.  bench/firstcall.py measures that cost separately.
    """
    pq, _, _ = prepare_data(200, 10, 12345, data_dir, csv=False)
    rec = run_one("bigmixed", 200, 0, pq, None, 600.0, work, from_path=False)
    return f"bigmixed warm-up fit (numba cache): {rec['status']}, job {rec['job_s']:.1f} s"


def _log_tail(log: Path, n: int = 3) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-600:]


def run_one(lib: str, groups: int, rows: int, pq: Path, csv: Path | None, budget: float,
            work: Path, from_path: bool) -> dict[str, Any]:
    """Run one library on one data set in a fresh child process; return its record."""
    out = work / f"{lib}_g{groups}.json"
    out.unlink(missing_ok=True)
    log = work / f"{lib}_g{groups}.log"
    if lib == "lme4":
        assert csv is not None
        cmd = lme4_cmd(csv, out)
    else:
        cmd = python_cmd(lib, pq, out, from_path=from_path)
    run = run_budgeted(cmd, budget, log, env=child_env())
    rec: dict[str, Any] = {"library": lib, "groups": groups, "rows": rows, "status": run.status,
                           "job_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "log": str(log)}
    if run.status == "ok" and out.exists():
        rec.update(json.loads(out.read_text()))
        rec["status"] = "ok"
    elif run.status == "ok":
        rec["status"] = "error"
        rec["error"] = "child exited 0 but wrote no result; " + _log_tail(log)
    elif run.status == "error":
        rec["error"] = f"exit {run.returncode}: " + _log_tail(log)
    return rec


# --------------------------------------------------------------------------
# derived numbers
# --------------------------------------------------------------------------


def _by(results: list[dict[str, Any]], groups: int) -> dict[str, dict[str, Any]]:
    return {r["library"]: r for r in results if r["groups"] == groups}


def speedups(results: list[dict[str, Any]], groups: int, budget: float) -> dict[str, str]:
    """bigmixed's fit-time speed-up over each competitor at one size.

    A competitor that ran out of budget gives a lower bound ``>budget/t_bm``.
    """
    runs = _by(results, groups)
    bm = runs.get("bigmixed")
    out: dict[str, str] = {}
    for lib in COMPETITORS:
        c = runs.get(lib)
        if not bm or bm["status"] != "ok" or not c:
            out[lib] = ""
        elif c["status"] == "ok":
            out[lib] = f"{c['fit_s'] / bm['fit_s']:.1f}x"
        elif c["status"] in ("timeout", "skipped"):
            out[lib] = f">{budget / bm['fit_s']:.0f}x"
        else:
            out[lib] = ""
    return out


def criterion_check(results: list[dict[str, Any]], groups: int) -> str:
    """PASS if bigmixed's REML criterion <= the reference's * (1 + 1e-6).

    The reference is lme4; without a converged lme4 run, the best (lowest)
    criterion among converged competitors is used and named.
    """
    runs = _by(results, groups)
    bm = runs.get("bigmixed")
    if not bm or bm["status"] != "ok":
        return f"n/a (bigmixed {bm['status'] if bm else 'not run'})"
    ref_lib = "lme4" if runs.get("lme4", {}).get("status") == "ok" else None
    if ref_lib is None:
        ok = [r for r in runs.values() if r["library"] != "bigmixed" and r["status"] == "ok" and r.get("converged")]
        if not ok:
            return "n/a (no reference)"
        ref_lib = min(ok, key=lambda r: r["criterion"])["library"]
    ref = runs[ref_lib]["criterion"]
    passed = bm["criterion"] <= ref + CRIT_RTOL * abs(ref)
    return f"{'PASS' if passed else 'FAIL'} vs {ref_lib} ({(bm['criterion'] - ref) / abs(ref):+.1e})"


# --------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------


def _cell(rec: dict[str, Any], key: str, fmt: str, budget: float) -> str:
    st = rec["status"]
    if st in ("timeout", "skipped"):
        return f"> {budget:g} s" if key in ("fit_s", "job_s") else "—"
    if st != "ok":
        return st if key == "fit_s" else "—"
    v = rec.get(key)
    return "—" if v is None else format(v, fmt)


def render_markdown(data: dict[str, Any]) -> str:
    """Render results.json content as the results.md report."""
    meta, results = data["meta"], data["runs"]
    budget = meta["budget_s"]
    sizes = sorted({r["groups"] for r in results})
    lines = [
        "# bigmixed benchmark: `y ~ x + x2 + (x | subject)`, REML",
        "",
        f"Generated {meta['date']} by `python bench/compare.py {meta['argv']}` on "
        f"{meta['machine']} ({meta['cpus']} CPUs, {meta['mem_gb']:.0f} GB RAM), Python {meta['python']}.",
        "",
        f"Data: `bigmixed.simulate.simulate(groups, {meta['obs_per_group']}, seed={meta['seed']})` "
        "(subject sizes uniform on 1..19, mean 10). Each fit runs in a fresh process on the same file "
        f"(parquet for Python, CSV for R). Budget {budget:g} s per run; once exceeded, larger sizes "
        "are skipped for that library.",
        "",
        "*fit s*: the fit call alone (formula to fitted model, data already in memory), timed inside "
        "the child. *job s*: the whole child process (start-up, imports, reading the file, fit). "
        "*peak RSS*: the child's maximum resident set size (GNU `time -v`). *criterion*: REML "
        "criterion (-2 REML log-likelihood, lme4's `REMLcrit`), lower is better; *rel. to lme4* is "
        "(criterion - lme4) / |lme4|. *speed-up*: competitor fit s / bigmixed fit s on the same data "
        "(> 1: bigmixed faster; '>N' when the competitor ran out of budget).",
        "",
    ]
    if meta.get("notes"):
        lines += ["Notes: " + "; ".join(meta["notes"]), ""]

    lines += ["## Summary", "",
              "| groups | rows | " + " | ".join(f"speed-up vs {c}" for c in COMPETITORS)
              + " | criterion check (bigmixed <= lme4·(1+1e-6)) |",
              "|---:|---:|" + "---:|" * len(COMPETITORS) + "---|"]
    for g in sizes:
        rows = next(r["rows"] for r in results if r["groups"] == g)
        su = speedups(results, g, budget)
        lines.append(f"| {g:,} | {rows:,} | " + " | ".join(su[c] or "—" for c in COMPETITORS)
                     + f" | {criterion_check(results, g)} |")

    lines += ["", "## All runs", "",
              "| groups | rows | library | fit s | job s | peak RSS MB | criterion | rel. to lme4 | converged |",
              "|---:|---:|---|---:|---:|---:|---:|---:|:-:|"]
    for g in sizes:
        runs = _by(results, g)
        ref = runs.get("lme4", {})
        ref_crit = ref.get("criterion") if ref.get("status") == "ok" else None
        for lib in ALL_LIBS:
            r = runs.get(lib)
            if r is None:
                continue
            rel = "—"
            if lib == "lme4" and ref_crit is not None:
                rel = "ref"
            elif r["status"] == "ok" and ref_crit is not None:
                rel = f"{(r['criterion'] - ref_crit) / abs(ref_crit):+.1e}"
            conv = {True: "yes", False: "**no**"}.get(r.get("converged"), "—")
            lines.append(
                f"| {g:,} | {r['rows']:,} | {lib} | {_cell(r, 'fit_s', '.3g', budget)} | "
                f"{_cell(r, 'job_s', '.3g', budget)} | {_cell(r, 'peak_rss_mb', '.0f', budget)} | "
                f"{_cell(r, 'criterion', '.4f', budget)} | {rel} | {conv} |")

    # errors and warnings are where surprises hide; keep them in the report
    extra = []
    for r in results:
        if r.get("error"):
            extra.append(f"- {r['library']} @ {r['groups']:,}: {r['error']}")
        for w in r.get("warnings", []) + r.get("messages", []):
            extra.append(f"- {r['library']} @ {r['groups']:,}: {w}")
    if extra:
        lines += ["", "## Errors and warnings", ""] + extra
    vers = {r["library"]: r["version"] for r in results if r.get("version")}
    if vers:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(vers.items()))]
    return "\n".join(lines) + "\n"


def render_plot(data: dict[str, Any], path: Path) -> None:
    """Log-log fit time vs groups, one line per library; budget overruns as triangles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = data["meta"]["budget_s"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lib in ALL_LIBS:
        runs = sorted((r for r in data["runs"] if r["library"] == lib), key=lambda r: r["groups"])
        ok = [r for r in runs if r["status"] == "ok"]
        if not runs:
            continue
        color = COLORS[lib]  # fixed per library, so plots of different runs compare
        if ok:
            ax.plot([r["groups"] for r in ok], [r["fit_s"] for r in ok], "o-", color=color, label=lib)
        over = [r for r in runs if r["status"] == "timeout"]
        if over:
            ax.plot([over[0]["groups"]], [budget], "^", ms=10, color=color,
                    label=None if ok else f"{lib} (> budget)")
    if any(r["status"] == "timeout" for r in data["runs"]):
        # only then: a budget line far above all points would squash the plot
        ax.axhline(budget, ls=":", color="grey", lw=1)
        ax.text(0.01, budget, "budget", transform=ax.get_yaxis_transform(), va="bottom",
                color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("groups (subjects); rows ≈ 10 × groups")
    ax.set_ylabel("fit time [s]")
    ax.set_title("y ~ x + x2 + (x | subject), REML")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_reports(data: dict[str, Any], out_dir: Path) -> None:
    """Write results.json, results.md and scaling.png atomically."""
    _atomic_write_text(out_dir / "results.json", json.dumps(data, indent=1, default=str))
    _atomic_write_text(out_dir / "results.md", render_markdown(data))
    render_plot(data, out_dir / "scaling.png")


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e3,1e4,1e5,1e6", help="numbers of subjects, comma separated")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds per library per size")
    ap.add_argument("--libs", default=",".join(ALL_LIBS), help=f"subset of {','.join(ALL_LIBS)}")
    ap.add_argument("--obs-per-group", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=BENCH_DIR, help="where results.* and scaling.png go")
    ap.add_argument("--data-dir", type=Path, default=BENCH_DIR / "data", help="simulated data and child logs")
    ap.add_argument("--bigmixed-from-path", action="store_true",
                    help="give bigmixed the parquet path instead of an in-memory frame")
    a = ap.parse_args(argv)

    sizes = parse_sizes(a.sizes)
    libs = [lib for lib in ALL_LIBS if lib in {s.strip() for s in a.libs.split(",")}]
    notes: list[str] = []
    if "lme4" in libs:
        ok, info = lme4_available()
        if not ok:
            libs.remove("lme4")
            notes.append(f"lme4 skipped: {info}")
            print(f"[compare] lme4 skipped: {info}", flush=True)
    import psutil

    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "mem_gb": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "formula": FORMULA,
        "budget_s": a.budget,
        "obs_per_group": a.obs_per_group,
        "seed": a.seed,
        "libs": libs,
        "notes": notes,
    }
    a.out_dir.mkdir(parents=True, exist_ok=True)
    work = a.data_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"meta": meta, "runs": []}
    over_budget: set[str] = set()
    if "bigmixed" in libs:
        notes.append(warm_up_bigmixed(work, a.data_dir))
        print(f"[compare] {notes[-1]}", flush=True)
    notes.append("'fit s' is measured after one 200-group warm-up fit in the same process, for every "
                 "Python library alike (start-up costs: bench/firstcall.md); 'job s' includes process "
                 "start, imports, warm-up and reading the data")
    for g in sizes:
        pq, csv, rows = prepare_data(g, a.obs_per_group, a.seed, a.data_dir, csv="lme4" in libs)
        print(f"[compare] {g:,} groups, {rows:,} rows -> {pq}", flush=True)
        for lib in libs:
            if lib in over_budget:
                rec = {"library": lib, "groups": g, "rows": rows, "status": "skipped"}
            else:
                rec = run_one(lib, g, rows, pq, csv, a.budget, work, a.bigmixed_from_path)
                if rec["status"] == "timeout":
                    over_budget.add(lib)
            data["runs"].append(rec)
            _progress(rec)
        write_reports(data, a.out_dir)
    print(f"[compare] wrote {a.out_dir / 'results.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
