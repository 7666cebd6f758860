"""Start-up stays light: ``import bigmixed`` and ``bigmixed --help`` load none of the heavy libraries.

(The time they take is measured in bench/firstcall.md; unit tests never assert wall-clock times.)
"""

import subprocess
import sys

HEAVY = ("numba", "polars", "pandas", "scipy", "formulaic", "pyarrow", "dask", "matplotlib", "rich")


def _loaded(code: str) -> list[str]:
    probe = code + "\nimport sys; print('loaded:' + ','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("loaded:")][-1]
    return [m for m in line[len("loaded:"):].split(",") if m]


def test_import_bigmixed_loads_no_heavy_module():
    assert _loaded("import bigmixed") == []
    assert _loaded("import bigmixed; bigmixed.__version__; dir(bigmixed)") == []


def test_cli_help_loads_no_heavy_module():
    code = "import sys; sys.argv = ['bigmixed', '--help']\nfrom bigmixed.cli import main\ntry:\n    main([\"--help\"])\nexcept SystemExit:\n    pass"
    assert _loaded(code) == []
    assert _loaded("from bigmixed.cli import build_parser; build_parser().format_help()") == []


def test_first_use_loads_the_model():
    assert "numba" in _loaded("import bigmixed; bigmixed.lmer")


def test_a_plain_model_on_polars_data_builds_without_pandas_or_formulaic():
    """``y ~ x + (x | g)`` on a polars frame: neither pandas nor formulaic is needed until the results
    (formulaic is loaded only for formulas beyond bare column names)."""
    code = ("import numpy as np, polars as pl, bigmixed as bm\n"
            "rng = np.random.default_rng(0); g = np.repeat(np.arange(40), 5); x = rng.uniform(0, 10, g.size)\n"
            "df = pl.DataFrame({'g': g, 'x': x, 'y': x + rng.normal(size=40)[g] + rng.normal(size=g.size)})\n"
            "m = bm.MixedLM('y ~ x', df, spec=bm.formula.spec_from_lmer('y ~ x + (x | g)'))")
    loaded = _loaded(code)
    assert "numba" in loaded and "pandas" not in loaded and "formulaic" not in loaded


def _env_after_import(env: dict) -> list[str]:
    import os

    code = ("import os, bigmixed\n"
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), os.environ.get('GOMP_SPINCOUNT'))")
    full = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT",
                                                             "OMP_WAIT_POLICY")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=full)
    return out.stdout.split()


def test_thread_spinning_defaults_are_set_on_import_and_yield_to_the_user():
    """BLAS and OpenMP threads sleep soon after their work (crossed fits alternate the two), unless the
    user chose otherwise."""
    assert _env_after_import({}) == ["17", "10000"]
    assert _env_after_import({"OPENBLAS_THREAD_TIMEOUT": "28", "GOMP_SPINCOUNT": "5"}) == ["28", "5"]
    assert _env_after_import({"OMP_WAIT_POLICY": "PASSIVE"}) == ["17", "None"]
