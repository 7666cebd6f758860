"""Per-library fit runners and the budgeted child-process launcher for the benchmarks.

Two roles:

* **Child** (``python bench/_competitors.py <library> <data.parquet> <out.json>
  [--formula F] [--warmup small.parquet]``): imports one library, fits the
  warm-up file, reads the data, fits the formula (default ``y ~ x + x2 + (x |
  subject)``) and writes a JSON record (fit time measured around the fit call
  only).  Libraries: bigmixed, statsmodels, mixedlm, mixedlm-rs (the last two
  of which take one grouping factor only: statsmodels' API).
  Each run gets a fresh process so its peak RSS is that run's alone and
  imports/JIT caches from other libraries cannot help or hurt it.
* **Parent helper** (:func:`run_budgeted`): launches a child command in its own
  process group, kills the whole group when the time budget is exceeded and
  reports wall time and peak RSS.

Peak RSS gotcha: on Linux a child's ``ru_maxrss`` starts from the high-water
mark of the memory image it had *before* ``exec``, i.e. a copy of the
parent's (fork and vfork alike).  Measured directly from the benchmark
parent, which has just simulated millions of rows, every child would report
at least the parent's peak.  So the child is always started by a small
intermediate process - GNU ``/usr/bin/time -v -o FILE`` when present, else
this file's ``--rusage`` launcher - whose own small image is what the
measured command inherits.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


try:
    import resource
except ImportError:  # not on Windows: no CPU split of the fit
    resource = None

# The fit's user and system CPU seconds, set by _since (the last timed fit of the process): on a
# virtual machine whose host backs memory only at first touch, system time is mostly page faults,
# and a library that takes more memory pays more of it.
_FIT_CPU: dict[str, float] = {}


def _clock() -> tuple[float, float, float]:
    """Wall clock and this process's user and system CPU seconds, now."""
    if resource is None:
        return time.perf_counter(), 0.0, 0.0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), ru.ru_utime, ru.ru_stime


def _since(t0: tuple[float, float, float]) -> float:
    """Wall seconds since ``t0`` (from :func:`_clock`); the CPU split goes to ``_FIT_CPU``."""
    t1 = _clock()
    if resource is not None:
        _FIT_CPU.update(fit_user_s=t1[1] - t0[1], fit_sys_s=t1[2] - t0[2])
    return t1[0] - t0[0]

FORMULA = "y ~ x + x2 + (x | subject)"
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

# --------------------------------------------------------------------------
# child side: one function per library.  Each returns (fit_seconds, record).
# --------------------------------------------------------------------------

FitResult = tuple[float, dict[str, Any]]


def split_single_bar(formula: str) -> tuple[str, str, str]:
    """``"y ~ x + x2 + (x | subject)"`` -> ``("y ~ x + x2", "~x", "subject")``.

    For the statsmodels-style APIs (statsmodels, mixedlm-rs), which take one
    grouping factor as ``groups=`` and the random part as ``re_formula``.
    Raises ``ValueError`` for formulas with other than one ``(re | g)`` term.
    """
    bars = re.findall(r"\(([^()|]*)\|([^()|]*)\)", formula)
    if len(bars) != 1 or "||" in formula:
        raise ValueError(f"needs exactly one (re | group) term: {formula!r}")
    re_part, group = (t.strip() for t in bars[0])
    fixed = re.sub(r"\s*\+\s*\([^()|]*\|[^()|]*\)", "", formula).strip()
    # patsy: "~x" and "~1 + x" both mean intercept and slope, "~0 + x" slope only
    return fixed, "~" + re_part, group


def _json_floats(v: Any) -> list[float]:
    import numpy as np

    return [float(t) for t in np.asarray(v, dtype=float).ravel()]


def parquet_files(path: Path) -> list[Path]:
    """``path`` itself, or the ``*.parquet`` files of a directory (sorted: row order)."""
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet files in {path}")
        return files
    return [path]


