"""Fitting on a Dask cluster (issue 5): same numbers as the single-machine fit.

One module-scoped LocalCluster (2 worker processes, 1 thread each) and one
small data set: 2000 groups with string keys, rows shuffled over 6 parquet
files so every group is spread over several partitions.  Estimates,
log-likelihood and BLUPs (compared by key) must equal the single-machine fit
to 1e-10 relative, in both "resident" (statistics stay on the workers) and
"gathered" (merged on the driver) modes; a worker killed mid-fit must not
change a bit of the result.  The worker-kill test runs last: it restarts a worker.
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
from bigmixed.simulate import simulate, write_parquet

FORMULA = "y ~ x + x2 + (x | subject)"
RTOL = 1e-10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    df = simulate(2000, 10, seed=11, string_keys=True, shuffle=True)
    return [str(p) for p in write_parquet(df, tmp_path_factory.mktemp("dist") / "data", files=6)]


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


def model(data, client=None, formula=FORMULA, **kw):
    return bm.MixedLM(formula, data, spec=spec_from_lmer(formula), client=client, **kw)


@pytest.fixture(scope="module")
def local(files):
    return model(files)


@pytest.fixture(scope="module")
def resident(files, client):
    return model(files, client, distributed_mode="resident")


def assert_same(res, ref, rtol=RTOL):
    """Estimates, log-likelihood and BLUPs (joined by key) agree to ``rtol`` relative."""
    assert res.nobs == ref.nobs and res.n_groups == ref.n_groups
    np.testing.assert_allclose(res.fe_params, ref.fe_params, rtol=rtol)
    np.testing.assert_allclose(res.bse_fe, ref.bse_fe, rtol=rtol)
    np.testing.assert_allclose(res.cov_re, ref.cov_re, rtol=rtol)
    np.testing.assert_allclose(res.theta, ref.theta, rtol=rtol)
    assert res.scale == pytest.approx(ref.scale, rel=rtol)
    assert res.llf == pytest.approx(ref.llf, rel=rtol)
    assert res.objective == pytest.approx(ref.objective, rel=rtol)
    a, b = ref.random_effects_frame("polars"), res.random_effects_frame("polars")
    assert a.height == b.height
    j = a.join(b, on="subject", suffix="_d")
    assert j.height == a.height  # the same keys
    for c in res.exog_re_names:
        ref_b = j[c].to_numpy()
        # relative to the spread of the BLUPs: a BLUP near 0 has no relative digits to compare
        np.testing.assert_allclose(j[f"{c}_d"].to_numpy(), ref_b, rtol=rtol, atol=rtol * np.abs(ref_b).max())


@pytest.mark.parametrize("reml", [True, False])
def test_resident_matches_single_machine(local, resident, reml):
    assert resident.built.mode == "resident"
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
    monkeypatch.setattr(bd.DistributedBackend, "transform_z", lambda self, M: calls.append(M) or original(self, M))
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
    """Bytes leaving the workers per evaluation are O(p^2 + q^2) per owner, not O(groups)."""
    res = resident.fit()
    obj = res.objective_fn

    def sent():
        return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())

    before = sent()
    n = 5
    for k in range(n):
        obj(res.optimizer.theta * (1.0 + 0.01 * k))
    per_eval = (sent() - before) / n
    stats_bytes = resident.built.backend.nbytes
    assert per_eval < 4096, per_eval  # two owners x (pass 1 + pass 2 results)
    assert per_eval < stats_bytes / 50


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


def test_errors(files, client):
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
    assert len(calls) > 3 and calls[2] in ("_fused_task", "_pass1_task")
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
