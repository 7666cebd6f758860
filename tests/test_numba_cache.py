"""A second Python process must load the compiled kernels from numba's cache, not recompile.

(A kernel numba cannot cache, e.g. one calling numba.get_num_threads() inside a
parallel function, would recompile in every process: ~60 s of start-up.)
"""

import json
import subprocess
import sys

SCRIPT = r"""
import json, warnings
warnings.simplefilter("error")  # "Cannot cache compiled function" is a NumbaWarning
import bigmixed as bm
from bigmixed import _kernels
from bigmixed.simulate import simulate
res = bm.lmer("Weight ~ Time + (Time | Pig)", bm.datasets.dietox())  # string keys
res.random_effects_frame()
res.fittedvalues
bm.lmer("y ~ x + x2 + (x | subject)", simulate(300, 5, seed=1))  # integer keys: the dense index
out = {}
for name in ["accumulate_records", "split_records", "_groups._fused_q2", "conditional_modes", "linear_predictor",
             "hash_levels", "mark_keys", "number_keys", "dense_codes", "hash_find"]:
    kernel = _kernels
    for part in name.split("."):  # the evaluation's entry point of q = 2 (objective_fused picks it)
        kernel = getattr(kernel, part)
    st = kernel.stats
    out[name] = [sum(st.cache_hits.values()), sum(st.cache_misses.values())]
print(json.dumps(out))
"""


def run():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_kernels_from_cache():
    run()  # may compile (cold cache) and write the cache
    second = run()
    for name, (hits, misses) in second.items():
        assert misses == 0, f"{name} was recompiled in a fresh process"
        assert hits >= 1, f"{name} was not loaded from the cache"
