"""First-call cost of bigmixed: import, JIT compilation and the numba on-disk cache.

A user's first ``bm.lmer`` in a fresh process pays for importing the package
and for numba compiling (cold cache) or loading (warm cache) the kernels.
This script measures it with fresh Python processes fitting
``Weight ~ Time + (Time|Pig)`` on ``bm.datasets.dietox()``:

1. **cold**: ``NUMBA_CACHE_DIR`` points to a new, empty temporary directory;
2. **warm**: a second process with the same directory, now populated.

Each process times ``import bigmixed``, loading the data set, the first fit
and a second fit of the same model (the steady-state cost).  The whole
process wall time and peak RSS are measured from outside.  Writes
``bench/firstcall.md``.

Usage::

    python bench/firstcall.py [--out bench/firstcall.md] [--budget 600]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _competitors import BENCH_DIR, child_env, run_budgeted  # noqa: E402

FORMULA = "Weight ~ Time + (Time|Pig)"


def _cache_files(d: str) -> int:
    """Number of numba index/data files under ``d`` (0 means a cold cache)."""
    return sum(1 for p in Path(d).rglob("*") if p.suffix in (".nbi", ".nbc"))


def child(out: Path) -> int:
    """Body of a measured process: time import, data load, first and second fit."""
    t0 = time.perf_counter()
    import bigmixed as bm

    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    data = bm.datasets.dietox()
    t_load = time.perf_counter() - t1
    times, fits = [], []
    for _ in range(2):
        t = time.perf_counter()
        m = bm.lmer(FORMULA, data)
        times.append(time.perf_counter() - t)
        fits.append({"objective": float(m.objective), "converged": bool(m.converged)})
    rec = {"import_s": t_import, "load_s": t_load, "fit1_s": times[0], "fit2_s": times[1],
           "fits": fits, "numba_loaded": "numba" in sys.modules,
           "version": getattr(bm, "__version__", "?")}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, out)
    return 0


def measure(cache_dir: str, label: str, work: Path, budget: float) -> dict[str, Any]:
    """Run one fresh child process with ``NUMBA_CACHE_DIR=cache_dir``."""
    out = work / f"firstcall_{label}.json"
    out.unlink(missing_ok=True)
    env = child_env()
    env["NUMBA_CACHE_DIR"] = cache_dir
    before = _cache_files(cache_dir)
    run = run_budgeted([sys.executable, str(Path(__file__).resolve()), "--child", str(out)],
                       budget, work / f"firstcall_{label}.log", env=env)
    rec: dict[str, Any] = {"label": label, "status": run.status, "job_s": run.wall_s,
                           "peak_rss_mb": run.peak_rss_mb, "cache_files_before": before,
                           "cache_files_after": _cache_files(cache_dir), "log": str(run.log)}
    if run.status == "ok" and out.exists():
        rec.update(json.loads(out.read_text()))
    elif run.status == "ok":
        rec["status"] = "error"
    return rec


def python_startup(work: Path) -> float:
    """Wall time of a bare ``python -c pass``: the floor under every job time."""
    return min(run_budgeted([sys.executable, "-c", "pass"], 60, work / "firstcall_bare.log").wall_s
               for _ in range(3))


def render(runs: list[dict[str, Any]], bare_s: float) -> str:
    """Markdown report."""
    def f(r: dict[str, Any], k: str, fmt: str = ".3f") -> str:
        v = r.get(k)
        return "—" if v is None else format(v, fmt)

    lines = [
        "# bigmixed first-call cost",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `python bench/firstcall.py` on "
        f"{platform.platform()} ({os.cpu_count()} CPUs), Python {platform.python_version()}.",
        "",
        f"Model `{FORMULA}` on `bm.datasets.dietox()` (861 rows, 72 pigs), each row a fresh process. "
        "*cold*: empty `NUMBA_CACHE_DIR` (kernels compiled); *warm*: the same directory on the "
        "second process (kernels loaded from the cache). *fit 2* is a second fit in the same "
        f"process, i.e. the steady state. A bare `python -c pass` takes {bare_s:.3f} s here.",
        "",
        "| cache | status | import s | load data s | fit 1 s | fit 2 s | job s | peak RSS MB "
        "| cache files before → after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r['label']} | {r['status']} | {f(r, 'import_s')} | {f(r, 'load_s')} | "
                     f"{f(r, 'fit1_s')} | {f(r, 'fit2_s')} | {f(r, 'job_s')} | {f(r, 'peak_rss_mb', '.0f')} | "
                     f"{r['cache_files_before']} → {r['cache_files_after']} |")
    notes = []
    for r in runs:
        if r["status"] != "ok":
            try:
                tail = Path(r["log"]).read_text(errors="replace").strip().splitlines()[-1:]
            except OSError:
                tail = []
            notes.append(f"- {r['label']}: {r['status']}: {' '.join(tail)[:300]}")
        for i, fit in enumerate(r.get("fits", []), 1):
            if not fit["converged"]:
                notes.append(f"- {r['label']}, fit {i}: not converged")
    objs = {round(fit["objective"], 6) for r in runs for fit in r.get("fits", [])}
    if len(objs) > 1:
        notes.append(f"- fits disagree on the REML criterion: {sorted(objs)}")
    elif objs:
        notes.append(f"- REML criterion of every fit: {objs.pop():.6f}")
    warm = next((r for r in runs if r["label"] == "warm"), None)
    if warm and warm.get("numba_loaded") is False:
        notes.append("- numba was not imported by the fits")
    elif warm and warm["cache_files_before"] == 0:
        notes.append("- the cold run left no numba cache files: kernels are not cached on disk "
                     "(`cache=True` missing?), so every process compiles")
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "firstcall.md")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds per process")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child)

    work = BENCH_DIR / "data" / "runs"
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = tempfile.mkdtemp(prefix="bigmixed-numba-cache-")
    try:
        runs = [measure(cache_dir, label, work, a.budget) for label in ("cold", "warm")]
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    bare = python_startup(work)
    text = render(runs, bare)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(f".{a.out.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, a.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