def _read_pandas(path: Path) -> Any:
    import pandas as pd

    files = parquet_files(path)
    if len(files) == 1:
        return pd.read_parquet(files[0])
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _fit_bigmixed(path: Path, formula: str, reml: bool, from_path: bool) -> FitResult:
    import bigmixed as bm
    import polars as pl

    # By default hand bigmixed an in-memory frame, like every other library,
    # so "fit s" compares fitting, not parquet reading.  --from-path lets it
    # stream the file(s) itself (then reading is inside its fit time): a
    # directory is given as its glob "DIR/*.parquet".
    files = parquet_files(path)
    if from_path:
        data: Any = str(path / "*.parquet") if path.is_dir() else str(path)
    else:
        data = pl.read_parquet(files)
    t0 = _clock()
    m = bm.lmer(formula, data, REML=reml)
    fit_s = _since(t0)
    rec: dict[str, Any] = {
        "version": getattr(bm, "__version__", "?"),
        "criterion": float(m.objective),
        "converged": bool(m.converged),
        "input": "parquet path" if from_path else "polars DataFrame",
    }
    for key, attr in (("loglik", "llf"), ("theta", "theta"), ("fixef", "fixef")):
        try:
            v = getattr(m, attr)
            rec[key] = float(v) if key == "loglik" else _json_floats(v)
        except Exception:  # noqa: BLE001 - optional extras, the engine's API is moving
            pass
    return fit_s, rec


def _fit_statsmodels(path: Path, formula: str, reml: bool, from_path: bool) -> FitResult:
    import statsmodels
    import statsmodels.formula.api as smf

    fixed, re_formula, group = split_single_bar(formula)
    df = _read_pandas(path)
    t0 = _clock()
    res = smf.mixedlm(fixed, df, groups=df[group], re_formula=re_formula).fit(reml=reml)
    fit_s = _since(t0)
    # statsmodels' REML llf includes the same constants as lme4's REML
    # log-likelihood (checked to ~1e-10 relative), so -2*llf == REMLcrit.
    return fit_s, {
        "version": statsmodels.__version__,
        "criterion": -2.0 * float(res.llf),
        "loglik": float(res.llf),
        "converged": bool(res.converged),
        "fixef": _json_floats(res.fe_params),
    }


def _fit_mixedlm(path: Path, formula: str, reml: bool, from_path: bool) -> FitResult:
    import mixedlm

    df = _read_pandas(path)
    t0 = _clock()
    res = mixedlm.lmer(formula, df, REML=reml)
    fit_s = _since(t0)
    # res.deviance is lme4's REMLcrit for REML fits (mixedlm.REMLcrit(res)
    # just returns it) and the ML deviance otherwise (checked with 1.3).
    return fit_s, {
        "version": mixedlm.__version__,
        "criterion": float(res.deviance),
        "loglik": float(res.logLik().value),
        "converged": bool(res.converged),
        "optimizer": str(res.optimizer),
        "theta": _json_floats(res.theta),
        "fixef": _json_floats(res.beta),
    }


