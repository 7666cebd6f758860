"""Distributed fit vs single process: time per objective evaluation and bytes moved per evaluation.

Data: ``y ~ x + x2 + (x | subject)`` simulated by
:func:`bigmixed.simulate.simulate_to_parquet` into ``bench/data/`` (git-ignored):
20M rows / 2M groups in 16 files, rows of a group scattered over several files
(``shuffle=True``), plus a 2M-row / 200k-group set to show that the bytes an
evaluation moves do not grow with the number of groups.

Measured, for one process (numba on all cores) and a ``LocalCluster`` of 2
worker processes x 1 thread (statistics resident on the workers):

* build (read + statistics [+ shuffle]) and fit wall time, evaluations;
* time per objective evaluation (pass 1 + pass 2) at 20 thetas near the optimum;
* bytes per evaluation: bytes the workers sent (``transfer_outgoing_bytes_total``:
  results fetched by the client and any worker-to-worker copy), the pickled
  arguments of the tasks sent to the workers (Lambda, ...).  (Loopback traffic
  is printed too but not tabled: on a shared machine it counts other jobs.)
* per-group costs for docs/distributed.md: ns per group of pass 1 + pass 2 on one
  thread, bytes of statistics per group, worker RSS.

With ``--nested CHILDREN``, also a nested model ``y ~ t + (t | child) + (t | school)``
(:func:`bigmixed.simulate.simulate_nested`, 20 children per school, shuffled over the files) at
CHILDREN / 10 and CHILDREN children: the owners hold whole schools and run the single-machine
nested backend; the table shows that the bytes per evaluation stay flat there too.

Usage::

    python bench/distributed.py [--rows 20_000_000] [--nested 1_000_000] [--out bench/distributed.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the `distributed` package: with bench/ first on sys.path,
# `import dask.distributed` would import this script instead.  Drop bench/ first.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

import bigmixed as bm  # noqa: E402
from bigmixed import _kernels  # noqa: E402
from bigmixed.formula import spec_from_lmer  # noqa: E402
from bigmixed.simulate import simulate_nested, simulate_to_parquet, write_parquet  # noqa: E402

FORMULA = "y ~ x + x2 + (x | subject)"
NESTED = "y ~ t + (t | child) + (t | school)"


def dataset(rows: int, files: int) -> list[str]:
    groups = rows // 10
    d = HERE / "data" / f"dist_g{groups}_f{files}"
    paths = sorted(d.glob("part-*.parquet"))
    if len(paths) != files:
        t = time.perf_counter()
        paths = simulate_to_parquet(d, groups, 10, files=files, seed=1, shuffle=True)
        print(f"generated {d} in {time.perf_counter() - t:.1f}s")
    return [str(p) for p in paths]


def nested_dataset(children: int, files: int) -> list[str]:
    d = HERE / "data" / f"nested_c{children}_f{files}"
    paths = sorted(d.glob("part-*.parquet"))
    if len(paths) != files:
        df = simulate_nested(children, max(2, children // 20), 10, seed=1, shuffle=True)
        paths = write_parquet(df, d, files=files)
    return [str(p) for p in paths]


def nested_run(client, files: list[str]) -> dict:
    """Local vs resident fit of the nested model: build, fit, ms and bytes per evaluation, agreement."""
    from bigmixed.formula import spec_from_lmer as spec

    t = time.perf_counter()
    m = bm.MixedLM(NESTED, files, spec=spec(NESTED))
    build = time.perf_counter() - t
    loc = m.fit()
    t = time.perf_counter()
    d = bm.MixedLM(NESTED, files, spec=spec(NESTED), client=client, distributed_mode="resident")
    dbuild = time.perf_counter() - t
    t = time.perf_counter()
    res = d.fit()
    dfit = time.perf_counter() - t
    theta = res.optimizer.theta
    w0 = worker_sent(client)
    per_eval = eval_times(res.objective_fn, theta, 10)
    w1 = worker_sent(client)
    w2 = worker_sent(client)
    agree = max(rel(res.fe_params, loc.fe_params), rel(res.llf, loc.llf), rel(res.theta, loc.theta))
    return dict(children=m.ngroups["child"], schools=m.ngroups["school"], rows=m.nobs, build=build,
                local_eval=eval_times(loc.objective_fn, loc.optimizer.theta, 10), dbuild=dbuild, dfit=dfit,
                evals=res.optimizer.n_evals, per_eval=per_eval, bytes=(w1 - w0 - (w2 - w1)) / 11,
                stats_bytes=d.built.backend.nbytes, agree=agree)


def eval_times(obj, theta: np.ndarray, n: int = 20) -> float:
    """Mean seconds per (pass 1 + pass 2) evaluation at ``n`` distinct thetas near ``theta``."""
    obj(theta * 1.01)  # warm: compiled, connections open
    times = []
    for k in range(n):
        t = time.perf_counter()
        obj(theta * (1.0 + 1e-3 * (k + 1)))
        times.append(time.perf_counter() - t)
    return float(np.mean(times))


def _noop(owner) -> int:
    return 0


def round_trip(client, owners, n: int = 20) -> float:
    """Mean seconds of one map over the owners + gather of trivial results: Dask's floor per pass."""
    client.gather(client.map(_noop, owners, pure=False))
    t = time.perf_counter()
    for _ in range(n):
        client.gather(client.map(_noop, owners, pure=False))
    return (time.perf_counter() - t) / n


