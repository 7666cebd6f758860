"""Fitting on a Dask cluster: same numbers as the single-machine fit.

One module-scoped LocalCluster (2 worker processes, 1 thread each) and small data sets
written to several parquet files with the rows shuffled, so every level is spread over
several partitions: one term (2000 groups with string keys), nested terms (children in
classes in schools, a composite class key ``school:cls``; the dietox pigs in litters),
crossed terms (users x items), weights and offsets.  Estimates, objective, theta and BLUPs
(compared by key, per term) must equal the single-machine fit to 1e-10 relative, in both
"resident" (statistics stay on the workers) and "gathered" (merged on the driver) modes; a
worker killed mid-fit must not change a bit of the result.  The worker-kill test runs last:
it restarts a worker.
"""

import os
import signal
import subprocess
import sys
import threading

import dask.dataframe as dd
import numpy as np
import polars as pl
import pytest
from dask.distributed import Client, LocalCluster, get_task_stream

import bigmixed as bm
from bigmixed import distributed as bd
from bigmixed.formula import spec_from_lmer
from bigmixed.simulate import simulate, simulate_crossed, simulate_nested, write_parquet

FORMULA = "y ~ x + x2 + (x | subject)"
NESTED = "y ~ t + (t | child) + (1 | school:cls) + (1 | school)"
RTOL = 1e-10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    df = simulate(2000, 10, seed=11, string_keys=True, shuffle=True)
    return [str(p) for p in write_parquet(df, tmp_path_factory.mktemp("dist") / "data", files=6)]


def nested_frame(children=800, schools=50, seed=3):
    """Children in classes (``cls``, a label reused across schools) in schools; weights, an offset."""
    df = simulate_nested(children, schools, 5, seed=seed, shuffle=True, string_keys=True)
    rng = np.random.default_rng(seed)
    df = df.with_columns(cls=(pl.col("child").str.slice(1).cast(pl.Int64) % 4).cast(pl.String))
    classes = df.select("school", "cls").unique().sort("school", "cls")
    classes = classes.with_columns(effect=rng.normal(0.0, 0.6, classes.height))  # a real class effect
    df = df.join(classes, on=["school", "cls"], how="left", maintain_order="left")
    return df.with_columns(y=pl.col("y") + pl.col("effect"), w=rng.uniform(0.5, 2.0, df.height),
                           off=0.1 * pl.col("t")).drop("effect")


@pytest.fixture(scope="module")
def nested_files(tmp_path_factory):
    return [str(p) for p in write_parquet(nested_frame(), tmp_path_factory.mktemp("nested") / "data", files=4)]


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(autouse=True)
def backend_start(monkeypatch):
    """Stand-in for the hook bigmixed.model needs: resident statistics (``built.stats`` None) take
    the moment start of several terms from the backend, as the single-machine fit takes it from
    its statistics.  A no-op once model.py does it itself, or if it does not use a moment start."""
    if not hasattr(bm.model, "moment_start"):
        return
    original = bm.model.MixedLM._start

    def start(self, start_params, tmap, scaling):
        b = self._built
        if start_params is None and b.stats is None and len(b.terms) > 1 and hasattr(b.backend, "moment_start"):
            return b.backend.moment_start(tmap)
        return original(self, start_params, tmap, scaling)

    monkeypatch.setattr(bm.model.MixedLM, "_start", start)


def model(data, client=None, formula=FORMULA, **kw):
    return bm.MixedLM(formula, data, spec=spec_from_lmer(formula), client=client, **kw)


@pytest.fixture(scope="module")
def local(files):
    return model(files)


@pytest.fixture(scope="module")
def resident(files, client):
    return model(files, client, distributed_mode="resident")


@pytest.fixture(scope="module")
def nested_local(nested_files):
    return model(nested_files, formula=NESTED)


@pytest.fixture(scope="module")
def nested_resident(nested_files, client):
    return model(nested_files, client, NESTED, distributed_mode="resident")