def _fit_mixedlm_rs(path: Path, formula: str, reml: bool, from_path: bool) -> FitResult:
    """mixedlm-rs: statsmodels' formula API (one grouping factor), Rust core.

    Timed like the others: formula + data to fitted model
    (``mixedlm_rs.mixedlm(...)`` builds the design with patsy, ``.fit()``
    optimises).  ``-2 * res.llf`` is lme4's REMLcrit / ML deviance (the
    package restores the constant its column scaling removes, so it matches
    lme4 to rounding; checked on the benchmark's data).  lme4's theta (the
    relative Cholesky factor, column-major lower triangle) is recovered from
    ``cov_re / scale``.
    """
    import mixedlm_rs
    import numpy as np

    fixed, re_formula, group = split_single_bar(formula)
    df = _read_pandas(path)
    t0 = _clock()
    res = mixedlm_rs.mixedlm(fixed, df, groups=group, re_formula=re_formula).fit(reml=reml)
    fit_s = _since(t0)
    rec: dict[str, Any] = {
        "version": mixedlm_rs.__version__,
        "criterion": -2.0 * float(res.llf),
        "loglik": float(res.llf),
        "converged": bool(res.converged),
        "singular": bool(res.singular),
        "fixef": _json_floats(res.fe_params),
    }
    try:
        lam = np.linalg.cholesky(np.atleast_2d(res.cov_re_unscaled))
        q = lam.shape[0]
        rec["theta"] = [float(lam[r, c]) for c in range(q) for r in range(c, q)]
    except np.linalg.LinAlgError:  # singular fit: no Cholesky factor
        rec["theta"] = None
    diag = res.diagnostics
    rec["optimizer"] = diag.get("method")
    rec["n_evaluations"] = diag.get("n_objective_evaluations")
    rec["max_abs_projected_gradient"] = diag.get("max_abs_projected_gradient")
    rec["gradient_tolerance"] = diag.get("gradient_tolerance")
    return fit_s, rec


def _warm_up(library: str, warmup: Path | None, formula: str, data_dir: Path, reml: bool,
             from_path: bool = False) -> float:
    """Fit a small problem first, so "fit s" is the steady-state cost.

    Every Python library gets the same treatment.  For bigmixed this loads the
    compiled kernels from numba's on-disk cache (~0.5 s once per process);
    that start-up cost is measured separately by bench/firstcall.py.  The
    parent passes a small file of the same layout and model (``--warmup``, read
    the same way as the data: ``--from-path`` too); without one, a 200-group
    file of the default model is made here.
    """
    if warmup is None:
        from bigmixed.simulate import simulate, write_parquet

        warmup = data_dir / "warmup_200.parquet"
        formula = FORMULA
        if not warmup.exists():
            write_parquet(simulate(200, 10, seed=99), warmup)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PY_RUNNERS[library](warmup, formula, reml, from_path)
    return time.perf_counter() - t0


PY_RUNNERS: dict[str, Callable[[Path, str, bool, bool], FitResult]] = {
    "bigmixed": _fit_bigmixed,
    "statsmodels": _fit_statsmodels,
    "mixedlm": _fit_mixedlm,
    "mixedlm-rs": _fit_mixedlm_rs,
}


