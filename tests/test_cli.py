"""The ``bigmixed`` command end to end: exit codes, outputs, atomic writes, interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import bigmixed as bm
from bigmixed.cli import main
from bigmixed.simulate import simulate, simulate_to_parquet

FORMULA = "y ~ x + x2 + (x | subject)"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """Shuffled rows, string keys, 4 files (written by the CLI itself)."""
    d = tmp_path_factory.mktemp("cli") / "data"
    rc = main(["simulate", "--groups", "300", "--obs-per-group", "6", "--seed", "3", "--out", str(d),
               "--files", "4", "--shuffle", "--string-keys", "--quiet"])
    assert rc == 0
    return d


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def restore_threads():
    import numba

    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)


def test_fit_end_to_end(parts, tmp_path, capsys, restore_threads):
    out = tmp_path / "results"
    rc, stdout, err = _run(capsys, "fit", parts / "*.parquet", "-f", FORMULA, "--ml", "--out", out,
                           "--predictions", "--timings", "--chunk-rows", "500", "--threads", "1", "--variance-se")
    assert rc == 0, err
    assert "Mixed Linear Model Regression Results" in stdout and "Method:             ML" in stdout
    assert "Timings:" in stdout and "optimize" in stdout
    assert _listing(out) == ["fit.json", "pred.parquet", "ranef.parquet"]  # and no temporary files

    rec = json.loads((out / "fit.json").read_text())
    ref = bm.lmer(FORMULA, pl.read_parquet(parts / "*.parquet"), REML=False)
    assert rec["method"] == "ML" and rec["converged"] is True
    assert rec["llf"] == pytest.approx(ref.llf, rel=1e-10)
    assert rec["nobs"] == ref.nobs and rec["n_groups"] == 300
    for k, v in ref.fe_params.items():
        assert rec["fe_params"][k] == pytest.approx(v, rel=1e-9)
        assert rec["bse_fe"][k] == pytest.approx(ref.bse_fe[k], rel=1e-9)
    np.testing.assert_allclose(rec["cov_re"], ref.cov_re.to_numpy(), rtol=1e-9)
    assert set(rec["bse_re"]) == {"subject Var", "subject x x Cov", "x Var"}
    for k, v in ref.bse_re.items():
        assert rec["bse_re"][k] == pytest.approx(v, rel=1e-6)
    assert rec["rows_dropped"] == 0 and rec["dropped_by_column"] == {}
    for k in ("read", "statistics", "optimize", "write", "total"):
        assert rec["timings"][k] >= 0.0
    assert rec["fe_table"]["x"]["Coef."] == pytest.approx(ref.fe_params["x"], rel=1e-9)

    ranef = pl.read_parquet(out / "ranef.parquet")
    assert ranef.columns == ["subject", "Intercept", "x"] and ranef.height == 300
    assert ranef["subject"].to_list() == sorted(ranef["subject"].to_list())
    pred = pl.read_parquet(out / "pred.parquet")
    assert pred.columns == ["subject", "fitted", "resid"] and pred.height == ref.nobs
    data = pl.read_parquet(parts / "*.parquet")
    np.testing.assert_allclose(pred["fitted"].to_numpy(), ref.predict(data), rtol=1e-8)


def test_fit_statsmodels_spelling_and_quiet(parts, tmp_path, capsys):
    out = tmp_path / "r"
    rc, stdout, err = _run(capsys, "fit", parts, "-f", "y ~ x + x2", "--groups", "subject",
                           "--re-formula", "~x", "--out", out, "--quiet")
    assert rc == 0, err
    assert stdout == "" and err == ""
    rec = json.loads((out / "fit.json").read_text())
    ref = bm.lmer(FORMULA, pl.read_parquet(parts / "*.parquet"))
    assert rec["method"] == "REML"
    assert rec["objective"] == pytest.approx(ref.objective, rel=1e-10)
    assert _listing(out) == ["fit.json", "ranef.parquet"]


def test_dropped_rows_reported(tmp_path, capsys):
    df = simulate(60, 5, seed=1).with_columns(
        x=pl.when(pl.int_range(pl.len()) % 10 == 0).then(None).otherwise(pl.col("x")))
    f = tmp_path / "d.parquet"
    df.write_parquet(f)
    rc, stdout, err = _run(capsys, "fit", f, "-f", FORMULA, "--out", tmp_path / "o")
    assert rc == 0
    n_null = int(df["x"].null_count())
    assert "Dropped rows:" in stdout and str(n_null) in stdout
    assert err.startswith("bigmixed: warning:") and len(err.strip().splitlines()) == 1
    rec = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert rec["rows_dropped"] == n_null and rec["dropped_by_column"] == {"x": n_null}
    assert rec["warnings"] and "DroppedRowsWarning" in rec["warnings"][0]
    # --missing raise: exit 2, names the column and the file
    rc, stdout, err = _run(capsys, "fit", f, "-f", FORMULA, "--missing", "raise")
    assert rc == 2
    assert err.startswith("bigmixed: error:") and "'x'" in err and "d.parquet" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["fit", "{d}/nothing-*.parquet", "-f", FORMULA], "no file matches"),
    (["fit", "{d}/missing.parquet", "-f", FORMULA], "does not exist"),
    (["fit", "{p}", "-f", "y ~ x + (x | nosuch)"], "nosuch"),
    (["fit", "{p}", "-f", "y ~ x + (x | subject"], "parenthes"),
    (["fit", "{p}", "-f", "y ~ x"], "random-effect"),
    (["fit", "{p}", "-f", FORMULA, "--predictions"], "--predictions needs --out"),
    (["fit", "{p}", "-f", FORMULA, "--threads", "0"], "positive integer"),
    (["fit", "{p}", "-f", FORMULA, "--threads", "999"], "threads"),
    (["fit", "{p}", "-f", FORMULA, "--re-formula", "~x"], "--re-formula needs --groups"),
    (["fit", "{p}", "-f", "y ~ x + (x | subject)", "--groups", "subject"], "|"),
    (["fit", "{p}", "-f", FORMULA, "--missing", "maybe"], "invalid choice"),
    (["fit", "{p}"], "required"),
    (["fit", "{d}/notparquet.txt", "-f", FORMULA], "parquet"),
    (["simulate", "--groups", "0", "--out", "{d}/x.parquet"], "positive integer"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(parts, tmp_path, capsys, argv, needle):
    (tmp_path / "notparquet.txt").write_text("hello")
    argv = [a.format(d=tmp_path, p=parts) for a in argv]
    rc, stdout, err = _run(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bigmixed: error: ")
    assert needle in lines[0]


def test_internal_error_exits_1(parts, tmp_path, capsys, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(bm.MixedLM, "fit", boom)
    rc, stdout, err = _run(capsys, "fit", parts, "-f", FORMULA, "--out", tmp_path / "o")
    assert rc == 1
    assert err.strip() == "bigmixed: internal error: RuntimeError: kaboom; rerun with --debug for the traceback"
    assert not (tmp_path / "o").exists()  # not even the directory it would have made
    rc, stdout, err = _run(capsys, "fit", parts, "-f", FORMULA, "--debug")
    assert rc == 1 and "Traceback" in err and "kaboom" in err


def test_scheduler_without_dask_exits_2(parts, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # import fails
    rc, stdout, err = _run(capsys, "fit", parts, "-f", FORMULA, "--scheduler", "tcp://127.0.0.1:1")
    assert rc == 2 and "install bigmixed[dask]" in err


def test_failed_write_leaves_no_output(parts, tmp_path, capsys, monkeypatch):
    """A writer failing half-way through pred.parquet: no fit.json, ranef.parquet, pred.parquet, no temp files."""
    out = tmp_path / "o"
    calls = {"n": 0}
    real = pq.ParquetWriter.write_table

    def flaky(self, table, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device (simulated)")
        return real(self, table, *a, **k)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", flaky)
    rc, stdout, err = _run(capsys, "fit", parts, "-f", FORMULA, "--out", out, "--predictions",
                           "--chunk-rows", "300")
    assert rc == 1 and "simulated" in err
    assert not out.exists()  # no fit.json, ranef.parquet, pred.parquet, temporary file or new directory


def test_keep_columns_in_predictions(tmp_path, capsys):
    df = simulate(40, 5, seed=2, shuffle=True).with_row_index("rowid")
    f = tmp_path / "d.parquet"
    df.write_parquet(f)
    rc, _, err = _run(capsys, "fit", f, "-f", FORMULA, "--out", tmp_path / "o", "--predictions", "--keep", "rowid",
                      "-q")
    assert rc == 0, err
    pred = pl.read_parquet(tmp_path / "o" / "pred.parquet")
    assert pred.columns == ["subject", "rowid", "fitted", "resid"]
    assert pred["rowid"].to_list() == df["rowid"].to_list()


def test_simulate_single_file_and_example(tmp_path, capsys):
    f = tmp_path / "sim.parquet"
    rc, stdout, _ = _run(capsys, "simulate", "--groups", "50", "--obs-per-group", "4", "--seed", "1",
                         "--out", f, "--balanced")
    assert rc == 0 and "wrote 200 rows" in stdout
    df = pl.read_parquet(f)
    assert df.height == 200 and df.columns == ["subject", "x", "x2", "y"]
    assert df.equals(simulate(50, 4, seed=1, unbalanced=False))
    assert _listing(tmp_path) == ["sim.parquet"]
    rc, stdout, err = _run(capsys, "example")
    assert rc == 0, err
    assert stdout.count("Mixed Linear Model Regression Results") == 3
    assert "Linear mixed model fit by REML" in stdout and "Converged:          Yes" in stdout
    assert "Group x Time Cov" in stdout


@pytest.mark.parametrize("cmd", [[], ["fit"], ["simulate"], ["example"]])
def test_help(capsys, cmd):
    rc, stdout, _ = _run(capsys, *cmd, "--help")
    assert rc == 0 and "usage: bigmixed" in stdout


def test_no_command_prints_help(capsys):
    rc, _, err = _run(capsys)
    assert rc == 2 and "usage: bigmixed" in err


# ---------------------------------------------------------------------------
# interrupted runs (subprocesses)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """Enough rows that writing pred.parquet in 100-row chunks takes a second or two."""
    d = tmp_path_factory.mktemp("big")
    simulate_to_parquet(d, 3000, 10, files=2, seed=1)
    return d


def _start(big: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "bigmixed.cli", "fit", str(big), "-f", FORMULA, "--out", str(out), "--predictions",
         "--chunk-rows", "100", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _wait_for_temp(proc: subprocess.Popen, out: Path, timeout: float = 120.0) -> Path:
    tmp = out / f".pred.parquet.tmp-{proc.pid}"
    t0 = time.monotonic()
    while not (tmp.exists() and tmp.stat().st_size > 0):
        if proc.poll() is not None:
            raise AssertionError(f"finished before writing: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("pred.parquet was never started")
        time.sleep(0.01)
    return tmp


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_while_writing_predictions(big, tmp_path, sig):
    out = tmp_path / "o"
    proc = _start(big, out)
    tmp = _wait_for_temp(proc, out)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    names = _listing(out)
    # never a file under a final name
    assert not {"pred.parquet", "fit.json", "ranef.parquet"} & set(names)
    if sig == signal.SIGKILL:
        # at most hidden temporary files, named so they are never taken for output
        assert all(n.startswith(".") and f".tmp-{proc.pid}" in n for n in names)
    else:  # SIGTERM: unwinds, removes its temporary files, exit 143
        assert proc.returncode == 143
        assert names == [] and not tmp.exists()


def test_variance_standard_errors_only_when_asked(parts, tmp_path, capsys, monkeypatch):
    """Without --variance-se the fit computes no Hessian (no extra pass over the groups)."""
    from bigmixed import variance

    calls = []
    real = variance.hessian
    monkeypatch.setattr(variance, "hessian", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "r"
    rc, stdout, err = _run(capsys, "fit", parts / "*.parquet", "-f", FORMULA, "--out", out)
    assert rc == 0, err
    assert calls == [] and json.loads((out / "fit.json").read_text())["bse_re"] is None
    rc, stdout, err = _run(capsys, "fit", parts / "*.parquet", "-f", FORMULA, "--out", out, "--variance-se")
    assert rc == 0 and calls == [1]
