"""Out-of-core fitting: many unsorted parquet files (or a LazyFrame) give the in-memory answer.

The streamed and the in-memory fits read the same rows in different orders and
chunkings; the statistics are mapped to a canonical transform after the pass
(:func:`bigmixed.scaling.canonical_scaling`), so both solve the same problem up
to round-off and must agree to 1e-10 relative.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import bigmixed as bm
from bigmixed import _progress, pipeline
from bigmixed.data import open_source
from bigmixed.keys import GroupIndex
from bigmixed.simulate import simulate
from bigmixed.scaling import Scaling
from bigmixed.stats import Statistics

FORMULA = "y ~ x + x2 + (x | subject)"
SITES = ["north", "east", "south", "west", "zz"]
RTOL = 1e-10


def _frame(groups: int = 150, seed: int = 5) -> pl.DataFrame:
    """Simulated rows with string keys, shuffled, plus a categorical column."""
    df = simulate(groups, 8, seed=seed, string_keys=True, shuffle=True)
    rng = np.random.default_rng(seed)
    site = np.array(SITES[:4])[rng.integers(0, 4, df.height)]
    df = df.with_columns(pl.Series("site", site), pl.Series("rowid", np.arange(df.height)))
    # a site effect, so C(site) matters
    eff = pl.col("site").replace_strict({"north": 0.0, "east": 0.5, "south": -0.3, "west": 0.2, "zz": 1.0})
    return df.with_columns(y=pl.col("y") + eff)


def _write_files(df: pl.DataFrame, directory, n: int) -> list[str]:
    """Split ``df`` (already shuffled) into ``n`` files of uneven size."""
    cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, df.height), n - 1, replace=False))
    bounds = [0, *cuts.tolist(), df.height]
    paths = []
    for i in range(n):
        p = os.path.join(directory, f"part-{i:03d}.parquet")
        df.slice(bounds[i], bounds[i + 1] - bounds[i]).write_parquet(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    df = _frame()
    paths = _write_files(df, d, 12)
    return df, str(d / "*.parquet"), paths


@pytest.fixture(scope="module")
def reference(data):
    df = data[0]
    return bm.lmer(FORMULA, df.to_pandas())  # in memory, pandas


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def assert_same_fit(res, ref, rtol=RTOL):
    assert res.nobs == ref.nobs and res.n_groups == ref.n_groups
    assert _rel(res.objective, ref.objective) < rtol
    assert _rel(res.fe_params.to_numpy(), ref.fe_params.to_numpy()) < rtol
    assert _rel(res.bse.to_numpy(), ref.bse.to_numpy()) < rtol
    assert _rel(res.cov_re.to_numpy(), ref.cov_re.to_numpy()) < rtol
    assert res.scale == pytest.approx(ref.scale, rel=rtol)
    a = res.random_effects_frame("polars")
    b = ref.random_effects_frame("polars")
    g = ref.model.spec.group
    assert a[g].cast(pl.String).to_list() == b[g].cast(pl.String).to_list()
    for col in ref.exog_re_names:  # normwise: BLUPs near 0 make elementwise ratios meaningless
        assert _rel(a[col].to_numpy(), b[col].to_numpy()) < rtol


@pytest.mark.parametrize("how", ["glob", "paths", "lazyframe", "small-chunks"])
def test_streamed_fit_equals_in_memory(data, reference, how):
    df, pattern, paths = data
    if how == "glob":
        res = bm.lmer(FORMULA, pattern)
    elif how == "paths":
        res = bm.lmer(FORMULA, list(reversed(paths)))  # another file order too
    elif how == "lazyframe":
        res = bm.lmer(FORMULA, pl.scan_parquet(pattern))
    else:  # groups straddle chunks (and files): 37-row chunks, 1200 rows
        res = bm.lmer(FORMULA, pattern, chunk_rows=37)
    assert res.model.data.in_memory is False
    assert_same_fit(res, reference)


def test_statsmodels_spelling_on_lazyframe_ml(data):
    df, pattern, _ = data
    ref = bm.mixedlm("y ~ x + x2", df, groups="subject", re_formula="~x").fit(reml=False)
    res = bm.mixedlm("y ~ x + x2", pl.scan_parquet(pattern), groups="subject", re_formula="~x",
                     chunk_rows=101).fit(reml=False)
    assert_same_fit(res, ref)


def test_random_intercept_and_independent_slopes_streamed(data):
    df, pattern, _ = data
    for f in ["y ~ x + (1 | subject)", "y ~ x + x2 + (x || subject)"]:
        assert_same_fit(bm.lmer(f, pattern, chunk_rows=53), bm.lmer(f, df))


def test_integer_keys_streamed(tmp_path):
    df = simulate(120, 6, seed=2, shuffle=True).with_columns(pl.col("subject") * 1_000_003)  # sparse ints
    _write_files(df, tmp_path, 7)
    assert_same_fit(bm.lmer(FORMULA, str(tmp_path / "*.parquet"), chunk_rows=29), bm.lmer(FORMULA, df))


def test_integer_keys_indexed_from_footers(tmp_path, monkeypatch):
    """Keys with gaps, and keys whose rows are all incomplete: the footer index gives the exact fit."""
    df = simulate(120, 6, seed=3, shuffle=True).with_columns(pl.col("subject") * 3 + 7)
    gone = [7 + 3 * g for g in (0, 5, 119)]  # every row of these subjects lacks y
    df = df.with_columns(pl.when(pl.col("subject").is_in(gone)).then(None).otherwise(pl.col("y")).alias("y"))
    _write_files(df, tmp_path, 5)
    spans = []
    real = GroupIndex._span_index.__func__
    monkeypatch.setattr(GroupIndex, "_span_index",
                        classmethod(lambda cls, src, col: spans.append(real(cls, src, col)) or spans[-1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bm.DroppedRowsWarning)
        res = bm.lmer(FORMULA, str(tmp_path / "*.parquet"), chunk_rows=31)
        ref = bm.lmer(FORMULA, df)
    assert spans and spans[0] is not None and spans[0].n_groups == 3 * 119 + 1
    assert res.n_groups == ref.n_groups == 117
    assert_same_fit(res, ref)


def test_levels_found_during_the_pass(data, reference, monkeypatch):
    """String keys of files are coded while the rows are read (no pass over the keys first)."""
    from bigmixed import keys

    def no_index_pass(*a, **k):
        raise AssertionError("the key column was indexed before the pass")

    monkeypatch.setattr(keys.GroupIndex, "from_source", classmethod(no_index_pass))
    res = bm.lmer(FORMULA, data[1], chunk_rows=97)
    assert_same_fit(res, reference)


def test_unpackable_key_in_a_later_file_reads_again(tmp_path):
    df = simulate(80, 6, seed=6, string_keys=True, shuffle=True)
    long = df.with_columns(pl.when(pl.col("subject") == "s000003").then(pl.lit("subject-number-three"))
                           .otherwise(pl.col("subject")).alias("subject"))
    long.head(300).write_parquet(tmp_path / "a.parquet")
    long.slice(300).write_parquet(tmp_path / "b.parquet")
    res = bm.lmer(FORMULA, str(tmp_path / "*.parquet"), chunk_rows=50)
    assert_same_fit(res, bm.lmer(FORMULA, long))
    assert "subject-number-three" in res.random_effects_frame("polars")["subject"].to_list()


def test_rows_after_finish_are_refused(data):
    from bigmixed.data import open_source as _open
    from bigmixed.formula import spec_from_lmer
    from bigmixed.reduce import Reducer

    src = _open(data[1])
    plan = pipeline.prepare(src, spec_from_lmer(FORMULA))
    red = Reducer(plan, 2, mapped=True)
    chunks = list(src.batches(plan.design.columns, 400))
    for label, ch in chunks:
        red.add(ch, label)
    st = red.finish()
    assert st.terms[0].n_groups == plan.terms[0].n_levels == 150
    with pytest.raises(RuntimeError, match="finish"):
        red.add(chunks[0][1], chunks[0][0])


def test_design_of_chunked_columns_and_reused_buffers(data):
    """Columns of many chunks (as read from parquet) are copied piece by piece, nulls as NaN;
    buffers handed back are overwritten only for a chunk of the same size."""
    df = data[0]
    d = bm.lmer(FORMULA, df).model._built.design
    parts = pl.concat([df.slice(0, 100), df.slice(100, 57).with_columns(x=pl.lit(None, pl.Float64)),
                       df.slice(157, 200)], rechunk=False)
    assert parts.get_column("x").n_chunks() == 3
    y, X, Z = d.matrices(parts)
    y1, X1, Z1 = d.matrices(parts.rechunk())
    np.testing.assert_array_equal(X, X1)
    assert np.isnan(X[100:157, 1]).all() and not np.isnan(X[:100]).any()
    reuse: dict = {}
    a = d.matrices(parts, reuse)
    b = d.matrices(parts.reverse(), reuse)
    assert np.shares_memory(b[1], a[1]) and np.shares_memory(b[0], a[0])  # the same buffers, overwritten
    np.testing.assert_array_equal(b[1], X[::-1])
    c = d.matrices(parts.head(10), reuse)
    assert c[1].shape == (10, X.shape[1]) and not np.shares_memory(c[1], a[1])


def test_footer_index_needs_statistics(tmp_path):
    df = simulate(30, 4, seed=4)
    df.write_parquet(tmp_path / "with.parquet")
    df.write_parquet(tmp_path / "without.parquet", statistics=False)
    with_stats = open_source(str(tmp_path / "with.parquet"))
    assert with_stats.int_range("subject") == (0, 29, df.height)
    both = open_source([str(tmp_path / "with.parquet"), str(tmp_path / "without.parquet")])
    assert both.int_range("subject") is None
    assert GroupIndex._span_index(both, "subject") is None  # then the keys are indexed by a pass
    assert GroupIndex.from_source(both, "subject").n_groups == 30


# ---------------------------------------------------------------------------
# categorical fixed effects
# ---------------------------------------------------------------------------


def test_categorical_level_absent_from_first_file(tmp_path):
    df = _frame(120, seed=9)
    # 'zz' occurs only in the last file: the first file (the prototype) never sees it
    last = df.tail(200).with_columns(site=pl.lit("zz"))
    df = pl.concat([df.head(df.height - 200), last])
    _write_files(df.head(df.height - 200), tmp_path, 5)
    last.write_parquet(tmp_path / "part-999.parquet")
    f = "y ~ x + x2 + C(site) + (x | subject)"
    res = bm.lmer(f, str(tmp_path / "*.parquet"), chunk_rows=64)
    ref = bm.lmer(f, df.to_pandas())
    assert res.exog_names == ref.exog_names
    assert any("zz" in n for n in res.exog_names)  # the level found by the levels pass
    assert_same_fit(res, ref)
    # levels given by the user: no levels pass, same design
    given = bm.lmer(f, str(tmp_path / "*.parquet"), levels={"site": SITES}, chunk_rows=64)
    assert_same_fit(given, ref)


def test_string_column_is_categorical_in_every_chunk(tmp_path):
    df = _frame(80, seed=4)
    _write_files(df, tmp_path, 6)
    f = "y ~ x + site + (1 | subject)"
    assert_same_fit(bm.lmer(f, str(tmp_path / "*.parquet"), chunk_rows=50), bm.lmer(f, df))


def test_unknown_level_given_levels_is_an_error(tmp_path):
    df = _frame(40, seed=4)
    _write_files(df, tmp_path, 3)
    with pytest.raises(ValueError, match="level"):
        bm.lmer("y ~ x + C(site) + (1 | subject)", str(tmp_path / "*.parquet"), levels={"site": ["north"]})


# ---------------------------------------------------------------------------
# missing values
# ---------------------------------------------------------------------------


def _with_missing(df: pl.DataFrame) -> pl.DataFrame:
    n = df.height
    idx = np.arange(n)
    return df.with_columns(
        x=pl.when(pl.Series(idx % 17 == 3)).then(None).otherwise(pl.col("x")),
        y=pl.when(pl.Series(idx % 23 == 5)).then(float("nan")).otherwise(pl.col("y")),
        subject=pl.when(pl.Series(idx % 31 == 7)).then(None).otherwise(pl.col("subject")),
    )


def test_nulls_dropped_and_counted(tmp_path):
    df = _with_missing(_frame(100, seed=3))
    _write_files(df, tmp_path, 5)
    idx = np.arange(df.height)
    bad_x, bad_y, bad_g = idx % 17 == 3, idx % 23 == 5, idx % 31 == 7
    n_bad = int((bad_x | bad_y | bad_g).sum())
    with pytest.warns(bm.DroppedRowsWarning, match="dropped"):
        res = bm.lmer(FORMULA, str(tmp_path / "*.parquet"), chunk_rows=70)
    d = res.to_dict()
    assert d["rows_read"] == df.height
    assert d["rows_dropped"] == n_bad
    assert d["dropped_by_column"]["x"] == int(bad_x.sum())
    assert d["dropped_by_column"]["y"] == int(bad_y.sum())
    assert d["dropped_by_column"]["subject"] == int(bad_g.sum())
    assert res.nobs == df.height - n_bad
    assert "Dropped rows:" in str(res.summary())
    complete = df.filter(pl.Series(~(bad_x | bad_y | bad_g)))
    assert_same_fit(res, bm.lmer(FORMULA, complete))


def test_missing_raise_names_column_and_file(tmp_path):
    df = _frame(60, seed=3)
    paths = _write_files(df, tmp_path, 4)
    bad = pl.read_parquet(paths[2])
    bad = bad.with_columns(x2=pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("x2")))
    bad.write_parquet(paths[2])
    with pytest.raises(ValueError, match=r"'x2'.*part-002\.parquet"):
        bm.lmer(FORMULA, str(tmp_path / "*.parquet"), missing="raise")


# ---------------------------------------------------------------------------
# group keys
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int-dense", "int-holes", "int-sparse", "string", "categorical"])
def test_group_index_codes(kind):
    rng = np.random.default_rng(0)
    base = rng.permutation(5000)
    if kind == "int-dense":  # the keys fill their range: codes without a table
        keys = pl.Series("k", base)
    elif kind == "int-holes":  # a compact range with gaps: a table
        keys = pl.Series("k", base * 3 + 11)
    elif kind == "int-sparse":
        keys = pl.Series("k", base.astype(np.int64) * 7_919_000_003 - 2**40)
    else:
        keys = pl.Series("k", [f"g{v:05d}" for v in base])
        if kind == "categorical":
            keys = keys.cast(pl.Categorical)
    gi = GroupIndex(keys)
    assert gi.n_groups == 5000
    expect_sorted = keys.cast(pl.String).sort() if kind == "categorical" else keys.sort()
    assert gi.keys.cast(expect_sorted.dtype).to_list() == expect_sorted.to_list()
    sample = keys.gather(rng.integers(0, 5000, 20000))
    codes = gi.codes(sample)
    assert (codes >= 0).all()
    back = gi.keys.gather(codes)
    assert back.to_list() == sample.cast(back.dtype).to_list()
    # nulls and keys not in the index give -1
    assert gi._identity == (kind == "int-dense")
    if kind == "int-holes":  # a value in a gap of the range is no key either
        other = pl.Series("k", [None, int(keys.max()) + 1, int(keys.min()) + 1, int(keys[0])], dtype=pl.Int64)
    elif kind.startswith("int"):
        other = pl.Series("k", [None, int(keys.max()) + 1, int(keys.min()) - 1, int(keys[0])], dtype=pl.Int64)
    else:
        other = pl.Series("k", [None, "nope", "g", str(keys.cast(pl.String)[0])])
    got = gi.codes(other)
    assert got[:3].tolist() == [-1, -1, -1] and got[3] >= 0


def test_group_index_hash_collisions_stay_exact(monkeypatch):
    from bigmixed import keys as data_mod

    L = "long-key-"  # over 8 bytes: the hashed (not packed) path
    keys = pl.Series("k", [L + "a", L + "bb", L + "ccc"])
    # a deliberately bad hash (the length): L+"d" collides with L+"a" -> verified and rejected
    monkeypatch.setattr(data_mod, "_hash_keys", lambda v, seed: v.cast(pl.String).str.len_bytes()
                        .cast(pl.UInt64).fill_null(0).to_numpy())
    gi = GroupIndex(keys)
    assert gi.codes(pl.Series([L + "bb", L + "d", L + "a", None, L + "ccc"])).tolist() == [1, -1, 0, -1, 2]
    # colliding index keys: falls back to a join, still exact
    gi2 = GroupIndex(pl.Series("k", [L + "a", L + "b", L + "cc"]))
    assert gi2.codes(pl.Series([L + "b", L + "cc", L + "a", L + "zz"])).tolist() == [1, 2, 0, -1]


def test_group_index_packed_string_keys(tmp_path):
    """Keys of at most 8 bytes are found as packed uint64s: same keys, order and codes as strings."""
    from bigmixed.data import open_source
    from bigmixed.keys import _pack_series, _unpack

    words = ["", "a", "ab", "abc", "b", "zz", "Z", "12345678", "a b", "~"]
    packed = _pack_series(pl.Series(words))
    assert packed.null_count() == 0
    assert _unpack(np.sort(packed.to_numpy())).to_list() == sorted(words, key=lambda w: w.encode())
    # not packable: too long, a NUL byte, non-ASCII (the general string path handles them)
    assert _pack_series(pl.Series(["123456789", "a\x00b", "été", None])).null_count() == 4
    # the Arrow-buffer kernel packs exactly what the polars expression packs
    from bigmixed.keys import _pack_arrow

    mixed = pl.concat([pl.Series(words + ["123456789", "a\x00b", "été", None, "é", "\x7f"]),
                       pl.Series(["tail", None, "8bytes!!"])], rechunk=False).slice(1)
    got, ok = _pack_arrow(mixed)
    want = _pack_series(mixed)
    assert ok.tolist() == want.is_not_null().to_list()
    assert got[ok].tolist() == want.drop_nulls().to_list()
    # the large-string layout (offsets and data) of older Arrow versions packs the same
    import pyarrow as pa

    from bigmixed import _kernels

    arr = mixed.to_arrow(compat_level=pl.CompatLevel.oldest()).cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=len(arr) + 1, offset=8 * arr.offset)
    out2, ok2 = np.empty(len(arr), np.uint64), np.empty(len(arr), bool)
    _kernels.pack_strings(offsets, np.frombuffer(arr.buffers()[2], np.uint8), mixed.is_not_null().to_numpy(),
                          out2, ok2, 2)
    assert ok2.tolist() == ok.tolist() and out2[ok2].tolist() == got[ok].tolist()
    pl.DataFrame({"g": words}).write_parquet(tmp_path / "a.parquet")
    gi = GroupIndex.from_source(open_source(str(tmp_path / "*.parquet")), "g")  # packed
    assert gi._packed is not None
    assert gi.keys.to_list() == GroupIndex(pl.Series(words)).keys.to_list()
    # lookups by packed value: the codes of the string path, for keys, unknown, unpackable and null values
    probe = pl.Series(["zz", "", "x", "123456789", "été", None, "a\x00b", "12345678", "a"] * 3)
    assert gi.codes(probe).tolist() == GroupIndex(pl.Series(words)).codes(probe).tolist()
    assert gi.codes(probe.cast(pl.Categorical)).tolist() == gi.codes(probe).tolist()
    words.append("été")
    pl.DataFrame({"g": words}).write_parquet(tmp_path / "a.parquet")
    gi = GroupIndex.from_source(open_source(str(tmp_path / "*.parquet")), "g")  # not packable
    assert gi.keys.to_list() == GroupIndex(pl.Series(words)).keys.to_list()
    # a key too long to pack in a later file: the general string path, same answer
    pl.DataFrame({"g": ["a-much-longer-key", "a"]}).write_parquet(tmp_path / "b.parquet")
    gi = GroupIndex.from_source(open_source(str(tmp_path / "*.parquet")), "g")
    keys = gi.keys.to_list()
    assert keys == sorted(set(words) | {"a-much-longer-key"}, key=lambda w: w.encode())
    assert gi.codes(pl.Series(["a-much-longer-key", "a", "x"])).tolist() == [
        keys.index("a-much-longer-key"), keys.index("a"), -1]



@pytest.mark.parametrize("values", [
    ["b", "a", None, "", "zz", "a", "12345678", "~"],  # packable, with a null and the empty string
    ["b", "a", "a-much-longer-key", None],  # one key too long to pack: the polars query
    ["é", "e", "e"],  # non-ASCII: the polars query
    [None, None],  # no key at all
], ids=["packed", "long", "non-ascii", "all-null"])
@pytest.mark.parametrize("dtype", [pl.String, pl.Categorical], ids=["string", "categorical"])
def test_group_index_of_a_small_frame_equals_the_query(monkeypatch, values, dtype):
    """Small in-memory frames index string keys by numpy; the keys, their order and the codes are
    those of the polars query that indexes larger frames and files."""
    from bigmixed import keys as keys_mod
    from bigmixed.data import open_source

    df = pl.DataFrame({"g": pl.Series(values, dtype=pl.String).cast(dtype)})
    small = GroupIndex.from_source(open_source(df), "g")
    monkeypatch.setattr(keys_mod, "SMALL_FRAME_ROWS", 0)
    query = GroupIndex.from_source(open_source(df), "g")
    assert small.keys.to_list() == query.keys.to_list()
    assert small.keys.dtype == query.keys.dtype
    probe = pl.Series(values + ["x", None], dtype=pl.String)
    assert small.codes(probe).tolist() == query.codes(probe).tolist()

# ---------------------------------------------------------------------------
# canonical transform
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("moves", ["all", "x only", "y only", "nothing"])
def test_transform_statistics_is_exact(moves):
    """Exact for any change of transform (the kernel skips the products that are identities)."""
    rng = np.random.default_rng(3)
    G, n = 40, 400
    codes = rng.integers(0, G, n)
    x = 1e6 + 3.0 * rng.standard_normal(n)
    X = np.column_stack([np.ones(n), x, rng.standard_normal(n)])
    Z = X[:, :2].copy()
    y = 50.0 + 2.0 * x + rng.standard_normal(n)
    s_old = Scaling(np.array([0.0, 1e6 - 2.0, 0.5]), np.array([1.0, 4.0, 0.5]), np.array([0.0, 1e6 + 1.0]),
                    np.array([1.0, 2.0]), 2e6, 8.0, 0, 0)
    s_new = Scaling(np.array([0.0, 1e6, 0.0]), np.array([1.0, 2.0, 1.0]), np.array([0.0, 1e6]),
                    np.array([1.0, 4.0]), 2e6 + 64.0, 16.0, 0, 0)
    if moves == "x only":
        s_new = dataclasses.replace(s_old, x_shift=s_new.x_shift, x_scale=s_new.x_scale)
    elif moves == "y only":
        s_new = dataclasses.replace(s_old, y_shift=s_new.y_shift, y_scale=s_new.y_scale)
    elif moves == "nothing":
        s_new = s_old
    a, b = Statistics.empty(G, 3, 2), Statistics.empty(G, 3, 2)
    a.add_rows(codes, X, Z, y, 1, s_old)
    b.add_rows(codes, X, Z, y, 1, s_new)
    pipeline.transform_statistics(a, s_old, s_new)
    for f in ("A", "B", "c", "XtX", "Xty"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-9, atol=1e-9 * np.abs(getattr(b, f)).max())
    assert a.yty == pytest.approx(b.yty, rel=1e-10)


def test_scaling_does_not_depend_on_first_rows(data, tmp_path, monkeypatch):
    """An unrepresentative first file (smallest x and y first) ends at the same canonical transform."""
    calls = []
    real = pipeline.transform_statistics
    monkeypatch.setattr(pipeline, "transform_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    df = data[0].sort("y")
    _write_files(df, tmp_path, 8)
    res_sorted = bm.lmer(FORMULA, str(tmp_path / "*.parquet"), chunk_rows=97)
    assert calls  # the first rows gave another transform: the statistics were mapped
    res_shuffled = bm.lmer(FORMULA, data[0])
    assert pipeline.same_scaling(res_sorted.scaling, res_shuffled.scaling)
    assert_same_fit(res_sorted, res_shuffled)


# ---------------------------------------------------------------------------
# predictions, progress
# ---------------------------------------------------------------------------


def test_write_predictions_streamed(data, reference, tmp_path):
    df, pattern, _ = data
    res = bm.lmer(FORMULA, pattern, chunk_rows=90)
    out = tmp_path / "out" / "pred.parquet"
    res.write_predictions(pattern, out, keys=["subject", "rowid"], chunk_rows=77)
    pred = pl.read_parquet(out)
    assert pred.columns == ["subject", "rowid", "fitted", "resid"]
    assert pred["rowid"].to_list() == df["rowid"].to_list()  # input order
    np.testing.assert_allclose(pred["fitted"].to_numpy(), reference.predict(df.to_pandas()), rtol=1e-9)
    np.testing.assert_allclose(pred["resid"].to_numpy(), df["y"].to_numpy() - pred["fitted"].to_numpy())
    assert pq.ParquetFile(out).metadata.num_row_groups > 1  # streamed: one row group per chunk
    assert [p.name for p in out.parent.iterdir()] == ["pred.parquet"]
    # the fitted data by default; new data without the response: no resid column
    res.write_predictions(None, out)
    assert pl.read_parquet(out).height == df.height
    res.write_predictions(df.drop("y").head(10), out)
    assert pl.read_parquet(out).columns == ["subject", "fitted"]


def test_failed_prediction_write_leaves_nothing(data, tmp_path, monkeypatch):
    df, pattern, _ = data
    res = bm.lmer(FORMULA, pattern)
    out = tmp_path / "pred.parquet"
    calls = {"n": 0}
    real = pq.ParquetWriter.write_table

    def flaky(self, table, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real(self, table, *a, **k)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", flaky)
    with pytest.raises(OSError, match="simulated"):
        res.write_predictions(pattern, out, chunk_rows=50)
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []  # neither pred.parquet nor a temporary file


def test_progress_bar_with_files(data, monkeypatch):
    from rich.console import Console

    buf = io.StringIO()
    monkeypatch.setattr(_progress, "_console", lambda: Console(file=buf, force_terminal=True, width=150))
    monkeypatch.setattr(_progress.Progress, "DELAY", 0.0)
    bm.lmer(FORMULA, data[1], chunk_rows=40, progress=True)
    text = buf.getvalue()
    assert "rows/s" in text and "12/12 files" in text
    buf.truncate(0)
    bm.lmer(FORMULA, data[1], chunk_rows=40, progress=False)
    bm.lmer(FORMULA, data[1], chunk_rows=40)  # default: only when stderr is a terminal (not under pytest)
    assert buf.getvalue().strip("\x00") == ""


def test_memory_is_per_group_not_per_row(tmp_path):
    """Streaming 10x the rows of the same groups allocates about as much memory (tracemalloc peak)."""
    import tracemalloc

    small = pl.concat([simulate(2000, 4, seed=s) for s in range(2)])
    big = pl.concat([simulate(2000, 4, seed=s) for s in range(20)])
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _write_files(small, a, 2)
    _write_files(big, b, 20)
    peaks = []
    for d in (a, b):
        bm.MixedLM(FORMULA, str(d / "*.parquet"), spec=bm.model.spec_from_lmer(FORMULA), chunk_rows=5000)  # warm
        tracemalloc.start()
        m = bm.MixedLM(FORMULA, str(d / "*.parquet"), spec=bm.model.spec_from_lmer(FORMULA), chunk_rows=5000)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert m.nobs == (small if d == a else big).height
    assert peaks[1] < 1.5 * peaks[0]  # 10x the rows


def test_no_warnings_on_clean_data(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bm.lmer(FORMULA, data[1], chunk_rows=500)


def test_in_memory_frames_are_sliced_along_their_own_chunks():
    """Slices inside one chunk of a polars frame reach numpy without a copy; the fit is unchanged."""
    from bigmixed.data import _slices

    a = pl.DataFrame({"x": np.arange(1000.0), "k": np.arange(1000)})
    three = pl.concat([a, a, a], rechunk=False)
    assert three.n_chunks() == 3
    assert list(_slices(three, 400)) == [(0, 400), (400, 400), (800, 200), (1000, 400), (1400, 400),
                                         (1800, 200), (2000, 400), (2400, 400), (2800, 200)]
    assert not any(three.slice(s, n).get_column("x").to_numpy().flags["OWNDATA"] for s, n in _slices(three, 400))
    tiny = pl.concat([a.slice(10 * i, 10) for i in range(100)], rechunk=False)  # 100 chunks of 10 rows
    assert list(_slices(tiny, 400)) == [(0, 400), (400, 400), (800, 200)]
    assert list(_slices(a, 400)) == [(0, 400), (400, 400), (800, 200)]

    df = simulate(3000, 5, seed=4)
    pieces = pl.concat([df.slice(0, 7000), df.slice(7000, 5000), df.slice(12000, df.height - 12000)], rechunk=False)
    assert pieces.n_chunks() == 3
    ref = bm.lmer(FORMULA, df.rechunk())
    res = bm.lmer(FORMULA, pieces, chunk_rows=4096)
    assert res.objective == pytest.approx(ref.objective, rel=1e-12)
    np.testing.assert_allclose(res.fe_params, ref.fe_params, rtol=1e-10)


def _region(addr: int) -> dict[str, str]:
    """The /proc/self/smaps entry of the mapping holding ``addr``: its permissions and sizes."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            lo, hi = (int(v, 16) for v in head[0].split("-"))
            if lo <= addr < hi:
                out = {"perms": head[1]}
                for entry in lines[i + 1:]:
                    key, _, val = entry.partition(":")
                    if "-" in key.split()[0] and len(key.split()) > 1:
                        break
                    out[key.strip()] = val.strip()
                return out
    raise AssertionError(f"no mapping holds address {addr:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's /proc/self/smaps")