def child_main(argv: list[str]) -> int:
    """Entry point of a child run; writes the JSON record atomically."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("library", choices=sorted(PY_RUNNERS))
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--formula", default=FORMULA, help="lme4-style formula")
    ap.add_argument("--warmup", type=Path, help="small data file fitted first (same formula)")
    ap.add_argument("--warmup-formula", help="formula of the warm-up fit (default: --formula)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--ml", action="store_true", help="ML instead of REML")
    ap.add_argument("--from-path", action="store_true", help="bigmixed: pass the parquet path")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    warm_s = None
    try:
        if not a.no_warmup:
            warm_s = _warm_up(a.library, a.warmup, a.warmup_formula or a.formula, a.data.parent, not a.ml,
                              a.from_path and a.warmup is not None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit_s, rec = PY_RUNNERS[a.library](a.data, a.formula, not a.ml, a.from_path)
    except Exception as exc:  # noqa: BLE001 - reported, e.g. a model the library cannot fit
        _write_json(a.out, {"library": a.library, "formula": a.formula, "status": "error",
                            "error": f"{type(exc).__name__}: {exc}"[:500],
                            "stage": "fit" if warm_s is not None or a.no_warmup else "warm-up"})
        return 3
    rec["warmup_s"] = warm_s
    rec.update(_FIT_CPU)  # the timed fit's (the warm-up's were overwritten by it)
    rec.update(
        library=a.library,
        formula=a.formula,
        fit_s=fit_s,
        # read + fit (+ imports of the library itself); the parent adds
        # interpreter start-up by timing the whole process.
        in_process_s=time.perf_counter() - t0,
        python=sys.version.split()[0],
        # keep warnings (convergence, singular fit, ...) for the report, deduplicated
        warnings=sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})[:10],
    )
    _write_json(a.out, rec)
    return 0


def _write_json(out: Path, rec: dict[str, Any]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out)


# --------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------


@dataclass
class ChildRun:
    """Outcome of one budgeted child process."""

    status: str  # "ok", "timeout" or "error"
    wall_s: float
    peak_rss_mb: float | None
    returncode: int | None
    log: Path


_RSS_LINE = "Maximum resident set size (kbytes):"


@functools.cache
def _gnu_time() -> str | None:
    """Path of a GNU ``time`` supporting ``-v -o``, or None."""
    exe = "/usr/bin/time" if os.path.exists("/usr/bin/time") else shutil.which("gtime")
    if not exe:
        return None
    with tempfile.NamedTemporaryFile() as f:
        ok = subprocess.run([exe, "-v", "-o", f.name, "true"], capture_output=True).returncode == 0
        return exe if ok and _RSS_LINE in Path(f.name).read_text() else None


def _measured(cmd: list[str], rss_file: Path) -> list[str]:
    """Wrap ``cmd`` so that its peak RSS lands in ``rss_file`` (see module docstring)."""
    gt = _gnu_time()
    if gt:
        return [gt, "-v", "-o", str(rss_file), *cmd]
    return [sys.executable, str(Path(__file__).resolve()), "--rusage", str(rss_file), "--", *cmd]


def _rusage_launcher(argv: list[str]) -> int:
    """``--rusage FILE -- cmd...``: run cmd, write its ru_maxrss like GNU time does."""
    rss_file, cmd = Path(argv[0]), argv[2:]
    proc = subprocess.Popen(cmd)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped already
    rss_file.write_text(f"{_RSS_LINE} {ru.ru_maxrss}\n")  # Linux: KiB
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def _read_rss_mb(rss_file: Path) -> float | None:
    try:
        for line in rss_file.read_text().splitlines():
            if _RSS_LINE in line:
                return int(line.split(":")[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


def run_budgeted(cmd: list[str], budget_s: float, log: Path,
                 env: dict[str, str] | None = None) -> ChildRun:
    """Run ``cmd`` with a wall-clock budget and measure its peak RSS.

    Parameters
    ----------
    cmd : list of str
        Command line.
    budget_s : float
        Seconds before the child's whole process group gets SIGKILL.
    log : Path
        File receiving the child's stdout and stderr.
    env : dict, optional
        Environment for the child (default: inherited).

    Returns
    -------
    ChildRun
        ``peak_rss_mb`` is the command's maximum resident set size (None on
        timeout), ``wall_s`` the whole-job wall time.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log.with_suffix(".rss")
    rss_file.unlink(missing_ok=True)
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        # own session -> own process group, so a timeout kills the measured
        # command and the wrapper (and e.g. R helper processes), nothing else.
        proc = subprocess.Popen(_measured(cmd, rss_file), stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = proc.wait()
        wall = time.perf_counter() - t0
    state = "timeout" if timed_out else ("ok" if rc == 0 else "error")
    return ChildRun(state, wall, None if timed_out else _read_rss_mb(rss_file), rc, log)


def child_env() -> dict[str, str]:
    """Environment for Python children: the repo on ``sys.path``, quiet warnings."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def python_cmd(library: str, data: Path, out: Path, reml: bool = True, from_path: bool = False,
               formula: str | None = None, warmup: Path | None = None,
               warmup_formula: str | None = None) -> list[str]:
    """Command line of a Python child run."""
    cmd = [sys.executable, str(Path(__file__).resolve()), library, str(data), str(out)]
    if formula:
        cmd += ["--formula", formula]
    if warmup is not None:
        cmd += ["--warmup", str(warmup)]
    if warmup_formula:
        cmd += ["--warmup-formula", warmup_formula]
    if not reml:
        cmd.append("--ml")
    if from_path:
        cmd.append("--from-path")
    return cmd


def lme4_cmd(csv: Path, out: Path, reml: bool = True, formula: str = FORMULA,
             factors: tuple[str, ...] = ("subject",)) -> list[str]:
    """Command line of an lme4 child run (``factors``: columns made factors in R)."""
    return ["Rscript", str(BENCH_DIR / "_lme4.R"), str(csv), str(out), "TRUE" if reml else "FALSE",
            formula, ",".join(factors)]


def bigmixed_cli() -> list[str]:
    """The ``bigmixed`` command of this interpreter's environment."""
    exe = Path(sys.executable).parent / "bigmixed"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from bigmixed.cli import main; sys.exit(main())"]


def bigmixed_cli_cmd(data: Path | list[Path], out_dir: Path, formula: str = FORMULA,
                     reml: bool = True) -> list[str]:
    """``bigmixed fit DATA... -f FORMULA --out DIR --quiet`` (the end-to-end batch job)."""
    paths = [data] if isinstance(data, Path) else list(data)
    cmd = [*bigmixed_cli(), "fit", *map(str, paths), "-f", formula, "--out", str(out_dir), "--quiet"]
    if not reml:
        cmd.append("--ml")
    return cmd


def read_cli_record(out_dir: Path) -> dict[str, Any]:
    """Criterion, convergence and phase timings from the ``fit.json`` of a CLI run."""
    rec = json.loads((out_dir / "fit.json").read_text())
    crit = rec.get("objective", rec.get("criterion"))
    out: dict[str, Any] = {
        "criterion": None if crit is None else float(crit),
        "converged": rec.get("converged"),
        "theta": rec.get("theta"),
        "timings": rec.get("timings"),
        "version": rec.get("version") or rec.get("bigmixed_version"),
    }
    fe = rec.get("fe_params")
    if isinstance(fe, dict):
        out["fixef"] = [float(v) for v in fe.values()]
    warn = rec.get("warnings")
    if isinstance(warn, list):
        out["warnings"] = [str(w)[:300] for w in warn][:10]
    return out


def lme4_available() -> tuple[bool, str]:
    """Whether ``Rscript`` can load lme4 and jsonlite (with a reason if not)."""
    try:
        p = subprocess.run(["Rscript", "-e", "library(lme4); library(jsonlite); cat(format(packageVersion('lme4')))"],
                           capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return False, "Rscript not found"
    except subprocess.TimeoutExpired:
        return False, "Rscript -e 'library(lme4)' timed out"
    if p.returncode != 0:
        return False, "lme4/jsonlite not loadable: " + p.stderr.strip().splitlines()[-1][:200]
    return True, p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "?"


# --------------------------------------------------------------------------
# parent side: results
# --------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary name and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def log_tail(log: Path, n: int = 3) -> str:
    """The last ``n`` lines of a child's log, joined (for error messages)."""
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-600:]


def finish_record(rec: dict[str, Any], run: Any, out: Path, log: Path) -> dict[str, Any]:
    """Merge a child's JSON record (result, or the exception it caught) into ``rec``."""
    child = json.loads(out.read_text()) if out.exists() and run.status != "timeout" else None
    if run.status == "ok" and child is not None:
        rec.update(child)
        rec["status"] = "ok"
    elif run.status == "ok":
        rec["status"] = "error"
        rec["error"] = "child exited 0 but wrote no result; " + log_tail(log)
    elif run.status == "error":
        if child is not None and child.get("error"):
            rec["error"] = child["error"]
            rec["stage"] = child.get("stage")
        else:
            rec["error"] = f"exit {run.returncode}: " + log_tail(log)
    return rec


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rusage"]:
        sys.exit(_rusage_launcher(sys.argv[2:]))
    sys.exit(child_main(sys.argv[1:]))
