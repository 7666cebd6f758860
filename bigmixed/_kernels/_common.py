"""Settings shared by the kernel modules."""

# cache=True: compiled once per environment (numba's on-disk cache); nogil: Dask worker
# threads and the warm-up thread run kernels concurrently; fastmath off: results must not
# depend on the order LLVM chooses for sums.
_JIT = dict(cache=True, nogil=True, fastmath=False)

# Sampling levels of groups whose rows' global sums are also kept (bigmixed.stats.SampleSums):
# level l holds ~1 group in 2^l; levels >= LEVEL_MAX share the last bucket.
LEVEL_MIN = 4
LEVEL_MAX = 12
