"""Load the numba kernels of a fit from numba's on-disk cache while polars reads the first rows."""

from __future__ import annotations

import numpy as np

__all__ = ["Warmup"]


class Warmup:
    """Load the numba kernels of a fit from the on-disk cache (~0.3 s) in a background thread.

    The statistics kernel first, while polars reads the prototype and indexes the
    keys (``wait_statistics`` before its first real call); then the objective's
    kernels, during the pass over the rows, but only under a thread-safe numba
    threading layer (omp, tbb): under ``workqueue`` two threads must never run
    parallel kernels at once, so the thread stops there.  ``join`` before the fit.
    """

    def __init__(self, nthreads: int | None, q: int = 1) -> None:
        import threading

        self.nthreads = nthreads
        self.q = max(int(q), 1)  # the evaluation kernel has one entry point per q: load the model's
        self._stats_ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bigmixed-warm")
        self._thread.start()

    def _run(self) -> None:
        from .stats import Statistics

        try:
            q = self.q
            st = Statistics.empty(2, 1, q)
            st.add_rows(np.array([0, 0, 1, 1]), np.ones((4, 1), order="F"), np.ones((4, q), order="F"),
                        np.array([1.0, 2.0, 4.0, 3.5]), self.nthreads)
        except Exception:  # only a warm-up: the real call reports any problem
            return
        finally:
            self._stats_ready.set()
        try:
            import numba

            if numba.threading_layer() not in ("omp", "tbb"):
                return
            from .backends import LocalBackend
            from .objective import Objective
            from .terms import ThetaMap

            be = LocalBackend(st, self.nthreads)
            tmap = ThetaMap(q)
            obj = Objective(be, tmap, True, 0.0)
            theta = tmap.start()
            obj(theta)
            obj.unprofiled(theta, 1.0)
            be.conditional_modes([np.eye(q)], np.zeros(1))
        except Exception:
            pass

    def wait_statistics(self) -> None:
        self._stats_ready.wait()

    def join(self) -> None:
        self._thread.join()
