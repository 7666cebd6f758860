"""Out-of-core benchmark: the ``bigmixed fit`` command on parquet data, wall time and peak RSS.

Two scenarios (issue 3):

* ``10m``: 10M rows / 1M groups in one parquet file, ``bigmixed simulate --groups 1000000
  --obs-per-group 10 --seed 1``; target: end-to-end CLI fit under 3 s once compiled, peak RSS
  under 1.5 GB.
* ``100m``: 100M rows / 10M groups as 100 parquet files, rows shuffled (a subject's rows spread
  over neighbouring files, every file permuted) and string keys; target: completes with peak
  RSS under 4 GB (the raw rows alone are 3.2 GB).

Every run is a fresh ``bigmixed fit <data> -f "y ~ x + x2 + (x | subject)" --ml --out DIR``
process under GNU ``/usr/bin/time -v`` (wall clock, maximum resident set size); the phase
timings come from the ``fit.json`` it writes.  One untimed run first makes sure numba's
cache is warm ("once compiled").  The machine is shared, so each scenario is repeated and
the best wall time is reported (with its peak RSS), plus the median.

Usage::

    python bench/outofcore.py                      # both scenarios
    python bench/outofcore.py --scenario 10m --repeat 5
    python bench/outofcore.py --scenario 100m --keep-data

Data go to ``bench/data/outofcore/`` (git-ignored).  The 100M-row data (~3.5 GB) are deleted
after measuring unless ``--keep-data``.  Results are appended to
``bench/data/outofcore/results.jsonl`` and printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DATA = BENCH / "data" / "outofcore"
FORMULA = "y ~ x + x2 + (x | subject)"

SCENARIOS = {
    "10m": dict(groups=1_000_000, obs=10, files=1, shuffle=False, string_keys=False,
                target_s=3.0, target_gb=1.5),
    "100m": dict(groups=10_000_000, obs=10, files=100, shuffle=True, string_keys=True,
                 target_s=None, target_gb=4.0),
}


def _bigmixed() -> list[str]:
    """The console script next to this interpreter (no pyenv shim in the timing), else ``-m``."""
    exe = Path(sys.executable).with_name("bigmixed")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bigmixed.cli"]


def _timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; wall seconds, peak RSS bytes, exit status, output."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", tf.name, *cmd], capture_output=True, text=True)
        wall_outer = time.perf_counter() - t0
        text = Path(tf.name).read_text()
    m_wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    m_rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = wall_outer
    if m_wall:
        parts = [float(p) for p in m_wall.group(1).split(":")]
        wall = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {"wall_s": wall, "rss_bytes": int(m_rss.group(1)) * 1024 if m_rss else None,
            "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def _data(name: str) -> tuple[Path, dict]:
    sc = SCENARIOS[name]
    DATA.mkdir(parents=True, exist_ok=True)
    if sc["files"] == 1:
        path = DATA / f"sim_{name}.parquet"
        exists = path.exists()
    else:
        path = DATA / f"sim_{name}"
        exists = path.is_dir() and len(list(path.glob("part-*.parquet"))) == sc["files"]
    info = {"generated": False}
    if not exists:
        cmd = [*_bigmixed(), "simulate", "--groups", str(sc["groups"]), "--obs-per-group", str(sc["obs"]),
               "--seed", "1", "--out", str(path)]
        if sc["files"] > 1:
            cmd += ["--files", str(sc["files"])]
        if sc["shuffle"]:
            cmd += ["--shuffle"]
        if sc["string_keys"]:
            cmd += ["--string-keys"]
        print(f"[{name}] generating: {' '.join(cmd)}", flush=True)
        r = _timed(cmd)
        if r["returncode"] != 0:
            raise SystemExit(f"simulate failed: {r['stderr']}")
        info = {"generated": True, "simulate_wall_s": r["wall_s"], "simulate_rss_bytes": r["rss_bytes"]}
    files = [path] if path.is_file() else sorted(path.glob("part-*.parquet"))
    info["bytes_on_disk"] = sum(f.stat().st_size for f in files)
    info["files"] = len(files)
    return path, info


def _fit_once(path: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    target = str(path / "*.parquet") if path.is_dir() else str(path)
    r = _timed([*_bigmixed(), "fit", target, "-f", FORMULA, "--ml", "--out", str(out), "--quiet", *extra])
    if r["returncode"] != 0:
        raise SystemExit(f"fit failed ({r['returncode']}): {r['stderr']}")
    rec = json.loads((out / "fit.json").read_text())
    return {"wall_s": r["wall_s"], "rss_bytes": r["rss_bytes"], "timings": rec["timings"],
            "nobs": rec["nobs"], "n_groups": rec["n_groups"], "llf": rec["llf"], "converged": rec["converged"],
            "n_iter": rec["n_iter"], "fe_params": rec["fe_params"]}


def run(name: str, repeat: int, keep_data: bool, extra: list[str]) -> dict:
    sc = SCENARIOS[name]
    path, info = _data(name)
    out = DATA / f"out_{name}"
    if name == "10m":  # also warms the page cache with the file, as in repeated use
        print(f"[{name}] warm-up run (numba cache)", flush=True)
        _fit_once(path, out, extra)
    else:  # a full untimed 100M-row run would take minutes: warm numba on a small file
        small = DATA / "warmup.parquet"
        if not small.exists():
            subprocess.run([*_bigmixed(), "simulate", "--groups", "2000", "--out", str(small), "-q"], check=True)
        _fit_once(small, out, extra)
    runs = []
    for i in range(repeat):
        load = os.getloadavg()[0]
        r = _fit_once(path, out, extra)
        r["loadavg_before"] = load
        runs.append(r)
        print(f"[{name}] run {i + 1}/{repeat}: {r['wall_s']:.2f} s, peak RSS {r['rss_bytes'] / 2**30:.2f} GiB, "
              f"load {load:.1f}, timings {r['timings']}", flush=True)
    best = min(runs, key=lambda r: r["wall_s"])
    result = {
        "scenario": name, "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "rows": best["nobs"], "groups": best["n_groups"], "data": info, "repeat": repeat,
        "best": best, "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "max_rss_bytes": max(r["rss_bytes"] for r in runs),
        "target_s": sc["target_s"], "target_gb": sc["target_gb"], "extra_args": extra,
    }
    with open(DATA / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    if name == "100m" and not keep_data:
        shutil.rmtree(path, ignore_errors=True)
        print(f"[{name}] deleted {path}", flush=True)
    return result


def bench_keys(groups: int = 10_000_000, chunk: int = 1_000_000, repeat: int = 3) -> dict:
    """Coding 10M distinct string keys: index build, then codes() of one 1M-row chunk, by method.

    The methods considered for :meth:`bigmixed.data.GroupIndex.codes` (best of ``repeat``).
    """
    import numpy as np
    import polars as pl

    from bigmixed.data import GroupIndex

    rng = np.random.default_rng(0)
    keys = ("s" + pl.Series(np.arange(groups)).cast(pl.String).str.zfill(8)).alias("subject")
    rows = keys.gather(rng.integers(0, groups, chunk))
    shuffled = keys.gather(rng.permutation(groups))

    def best(fn):
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        return min(ts), out

    res: dict = {"groups": groups, "chunk_rows": chunk}
    res["index_unique_sort_s"], gi = best(lambda: GroupIndex(shuffled))
    res["hash_table_build_s"], _ = best(lambda: __import__("bigmixed.data", fromlist=["_HashTable"])
                                        ._HashTable.build(gi.keys))
    gi.codes(rows[:10])
    res["codes_hash_s"], codes = best(lambda: gi.codes(rows))
    frame = pl.DataFrame({"key": gi.keys, "__code": np.arange(groups)})
    res["codes_left_join_s"], c2 = best(lambda: pl.DataFrame({"key": rows}).join(
        frame, on="key", how="left", maintain_order="left")["__code"].to_numpy())
    enum = pl.Enum(gi.keys)
    res["codes_enum_cast_s"], c3 = best(lambda: rows.cast(enum).to_physical().cast(pl.Int64).to_numpy())
    res["codes_search_sorted_s"], c4 = best(lambda: gi.keys.search_sorted(rows).to_numpy())
    assert (codes == c2).all() and (codes == c3).all() and (codes == c4).all()
    return res


def table(results: list[dict]) -> str:
    head = ("| scenario | rows | groups | files | best wall | median wall | peak RSS (best run) | "
            "startup | index | read | statistics | optimize | inference | write | target |")
    lines = [head, "|" + "---|" * 15]
    for r in results:
        t = r["best"]["timings"]
        tgt = []
        if r["target_s"]:
            tgt.append(f"< {r['target_s']:g} s")
        if r["target_gb"]:
            tgt.append(f"< {r['target_gb']:g} GB")
        ok = ((r["target_s"] is None or r["best"]["wall_s"] < r["target_s"])
              and (r["target_gb"] is None or r["best"]["rss_bytes"] < r["target_gb"] * 1e9))
        lines.append(
            f"| {r['scenario']} | {r['rows']:,} | {r['groups']:,} | {r['data']['files']} | "
            f"{r['best']['wall_s']:.2f} s | {r['median_wall_s']:.2f} s | {r['best']['rss_bytes'] / 1e9:.2f} GB | "
            + " | ".join(f"{t.get(k, 0.0):.2f}" for k in
                         ("startup", "index", "read", "statistics", "optimize", "inference", "write"))
            + f" | {', '.join(tgt)} {'met' if ok else 'MISSED'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=["10m", "100m", "both", "keys"], default="both")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep-data", action="store_true", help="keep the 100M-row data after measuring")
    ap.add_argument("extra", nargs="*", help="extra arguments for 'bigmixed fit' (after --)")
    args = ap.parse_args()
    if args.scenario == "keys":
        r = bench_keys(repeat=args.repeat)
        print(json.dumps(r, indent=2))
        DATA.mkdir(parents=True, exist_ok=True)
        with open(DATA / "results.jsonl", "a") as f:
            f.write(json.dumps({"scenario": "keys", "date": dt.datetime.now().isoformat(timespec="seconds"),
                                **r}) + "\n")
        return
    names = ["10m", "100m"] if args.scenario == "both" else [args.scenario]
    results = [run(n, args.repeat if n == "10m" else max(1, min(args.repeat, 2)), args.keep_data, args.extra)
               for n in names]
    print()
    print(table(results))


if __name__ == "__main__":
    main()
