"""The backend of crossed terms: the leading term in closed form per level, the others in one dense block.

DESIGN.md section 8 and :mod:`bigmixed._kernels._crossed` give the algebra; this class lays the
statistics out for the kernels (the dense positions, the sparse ``A_R`` block rows, the leading
level's pairs and the threads' row ranges) and runs the factorisation per theta with LAPACK on one
reused ``m x m`` buffer (the factor, then the inverse in its place).  It answers the calls of :class:`bigmixed.backends.StatsBackend`.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas, lapack

from . import _kernels
from .backends import N_CHUNKS, Evaluation, NumericalError, _chunks, _lower_factor, _split
from .start import moment_start
from .stats import Statistics, blas_threads, default_threads
from .terms import check_crossed_memory, crossed_lead

__all__ = ["CrossedBackend"]


class CrossedBackend:
    """Crossed terms: leading term in closed form, the others in one dense block (:mod:`._crossed`).

    ``lead`` is the term with the most random effects (levels x q); the rest are laid out as
    ``m`` scalar random effects, term by term, level by level.
    """

    # True: the block kernel even when every term is scalar (tests compare the two)
    generic = False
    information = True  # spherical_modes, schur_columns: Newton steps with the average information

    def __init__(self, stats: Statistics, names: list[str] | None = None, nthreads: int | None = None) -> None:
        self.stats = stats
        self.names = names or [f"term {k}" for k in range(len(stats.terms))]
        self.nthreads = nthreads or default_threads()
        self.p, self.N = stats.p, stats.N
        self.XtX, self.Xty, self.yty = stats.XtX, stats.Xty, stats.yty
        self.qs = [t.q for t in stats.terms]
        self.n_groups = 0  # no warm-start sample
        K = len(stats.terms)
        levels_q = [(stats.terms[k].n_groups, self.qs[k]) for k in range(K)]
        check_crossed_memory(levels_q, self.names)
        self.lead = crossed_lead(levels_q)
        self.rest = [k for k in range(K) if k != self.lead]
        self._layout()
        self._cache = None
        self._om = None
        self._inverted = False  # the buffer holds Sigma_R, not the factor, of the cached forward
        self._rr = None  # Omega^-1 OmD of the cached forward, once the back-substitution needed it

    def _layout(self) -> None:
        st = self.stats
        lead = self.lead
        q0 = self.qs[lead]
        t0 = st.terms[lead]
        self.A0 = np.ascontiguousarray(t0.A)
        self.D0 = np.ascontiguousarray(np.concatenate([t0.c[:, :, None], t0.B], axis=2))
        self.pos = self._positions()
        self.Qr = int(self.qR.max())
        self._rest_blocks()
        self._lead_pairs(q0)
        self.scalar = q0 == 1 and self.Qr == 1
        per_level = np.diff(self.ptr).astype(float)
        self.chunks = _chunks(per_level + 1.0, N_CHUNKS)
        self._row_owners(self._row_chunks())

    def _positions(self) -> dict:
        """Dense-block position of each rest level: its term's levels by falling pair count.

        Block ``b`` (term by term, level by level) starts at ``bstart[b]``.  Ordering each term's
        levels by how many leading levels they share keeps the busiest rows and columns of the
        dense block together (Zipf-like popularity: a few items in most users' rows), so the
        per-level updates and Sigma gathers touch a cache-sized corner most of the time.  The
        factorisation does not depend on the order; results are reported per level as before.
        """
        st, lead = self.stats, self.lead
        counts = {k: np.zeros(st.terms[k].n_groups) for k in self.rest}
        for pr in st.pairs:
            if lead == pr.k:
                counts[pr.j] += np.bincount(pr.jcodes, minlength=counts[pr.j].size)
            elif lead == pr.j:
                counts[pr.k] += np.bincount(pr.kcodes, minlength=counts[pr.k].size)
        pos, bstart, bq, bterm, off = {}, [], [], [], 0
        for r, k in enumerate(self.rest):
            n, q = st.terms[k].n_groups, self.qs[k]
            rank = np.empty(n, dtype=np.int64)
            rank[np.argsort(-counts[k], kind="stable")] = np.arange(n)
            pos[k] = off + rank * q
            bstart.append(pos[k])
            bq.append(np.full(n, q))
            bterm.append(np.full(n, r))
            off += n * q
        self.m = off
        self.bstart = np.concatenate(bstart).astype(np.int64)
        self.bq = np.concatenate(bq).astype(np.int64)
        self.bterm = np.concatenate(bterm).astype(np.int64)
        self.qR = np.array([self.qs[k] for k in self.rest], dtype=np.int64)
        return pos

    def _rows_of(self, k: int, codes: np.ndarray) -> np.ndarray:
        """Dense-block rows ``(n, q_k)`` of levels ``codes`` of rest term ``k``."""
        return self.pos[k][codes][:, None] + np.arange(self.qs[k])[None, :]

    def _rest_blocks(self) -> None:
        """``A_R`` by block rows (both triangles, pairs between rest terms included) and ``D_R``.

        Block ``b`` is rest level ``b - boff[r]`` of rest term ``r``.  Only the blocks with
        entries are kept: each row has one level per term, so ``A_R`` is the rest terms'
        diagonal blocks and their pairs, however dense the factor of the update becomes.
        """
        st, Qr = self.stats, self.Qr
        boff = np.concatenate(([0], np.cumsum([st.terms[k].n_groups for k in self.rest])))
        bidx = {k: boff[r] for r, k in enumerate(self.rest)}
        rows, cols, vals = [], [], []

        def put(bi, bj, v):  # v (n, q_i, q_j), padded to (Qr, Qr)
            w = np.zeros((bi.size, Qr, Qr))
            w[:, :v.shape[1], :v.shape[2]] = v
            rows.append(bi)
            cols.append(bj)
            vals.append(w)

        self.DR = np.zeros((self.m, self.p + 1))
        for k in self.rest:
            t = st.terms[k]
            b = bidx[k] + np.arange(t.n_groups)
            put(b, b, t.A)
            idx = self._rows_of(k, np.arange(t.n_groups))
            self.DR[idx, 0] = t.c
            self.DR[idx, 1:] = t.B
        for pr in st.pairs:
            if self.lead not in (pr.k, pr.j):
                bk, bj = bidx[pr.k] + pr.kcodes, bidx[pr.j] + pr.jcodes
                put(bj, bk, pr.vals)
                put(bk, bj, np.swapaxes(pr.vals, 1, 2))
        bi, bj, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        nb = int(boff[-1])
        order = np.argsort(bi * nb + bj, kind="stable")
        bi, bj, v = bi[order], bj[order], v[order]
        first = np.ones(bi.size, dtype=bool)  # the same block twice (never from one pass) is summed
        first[1:] = (bi[1:] != bi[:-1]) | (bj[1:] != bj[:-1])
        starts = np.flatnonzero(first)
        self.arval = np.ascontiguousarray(np.add.reduceat(v, starts, axis=0))
        self.arcol = np.ascontiguousarray(bj[starts]).astype(np.int64)
        self.arptr = np.concatenate(([0], np.cumsum(np.bincount(bi[starts], minlength=nb)))).astype(np.int64)
        self.border = np.argsort(self.bstart, kind="stable").astype(np.int64)
        # clearing a row costs its position, writing it its blocks
        work = (self.bstart[self.border] + 1.0) * self.bq[self.border] + np.diff(self.arptr)[self.border]
        self.rchunks = _chunks(work.astype(float), N_CHUNKS)

    def _lead_pairs(self, q0: int) -> None:
        """The sparse L_21 pattern: pairs (leading level, rest level), sorted by level then row."""
        st, lead, Qr = self.stats, self.lead, self.Qr
        keys, cols, terms_, vals = [], [], [], []
        for pr in st.pairs:
            if lead not in (pr.k, pr.j):
                continue
            if pr.k == lead:
                lc, oc, v, other = pr.kcodes, pr.jcodes, pr.vals, pr.j
            else:
                lc, oc, v, other = pr.jcodes, pr.kcodes, np.swapaxes(pr.vals, 1, 2), pr.k
            W = v
            if v.shape[1] != Qr:  # padded to the widest rest term
                W = np.zeros((lc.size, Qr, q0))
                W[:, :self.qs[other], :] = v
            keys.append(lc)
            cols.append(self.pos[other][oc])
            terms_.append(np.full(lc.size, self.rest.index(other)))
            vals.append(W)
        def joined(parts: list, empty: np.ndarray) -> np.ndarray:  # no copy for the one pair list of two terms
            return parts[0] if len(parts) == 1 else (np.concatenate(parts) if parts else empty)

        lc = joined(keys, np.zeros(0, np.int64))
        pc = joined(cols, np.zeros(0, np.int64))
        self.ptr = np.concatenate(([0], np.cumsum(np.bincount(lc, minlength=st.terms[lead].n_groups)))).astype(np.int64)
        # rows ascending within a level (crossed_update writes below the diagonal)
        if lc.size and bool(np.all(lc[1:] >= lc[:-1])):  # one merged pair list: in level order already
            order = _kernels.order_within_runs(self.ptr, np.ascontiguousarray(pc, dtype=np.int64))
        else:  # two counting passes (rows, then levels): linear, the order of a stable sort by (level, row)
            order = _kernels.pair_order(np.ascontiguousarray(lc, dtype=np.int64), np.ascontiguousarray(pc, dtype=np.int64),
                                        st.terms[lead].n_groups, self.m)
        self.pcol = np.ascontiguousarray(pc[order]).astype(np.int64, copy=False)
        self.pterm = np.ascontiguousarray(joined(terms_, np.zeros(0, np.int64))[order]).astype(np.int64, copy=False)
        self.W = np.ascontiguousarray(joined(vals, np.zeros((0, Qr, q0)))[order], dtype=float)

    def _row_chunks(self) -> np.ndarray:
        """Row ranges of the dense update, whole blocks each, balancing the (pairs in level)^2 work."""
        rank = np.arange(self.pcol.size) - np.repeat(self.ptr[:-1], np.diff(self.ptr))
        work = np.bincount(self.pcol, weights=rank + 1.0, minlength=self.m + 1)
        starts = np.sort(self.bstart)
        cut = _chunks(work[starts] + 1e-9, N_CHUNKS)
        return np.concatenate((starts[cut[:-1]], [self.m])).astype(np.int64)

    def _row_owners(self, row_chunks: np.ndarray) -> None:
        """Each row range's pairs, in level order, so a thread visits only the pairs it writes."""
        self.plev = np.repeat(np.arange(self.ptr.size - 1), np.diff(self.ptr)).astype(np.int64, copy=False)
        owner = np.searchsorted(row_chunks, self.pcol, side="right") - 1
        # at most N_CHUNKS owners: as 16-bit keys the stable sort is a radix sort (linear)
        key = owner.astype(np.int16) if row_chunks.size <= np.iinfo(np.int16).max else owner
        self.eorder = np.argsort(key, kind="stable").astype(np.int64, copy=False)
        counts = np.bincount(owner, minlength=row_chunks.size - 1)
        self.eptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)

    def _blas(self):
        """All threads for LAPACK on a large dense block (the fit otherwise runs BLAS single-threaded)."""
        import contextlib

        return blas_threads(self.nthreads) if self.m >= 256 else contextlib.nullcontext()

    def _lamR(self, lams) -> np.ndarray:
        out = np.zeros((len(self.rest), self.Qr, self.Qr))
        for r, k in enumerate(self.rest):
            q = self.qs[k]
            out[r, :q, :q] = lams[k]
        return out

    def _buffer(self) -> np.ndarray:
        """The dense block: one ``(m, m)`` C-ordered array reused by every evaluation.

        It holds Omega's lower triangle, then its factor, then (for the gradient) its inverse:
        LAPACK works on the transpose (a Fortran-ordered view, upper triangle) in place, so
        nothing is copied, no fresh memory is touched per evaluation, and one matrix is all the
        block ever takes (:func:`bigmixed.terms.dense_bytes`).
        """
        if self._om is None:
            self._om = np.zeros((self.m, self.m))
        return self._om

    def _forward(self, lams):
        key = tuple(np.asarray(L).tobytes() for L in lams)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self._cache = None  # the buffer is about to change
        self._inverted = False
        self._rr = None
        lam0 = np.ascontiguousarray(lams[self.lead], dtype=float)
        lamR = self._lamR(lams)
        ld, SFD, L, P, V, ok = _kernels.crossed_forward(self.A0, self.D0, lam0, self.ptr, self.pterm, self.W, lamR,
                                                        self.qR, self.chunks)
        if not ok.all():
            raise NumericalError("a block of Lambda' Z'Z Lambda + I is not positive definite")
        Om = self._buffer()
        OmD = np.empty((self.m, self.p + 1))
        _kernels.rest_fill(Om, OmD, self.arptr, self.arcol, self.arval, self.DR, self.bstart, self.bq, self.bterm,
                           lamR, self.border, self.rchunks)
        _kernels.crossed_update(self.ptr, self.pcol, self.pterm, self.qR, V, P, self.plev, self.eorder, self.eptr,
                                Om, OmD)
        with self._blas():
            # Om's lower triangle is the upper one of its Fortran-ordered transpose: U'U = Omega, U = L'
            U, info = lapack.dpotrf(Om.T, lower=0, clean=0, overwrite_a=1)
            if info != 0:
                raise NumericalError("the dense block of the crossed terms is not positive definite")
            E, info = lapack.dtrtrs(U, OmD, lower=0, trans=1)
        logdet = float(ld.sum()) + 2.0 * float(np.sum(np.log(np.diag(U))))
        SFD = SFD.sum(axis=0) + E.T @ E
        res = (logdet, SFD, L, P, V, U, E, OmD, lam0, lamR)
        self._cache = (key, res)
        return res

    def _inverse(self, U: np.ndarray) -> np.ndarray:
        """Sigma_R = Omega^-1 in place of its factor, C-ordered with the lower triangle set (dpotri's upper).

        Kept for the theta of the factor: the gradient, the conditional modes and the average
        information at one theta share one inversion (the costliest step of an evaluation); the
        solves that follow at that theta use it (:meth:`_solve`) instead of the factor.
        """
        if self._inverted:
            return self._om
        with self._blas():
            inv, info = lapack.dpotri(U, lower=0, overwrite_c=1)
        if info != 0:
            raise NumericalError("the dense block of the crossed terms is singular")
        self._inverted = True
        return inv.T

    def _rest_solution(self, U: np.ndarray, E: np.ndarray, OmD: np.ndarray) -> np.ndarray:
        """``U^-1 E = Omega^-1 OmD`` at the cached theta, kept: the back-substitution and the
        spherical modes of the average information both start from it."""
        if self._rr is None:
            if self._inverted:
                rr = self._solve(U, OmD)
            else:
                with self._blas():
                    rr, info = lapack.dtrtrs(U, E, lower=0, trans=0)
                if info != 0:
                    raise NumericalError("the dense block of the crossed terms is singular")
            self._rr = np.ascontiguousarray(rr)
        return self._rr

    def _solve(self, U: np.ndarray, B: np.ndarray) -> np.ndarray:
        """``Omega^-1 B`` at the cached theta: by the factor, or by Sigma_R once it replaced the factor."""
        B = np.ascontiguousarray(B, dtype=float)
        vec = B.ndim == 1
        B2 = B[:, None] if vec else B
        with self._blas():
            if self._inverted:  # U's memory holds Sigma_R's upper triangle (Fortran order)
                X = blas.dsymm(1.0, U, B2, side=0, lower=0)
                info = 0
            else:
                X, info = lapack.dpotrs(U, B2, lower=0)
        if info != 0:
            raise NumericalError("the dense block of the crossed terms is singular")
        return X[:, 0] if vec else X

    def _backward(self, lams, grad, modes, g, cf, kappa, reml):
        logdet, SFD, L, P, V, U, E, OmD, lam0, lamR = self._forward(lams)
        RR = self._rest_solution(U, E, OmD)  # first: one triangular solve while the factor is there
        Sig = self._inverse(U)
        if self.scalar and not self.generic:
            GA0, S0, GC0, TR, GR, bh0, bc0 = _kernels.crossed_backward1(
                self.A0, self.D0, lam0, self.ptr, self.pcol, self.pterm, self.W, lamR, L, P, V, RR, Sig,
                self.chunks, bool(grad), bool(modes), g, cf, float(kappa), bool(reml), self.m)
        else:
            GA0, S0, GC0, TR, GR, bh0, bc0 = _kernels.crossed_backward(
                self.A0, self.D0, lam0, self.ptr, self.pcol, self.pterm, self.W, lamR, self.qR, L, P, V, RR, Sig,
                self.chunks, bool(grad), bool(modes), g, cf, float(kappa), bool(reml), self.m)
        GAr, Sr, GCr, bhr, bcr = _kernels.rest_pieces(
            self.arptr, self.arcol, self.arval, self.DR, RR, Sig,
            TR.sum(axis=0) if grad else np.zeros((self.m, 1)), GR.sum(axis=0) if grad else np.zeros((self.m, 1)),
            self.bstart, self.bq, self.bterm, lamR, len(self.rest), bool(grad), bool(modes), g, cf, float(kappa),
            bool(reml))
        return (GA0, S0, GC0, bh0, bc0), (GAr, Sr, GCr, bhr, bcr)

    def _assemble(self, lead_part, rest_parts) -> list:
        out = [None] * len(self.qs)
        out[self.lead] = lead_part
        for r, k in enumerate(self.rest):
            q = self.qs[k]
            out[k] = np.ascontiguousarray(rest_parts[r][:q, :q])
        return out

    def evaluate(self, lams, grad: bool) -> Evaluation:
        logdet, SFD, *_ = self._forward(lams)
        SF, Sg, Sh = _split(SFD)
        if not grad:
            return Evaluation(logdet, SF, Sg, Sh)
        g = np.zeros(self.p + 1)
        (GA0, S0, *_), (GAr, Sr, *_) = self._backward(lams, True, False, g, np.zeros((0, 0)), 0.0, False)
        return Evaluation(logdet, SF, Sg, Sh, self._assemble(GA0.sum(axis=0), GAr),
                          self._assemble(S0.sum(axis=0), Sr))

    def gradient(self, lams, beta, Finv, kappa, reml) -> list:
        g = np.concatenate(([1.0], -np.asarray(beta, dtype=float)))
        cf = _lower_factor(Finv)
        (_, _, GC0, *_), (_, _, GCr, *_) = self._backward(lams, True, False, g, cf, kappa, reml)
        return self._assemble(GC0.sum(axis=0), GCr)

    def conditional_modes(self, lams, beta) -> list:
        g = np.concatenate(([1.0], -np.asarray(beta, dtype=float)))
        (_, _, _, bh0, bc0), (_, _, _, bhr, bcr) = self._backward(lams, False, True, g, np.zeros((0, 0)), 0.0,
                                                                  False)
        out = [None] * len(self.qs)
        out[self.lead] = (bh0, bc0)
        start = 0
        for r, k in enumerate(self.rest):
            n, q = self.stats.terms[k].n_groups, self.qs[k]
            out[k] = (np.ascontiguousarray(bhr[start:start + n, :q]), np.ascontiguousarray(bcr[start:start + n, :q, :q]))
            start += n
        return out

    def spherical_modes(self, lams, beta) -> list:
        """Each term's spherical conditional modes ``u (levels, q)`` (``b = Lambda u``), by two solves.

        What :meth:`conditional_modes` computes first, without the conditional covariances (which
        need the inverse of the dense block): the rest's ``u_R = U^-1 E g``, the leading levels'
        ``u_i = L_i^-T (P_i g - sum_e V_e' u_R)``.
        """
        logdet, SFD, L, P, V, U, E, OmD, lam0, lamR = self._forward(lams)
        g = np.concatenate(([1.0], -np.asarray(beta, dtype=float)))
        # U^-1 E g, padded: a pair's block rows past its q are zero
        uR = np.concatenate((self._rest_solution(U, E, OmD) @ g, np.zeros(self.Qr)))
        t = P @ g  # (l0, q0)
        n0, q0 = t.shape
        if V.shape[1] == q0 == 1:  # (1 | a) + (1 | b): one pass over the pairs
            t -= _kernels.pair_sums(self.plev, self.pcol, V[:, 0, 0], uR[:, None], n0)
        else:
            vu = np.einsum("eab,ea->eb", V, uR[self.pcol[:, None] + np.arange(self.Qr)])
            for b in range(q0):  # bincount sums in pair order: the same bits every time
                t[:, b] -= np.bincount(self.plev, weights=vu[:, b], minlength=n0)
        out = [None] * len(self.qs)
        out[self.lead] = t / L[:, 0, :1] if q0 == 1 else np.linalg.solve(np.swapaxes(L, 1, 2), t[:, :, None])[:, :, 0]
        for k in self.rest:
            out[k] = uR[self._rows_of(k, np.arange(self.stats.terms[k].n_groups))]
        return out

    def schur_columns(self, lams, ext: list) -> tuple[np.ndarray, np.ndarray]:
        """Corrections for extra columns W beside ``[y X]``, from the factor at ``lams``.

        ``ext[k] (levels_k, q_k, K)`` holds ``Z_k' W`` per level of term k.  Returns ``(SWW (K, K),
        SWD (K, p + 1))`` with ``W'H^-1W = W'W - SWW`` and ``W'H^-1[y X] = W'[y X] - SWD``, as
        the evaluation's ``SFD`` is for ``[y X]`` (:mod:`bigmixed.information`).  The factor is
        not recomputed: the leading levels' pieces are ``L_i^-1 Lambda_0' Z_0'W``, the rest's
        ``Lambda_R' Z_R'W - sum_i V_i (...)``, solved with the dense block's factor (or its inverse).
        """
        logdet, SFD, L, P, V, U, E, OmD, lam0, lamR = self._forward(lams)
        Px = np.einsum("ba,gbk->gak", lam0, ext[self.lead])
        if Px.shape[1] == 1:
            Px /= L[:, :1, :1]
        else:
            Px = np.linalg.solve(L, Px)  # L_i lower triangular, q0 x q0
        SWW = np.einsum("gak,gal->kl", Px, Px)
        SWD = np.einsum("gak,gac->kc", Px, P)
        K = Px.shape[2]
        OmDx = np.zeros((self.m + self.Qr, K))  # padded: a pair's block rows past its q are zero
        for k in self.rest:
            rows = self._rows_of(k, np.arange(self.stats.terms[k].n_groups))
            OmDx[rows] = np.einsum("ba,nbk->nak", lams[k], ext[k])
        if V.shape[1] == V.shape[2] == 1:  # (1 | a) + (1 | b): every column in one pass over the pairs
            OmDx -= _kernels.pair_sums(self.pcol, self.plev, V[:, 0, 0], Px[:, 0, :], OmDx.shape[0])
        else:
            for a in range(self.Qr):  # bincount sums in pair order: the same bits every time
                for c in range(K):
                    w = np.einsum("eb,eb->e", V[:, a, :], Px[self.plev, :, c])
                    OmDx[:, c] -= np.bincount(self.pcol + a, weights=w, minlength=OmDx.shape[0])
        OmDx = OmDx[:self.m]
        T = self._solve(U, OmDx)  # with Ex = U^-T OmDx: Ex'Ex = OmDx' T and Ex'E = T' OmD
        W = OmDx.T @ T
        return SWW + 0.5 * (W + W.T), SWD + T.T @ OmD

    def subsample(self, level: int) -> None:
        return None  # crossed levels cannot be sampled independently

    def transform_z(self, Ms) -> "CrossedBackend":
        return CrossedBackend(self.stats.transform_z(Ms), self.names, self.nthreads)

    def moment_start(self, tmap) -> np.ndarray:
        return moment_start(self.stats, tmap, crossed=True)
