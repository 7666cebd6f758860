"""Tests for bigmixed.simulate (kept small: the whole module runs in ~1 s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from bigmixed.simulate import simulate, simulate_to_parquet, write_parquet


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