def lo_bytes() -> int:
    c = psutil.net_io_counters(pernic=True).get("lo")
    return int(c.bytes_sent) if c else 0


def worker_sent(client) -> int:
    return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())


def per_group_ns(stats, theta_lam: np.ndarray, beta: np.ndarray, Finv: np.ndarray) -> tuple[float, float, float]:
    """ns per group of pass 1, of pass 2 (REML) and of the fused pass, one thread, one chunk."""
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        _kernels.objective_pass1(stats.A, stats.B, stats.c, theta_lam, 1)
        _kernels.objective_pass2(stats.A, stats.B, stats.c, theta_lam, beta, Finv, 1.0, True, 1)
        reps = 5
        t = time.perf_counter()
        for _ in range(reps):
            _kernels.objective_pass1(stats.A, stats.B, stats.c, theta_lam, 1)
        t1 = (time.perf_counter() - t) / reps
        t = time.perf_counter()
        for _ in range(reps):
            _kernels.objective_pass2(stats.A, stats.B, stats.c, theta_lam, beta, Finv, 1.0, True, 1)
        t2 = (time.perf_counter() - t) / reps
        _kernels.objective_fused(stats.A, stats.B, stats.c, theta_lam, 1, True)
        t = time.perf_counter()
        for _ in range(reps):
            _kernels.objective_fused(stats.A, stats.B, stats.c, theta_lam, 1, True)
        t3 = (time.perf_counter() - t) / reps
    finally:
        numba.set_num_threads(old)
    G = stats.n_groups
    return 1e9 * t1 / G, 1e9 * t2 / G, 1e9 * t3 / G


def local_run(files: list[str]) -> dict:
    t = time.perf_counter()
    m = bm.MixedLM(FORMULA, files, spec=spec_from_lmer(FORMULA))
    build = time.perf_counter() - t
    t = time.perf_counter()
    res = m.fit()
    fit = time.perf_counter() - t
    obj = res.objective_fn
    per_eval = eval_times(obj, res.optimizer.theta)
    s = obj.solve(res.optimizer.theta)
    ns1, ns2, nsf = per_group_ns(m.built.stats, s.lam, s.beta, np.linalg.inv(s.F))
    return dict(res=res, build=build, fit=fit, evals=res.optimizer.n_evals, per_eval=per_eval,
                groups=m.n_groups, rows=m.nobs, ns1=ns1, ns2=ns2, nsf=nsf, fused=bool(obj._fused),
                bytes_per_group=m.built.stats.nbytes / m.n_groups,
                rss=psutil.Process().memory_info().rss)


def task_compute(ts_data: list[dict], G: int) -> tuple[float, float]:
    """From a task stream: seconds per evaluation spent in the slowest task of each map, and
    kernel ns per group inside the workers (all owners' compute time / groups / evaluations)."""
    per_pass: dict[tuple[str, str], float] = {}
    total = 0.0
    for t in ts_data:
        key = str(t["key"])
        if not key.startswith(("_evaluate_task", "_gradient_task")):
            continue
        c = sum(s["stop"] - s["start"] for s in t["startstops"] if s["action"] == "compute")
        call = key.rsplit("-", 1)[0]  # one client.map call = one pass of one evaluation (fused: the only one)
        per_pass[call] = max(per_pass.get(call, 0.0), c)
        total += c
    n_evals = max(1, sum(1 for k in per_pass if not k.startswith("_gradient_task")))
    return sum(per_pass.values()) / n_evals, 1e9 * total / n_evals / G


