"""Caterpillar and residual plots: the files are made (atomically), and what is drawn is the BLUPs and intervals.

The conditional intervals are ``b -+ qnorm(0.975) sqrt(condVar)``; the conditional variances are checked
here against lme4's ``ranef(condVar = TRUE)`` (``tests/data/lme4/single.json``, ``scripts/ref_single.R``:
``attr(ranef(lmer(Weight ~ Time + (Time | Pig), dietox), condVar = TRUE)$Pig, "postVar")``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import bigmixed as bm  # noqa: E402
from bigmixed import plots  # noqa: E402

DATA = Path(__file__).parent / "data"
SINGLE = json.loads((DATA / "lme4" / "single.json").read_text())["fits"]
Z975 = 1.959963984540054


@pytest.fixture(scope="module")
def dietox():
    d = pd.read_csv(DATA / "dietox.csv", dtype={"Pig": str})
    return d, bm.lmer("Weight ~ Time + (Time | Pig)", d)


def _drawn(ax):
    """(x of the points, the horizontal bars' ends) of an errorbar panel."""
    cont = ax.containers[0]
    x = np.asarray(cont.lines[0].get_xdata(), dtype=float)
    segs = cont.lines[2][0].get_segments()
    return x, np.array([[s[0][0], s[1][0]] for s in segs])


def test_caterpillar_draws_the_blups_and_lme4_condvar_intervals(dietox, tmp_path):
    _, m = dietox
    out = tmp_path / "plots" / "ranef.png"
    fig = m.plot_ranef(path=out)
    assert out.is_file() and out.stat().st_size > 1000
    assert [p.name for p in out.parent.iterdir()] == ["ranef.png"]  # no temporary file left
    rec = SINGLE["dietox_slope_reml"]
    ref = pd.DataFrame(rec["ranef"]["Pig"]).set_index("level")
    refK = {str(lv): np.array(K) for lv, K in zip(ref.index, rec["condvar"]["Pig"])}
    for j, (ax, eff) in enumerate(zip(fig.axes, ["(Intercept)", "Time"])):
        x, bars = _drawn(ax)
        shown = fig.bigmixed_data[("Pig", eff)]
        assert len(x) == 72 and np.all(np.diff(x) >= 0)  # every level, sorted
        levels = shown["level"].tolist()
        want = ref.loc[[int(v) if isinstance(ref.index[0], (int, np.integer)) else v for v in levels], eff]
        np.testing.assert_allclose(x, want.to_numpy(dtype=float), rtol=1e-4, atol=1e-4)
        half = Z975 * np.sqrt([refK[str(v)][j, j] for v in levels])
        np.testing.assert_allclose(bars[:, 0], x - half, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(bars[:, 1], x + half, rtol=1e-4, atol=1e-4)
        # and exactly what the results report
        np.testing.assert_allclose(x, m.ranef().loc[levels, eff].to_numpy())
        K = m.conditional_variances()
        idx = [list(m.ranef().index).index(v) for v in levels]
        np.testing.assert_allclose(bars[:, 1] - x, Z975 * np.sqrt(K[idx, j, j]), rtol=1e-12)
    plt.close(fig)


def test_caterpillar_many_levels_extremes_and_sample(tmp_path):
    rng = np.random.default_rng(0)
    G = 3000
    g = np.repeat(np.arange(G), 4)
    y = rng.normal(size=G)[g] * 2 + rng.normal(size=g.size)
    d = pd.DataFrame({"y": y, "g": [f"g{i:05d}" for i in g]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = bm.lmer("y ~ 1 + (1 | g)", d)
    fig = m.plot_ranef(max_levels=200, n_extreme=10, seed=1)
    ax = fig.axes[0]
    x, bars = _drawn(ax)
    b = m.ranef()["(Intercept)"].to_numpy()
    assert len(x) == 200 and "200 of 3,000 levels" in ax.get_title()
    assert x[0] == b.min() and x[-1] == b.max()  # the extremes are always there
    np.testing.assert_allclose(np.sort(b)[:10], x[:10])
    np.testing.assert_allclose(np.sort(b)[-10:], x[-10:])
    assert set(np.round(x, 12)) <= set(np.round(b, 12))
    plt.close(fig)


def test_residual_plots(dietox, tmp_path):
    _, m = dietox
    out = tmp_path / "resid.png"
    fig = m.plot_residuals(path=out, max_points=200)
    assert out.is_file()
    smp = fig.bigmixed_data
    step = int(np.ceil(861 / 200))
    np.testing.assert_allclose(smp["resid"].to_numpy(), m.resid[::step])
    np.testing.assert_allclose(smp["fitted"].to_numpy(), m.fittedvalues[::step])
    pts = fig.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(pts)[:, 1], m.resid[::step])
    assert "of 861 rows" in fig.axes[0].get_title()
    plt.close(fig)


def test_save_is_atomic(dietox, tmp_path):
    _, m = dietox
    fig = m.plot_ranef()
    with pytest.raises(ValueError):
        plots.save_figure(fig, tmp_path / "x.nosuchformat")
    assert list(tmp_path.iterdir()) == []
    plt.close(fig)


def test_cli_ddf_and_plots(tmp_path):
    from bigmixed.cli import main

    d = pd.read_csv(DATA / "dietox.csv")
    src = tmp_path / "d.parquet"
    d.to_parquet(src)
    rc = main(["fit", str(src), "-f", "Weight ~ Time + (Time | Pig)", "--ddf", "Satterthwaite", "--plots",
               str(tmp_path / "plots"), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["ranef.png", "residuals.png"]
    rec = json.loads((tmp_path / "out" / "fit.json").read_text())
    m = bm.lmer("Weight ~ Time + (Time | Pig)", d.assign(Pig=d.Pig.astype(str)))
    tab = m.coef_table(ddf="Satterthwaite")
    assert rec["ddf"]["method"] == "Satterthwaite"
    for name in tab.index:
        assert rec["ddf"]["table"][name]["df"] == pytest.approx(tab.loc[name, "df"], rel=1e-8)
    assert main(["fit", str(src), "-f", "Weight ~ Time + (Time | Pig)", "--ml", "--ddf", "Kenward-Roger",
                 "--quiet"]) == 2
    assert main(["fit", str(src), "-f", "y ~ x", "--plots", str(src), "--quiet"]) == 2
