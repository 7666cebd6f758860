"""Parametric bootstrap (lme4's ``bootMer``) from the statistics alone: the rows are never read again.

Under the fitted model ``y = X beta + Z b + e`` (b ~ N(0, sigma^2 Lambda Lambda'), e ~ N(0, sigma^2 I),
for the transformed rows the statistics hold; with weights these are the rows times sqrt(w), whose
residual covariance is sigma^2 I) the design parts of the statistics - Z'Z, Z'X, X'X - do not change
with y.  Only ``c = Z'y``, ``X'y`` and ``y'y`` do, and their joint law given the design is exact per
block of random effects (a group; an outer group of nested terms; all of them for crossed terms,
:func:`design_blocks`).  Split each block's residuals with the projection P on the
columns of its Z (``A = Z'Z = V diag(l) V'``)::

    Z'e       = sigma V l^(1/2) w                     w ~ N(0, I)
    X'P e     = B' A^+ Z'e = sigma B' V l^(-1/2) w    ||P e||^2 = sigma^2 |w|^2 (l > 0)
    X'(I-P)e  = r ~ N(0, sigma^2 Q),  Q = X'X - sum B'A^+B  (independent of every w)
    ||(I-P)e||^2 = r'Q^+ r + sigma^2 chi^2(N - sum rank A - rank Q)

so a replicate draws b, w per block and r, the chi-square once; nothing per row, and no per-level
X'X is needed.  Each replicate is refitted with the fit's REML/ML criterion by Newton steps from the
fit's theta with its Hessian (BFGS-updated; L-BFGS-B if that does not converge), in parallel threads
(the numba kernels release the GIL; each worker runs them on one thread).  Replicate ``r`` draws from
its own stream ``SeedSequence(seed).spawn(nsim)[r]``: results do not depend on the number of threads.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numba import njit

from . import inference
from .backends import make_backend
from .objective import NumericalError, Objective
from .optimize import hessian, minimize
from .stats import Statistics, TermStats

__all__ = ["bootstrap", "Blocks", "design_blocks"]

# Padded per-group blocks (nested terms) may hold at most this many doubles per array.
_MAX_BLOCK_ELEMENTS = 50_000_000
NEWTON_MAXITER = 25
# A replicate's refit stops when the Newton decrement g'H^-1g/2 is below this many deviance units and
# takes that last step: its estimates are then within ~1e-4 of their standard errors of the optimum.
NEWTON_ACCEPT = 1e-4
_EIG_TOL = 1e-10  # eigenvalues of a block's Z'Z below this fraction of its largest are 0 (rank)


# ----------------------------------------------------------------------------------- blocks of random effects
@dataclass
class Blocks:
    """The random effects laid out in independent blocks (padded to a common size ``m``).

    ``A (nb, m, m) = Z'Z``, ``B (nb, m, p) = Z'X``, ``c (nb, m) = Z'y`` of each block (transformed
    rows); ``term``, ``eff``, ``level`` (nb, m) name each column's term, effect and level (-1 for
    padding).  Columns of one level of a term are contiguous, in effect order.
    """

    A: np.ndarray
    B: np.ndarray
    c: np.ndarray
    term: np.ndarray
    eff: np.ndarray
    level: np.ndarray

    @property
    def m(self) -> int:
        return int(self.A.shape[1])

    def lam(self, lams: list) -> np.ndarray:
        """Block-diagonal Lambda of every block (nb, m, m)."""
        nb, m = self.term.shape
        out = np.zeros((nb, m, m))
        for k, L in enumerate(lams):
            q = L.shape[0]
            for b in range(q):
                bi, ci = np.nonzero((self.term == k) & (self.eff == b))
                for a in range(b, q):
                    if L[a, b] != 0.0:
                        out[bi, ci + (a - b), ci] = L[a, b]
        return out


def design_blocks(res) -> Blocks:
    """The blocks of the fitted model's random effects (see :class:`Blocks`).

    One block per level (one term), per outer level (nested terms), or one block of all random
    effects (crossed terms; at most :data:`bigmixed.inference.KR_MAX_DENSE`).

    Raises
    ------
    NotImplementedError
        Statistics not held in this process, or crossed terms with too many random effects.
    """
    be = res.objective_fn.backend
    st = getattr(be, "stats", None)
    if st is None:
        raise NotImplementedError("this needs the statistics in this process; statistics resident on Dask "
                                  "workers are not supported yet (fit with distributed_mode='gathered')")
    K = len(st.terms)
    layout = type(be).__name__
    if K == 1:
        roots = [np.arange(st.terms[0].n_groups)]
    elif layout == "NestedBackend":
        root = be.chain[-1]
        pair = {(pr.k, pr.j): pr for pr in st.pairs}
        roots = [np.arange(st.terms[k].n_groups) if k == root else pair[(k, root)].jcodes for k in range(K)]
    else:
        m = sum(t.n_groups * t.q for t in st.terms)
        if m > inference.KR_MAX_DENSE:
            desc = " + ".join(f"{t.n_groups:,} x {t.q}" for t in st.terms)
            raise NotImplementedError(
                f"crossed random effects: {m:,} random effects in all ({desc}), more than the "
                f"{inference.KR_MAX_DENSE:,} "
                "this computation handles as one dense block (m^3 work); Satterthwaite's df and the profile "
                "intervals work at any size")
        roots = [np.zeros(t.n_groups, dtype=np.int64) for t in st.terms]
    return _build_blocks(st, roots)


def _build_blocks(st, roots: list[np.ndarray]) -> Blocks:
    K = len(st.terms)
    qs = [t.q for t in st.terms]
    nt = [t.n_groups for t in st.terms]
    node_term = np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(nt)])
    node_level = np.concatenate([np.arange(n, dtype=np.int64) for n in nt])
    node_root = np.concatenate([np.asarray(r, dtype=np.int64) for r in roots])
    node_q = np.asarray(qs, dtype=np.int64)[node_term]
    order = np.lexsort((node_level, node_term, node_root))
    nb = int(node_root.max()) + 1 if node_root.size else 0
    q_sorted = node_q[order]
    r_sorted = node_root[order]
    csum = np.cumsum(q_sorted) - q_sorted
    first = np.searchsorted(r_sorted, np.arange(nb), side="left")
    off_sorted = csum - csum[first][r_sorted]
    size = np.bincount(r_sorted, weights=q_sorted, minlength=nb).astype(np.int64)
    m = int(size.max()) if nb else 0
    if nb * m * m > _MAX_BLOCK_ELEMENTS:
        raise NotImplementedError(f"the random effects form {nb:,} blocks of up to {m:,} effects; more than this "
                                  f"computation holds in memory ({_MAX_BLOCK_ELEMENTS:,} doubles per array)")
    offset = np.empty_like(off_sorted)
    offset[order] = off_sorted
    starts = np.concatenate(([0], np.cumsum(nt)))
    off_of = [offset[starts[k]:starts[k + 1]] for k in range(K)]
    root_of = [node_root[starts[k]:starts[k + 1]] for k in range(K)]
    p = st.p
    A = np.zeros((nb, m, m))
    B = np.zeros((nb, m, p))
    c = np.zeros((nb, m))
    term = np.full((nb, m), -1, dtype=np.int64)
    eff = np.full((nb, m), -1, dtype=np.int64)
    level = np.full((nb, m), -1, dtype=np.int64)
    for k, t in enumerate(st.terms):
        q = qs[k]
        rb, cols = root_of[k][:, None], off_of[k][:, None] + np.arange(q)[None, :]
        A[rb[:, :, None], cols[:, :, None], cols[:, None, :]] = t.A
        B[rb, cols, :] = t.B
        c[rb, cols] = t.c
        term[rb, cols] = k
        eff[rb, cols] = np.arange(q)[None, :]
        level[rb, cols] = np.arange(t.n_groups)[:, None]
    for pr in st.pairs:  # Z_j'Z_k blocks: rows of j's level, columns of k's level
        rk, rj = root_of[pr.k][pr.kcodes], root_of[pr.j][pr.jcodes]
        if pr.n_pairs and not np.array_equal(rk, rj):  # pragma: no cover - the layouts guarantee it
            raise ValueError("a pair of levels spans two blocks")
        ck = off_of[pr.k][pr.kcodes][:, None] + np.arange(qs[pr.k])[None, :]
        cj = off_of[pr.j][pr.jcodes][:, None] + np.arange(qs[pr.j])[None, :]
        rb = rk[:, None, None]
        np.add.at(A, (rb, cj[:, :, None], ck[:, None, :]), pr.vals)
        np.add.at(A, (rb, ck[:, :, None], cj[:, None, :]), np.swapaxes(pr.vals, 1, 2))
    return Blocks(A, B, c, term, eff, level)


@dataclass
class _Design:
    """What every replicate shares: the design statistics and the square roots of their covariances."""

    blocks: object
    Lam: np.ndarray  # (nb, m, m) fitted Lambda~ per block
    Ahalf: np.ndarray  # (nb, m, m) V l^(1/2)
    Pw: np.ndarray  # (nb, p, m) B' V l^(-1/2)  (0 on zero eigenvalues)
    pos: np.ndarray  # (nb, m) eigenvalue > 0
    Qhalf: np.ndarray  # (p, p)
    rankQ: int
    df_rest: int
    beta: np.ndarray
    sigma: float
    identity: bool  # one term: block b is level b, column j effect j


def _design(res) -> _Design:
    blk = design_blocks(res)
    st = res.objective_fn.backend.stats
    sol = res._sol
    A, B = blk.A, blk.B
    lam, V = np.linalg.eigh(A)
    top = np.maximum(lam.max(axis=1, keepdims=True), 1e-300)
    pos = lam > _EIG_TOL * top
    root = np.where(pos, np.sqrt(np.where(pos, lam, 1.0)), 0.0)
    inv_root = np.where(pos, 1.0 / np.where(pos, root, 1.0), 0.0)
    Ahalf = V * root[:, None, :]
    Pw = np.einsum("bmi,bmn,bn->bin", B, V, inv_root, optimize=True)
    Q = st.XtX - np.einsum("bin,bjn->ij", Pw, Pw, optimize=True)
    lq, Vq = np.linalg.eigh(0.5 * (Q + Q.T))
    posq = lq > _EIG_TOL * max(float(lq.max()) if lq.size else 0.0, 1e-300)
    Qhalf = Vq[:, posq] * np.sqrt(lq[posq])[None, :]
    df_rest = int(st.N) - int(pos.sum()) - int(posq.sum())
    identity = len(st.terms) == 1 and blk.m == st.terms[0].q
    return _Design(blk, np.ascontiguousarray(blk.lam(sol.lams)), np.ascontiguousarray(Ahalf), np.ascontiguousarray(Pw),
                   pos, Qhalf, int(posq.sum()), max(df_rest, 0), np.asarray(sol.beta, dtype=float),
                   float(np.sqrt(sol.sigma2)), identity)


@njit(cache=True, nogil=True)
def _draw_blocks(Lam, Ahalf, A, B, Pw, beta, sigma, z, w):  # pragma: no cover - compiled
    """Per block: u = sigma Lam z, e = sigma Ahalf w, c = A u + B beta + e; and the sums y'y and X'y need."""
    nb, m = z.shape
    p = B.shape[2]
    c = np.empty((nb, m))
    Bu = np.zeros(p)
    Pww = np.zeros(p)
    uAu = 0.0
    ue = 0.0
    u = np.empty(m)
    e = np.empty(m)
    for b in range(nb):
        for i in range(m):
            ui = 0.0
            ei = 0.0
            for j in range(m):
                ui += Lam[b, i, j] * z[b, j]
                ei += Ahalf[b, i, j] * w[b, j]
            u[i] = sigma * ui
            e[i] = sigma * ei
        for i in range(m):
            ci = e[i]
            for j in range(m):
                ci += A[b, i, j] * u[j]
            for k in range(p):
                ci += B[b, i, k] * beta[k]
            c[b, i] = ci
            uAu += u[i] * (ci - e[i])
            ue += u[i] * e[i]
            for k in range(p):
                Bu[k] += B[b, i, k] * u[i]
                Pww[k] += Pw[b, k, i] * w[b, i]
        for i in range(m):  # (ci - e[i]) above included B beta: take it out of u'Au
            bb = 0.0
            for k in range(p):
                bb += B[b, i, k] * beta[k]
            uAu -= u[i] * bb
    return c, Bu, Pww, uAu, ue


def _simulate(d: _Design, st: Statistics, rng: np.random.Generator):
    """One draw of the y-dependent statistics: per-term c, X'y, y'y (transformed rows)."""
    blk, s = d.blocks, d.sigma
    nb, m = blk.term.shape
    z = rng.standard_normal((nb, m))
    w = rng.standard_normal((nb, m)) * d.pos
    c, Bu, Pww, uAu, ue = _draw_blocks(d.Lam, d.Ahalf, blk.A, blk.B, d.Pw, d.beta, s, z, w)
    xi = rng.standard_normal(d.rankQ)
    Xe = s * Pww + s * (d.Qhalf @ xi)
    Xty = Bu + st.XtX @ d.beta + Xe
    ee = s * s * (float(np.sum(w * w)) + float(xi @ xi) + (rng.chisquare(d.df_rest) if d.df_rest > 0 else 0.0))
    yty = (float(d.beta @ st.XtX @ d.beta) + 2.0 * float(d.beta @ Bu) + uAu
           + 2.0 * (float(d.beta @ Xe) + ue) + ee)
    if d.identity:
        return [c], Xty, yty
    cs = []
    for k, t in enumerate(st.terms):
        ck = np.zeros((t.n_groups, t.q))
        sel = blk.term == k
        ck[blk.level[sel], blk.eff[sel]] = c[sel]
        cs.append(ck)
    return cs, Xty, yty


def _layout(be) -> tuple[str, list | None]:
    name = type(be).__name__
    if name == "LocalBackend":
        return "single", None
    if name == "NestedBackend":
        return "nested", list(be.chain)
    return "crossed", None


def _replicate_backend(res, st: Statistics, cs, Xty, yty):
    be = res.objective_fn.backend
    terms = [TermStats(t.A, t.B, np.ascontiguousarray(c), t.n, None, None) for t, c in zip(st.terms, cs)]
    new = Statistics(terms, st.XtX, np.ascontiguousarray(Xty), float(yty), st.N, st.pairs, None, st.sample_term,
                     st.sum_log_w)
    layout, chain = _layout(be)
    return make_backend(new, layout, chain, [t.name for t in res._terms], getattr(be, "nthreads", None))


def _newton(obj: Objective, theta0: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Newton steps with BFGS updates of H from theta0: ``(theta, last_step, converged)``.

    Once the Newton decrement ``g'H^-1g / 2`` is below ``NEWTON_ACCEPT`` the last step is not
    evaluated: the answer is ``theta + last_step`` (its error is of the order of the decrement squared).
    """
    theta = theta0.copy()
    try:
        f, g = obj(theta)
    except NumericalError:
        return theta, None, False
    for _ in range(NEWTON_MAXITER):
        try:
            step = -np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            return theta, None, False
        slope = float(g @ step)
        if slope >= 0.0:
            return theta, None, False
        if -0.5 * slope <= NEWTON_ACCEPT:
            return theta, step, True
        t = 1.0
        for _ in range(6):
            try:
                fn, gn = obj(theta + t * step)
            except NumericalError:
                fn, gn = np.inf, g
            if np.isfinite(fn) and fn <= f + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            return theta, None, False
        s_, y_ = t * step, gn - g
        sy = float(s_ @ y_)
        if sy > 1e-12 * float(np.linalg.norm(s_) * np.linalg.norm(y_)):
            Hs = H @ s_
            H = H - np.outer(Hs, Hs) / float(s_ @ Hs) + np.outer(y_, y_) / sy
        theta, f, g = theta + s_, fn, gn
    return theta, None, False


