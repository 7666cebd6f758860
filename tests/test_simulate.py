"""Tests for bigmixed.simulate and bigmixed.simulate_multi (kept small: the whole module runs in ~2 s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bigmixed.simulate import (
    simulate,
    simulate_crossed,
    simulate_crossed_to_parquet,
    simulate_nested,
    simulate_to_parquet,
    write_parquet,
)


def test_columns_dtypes_and_balanced_size() -> None:
    df = simulate(50, 4, seed=1, unbalanced=False)
    assert df.columns == ["subject", "x", "x2", "y"]
    assert df.schema == {"subject": pl.Int64, "x": pl.Float64, "x2": pl.Float64, "y": pl.Float64}
    assert df.height == 200
    counts = df.group_by("subject").len()
    assert counts["len"].unique().to_list() == [4]
    assert sorted(counts["subject"].to_list()) == list(range(50))


def test_unbalanced_sizes_range_and_mean() -> None:
    df = simulate(20_000, 10, seed=2)
    sizes = df.group_by("subject").len()["len"]
    assert sizes.min() >= 1 and sizes.max() <= 19
    assert df["subject"].n_unique() == 20_000
    # mean of U{1..19} is 10; sd of the mean over 20k groups is ~0.04
    assert abs(sizes.mean() - 10) < 0.2


def test_grouped_by_subject_unless_shuffled() -> None:
    df = simulate(300, 5, seed=3)
    assert np.all(np.diff(df["subject"].to_numpy()) >= 0)
    sh = simulate(300, 5, seed=3, shuffle=True)
    assert not np.all(np.diff(sh["subject"].to_numpy()) >= 0)
    # shuffling permutes rows, it does not change them
    assert sh.sort("subject", "x").equals(df.sort("subject", "x"))


def test_determinism_by_seed() -> None:
    a = simulate(200, 5, seed=7)
    assert a.equals(simulate(200, 5, seed=7))
    assert not a.equals(simulate(200, 5, seed=8))


def test_string_keys() -> None:
    df = simulate(30, 3, seed=4, string_keys=True)
    assert df["subject"].dtype == pl.String
    ints = simulate(30, 3, seed=4)
    expected = [f"s{i:06d}" for i in ints["subject"].to_list()]
    assert df["subject"].to_list() == expected
    assert df.select("x", "x2", "y").equals(ints.select("x", "x2", "y"))


def test_parameters_shape_the_data() -> None:
    # With no random effects or noise, y is exactly the fixed-effect line.
    df = simulate(40, 5, seed=5, sd_intercept=0, sd_slope=0, sigma=0, beta=(1, 2, 3))
    resid = df["y"] - (1 + 2 * df["x"] + 3 * df["x2"])
    assert np.allclose(resid.to_numpy(), 0)
    # Residual noise only: residual sd ~ sigma.
    df = simulate(2000, 10, seed=5, sd_intercept=0, sd_slope=0, sigma=2.0)
    resid = df["y"] - (1 + 2 * df["x"] - 0.5 * df["x2"])
    assert abs(resid.std() - 2.0) < 0.1


@pytest.mark.parametrize("kw", [dict(groups=0), dict(obs_per_group=0), dict(corr=1.5), dict(sigma=-1)])
def test_rejects_bad_arguments(kw: dict) -> None:
    args = dict(groups=5, obs_per_group=2) | kw
    with pytest.raises(ValueError):
        simulate(**args)


def test_write_parquet_single_file_atomic(tmp_path: Path) -> None:
    df = simulate(100, 5, seed=6)
    out = tmp_path / "sub" / "data.parquet"
    paths = write_parquet(df, out)
    assert paths == [out]
    assert pl.read_parquet(out).equals(df)
    # only the target remains: no temp file left behind
    assert [p.name for p in out.parent.iterdir()] == ["data.parquet"]


def test_write_parquet_failure_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    def boom(self, path, **kw):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(OSError):
        write_parquet(simulate(5, 2), tmp_path / "x.parquet")
    assert list(tmp_path.iterdir()) == []


def test_write_parquet_many_files(tmp_path: Path) -> None:
    df = simulate(100, 5, seed=6)
    (tmp_path / "part-00009.parquet").write_bytes(b"stale")
    paths = write_parquet(df, tmp_path, files=3, row_group_size=50)
    assert [p.name for p in paths] == [f"part-{i:05d}.parquet" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]
    assert pl.read_parquet(paths).equals(df)


@pytest.mark.parametrize("files", [1, 3, 10])
def test_streaming_matches_in_memory(tmp_path: Path, files: int) -> None:
    ref = simulate(1000, 6, seed=9)
    paths = simulate_to_parquet(tmp_path, 1000, 6, files=files, seed=9)
    assert len(paths) == files
    assert pl.read_parquet(paths).equals(ref)
    # each file holds a disjoint, contiguous range of subjects
    ranges = [pl.read_parquet(p)["subject"] for p in paths]
    for a, b in zip(ranges, ranges[1:]):
        assert a.max() < b.min()


def test_streaming_spans_many_chunks(tmp_path: Path, monkeypatch) -> None:
    # Shrink the generation chunk so that file boundaries fall mid-chunk and
    # files span several chunks; streamed output must still equal the
    # in-memory result (the chunk size is part of the stream layout, so both
    # sides use the same one).
    import bigmixed.simulate as sim_mod

    monkeypatch.setattr(sim_mod, "_CHUNK_ROWS", 37)
    paths = simulate_to_parquet(tmp_path, 500, 4, files=7, seed=11)
    assert pl.read_parquet(paths).equals(simulate(500, 4, seed=11))


def test_streaming_shuffle_spreads_groups(tmp_path: Path) -> None:
    ref = simulate(400, 10, seed=12, string_keys=True)
    paths = simulate_to_parquet(tmp_path, 400, 10, files=8, seed=12, shuffle=True,
                                shuffle_window=4, string_keys=True)
    got = pl.read_parquet(paths)
    assert got.sort("subject", "x").equals(ref.sort("subject", "x"))
    per_file = pl.concat([pl.read_parquet(p).select(pl.col("subject").unique()) for p in paths])
    files_per_subject = per_file.group_by("subject").len()["len"]
    assert files_per_subject.mean() > 2  # groups are spread over the window
    assert files_per_subject.max() <= 4  # ... but never beyond it
    # determinism of the streamed shuffle
    again = simulate_to_parquet(tmp_path / "again", 400, 10, files=8, seed=12, shuffle=True,
                                shuffle_window=4, string_keys=True)
    for p, q in zip(paths, again):
        assert pl.read_parquet(p).equals(pl.read_parquet(q))


# --------------------------------------------------------------------------
# covariate layout: x_dist
# --------------------------------------------------------------------------


def test_x_dist_normal_is_the_default_and_unchanged() -> None:
    assert simulate(300, 5, seed=3).equals(simulate(300, 5, seed=3, x_dist="normal"))


def test_x_dist_uniform10_raw_covariates() -> None:
    df = simulate(5000, 10, seed=13, x_dist="uniform10", shuffle=True)
    for col in ("x", "x2"):
        v = df[col].to_numpy()
        assert v.min() >= 0 and v.max() < 10
        assert abs(v.mean() - 5) < 0.05 and abs(v.var() - 100 / 12) < 0.2
    # same subjects and group sizes as the normal layout (only x, x2, y change)
    ref = simulate(5000, 10, seed=13)
    assert df.height == ref.height
    assert df.group_by("subject").len().sort("subject").equals(ref.group_by("subject").len().sort("subject"))
    # fixed effects recovered by OLS on y (random slope has mean 0)
    X = np.column_stack([np.ones(df.height), df["x"].to_numpy(), df["x2"].to_numpy()])
    b = np.linalg.lstsq(X, df["y"].to_numpy(), rcond=None)[0]
    assert np.allclose(b, [1.0, 2.0, -0.5], atol=0.1)
    # residual variance: sd0^2 + 2 cov E[x] + sd1^2 E[x^2] + sigma^2 = 1 + 1.5 + 0.25*100/3 + 1
    resid = df["y"].to_numpy() - X @ np.array([1.0, 2.0, -0.5])
    assert abs(resid.var() / (1 + 2 * 0.15 * 5 + 0.25 * 100 / 3 + 1) - 1) < 0.05


def test_x_dist_streaming_matches_and_rejects_unknown(tmp_path: Path) -> None:
    ref = simulate(700, 6, seed=14, x_dist="uniform10")
    paths = simulate_to_parquet(tmp_path, 700, 6, files=3, seed=14, x_dist="uniform10")
    assert pl.read_parquet(paths).equals(ref)
    with pytest.raises(ValueError, match="x_dist"):
        simulate(10, 2, x_dist="lognormal")


# --------------------------------------------------------------------------
# nested: y ~ t + (t | child) + (t | school)
# --------------------------------------------------------------------------


def _group_ols(df: pl.DataFrame, key: str, resid: str = "r") -> pl.DataFrame:
    """Per-group OLS of ``resid`` on ``[1, t]``: intercept a, slope b."""
    g = df.group_by(key).agg(
        n=pl.len(), st=pl.col("t").sum(), stt=(pl.col("t") ** 2).sum(),
        sr=pl.col(resid).sum(), str_=(pl.col("t") * pl.col(resid)).sum())
    det = g["n"] * g["stt"] - g["st"] ** 2
    return g.with_columns(
        b=(g["n"] * g["str_"] - g["st"] * g["sr"]) / det,
        a=(g["stt"] * g["sr"] - g["st"] * g["str_"]) / det)


def test_nested_shape_keys_and_nesting() -> None:
    df = simulate_nested(3000, 40, seed=1)
    assert df.columns == ["child", "school", "t", "y"]
    assert df.schema == {"child": pl.Int64, "school": pl.Int64, "t": pl.Float64, "y": pl.Float64}
    sizes = df.group_by("child").len()["len"]
    assert df["child"].n_unique() == 3000 and sizes.min() >= 1 and sizes.max() <= 19
    assert abs(sizes.mean() - 10) < 0.3
    assert df["school"].n_unique() == 40
    # every child in exactly one school
    assert df.group_by("child").agg(pl.col("school").n_unique())["school"].max() == 1
    t = df["t"].to_numpy()
    assert t.min() >= 0 and t.max() < 10 and not df.select(pl.all().is_null().any()).row(0)[0]
    assert np.isfinite(df["y"].to_numpy()).all()
    # shuffled by default, grouped by child otherwise (same rows)
    assert not np.all(np.diff(df["child"].to_numpy()) >= 0)
    srt = simulate_nested(3000, 40, seed=1, shuffle=False)
    assert np.all(np.diff(srt["child"].to_numpy()) >= 0)
    assert srt.sort("child", "t").equals(df.sort("child", "t"))


def test_nested_determinism_and_string_keys() -> None:
    a = simulate_nested(500, 10, seed=2)
    assert a.equals(simulate_nested(500, 10, seed=2))
    assert not a.equals(simulate_nested(500, 10, seed=3))
    s = simulate_nested(500, 10, seed=2, string_keys=True)
    assert s["child"].to_list() == [f"c{i:06d}" for i in a["child"].to_list()]
    assert s["school"].to_list() == [f"s{i:06d}" for i in a["school"].to_list()]
    assert s.select("t", "y").equals(a.select("t", "y"))


def test_nested_parameters_recovered_by_moments() -> None:
    # no random effects, no noise: the fixed line exactly
    df = simulate_nested(200, 5, seed=4, child_sd=(0, 0), school_sd=(0, 0), sigma=0, beta=(3.0, -2.0))
    assert np.allclose(df["y"].to_numpy(), 3.0 - 2.0 * df["t"].to_numpy())
    # school effects only: per-school OLS of y - X beta recovers their SDs and correlation
    df = simulate_nested(40_000, 1000, seed=5, child_sd=(0, 0), sigma=0.5)
    sch = _group_ols(df.with_columns(r=pl.col("y") - 10 - pl.col("t")), "school")
    a, b = sch["a"].to_numpy(), sch["b"].to_numpy()
    assert abs(a.std() - 0.8) < 0.06 and abs(b.std() - 0.1) < 0.01
    assert abs(np.corrcoef(a, b)[0, 1] + 0.2) < 0.1
    # child effects only: per-child OLS (children with >= 8 rows, tiny noise)
    df = simulate_nested(20_000, 100, seed=6, school_sd=(0, 0), sigma=0.05)
    ch = _group_ols(df.with_columns(r=pl.col("y") - 10 - pl.col("t")), "child").filter(pl.col("n") >= 8)
    a, b = ch["a"].to_numpy(), ch["b"].to_numpy()
    assert abs(a.std() - 1.0) < 0.05 and abs(b.std() - 0.2) < 0.01
    assert abs(np.corrcoef(a, b)[0, 1] - 0.3) < 0.05
    # all terms at the defaults: OLS recovers beta; residual variance matches
    df = simulate_nested(20_000, 200, seed=7)
    t, y = df["t"].to_numpy(), df["y"].to_numpy()
    X = np.column_stack([np.ones_like(t), t])
    assert np.allclose(np.linalg.lstsq(X, y, rcond=None)[0], [10.0, 1.0], atol=0.15)
    r = y - 10 - t
    # var = sum over terms of sd0^2 + 2 rho sd0 sd1 E[t] + sd1^2 E[t^2], + sigma^2
    expect = (1 + 2 * 0.3 * 0.2 * 5 + 0.04 * 100 / 3) + (0.64 - 2 * 0.2 * 0.08 * 5 + 0.01 * 100 / 3) + 1
    assert abs(r.var() / expect - 1) < 0.1


@pytest.mark.parametrize("kw", [dict(children=0, schools=1), dict(children=5, schools=6),
                                dict(children=5, schools=0), dict(children=5, schools=2, child_corr=2)])
def test_nested_rejects_bad_arguments(kw: dict) -> None:
    with pytest.raises(ValueError):
        simulate_nested(**kw)


# --------------------------------------------------------------------------
# crossed: y ~ x + (1 | user) + (1 | item)
# --------------------------------------------------------------------------


def test_crossed_shape_popularity_and_coverage() -> None:
    df = simulate_crossed(10_000, 200, 100_000, seed=1)
    assert df.columns == ["user", "item", "x", "y"]
    assert df.schema == {"user": pl.Int64, "item": pl.Int64, "x": pl.Float64, "y": pl.Float64}
    assert df.height == 100_000 and not df.select(pl.all().is_null().any()).row(0)[0]
    assert np.isfinite(df["y"].to_numpy()).all()
    x = df["x"].to_numpy()
    assert x.min() >= 0 and x.max() < 10
    # users roughly uniform: ~Poisson(10) rows each
    uc = df.group_by("user").len()["len"]
    assert df["user"].n_unique() > 9_990 and uc.max() < 40 and abs(uc.var() / uc.mean() - 1) < 0.1
    # every item present with >= 3 rows; popularity Zipf-like (count ~ 1/rank)
    ic = np.sort(df.group_by("item").len()["len"].to_numpy())[::-1]
    assert len(ic) == 200 and ic.min() >= 3
    assert ic[0] / np.median(ic) > 50
    assert 6 < ic[0] / ic[9] < 15  # rank 1 vs rank 10: ~10x for zipf=1
    assert ic[0] / df.height > 0.15  # top item ~1/H_200 = 17% of rows
    # ids are not popularity ranks
    top = df.group_by("item").len().sort("len", descending=True)["item"].head(5).to_list()
    assert top != [0, 1, 2, 3, 4]
    # rows in random order: neither key sorted
    assert not np.all(np.diff(df["user"].to_numpy()) >= 0)
    assert not np.all(np.diff(df["item"].to_numpy()) >= 0)
    # zipf=0: uniform items
    flat = simulate_crossed(1000, 50, 50_000, seed=1, zipf=0.0).group_by("item").len()["len"]
    assert flat.max() / flat.min() < 1.5


def test_crossed_determinism_string_keys_and_min_rows() -> None:
    a = simulate_crossed(500, 100, 2000, seed=3)
    assert a.equals(simulate_crossed(500, 100, 2000, seed=3))
    assert not a.equals(simulate_crossed(500, 100, 2000, seed=4))
    # few rows: the guarantee still gives every item its rows
    assert a.group_by("item").len()["len"].min() >= 3
    s = simulate_crossed(500, 100, 2000, seed=3, string_keys=True)
    assert s["user"].to_list() == [f"u{i:06d}" for i in a["user"].to_list()]
    assert s["item"].to_list() == [f"i{i:06d}" for i in a["item"].to_list()]
    with pytest.raises(ValueError):
        simulate_crossed(10, 100, 200)  # < 3 rows per item possible


def test_crossed_parameters_recovered_by_moments() -> None:
    df = simulate_crossed(100, 10, 1000, seed=5, sd_user=0, sd_item=0, sigma=0, beta=(2.0, 3.0))
    assert np.allclose(df["y"].to_numpy(), 2.0 + 3.0 * df["x"].to_numpy())
    df = simulate_crossed(20_000, 300, 400_000, seed=6)
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    X = np.column_stack([np.ones_like(x), x])
    assert np.allclose(np.linalg.lstsq(X, y, rcond=None)[0], [1.0, 0.5], atol=0.1)
    r = df.with_columns(r=pl.col("y") - 1 - 0.5 * pl.col("x"))
    assert abs(r["r"].var() / (1 + 0.25 + 1) - 1) < 0.1
    # item means (items with >= 200 rows): var ~ sd_item^2 (+ tiny noise)
    im = r.group_by("item").agg(m=pl.col("r").mean(), n=pl.len()).filter(pl.col("n") >= 200)
    assert len(im) > 100 and abs(im["m"].std() - 0.5) < 0.08
    # user means over ~20 rows: var ~ sd_user^2 + (sd_item^2 + sigma^2) / n
    um = r.group_by("user").agg(m=pl.col("r").mean(), n=pl.len()).filter(pl.col("n") >= 15)
    expect = 1 + ((um["n"].cast(pl.Float64) ** -1).mean()) * 1.25
    assert abs(um["m"].var() / expect - 1) < 0.08


def test_crossed_streaming_matches_in_memory(tmp_path: Path, monkeypatch) -> None:
    import bigmixed.simulate_multi as sim_mod

    # small chunks, so files start and end mid-chunk and span several chunks
    monkeypatch.setattr(sim_mod, "_CROSSED_CHUNK", 997)
    ref = simulate_crossed(3000, 150, 20_000, seed=8)
    (tmp_path / "part-00011.parquet").write_bytes(b"stale")
    paths = simulate_crossed_to_parquet(tmp_path, 3000, 150, 20_000, files=5, seed=8)
    assert [p.name for p in paths] == [f"part-{i:05d}.parquet" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]
    assert pl.read_parquet(paths).equals(ref)
    # every file mixes (almost) all items
    assert min(pl.read_parquet(p)["item"].n_unique() for p in paths) > 140


def test_multi_term_generators_are_re_exported() -> None:
    import bigmixed.simulate as sim_mod
    import bigmixed.simulate_multi as multi

    for name in ("simulate_nested", "simulate_crossed", "simulate_crossed_to_parquet"):
        assert getattr(sim_mod, name) is getattr(multi, name)
        assert name in sim_mod.__all__ and name in dir(sim_mod)
    assert simulate_nested is multi.simulate_nested
    with pytest.raises(AttributeError):
        sim_mod.no_such_generator  # noqa: B018


def test_simulate_multi_imports_first_without_a_cycle() -> None:
    # a fresh interpreter that imports simulate_multi before simulate
    import subprocess
    import sys

    code = ("import bigmixed.simulate_multi as m; from bigmixed.simulate import simulate_nested; "
            "assert simulate_nested is m.simulate_nested")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