def test_streamed_records_are_private_memory_given_back_by_split():
    # A shared anonymous mapping (mmap's default) is shared memory: MADV_DONTNEED only unmaps its
    # pages (the process's RSS falls, the memory stays taken) and it gets no huge pages.  The
    # records must be private, and the release in split must leave none of them resident.
    from bigmixed.reduce import _Records

    G, q, p = 40_000, 2, 3
    rec = _Records(G, q, p, (), capacity=G, mapped=True)
    rec.R[:] = 1.0  # every page of the records touched
    region = _region(rec.R.ctypes.data)
    assert region["perms"][3] == "p", region["perms"]
    assert int(region["Rss"].split()[0]) * 1024 >= rec.R.nbytes // 2
    addr = rec.R.ctypes.data
    ts = rec.split(None, None, release=True)
    assert rec.released and ts.A.shape == (G, q, q) and np.all(ts.n == 1)
    try:
        after = _region(addr)
    except AssertionError:
        return  # unmapped altogether: nothing resident
    assert int(after["Rss"].split()[0]) == 0, after


@pytest.mark.parametrize("formula, packed", [
    ("y ~ x + x2 + (x | subject)", True),     # Z = (1, x) = X's first two columns
    ("y ~ x + (x | subject)", True),
    ("y ~ x2 + (x | subject)", False),        # x is not a fixed effect
    ("y ~ x2 + x + (x | subject)", False),    # Z is X's columns 0 and 2, not a prefix
    ("y ~ 0 + x + (x | subject)", False),     # no intercept in X
    ("y ~ x + x2 + (0 + x | subject)", False),
])
def test_packed_records_are_used_when_z_leads_x_and_change_no_bit(monkeypatch, formula, packed):
    from bigmixed import reduce as reduce_mod
    from bigmixed.formula import spec_from_lmer

    df = simulate(300, 6, seed=3, shuffle=True)
    src = open_source(df)
    plan = pipeline.prepare(src, spec_from_lmer(formula))
    assert reduce_mod._packed(plan) is packed
    stats = {}
    for on in (True, False):
        monkeypatch.setattr(reduce_mod, "_packed", lambda plan, on=on: on and packed)
        for where, data in (("memory", df), ("chunks", pl.LazyFrame(df))):
            b = pipeline.build_statistics(open_source(data), spec_from_lmer(formula),
                                          chunk_rows=257 if where == "chunks" else None)
            stats[(on, where)] = b.stats
    for where in ("memory", "chunks"):
        s1, s0 = stats[(True, where)], stats[(False, where)]
        for f in ("A", "B", "c", "n"):
            assert np.array_equal(getattr(s1.terms[0], f), getattr(s0.terms[0], f)), (where, f)
        assert np.array_equal(s1.XtX, s0.XtX) and s1.N == s0.N