def _estimates_after_step(obj: Objective, theta: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, float]:
    """beta~ and sigma~^2 at theta + step, to first order from the evaluation at theta (no new pass).

    ``D = [y | X]``, ``d(D'V^-1D sigma^2)/dLambda_ab = -(S_ab + S_ab')`` (the fused pass's tensors): F, g, h
    are moved along the step; the error is of the order of the step squared, and the step is the last
    Newton step (decrement below ``NEWTON_ACCEPT``).
    """
    s = obj.solve(theta)
    if s.S is None or s.exact:
        return _estimates(obj, theta + step)
    tmap = obj.map
    g = s.F @ s.beta
    W = np.zeros((s.F.shape[0] + 1,) * 2)
    W[1:, 1:] = s.F
    W[1:, 0] = W[0, 1:] = g
    W[0, 0] = s.r2 + float(g @ s.beta)
    for i in range(tmap.size):
        k = int(tmap.term_of[i])
        tt = tmap.terms[k]
        loc = i - int(tmap.offsets[k])
        Sab = s.S[k][int(tt.rows[loc]), int(tt.cols[loc])]
        W -= step[i] * (Sab + Sab.T)
    beta = np.linalg.solve(W[1:, 1:], W[1:, 0]) if s.F.size else np.zeros(0)
    r2 = float(W[0, 0] - W[1:, 0] @ beta)
    if not (np.isfinite(r2) and r2 > 0):
        return _estimates(obj, theta + step)
    return beta, r2 / obj.dof


def _estimates(obj: Objective, theta: np.ndarray) -> tuple[np.ndarray, float]:
    """beta~ and sigma~^2 at theta from one pass without the gradient tensors."""
    be = obj.backend
    ev = be.evaluate(obj.map.lams(theta), False)
    F = be.XtX - ev.SF
    g = be.Xty - ev.Sg
    beta = np.linalg.solve(F, g) if F.size else np.zeros(0)
    r2 = float(be.yty - ev.Sh - g @ beta)
    if not (np.isfinite(r2) and r2 > 0 and np.all(np.isfinite(beta))):
        raise NumericalError("non-finite estimates")
    return beta, r2 / obj.dof


def bootstrap(res, nsim: int = 1000, seed: int | None = None, *, threads: int | None = None) -> pd.DataFrame:
    """Parametric bootstrap of every parameter: ``nsim`` refits to responses simulated from the fit.

    Parameters
    ----------
    res
        A fitted :class:`~bigmixed.results.MixedLMResults` (one term, nested or crossed terms;
        crossed with at most :data:`bigmixed.inference.KR_MAX_DENSE` random effects).
    nsim
        Number of replicates.
    seed
        Seed of :class:`numpy.random.SeedSequence`; the same seed gives the same replicates
        whatever ``threads`` is.
    threads
        Worker threads (default: numba's thread count); each runs its kernels on one thread.

    Returns
    -------
    pandas.DataFrame
        One row per replicate, one column per parameter named as :func:`bigmixed.profile.confint`
        names them (``sd_(Intercept)|Pig``, ``cor_...``, ``sigma``, fixed effects); a replicate whose
        refit failed is a row of NaN.  ``attrs``: ``t0`` (the fit's values), ``n_failed``,
        ``n_fallback`` (replicates that needed L-BFGS-B), ``seed``, ``seconds``.
    """
    from .profile import _params, sdcor_values

    nsim = int(nsim)
    if nsim < 1:
        raise ValueError(f"nsim must be a positive number of replicates, not {nsim!r}")
    t0 = time.perf_counter()
    be = res.objective_fn.backend
    st = getattr(be, "stats", None)
    if st is None:
        raise NotImplementedError("the parametric bootstrap needs the statistics in this process; statistics "
                                  "resident on Dask workers are not supported yet (fit with "
                                  "distributed_mode='gathered')")
    if any(tt.held for tt in res.tmap.terms):
        raise NotImplementedError("the bootstrap of a model with a variance held at a fixed value is not supported")
    d = _design(res)
    pars = _params(res)
    vpars = [p for p in pars if p.kind != "beta"]
    Tu = res.scaling.y_scale * res._T
    shift = np.zeros(len(res.exog_names))
    if res.scaling.x_intercept >= 0:
        shift[res.scaling.x_intercept] = res.scaling.y_shift
    theta_hat = np.asarray(res._sol.theta, dtype=float)
    # A diagonal theta at 0 is a stationary point for any data (DESIGN.md section 9): Newton steps from
    # there never leave it, so such fits are refitted by minimize(), from just off 0, with its probes.
    near_zero = res.tmap.is_diag & (np.abs(theta_hat) < 1e-3)
    start = np.where(near_zero, np.where(theta_hat < 0, -1e-3, 1e-3), theta_hat)
    newton_ok = bool(theta_hat.size) and not np.any(near_zero)
    if newton_ok:
        with np.errstate(all="ignore"):
            H0 = hessian(res.objective_fn, theta_hat)
        res.objective_fn.solve(theta_hat)
        try:
            np.linalg.cholesky(H0)
        except np.linalg.LinAlgError:
            newton_ok = False
    streams = np.random.SeedSequence(seed).spawn(nsim)
    out = np.full((nsim, len(pars)), np.nan)
    fallback = np.zeros(nsim, dtype=bool)

    def one(r: int) -> None:
        rng = np.random.Generator(np.random.PCG64(streams[r]))
        cs, Xty, yty = _simulate(d, st, rng)
        obj = Objective(_replicate_backend(res, st, cs, Xty, yty), res.tmap, res.reml, 0.0)
        try:
            theta, step, ok = _newton(obj, theta_hat, H0) if newton_ok else (theta_hat, None, False)
            if ok:
                beta, s2 = _estimates_after_step(obj, theta, step)
                theta = res.tmap.rectify(theta + step)
            else:
                fallback[r] = True
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    theta = res.tmap.rectify(minimize(obj, start, warm_start=False).theta)
                beta, s2 = _estimates(obj, theta)
        except (NumericalError, ValueError, np.linalg.LinAlgError):
            return
        out[r, :len(vpars)] = sdcor_values(res, vpars, theta, s2)
        out[r, len(vpars):] = Tu @ beta + shift

    if threads is None:
        import numba

        threads = int(numba.get_num_threads())
    threads = max(1, min(int(threads), nsim))
    chunks = [list(range(i, nsim, threads)) for i in range(threads)]

    def worker(idx: list[int]) -> None:
        import numba

        old = numba.get_num_threads()
        numba.set_num_threads(1)  # thread-local: this worker's kernels run on its own thread
        try:
            with np.errstate(all="ignore"):
                for r in idx:
                    one(r)
        finally:
            numba.set_num_threads(old)

    if threads == 1:
        worker(chunks[0])
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bigmixed-boot") as ex:
            list(ex.map(worker, chunks))
    names = [p.name for p in pars]
    frame = pd.DataFrame(out, columns=names)
    est = np.concatenate([sdcor_values(res, vpars, res._sol.theta, res._sol.sigma2), res.fixef.to_numpy()])
    failed = int(np.isnan(out).all(axis=1).sum())
    frame.attrs.update(t0=dict(zip(names, est.tolist())), n_failed=failed, n_fallback=int(fallback.sum()),
                       seed=seed, seconds=time.perf_counter() - t0)
    if failed:
        warnings.warn(f"{failed} of {nsim} bootstrap refits failed (rows of NaN)", RuntimeWarning, stacklevel=2)
    return frame