def assert_same(res, ref, rtol=RTOL):
    """Estimates, objective, theta and every term's BLUPs (joined by key) agree to ``rtol`` relative."""
    assert res.nobs == ref.nobs and res.n_groups == ref.n_groups and res.ngroups == ref.ngroups
    np.testing.assert_allclose(res.fe_params, ref.fe_params, rtol=rtol)
    np.testing.assert_allclose(res.bse_fe, ref.bse_fe, rtol=rtol)
    np.testing.assert_allclose(res.cov_re, ref.cov_re, rtol=rtol)
    np.testing.assert_allclose(res.theta, ref.theta, rtol=rtol, atol=rtol)
    assert res.scale == pytest.approx(ref.scale, rel=rtol)
    assert res.llf == pytest.approx(ref.llf, rel=rtol)
    assert res.objective == pytest.approx(ref.objective, rel=rtol)
    for k, term in enumerate(ref.model.built.terms):
        a, b = ref.random_effects_frame("polars", term=k), res.random_effects_frame("polars", term=k)
        assert a.height == b.height
        j = a.join(b, on=list(term.factors), suffix="_d")
        assert j.height == a.height  # the same keys
        for c in term.re_names:
            c = c if c not in term.factors else f"{c}_re"
            ref_b = j[c].to_numpy()
            # relative to the spread of the BLUPs: a BLUP near 0 has no relative digits to compare
            np.testing.assert_allclose(j[f"{c}_d"].to_numpy(), ref_b, rtol=rtol, atol=rtol * np.abs(ref_b).max())


# ------------------------------------------------------------------------------------ one term


@pytest.mark.parametrize("reml", [True, False])
def test_resident_matches_single_machine(local, resident, reml):
    assert resident.built.mode == "resident" and resident.built.layout == "single"
    assert resident.built.stats is None
    assert isinstance(resident.built.backend, bd.DistributedBackend)
    res = resident.fit(reml=reml)
    assert res.converged
    assert_same(res, local.fit(reml=reml))
    np.testing.assert_array_equal(res.group_sizes(), local.fit(reml=reml).group_sizes())


def test_resident_constrained_fit_transforms_on_workers(files, client, monkeypatch):
    # Independent intercept and slope via statsmodels' `free`: the model layer un-centres Z,
    # i.e. calls backend.transform_z, which runs on the workers.  The slope needs a mean far
    # from 0 for Z to be centred at all.
    f = "y ~ I(x + 1) + x2 + (I(x + 1) | subject)"
    resident = model(files, client, f, distributed_mode="resident")
    assert resident.built.scaling.z_shift.any()
    calls = []
    original = bd.DistributedBackend.transform_z
    monkeypatch.setattr(bd.DistributedBackend, "transform_z", lambda self, Ms: calls.append(Ms) or original(self, Ms))
    free = bm.MixedLMParams(np.ones(3), np.eye(2))
    assert_same(resident.fit(free=free), model(files, formula=f).fit(free=free))
    assert len(calls) == 1


def test_gathered_mode_is_a_local_fit(files, client, local):
    m = model(files, client)  # mode="auto": 2000 groups are far below the gather limit
    b = m.built
    assert b.mode == "gathered" and b.backend is None
    assert isinstance(b.stats, bm.stats.Statistics)
    assert b.groups.keys.equals(local.built.groups.keys)  # same sorted-key coding
    np.testing.assert_array_equal(b.stats.n, local.built.stats.n)
    for reml in (True, False):
        assert_same(m.fit(reml=reml), local.fit(reml=reml))


def test_auto_mode_keeps_large_statistics_on_workers(files, client, local):
    m = model(files, client, distributed_options={"gather_limit": 1000, "n_owners": 3})
    b = m.built
    assert b.mode == "resident" and b.stats is None and b.backend.n_groups == 2000
    assert len(b.backend.owners) == 3  # more owners than workers is fine
    assert_same(m.fit(), local.fit())


def test_dask_dataframe_input(files, client, local):
    ddf = dd.read_parquet(files)
    m = model(ddf, client, distributed_mode="resident")
    assert_same(m.fit(), local.fit())