# ---------------------------------------- found by a sweep of 39 models x 15 ways of reading them
def test_categorical_of_an_expression_takes_levels_from_every_file(tmp_path):
    """C(round(x2)) / factor(x2 > 0): levels only later files have are levels of the fit."""
    df = simulate(120, 6, seed=7)
    s = df.sort("x2")
    s.filter(pl.col("x2") <= 0).write_parquet(tmp_path / "a.parquet")  # no x2 > 0 here
    s.filter(pl.col("x2") > 0).write_parquet(tmp_path / "b.parquet")
    for f in ("y ~ x + factor(x2 > 0) + (1 | subject)", "y ~ x + C(round(x2)) + (1 | subject)"):
        mem, files = bm.lmer(f, df), bm.lmer(f, str(tmp_path / "*.parquet"))
        assert list(files.fixef.index) == list(mem.fixef.index)
        assert_same_fit(files, mem)


def test_stateful_transform_learns_from_complete_rows(tmp_path):
    """scale(x) with missing x (or y): its mean and SD come from the rows the fit uses, as R's model
    frame drops incomplete rows first (all rows were dropped before: NaN mean)."""
    df = simulate(80, 6, seed=3)
    x = df["x"].to_numpy().copy()
    x[::7] = np.nan
    y = df["y"].to_numpy().copy()
    y[3::11] = np.nan
    df = df.with_columns(pl.Series("x", x), pl.Series("y", y))
    ok = np.isfinite(x) & np.isfinite(y)
    xs = (x - x[ok].mean()) / x[ok].std(ddof=1)
    by_hand = bm.lmer("y ~ xs + (1 | subject)", df.with_columns(pl.Series("xs", xs)))
    df.write_parquet(tmp_path / "d.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bm.DroppedRowsWarning)
        for data in (df, df.to_pandas(), str(tmp_path / "d.parquet")):
            res = bm.lmer("y ~ scale(x) + (1 | subject)", data)
            assert res.nobs == int(ok.sum())
            assert res.objective == pytest.approx(by_hand.objective, rel=RTOL)
            np.testing.assert_allclose(res.fixef.to_numpy(), by_hand.fixef.to_numpy(), rtol=1e-8)


def test_empty_first_file_and_widening_key_types(tmp_path):
    """An empty first file (its categorical column without levels), and an Int8 key in the first
    file with larger Int64 keys later, give the in-memory fit."""
    df = simulate(200, 6, seed=7).with_columns(
        pl.Series("arm", np.random.default_rng(1).choice(["a", "b", "c"], 1228)))
    df.head(0).write_parquet(tmp_path / "e0.parquet")
    df.write_parquet(tmp_path / "e1.parquet")
    assert_same_fit(bm.lmer("y ~ x + arm + (1 | subject)", str(tmp_path / "e*.parquet")),
                    bm.lmer("y ~ x + arm + (1 | subject)", df))
    small = df.filter(pl.col("subject") < 100).with_columns(pl.col("subject").cast(pl.Int8))
    small.write_parquet(tmp_path / "k0.parquet")
    df.filter(pl.col("subject") >= 100).write_parquet(tmp_path / "k1.parquet")
    assert_same_fit(bm.lmer("y ~ x + (1 | subject)", str(tmp_path / "k*.parquet")),
                    bm.lmer("y ~ x + (1 | subject)", df))


def test_a_file_given_twice_and_zero_chunk_rows_are_errors(tmp_path):
    df = simulate(20, 5, seed=1)
    df.write_parquet(tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="given twice"):
        bm.lmer("y ~ x + (1 | subject)", [str(tmp_path / "*.parquet"), str(tmp_path / "a.parquet")])
    with pytest.raises(ValueError, match="chunk_rows must be a positive"):
        bm.lmer("y ~ x + (1 | subject)", df, chunk_rows=0)
