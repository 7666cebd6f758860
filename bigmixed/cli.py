"""The ``bigmixed`` command: ``fit``, ``simulate``, ``example``.

::

    bigmixed fit data/*.parquet -f "y ~ x + x2 + (x | subject)" --ml --out results/
    bigmixed fit data/*.parquet -f "y ~ x" --groups subject --re-formula "~x"
    bigmixed simulate --groups 1000000 --obs-per-group 10 --seed 1 --out big.parquet
    bigmixed example

Exit status: 0 on success; 2 on bad input or usage (one line on stderr,
``bigmixed: error: <message>``); 1 on an internal error (one line, and the
traceback with ``--debug``); 130 when interrupted, 143 on SIGTERM.  Outputs are
written to hidden temporary files and renamed into place together once all are
complete, so a failed or interrupted run leaves no partial output.

Heavy imports (numba, polars, pandas, scipy) happen after the arguments are
parsed: ``--help`` is instant, and ``--threads`` can still configure the thread
pools before they start.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

PROG = "bigmixed"
# Exceptions that mean "the input or the usage is wrong": exit 2 with their message.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, NotImplementedError, FileNotFoundError, PermissionError, IsADirectoryError,
    NotADirectoryError, FileExistsError, MemoryError,  # MemoryError: the crossed-terms guard (docs/errors.md)
)


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


class _Terminated(BaseException):
    """SIGTERM arrived: unwind (removing temporary files) and exit 143."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line if len(line) <= 500 else line[:497] + "..."


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``bigmixed: error: ...``, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bigmixed`` command."""
    parser = _Parser(
        prog=PROG,
        description="Linear mixed models (lme4-exact REML/ML) for data larger than memory.",
        epilog="Run 'bigmixed <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{fit,simulate,example}", parser_class=_Parser)

    fit = sub.add_parser(
        "fit", help="fit a model to parquet files",
        description="Fit a linear mixed model to parquet files (paths or globs), streaming them in chunks: "
                    "memory grows with the number of groups, not rows. Prints the summary; with --out writes "
                    "fit.json (estimates, standard errors, variance components, log-likelihood, convergence, "
                    "dropped rows, timings) and ranef.parquet (one row per group: key and BLUPs; with several "
                    "grouping factors one ranef-<factor>.parquet per factor).",
        epilog='examples:\n  bigmixed fit data/*.parquet -f "y ~ x + x2 + (x | subject)" --ml --out results/\n'
               '  bigmixed fit data/ -f "y ~ x" --groups subject --re-formula "~x" --out results/',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("data", nargs="+", help="parquet files, directories or globs (quote globs for the shell)")
    fit.add_argument("-f", "--formula", required=True,
                     help="lme4 formula 'y ~ x + (x | g)'; with --groups, a fixed-effects formula 'y ~ x'")
    fit.add_argument("--groups", metavar="COLUMN",
                     help="grouping column (statsmodels spelling, with --re-formula)")
    fit.add_argument("--re-formula", metavar="FORMULA",
                     help="random-effects formula with --groups, e.g. '~x' (default: random intercept)")
    fit.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    fit.add_argument("--ddf", choices=("Satterthwaite", "Kenward-Roger"),
                     help="t-tests of the fixed effects with these denominator df (lmerTest's; Kenward-Roger: REML "
                          "only): printed in lme4/lmerTest's layout and written to fit.json ('ddf')")
    fit.add_argument("--plots", metavar="DIR",
                     help="write a caterpillar plot of the BLUPs (ranef*.png) and residual plots (residuals.png) "
                          "to DIR; needs matplotlib (bigmixed[plot])")
    fit.add_argument("--variance-se", action="store_true",
                     help="also compute standard errors of the variance components (the Hessian: about one "
                          "more pass over the groups per variance parameter)")
    fit.add_argument("--weights", metavar="COLUMN",
                     help="column of observation (precision) weights, as lme4's weights=")
    fit.add_argument("--out", metavar="DIR", help="write fit.json and ranef.parquet (and pred.parquet) here")
    fit.add_argument("--predictions", action="store_true",
                     help="also write DIR/pred.parquet: key columns, fitted and resid for every input row")
    fit.add_argument("--keep", metavar="COLUMNS", default="",
                     help="comma-separated extra input columns to copy into pred.parquet (e.g. a row id)")
    fit.add_argument("--quiet", "-q", action="store_true",
                     help="print nothing but warnings and errors (no summary, no progress bar)")
    fit.add_argument("--threads", type=_positive_int, metavar="N",
                     help="threads for the numba kernels (the reader's: env POLARS_MAX_THREADS)")
    fit.add_argument("--chunk-rows", type=_positive_int, metavar="N",
                     help="rows per chunk read (default 1000000); memory is about 8*(p+q+2)*N bytes")
    fit.add_argument("--missing", choices=("drop", "raise"), default="drop",
                     help="rows with null/NaN values: drop and count them (default), or fail")
    fit.add_argument("--maxiter", type=_positive_int, default=1000, metavar="N",
                     help="iteration limit of the optimiser (default 1000)")
    fit.add_argument("--timings", action="store_true",
                     help="print the time spent reading, building statistics, optimising and writing")
    fit.add_argument("--scheduler", metavar="ADDRESS",
                     help="fit on a Dask cluster (e.g. tcp://host:8786); needs bigmixed[dask]")
    fit.add_argument("--debug", action="store_true", help="show tracebacks")

    sim = sub.add_parser(
        "simulate", help="simulate data from y ~ x + x2 + (x | subject)",
        description="Simulate y ~ x + x2 + (x | subject) (fixed effects 1, 2, -0.5; random intercept and "
                    "slope SDs 1 and 0.5, correlation 0.3; residual SD 1) to parquet. Group sizes are "
                    "uniform on 1..2*obs-1 unless --balanced.",
    )
    sim.add_argument("--groups", type=_positive_int, required=True, metavar="G", help="number of subjects")
    sim.add_argument("--obs-per-group", type=_positive_int, default=10, metavar="N",
                     help="mean rows per subject (default 10)")
    sim.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    sim.add_argument("--out", required=True, metavar="PATH",
                     help="output file, or with --files N > 1 a directory of part-*.parquet files")
    sim.add_argument("--files", type=_positive_int, default=1, metavar="N",
                     help="write N files, one at a time (memory of one file; default 1)")
    sim.add_argument("--shuffle", action="store_true",
                     help="shuffle rows (with --files: rows of a subject spread over neighbouring files)")
    sim.add_argument("--string-keys", action="store_true", help="subject keys as strings 's000123'")
    sim.add_argument("--balanced", action="store_true", help="every subject has exactly --obs-per-group rows")
    sim.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    sim.add_argument("--debug", action="store_true", help="show tracebacks")

    ex = sub.add_parser(
        "example", help="the dietox examples (statsmodels' and lme4's spellings)",
        description="Fit the statsmodels MixedLM examples on the pig-growth data (dietox, embedded): random "
                    "intercept; random intercept and slope; independent intercept and slope (MixedLMParams "
                    "free); then print lme4's view of Weight ~ Time + (Time | Pig).",
    )
    ex.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------


def _set_threads(n: int | None) -> None:
    """Threads of the numba kernels (polars' pool is fixed when polars is imported: POLARS_MAX_THREADS)."""
    if n is None:
        return
    import numba

    limit = int(numba.config.NUMBA_NUM_THREADS)
    if n > limit:
        raise UsageError(f"--threads {n} is more than the {limit} threads available (NUMBA_NUM_THREADS)")
    numba.set_num_threads(n)


def _client(address: str):
    try:
        from dask.distributed import Client
    except ImportError:
        raise UsageError("--scheduler needs dask.distributed: install bigmixed[dask]") from None
    try:
        return Client(address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"cannot connect to the Dask scheduler at {address}: {_one_line(exc)}") from None


def _since_process_start() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): interpreter start-up and imports."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def _say(quiet: bool, *lines: str) -> None:
    if not quiet:
        for line in lines:
            print(line)
        sys.stdout.flush()