def test_independent_effects_formula(files, client):
    f = "y ~ x + x2 + (x || subject)"
    assert_same(model(files, client, f, distributed_mode="resident").fit(), model(files, formula=f).fit())


def test_evaluations_move_only_small_partial_sums(resident, client):
    """Bytes leaving the workers per evaluation are O(p^2 q^2) per owner, not O(groups)."""
    res = resident.fit()
    per_eval = bytes_per_evaluation(client, res)
    assert per_eval < 4096, per_eval  # two owners x one packed array of sums
    assert per_eval < resident.built.backend.nbytes / 50


def bytes_per_evaluation(client, res, n=5) -> float:
    obj = res.objective_fn

    def sent():
        return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())

    before = sent()
    for k in range(n):
        obj(res.optimizer.theta * (1.0 + 0.01 * (k + 1)))
    return (sent() - before) / n


def test_write_random_effects(tmp_path, resident, local):
    res, ref = resident.fit(), local.fit()
    out = tmp_path / "ranef"
    out.mkdir()
    (out / "part-00099.parquet").write_bytes(b"stale file of an earlier run")
    paths = res.write_random_effects(out)
    assert len(paths) == len(resident.built.backend.owners)  # one file per partition
    assert sorted(os.listdir(out)) == sorted(p.name for p in paths)  # no temp or stale files
    written = pl.concat([pl.read_parquet(p) for p in paths]).sort("subject")
    expected = ref.random_effects_frame("polars")
    assert written["subject"].equals(expected["subject"])
    for c in res.exog_re_names:
        np.testing.assert_allclose(written[c], expected[c], rtol=RTOL, atol=RTOL * expected[c].abs().max())
    # the local path writes one file with the same content
    (lp,) = ref.write_random_effects(tmp_path / "local")
    assert pl.read_parquet(lp).equals(expected)


def test_stateful_transform_learns_from_all_rows(files, client):
    f = "y ~ scale(x) + x2 + (x | subject)"
    assert_same(model(files, client, f, distributed_mode="resident").fit(), model(files, formula=f).fit())


def test_weights_offset_and_dropped_rows(client, tmp_path):
    """Precision weights (some 0), an offset and a missing response: the same rows, sums and fit."""
    df = simulate(600, 8, seed=5, shuffle=True)
    rng = np.random.default_rng(5)
    w = rng.uniform(0.2, 3.0, df.height)
    w[::97] = 0.0
    y = df["y"].to_numpy().copy()
    y[5::211] = np.nan
    df = df.with_columns(w=w, off=0.5 * df["x2"], y=y)
    paths = [str(p) for p in write_parquet(df, tmp_path / "w", files=3)]
    f = "y ~ x + x2 + offset(off) + (x | subject)"
    with pytest.warns(bm.pipeline.DroppedRowsWarning):
        ref_model = model(paths, formula=f, weights="w")
    ref = ref_model.fit()
    for mode in ("resident", "gathered"):
        with pytest.warns(bm.pipeline.DroppedRowsWarning):
            m = model(paths, client, f, weights="w", distributed_mode=mode)
        assert m.built.mode == mode
        assert m.built.n_dropped == ref_model.built.n_dropped > 0
        assert m.built.dropped_by_column == ref_model.built.dropped_by_column
        assert m._sum_log_w() == pytest.approx(ref_model._sum_log_w(), rel=1e-12)
        assert_same(m.fit(), ref)