def cluster_run(client, files: list[str]) -> dict:
    rss0 = client.run(lambda: psutil.Process().memory_info().rss)
    t = time.perf_counter()
    m = bm.MixedLM(FORMULA, files, spec=spec_from_lmer(FORMULA), client=client, distributed_mode="resident")
    build = time.perf_counter() - t
    t = time.perf_counter()
    res = m.fit()
    fit = time.perf_counter() - t
    obj = res.objective_fn
    n = 20
    from dask.distributed import get_task_stream

    w0, l0 = worker_sent(client), lo_bytes()
    with get_task_stream(client) as ts:
        per_eval = eval_times(obj, res.optimizer.theta, n)
    # (the task stream's own messages are in the loopback count; they are small)
    # the two client.run calls of worker_sent add their own bytes: measured once and removed
    w1, l1 = worker_sent(client), lo_bytes()
    w2, l2 = worker_sent(client), lo_bytes()
    probe_w, probe_l = w2 - w1, l2 - l1
    rss = client.run(lambda: psutil.Process().memory_info().rss)
    s = obj.solve(res.optimizer.theta)
    args1 = len(pickle.dumps((s.lams, True)))  # an evaluation task: the Lambdas (and whether to return gradients)
    args2 = len(pickle.dumps((s.lams, s.beta, np.linalg.inv(s.F), 1.0, True)))  # the gradient pass (p > 5)
    task_args = len(m.built.backend.owners) * (args1 if obj._fused else args1 + args2)
    compute, ns_worker = task_compute(ts.data, m.n_groups)
    rt = round_trip(client, m.built.backend.owners)
    return dict(res=res, build=build, fit=fit, evals=res.optimizer.n_evals, per_eval=per_eval,
                worker_bytes=(w1 - w0 - probe_w) / (n + 1), lo_bytes=(l1 - l0 - probe_l) / (n + 1),
                owners=len(m.built.backend.owners), groups=m.n_groups, rows=m.nobs,
                timings=dict(m.built.timings), worker_rss=list(rss.values()), worker_rss0=list(rss0.values()),
                stats_bytes=m.built.backend.nbytes, compute=compute, ns_worker=ns_worker, round_trip=rt,
                task_args=task_args)


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) / np.asarray(b) - 1.0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--nested", type=int, default=0, help="children of the nested model (0: skip it)")
    ap.add_argument("--out", default=str(HERE / "distributed.md"))
    args = ap.parse_args()
    from dask.distributed import Client, LocalCluster

    sets = [(args.rows // 10, dataset(args.rows // 10, args.files)), (args.rows, dataset(args.rows, args.files))]
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    rows_out = []
    try:
        for nrows, files in sets:
            loc = local_run(files)
            dist = cluster_run(client, files)
            agree = max(rel(dist["res"].fe_params, loc["res"].fe_params), rel(dist["res"].llf, loc["res"].llf),
                        rel(dist["res"].theta, loc["res"].theta))
            rows_out.append((nrows, loc, dist, agree))
            print(f"{nrows:,} rows: local {loc['per_eval'] * 1e3:.1f} ms/eval, cluster "
                  f"{dist['per_eval'] * 1e3:.1f} ms/eval, {dist['worker_bytes']:.0f} B/eval from workers, "
                  f"{dist['lo_bytes']:.0f} B/eval loopback, agree {agree:.1e}", flush=True)
        nested_out = []
        for children in ([args.nested // 10, args.nested] if args.nested else []):
            nested_out.append(nested_run(client, nested_dataset(children, args.files)))
            n = nested_out[-1]
            print(f"nested, {n['children']:,} children: local {n['local_eval'] * 1e3:.1f} ms/eval, cluster "
                  f"{n['per_eval'] * 1e3:.1f} ms/eval, {n['bytes']:.0f} B/eval from workers, agree {n['agree']:.1e}",
                  flush=True)
    finally:
        client.close()
        cluster.close()

    load = os.getloadavg()
    lines = [
        "# Distributed fit vs single process",
        "",
        f"`python bench/distributed.py` on {dt.date.today()}: {platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; bigmixed {bm.__version__}, "
        f"dask {__import__('dask').__version__}, numba {numba.__version__}.  Load average at the end: "
        f"{load[0]:.1f} (1 min), {load[1]:.1f} (5 min): the machine is shared, timings are noisy.",
        "",
        f"Model `{FORMULA}` (p = 3, q = 2), REML; data from `simulate_to_parquet(..., files={args.files}, "
        "shuffle=True)`: each group's rows are spread over several files.",
        "*Local*: one process, numba on all cores.  *Cluster*: `LocalCluster(n_workers=2, threads_per_worker=1)`, "
        "statistics resident on the workers, one owner partition per worker thread, one task per owner and map.",
        "",
        "| rows | groups | | build s | fit s | evals | ms / evaluation | of which in tasks | "
        "bytes / evaluation from workers | task arguments bytes / evaluation | statistics on workers |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for nrows, loc, dist, _ in rows_out:
        lines.append(f"| {loc['rows']:,} | {loc['groups']:,} | local | {loc['build']:.1f} | {loc['fit']:.2f} | "
                     f"{loc['evals']} | {loc['per_eval'] * 1e3:.1f} | - | - | - | - |")
        lines.append(f"| | | cluster | {dist['build']:.1f} | {dist['fit']:.2f} | {dist['evals']} | "
                     f"{dist['per_eval'] * 1e3:.1f} | {dist['compute'] * 1e3:.1f} | "
                     f"{dist['worker_bytes']:,.0f} | {dist['task_args']:,} | "
                     f"{dist['stats_bytes'] / 2**20:,.0f} MiB |")
    big = rows_out[-1]
    loc, dist = big[1], big[2]
    lines += [
        "",
        "Bytes per evaluation do not depend on the number of groups (compare the two sizes): each of the "
        f"{dist['owners']} owner tasks returns one packed array: logdet, SF (p x p), Sg, Sh and, from the fused pass, "
        "the gradient tensors (or, from a second pass, the q x q gradient), plus pickle overhead ('from workers': "
        "the workers' `transfer_outgoing_bytes_total`; 'task arguments': the pickled arguments sent with the "
        "tasks; Dask's message headers come on top).  "
        "*of which in tasks*: the slowest owner task of "
        "each map of the evaluation (from Dask's task stream); the rest is Dask's round trips.  With p <= 5 the "
        "objective uses the fused pass: one map per evaluation returning the pass-1 sums and the gradient tensors "
        "(GA: q x q, S: q x q x (p+1) x (p+1)), computed on each owner by the single-machine backend.",
        "",
        "Agreement with the single-process fit (max relative difference of fixed effects, log-likelihood, "
        "theta): " + ", ".join(f"{r[0]:,} rows {r[3]:.1e}" for r in rows_out) + ".",
        "",
        f"Cluster build timings at {big[0]:,} rows: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in dist["timings"].items())
        + f"; worker RSS before the build: {', '.join(f'{r / 2**20:,.0f} MiB' for r in dist['worker_rss0'])}, "
        f"after the fit: {', '.join(f'{r / 2**20:,.0f} MiB' for r in dist['worker_rss'])}.",
        "",
        "## Per-group costs (inputs of docs/distributed.md, 'scaling on paper')",
        "",
        f"- fused pass (what an evaluation runs at p <= 5): {loc['nsf']:.1f} ns / group; pass 1: {loc['ns1']:.1f} "
        f"ns / group, pass 2 (REML): {loc['ns2']:.1f} ns / group (the two-pass evaluation: "
        f"{loc['ns1'] + loc['ns2']:.1f}); one thread, on the {loc['groups']:,}-group statistics;",
        f"- statistics: {loc['bytes_per_group']:.0f} bytes / group (A, B, c, n in float64/int64);",
        f"- inside the worker tasks, both workers computing at once: {dist['ns_worker']:.1f} ns / group / "
        "evaluation (compare with the one-thread figure above: the ratio is what two busy processes cost "
        "each other on this machine; under load from other jobs it reached 2-3x in earlier runs);",
        f"- Dask's fixed cost per evaluation on this cluster: {1 if loc['fused'] else 2} x "
        f"{dist['round_trip'] * 1e3:.1f} ms (a map of a no-op over the owners + gather, measured; "
        f"{'the fused pass needs one per evaluation' if loc['fused'] else 'pass 1 and pass 2 need one each'}).",
        "",
    ]
    if nested_out:
        lines += [
            f"## Nested terms: `{NESTED}`",
            "",
            "Resident: owners hold whole schools (all their children and the child-in-school blocks) and answer with "
            "the single-machine nested backend; 'bytes / evaluation' as above.",
            "",
            "| rows | children | schools | | build s | fit s | evals | ms / evaluation "
            "| bytes / evaluation from workers | statistics on workers | agreement |",
            "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in nested_out:
            lines.append(f"| {n['rows']:,} | {n['children']:,} | {n['schools']:,} | local | {n['build']:.1f} | - | - | "
                         f"{n['local_eval'] * 1e3:.1f} | - | - | - |")
            lines.append(f"| | | | cluster | {n['dbuild']:.1f} | {n['dfit']:.2f} | {n['evals']} | "
                         f"{n['per_eval'] * 1e3:.1f} | {n['bytes']:,.0f} | {n['stats_bytes'] / 2**20:,.1f} MiB | "
                         f"{n['agree']:.1e} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