def _timings_text(t: dict[str, float]) -> str:
    order = ["startup", "index", "read", "statistics", "optimize", "inference", "write", "total"]
    parts = [f"{k} {t[k]:.2f} s" for k in order if k in t]
    return "Timings: " + ", ".join(parts)


def _fit(args: argparse.Namespace, t_start: float, caught: list[str]) -> int:
    if args.predictions and not args.out:
        raise UsageError("--predictions needs --out DIR")
    if args.re_formula and not args.groups:
        raise UsageError("--re-formula needs --groups (or write the random effects in the formula: '(x | g)')")
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    created = out_dir is not None and not out_dir.exists()
    try:
        return _fit_run(args, t_start, caught, out_dir)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed run leaves nothing behind, not even the directory it made
        raise


def _fit_run(args: argparse.Namespace, t_start: float, caught: list[str], out_dir: Path | None) -> int:
    keep = [c.strip() for c in args.keep.split(",") if c.strip()]
    if keep and not args.predictions:
        raise UsageError("--keep applies to --predictions")
    plots_dir = _plots_dir(args)
    _set_threads(args.threads)
    import bigmixed as bm

    from ._io import OutputSet, write_predictions

    # start-up: from process start to main() (interpreter, imports; numba's cache loads come later)
    timings: dict[str, float] = {"startup": float(getattr(args, "startup", 0.0))}
    progress = False if args.quiet else None  # None: only when stderr is a terminal
    client = _client(args.scheduler) if args.scheduler else None
    data: Any = args.data if len(args.data) > 1 else args.data[0]
    try:
        kw = dict(missing=args.missing, chunk_rows=args.chunk_rows, progress=progress,
                  nthreads=args.threads, weights=args.weights)
        if client is not None:
            kw = dict(missing=args.missing, chunk_rows=args.chunk_rows, client=client, weights=args.weights)
        if args.groups:
            model = bm.mixedlm(args.formula, data, groups=args.groups, re_formula=args.re_formula, **kw)
        else:
            from .formula import spec_from_lmer

            model = bm.MixedLM(args.formula, data, spec=spec_from_lmer(args.formula), **kw)
        mt = model._timings
        timings["index"] = mt.get("prepare", 0.0)
        timings["read"] = mt.get("read", 0.0)
        timings["statistics"] = mt.get("statistics", 0.0)
        t1 = time.perf_counter()
        res = model.fit(reml=not args.ml, maxiter=args.maxiter)
        timings["optimize"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        # standard errors of the variance components need the Hessian: only when asked for
        record = res.to_dict(variance_se=args.variance_se)
        summary = str(res.summary(variance_se=args.variance_se))
        if args.ddf:  # lmerTest's layout, and the table for fit.json
            ddf_table = res.coef_table(ddf=args.ddf)
            summary = str(res.summary(ddf=args.ddf))
            record["ddf"] = {"method": args.ddf, "table": {str(n): {str(k): float(v) for k, v in row.items()}
                                                             for n, row in ddf_table.iterrows()}}
        ranefs = {}
        if out_dir is not None:  # one file per term: ranef.parquet, or ranef-<term>.parquet for several
            for k, name in enumerate(res.terms):
                fname = "ranef.parquet" if len(res.terms) == 1 else f"ranef-{_file_name(name)}.parquet"
                ranefs[fname] = res.random_effects_frame("polars", term=k)
        timings["inference"] = time.perf_counter() - t2
        _say(args.quiet, summary.rstrip("\n"))
        if plots_dir is not None:
            src = None if getattr(model, "data", None) is not None else data
            _say(args.quiet, f"wrote {', '.join(_write_plots(res, plots_dir, src))}")

        written: list[str] = []
        if out_dir is not None:
            t3 = time.perf_counter()
            with OutputSet() as outs:
                for fname, frame in ranefs.items():
                    ranef_path = out_dir / fname
                    frame.write_parquet(outs.path(ranef_path))
                    written.append(str(ranef_path))
                if args.predictions:
                    pred_path = out_dir / "pred.parquet"
                    src = None if getattr(model, "data", None) is not None else data
                    key_cols = list(model.spec.key_columns)
                    keys = key_cols + [k for k in keep if k not in key_cols]
                    write_predictions(res, src, pred_path, keys=keys, chunk_rows=args.chunk_rows,
                                      progress=progress, _tmp=outs.path(pred_path))
                    written.append(str(pred_path))
                fit_path = out_dir / "fit.json"
                written.append(str(fit_path))
                timings["write"] = time.perf_counter() - t3
                timings["total"] = timings["startup"] + time.perf_counter() - t_start
                record.update(_cli_record(res, args, timings, written, caught))
                _write_json_to(record, outs.path(fit_path))
            _say(args.quiet, f"wrote {', '.join(written)}")
        else:
            timings["total"] = timings["startup"] + time.perf_counter() - t_start
        if args.timings:
            print(_timings_text(timings))
    finally:
        if client is not None:
            client.close()
    return 0


def _plots_dir(args: argparse.Namespace) -> Path | None:
    """``--plots DIR``, checked before the fit: a directory (or a new one) and matplotlib installed."""
    if not args.plots:
        return None
    import importlib.util

    path = Path(args.plots)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--plots {path} exists and is not a directory")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plots needs matplotlib: pip install 'bigmixed[plot]'")
    return path