def test_errors(files, client, tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        bd.build_distributed(client, files, spec_from_lmer(FORMULA), mode="everywhere")
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        bd.build_distributed("tcp://localhost:8786", files, spec_from_lmer(FORMULA))
    with pytest.raises(ValueError, match="no file matches"):
        model("/nonexistent/dir/*.parquet", client)
    with pytest.raises(ValueError, match="names no column"):
        model(files, client, "y ~ x + nope + (1 | subject)")


def test_missing_dask_gives_one_clear_message():
    code = ("import sys; sys.modules['dask'] = None; sys.modules['dask.distributed'] = None\n"
            "try:\n    import bigmixed.distributed\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install bigmixed[dask]" in out


def test_warm_start_sample_is_the_same_on_the_cluster(local, resident, monkeypatch):
    """The warm-start subsample is chosen by key hash, so owners pick the single-machine groups."""
    from bigmixed import optimize

    monkeypatch.setattr(optimize, "WARM_GROUPS_MIN", 100)  # 2000 groups: a sample of ~125
    ref = local.fit()
    res = resident.fit()
    assert "Newton" in ref.optimizer.message and "Newton" in res.optimizer.message
    assert_same(res, ref)
    sub_local = ref.objective_fn.subsample(100).backend
    sub_dist = res.objective_fn.subsample(100).backend
    for a in ("A", "B", "c", "n", "XtX", "Xty"):
        np.testing.assert_allclose(getattr(sub_dist.stats, a), getattr(sub_local.stats, a), rtol=1e-12, atol=1e-12)
    assert sub_dist.stats.yty == pytest.approx(sub_local.stats.yty, rel=1e-12)


def test_files_differing_in_unused_columns(client, tmp_path):
    df = simulate(400, 5, seed=12)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    df.slice(0, 1000).write_parquet(a)
    df.slice(1000).with_columns(extra=pl.lit(2.0)).write_parquet(b)
    res = model([str(b), str(a)], client, distributed_mode="resident").fit()
    assert res.objective == pytest.approx(model(df).fit().objective, rel=RTOL)
    with pytest.raises(ValueError, match=r"a\.parquet' lacks column\(s\) \['extra'\]"):
        model([str(a), str(b)], client, formula="y ~ x + extra + (x | subject)")


# ------------------------------------------------------------------------------------ nested terms


@pytest.mark.parametrize("reml", [True, False])
def test_nested_resident_and_gathered_match_single_machine(nested_local, nested_resident, nested_files, client,
                                                           reml):
    """Three nested terms (child in school:cls in school), one of them a composite key."""
    b, lb = nested_resident.built, nested_local.built
    assert lb.layout == "nested"
    assert b.mode == "resident" and b.layout == "nested" and b.stats is None
    assert b.chain == lb.chain
    assert b.backend.n_units == lb.terms[lb.chain[-1]].n_levels  # owners hold whole schools
    assert b.backend.n_groups == lb.terms[lb.chain[0]].n_levels
    ref = nested_local.fit(reml=reml)
    res = nested_resident.fit(reml=reml)
    assert res.converged
    assert_same(res, ref)
    gathered = model(nested_files, client, NESTED, distributed_mode="gathered")
    g = gathered.built
    assert g.mode == "gathered" and g.layout == "nested" and g.chain == lb.chain
    for k in range(3):
        assert g.terms[k].index.frame().equals(lb.terms[k].index.frame())  # the same level coding
        np.testing.assert_array_equal(g.stats.terms[k].n, lb.stats.terms[k].n)
        np.testing.assert_array_equal(b.backend.group_sizes(k), lb.stats.terms[k].n)
    tmap = ref.tmap  # the resident start equals the single-machine one
    np.testing.assert_allclose(b.backend.moment_start(tmap), nested_local.fit().objective_fn.backend.moment_start(tmap),
                               rtol=1e-12, atol=1e-12)
    for pg, pl_ in zip(g.stats.pairs, lb.stats.pairs):
        assert (pg.k, pg.j) == (pl_.k, pl_.j)
        np.testing.assert_array_equal(pg.jcodes, pl_.jcodes)
    assert_same(gathered.fit(reml=reml), res)  # resident == gathered


def test_nested_weights_and_offset(nested_files, client):
    f = "y ~ t + offset(off) + (t | child) + (1 | school)"
    ref = model(nested_files, formula=f, weights="w").fit()
    for mode in ("resident", "gathered"):
        m = model(nested_files, client, f, weights="w", distributed_mode=mode)
        assert m.built.layout == "nested" and m.built.mode == mode
        assert_same(m.fit(), ref)


def test_nested_predictions_and_written_random_effects(nested_local, nested_resident, nested_files, tmp_path):
    ref, res = nested_local.fit(), nested_resident.fit()
    new = pl.read_parquet(nested_files[0]).head(500)
    np.testing.assert_allclose(res.predict(new), ref.predict(new), rtol=1e-10)
    k = res.terms.index("school:cls")  # a composite key, nested: written by the owners of its schools
    paths = res.write_random_effects(tmp_path / "cls", term=k)
    written = pl.concat([pl.read_parquet(p) for p in paths]).sort(["school", "cls"])
    expected = ref.random_effects_frame("polars", term=k).sort(["school", "cls"])
    assert written.select("school", "cls").equals(expected.select("school", "cls"))
    np.testing.assert_allclose(written["Intercept"], expected["Intercept"], rtol=RTOL,
                               atol=RTOL * expected["Intercept"].abs().max())


def test_dietox_pigs_in_litters(client, tmp_path):
    """lme4: lmer(Weight ~ Time + (1 | Pig) + (1 | Litter), dietox) - pigs nested in litters."""
    df = pl.from_pandas(bm.datasets.dietox()).sample(fraction=1.0, shuffle=True, seed=1)
    paths = [str(p) for p in write_parquet(df, tmp_path / "dietox", files=3)]
    f = "Weight ~ Time + (1 | Pig) + (1 | Litter)"
    ref = model(paths, formula=f).fit()
    res = model(paths, client, f, distributed_mode="resident")
    assert res.built.layout == "nested" and [res.built.terms[k].name for k in res.built.chain] == ["Pig", "Litter"]
    assert_same(res.fit(), ref)


def test_nested_warm_start_sample(nested_local, nested_resident, monkeypatch):
    from bigmixed import backends, optimize

    lb = nested_local.built
    want = lb.terms[lb.chain[0]].n_levels // 20  # in children: a sample of a few of the 50 schools
    monkeypatch.setattr(optimize, "WARM_GROUPS_MIN", want)
    monkeypatch.setattr(backends, "MIN_SAMPLE_UNITS", 2)
    monkeypatch.setattr(optimize, "WARM_FRACTION", 0.0)
    ref, res = nested_local.fit(), nested_resident.fit()
    assert "Newton" in ref.optimizer.message and res.optimizer.message == ref.optimizer.message
    assert_same(res, ref)
    sub_local = ref.objective_fn.subsample(want)
    sub_dist = res.objective_fn.subsample(want)
    assert sub_local is not None and sub_dist is not None
    a, b = sub_local.backend.stats, sub_dist.backend.stats
    assert a.N == b.N and a.yty == pytest.approx(b.yty, rel=1e-12)
    for ta, tb in zip(a.terms, b.terms):
        np.testing.assert_array_equal(ta.n, tb.n)
        np.testing.assert_allclose(tb.A, ta.A, rtol=1e-12, atol=1e-12)
    for pa, pb in zip(a.pairs, b.pairs):
        np.testing.assert_array_equal(pa.jcodes, pb.jcodes)


def test_nested_bytes_per_evaluation_do_not_grow_with_groups(nested_resident, client, tmp_path):
    big = write_parquet(nested_frame(children=4000, schools=400, seed=4), tmp_path / "big", files=4)
    m = model([str(p) for p in big], client, NESTED, distributed_mode="resident")
    small_bytes = bytes_per_evaluation(client, nested_resident.fit())
    big_res = m.fit()
    big_bytes = bytes_per_evaluation(client, big_res)
    assert m.built.backend.nbytes > 4 * nested_resident.built.backend.nbytes
    assert big_bytes < 1.1 * small_bytes + 256, (small_bytes, big_bytes)
    assert big_bytes < 8192 and big_bytes < m.built.backend.nbytes / 50


def test_nested_within_files_but_not_across_falls_back_to_crossed(client, tmp_path):
    """Each file nests children in schools, but some children sit in another school in another file."""
    df = nested_frame(children=300, schools=20, seed=6)
    paths = write_parquet(df, tmp_path / "x", files=3)
    moved = pl.read_parquet(paths[1]).with_columns(
        school=pl.when(pl.col("child").str.slice(1).cast(pl.Int64) % 7 == 0).then(pl.lit("s_other"))
        .otherwise(pl.col("school")))
    moved.write_parquet(paths[1])
    paths = [str(p) for p in paths]
    f = "y ~ t + (1 | child) + (1 | school)"
    ref_model = model(paths, formula=f)
    assert ref_model.built.layout == "crossed"
    with get_task_stream(client) as ts:
        m = model(paths, client, f)
    assert m.built.mode == "gathered" and m.built.layout == "crossed" and m.built.chain == ref_model.built.chain
    reads = [t["key"] for t in ts.data if "bigmixed-reduce" in str(t["key"])]
    assert len(reads) == len(paths)  # combined again as crossed from the same reduced partitions
    assert_same(m.fit(), ref_model.fit())
    with pytest.raises(ValueError, match="not across them"):
        model(paths, client, f, distributed_mode="resident")


# ------------------------------------------------------------------------------------ crossed terms


def test_crossed_terms_are_gathered(client, tmp_path):
    df = simulate_crossed(300, 60, 3000, seed=2, string_keys=True)
    paths = [str(p) for p in write_parquet(df, tmp_path / "crossed", files=4)]
    f = "y ~ x + (1 | user) + (1 | item)"
    ref_model = model(paths, formula=f)
    assert ref_model.built.layout == "crossed"
    m = model(paths, client, f)
    b = m.built
    assert b.mode == "gathered" and b.layout == "crossed" and b.chain == ref_model.built.chain
    for p, q in zip(b.stats.pairs, ref_model.built.stats.pairs):
        assert (p.k, p.j) == (q.k, q.j)
        np.testing.assert_array_equal(p.kcodes, q.kcodes)
        np.testing.assert_array_equal(p.jcodes, q.jcodes)
        np.testing.assert_allclose(p.vals, q.vals, rtol=1e-12)
    assert_same(m.fit(), ref_model.fit())
    with pytest.raises(ValueError, match="'user' and 'item' are crossed"):
        model(paths, client, f, distributed_mode="resident")


# ------------------------------------------------------------------------------------ last: kills a worker


def test_worker_killed_mid_fit_gives_identical_result(resident, local, client, monkeypatch):
    """SIGKILL the worker holding an owner during the 3rd evaluation; Dask recomputes its statistics."""
    undisturbed = resident.fit()
    backend = resident.built.backend
    victim = next(iter(client.who_has([backend.owners[0]]).values()))[0]
    pid = client.run(os.getpid, workers=[victim])[victim]
    original = bd.DistributedBackend._map
    calls = []

    def map_(self, fn, *args, **kwargs):  # every evaluation maps over the owners
        calls.append(fn.__name__)
        if len(calls) == 3:  # kill while this evaluation's tasks are being submitted
            threading.Thread(target=os.kill, args=(pid, signal.SIGKILL)).start()
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(bd.DistributedBackend, "_map", map_)
    with get_task_stream(client) as ts:
        res = resident.fit()
    monkeypatch.undo()
    assert len(calls) > 3 and calls[2] == "_evaluate_task"
    recomputed = [t["key"] for t in ts.data if "bigmixed-reduce" in str(t["key"])]
    assert recomputed, "the lost statistics were not recomputed from their lineage"
    owner = backend.owners[0]
    assert victim not in client.who_has([owner])[owner.key]  # it lives elsewhere now
    # bit-identical to the undisturbed fit, and equal to the single-machine fit
    assert res.llf == undisturbed.llf
    np.testing.assert_array_equal(res.theta, undisturbed.theta)
    np.testing.assert_array_equal(res.fe_params, undisturbed.fe_params)
    assert res.random_effects_frame().equals(undisturbed.random_effects_frame())
    assert_same(res, local.fit())
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker
