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