def _write_plots(res, plots_dir: Path, data: Any) -> list[str]:
    """The caterpillar plot of every term and the residual plots, written together (OutputSet)."""
    import matplotlib.pyplot as plt

    from ._io import OutputSet
    from .plots import plot_ranef, plot_residuals

    figs = {}
    for k, name in enumerate(res.terms):
        figs["ranef.png" if len(res.terms) == 1 else f"ranef-{_file_name(name)}.png"] = plot_ranef(res, k)
    figs["residuals.png"] = plot_residuals(res, data=data)
    written = []
    with OutputSet() as outs:
        for fname, fig in figs.items():
            fig.savefig(outs.path(plots_dir / fname), dpi=120, format="png", bbox_inches="tight")
            plt.close(fig)
            written.append(str(plots_dir / fname))
    return written


def _file_name(term: str) -> str:
    """A term's name as part of a file name: ``cask:batch`` -> ``cask_batch``."""
    import re

    return re.sub(r"[^\w.-]+", "_", term).strip("_") or "term"


def _write_json_to(record: dict, tmp: Path) -> None:
    import json

    from ._io import _clean

    tmp.write_text(json.dumps(_clean(record), indent=2, allow_nan=False) + "\n")


def _cli_record(res, args: argparse.Namespace, timings: dict, written: list[str], caught: list[str]) -> dict:
    import bigmixed as bm

    table = res.coef_table()
    fe_table = {name: {str(k): float(v) for k, v in row.items()} for name, row in table.iterrows()}
    return {
        "bigmixed_version": bm.__version__,
        "data": list(args.data),
        "fe_table": fe_table,
        "bse_scale": res.bse_scale if args.variance_se else None,
        "timings": {k: round(float(v), 6) for k, v in timings.items()},
        "timings_detail": {k: float(v) for k, v in res.model._timings.items()},
        "outputs": written,
        "warnings": list(caught),
    }


# ---------------------------------------------------------------------------
# simulate, example
# ---------------------------------------------------------------------------


def _simulate(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    from ._io import write_parquet
    from .simulate import simulate, simulate_to_parquet

    out = Path(args.out)
    kw = dict(seed=args.seed, unbalanced=not args.balanced, string_keys=args.string_keys, shuffle=args.shuffle)
    if args.files == 1:
        if out.is_dir():
            raise UsageError(f"--out {out} is a directory; give a file name, or --files N for a directory")
        df = simulate(args.groups, args.obs_per_group, **kw)
        write_parquet(df, out)
        rows, what = df.height, str(out)
    else:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; with --files N it must be a directory")
        paths = simulate_to_parquet(out, args.groups, args.obs_per_group, files=args.files, **kw)
        import polars as pl

        rows = int(pl.scan_parquet(paths).select(pl.len()).collect().item())
        what = f"{out}/ ({len(paths)} files)"
    _say(args.quiet, f"wrote {rows:,} rows, {args.groups:,} groups to {what} in {time.perf_counter() - t0:.1f} s")
    return 0


EXAMPLE = '''\
import bigmixed as bm
import numpy as np
data = bm.datasets.dietox()
'''


def _example(args: argparse.Namespace) -> int:
    import numpy as np

    import bigmixed as bm

    data = bm.datasets.dietox()
    print(EXAMPLE)
    steps = [
        ('md = bm.mixedlm("Weight ~ Time", data, groups=data["Pig"])\nmdf = md.fit()',
         lambda: bm.mixedlm("Weight ~ Time", data, groups=data["Pig"]).fit()),
        ('md = bm.mixedlm("Weight ~ Time", data, groups=data["Pig"], re_formula="~Time")\nmdf = md.fit()',
         lambda: bm.mixedlm("Weight ~ Time", data, groups=data["Pig"], re_formula="~Time").fit()),
        ("free = bm.MixedLMParams.from_components(np.ones(2), np.eye(2))\nmdf = md.fit(free=free)",
         lambda: bm.mixedlm("Weight ~ Time", data, groups=data["Pig"], re_formula="~Time").fit(
             free=bm.MixedLMParams.from_components(np.ones(2), np.eye(2)))),
    ]
    for code, run in steps:
        res = run()
        print(code)
        print("print(mdf.summary())\n")
        print(str(res.summary()).rstrip("\n"))
        print()
    print('print(bm.lmer("Weight ~ Time + (Time | Pig)", data))\n')
    print(bm.lmer("Weight ~ Time + (Time | Pig)", data))
    return 0


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------


def _on_sigterm(signum, frame):  # pragma: no cover - exercised in a subprocess
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Called without ``argv`` (as the ``bigmixed`` program) it ends the process
    itself once every output is complete and flushed: tearing down the
    interpreter (numba's and polars' thread pools, gigabytes of arrays) took
    ~0.3 s of a 3 s fit and protects nothing.
    """
    rc = _main(argv)
    if argv is None and "dask" not in sys.modules:  # a Dask client may still need its atexit hooks
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):  # e.g. stdout closed by the reader: nothing left to flush to
            pass
        os._exit(rc)
    return rc


def _main(argv: list[str] | None) -> int:
    t_start = time.perf_counter()
    # run as the program (not called from Python): count interpreter start-up and imports too
    startup = _since_process_start() if argv is None else 0.0
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    caught: list[str] = []
    old_term = None
    try:
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded use): keep the default
        old_term = None
    old_showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = _one_line(message if isinstance(message, BaseException) else Warning(str(message)))
        caught.append(f"{category.__name__}: {text}")
        print(f"{PROG}: warning: {text}", file=sys.stderr)

    warnings.showwarning = showwarning
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        debug = getattr(args, "debug", False)
        if args.version:
            from . import __version__

            print(f"{PROG} {__version__}")
            return 0
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if args.command == "fit":
            args.startup = startup
            return _fit(args, t_start, caught)
        if args.command == "simulate":
            return _simulate(args)
        return _example(args)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except _USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    except SystemExit:
        raise
    except Exception as exc:
        if debug:
            traceback.print_exc()
            print(f"{PROG}: internal error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        else:
            print(f"{PROG}: internal error: {type(exc).__name__}: {_one_line(exc)}; "
                  "rerun with --debug for the traceback", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_showwarning
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
