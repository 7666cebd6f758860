"""Kernels over groups: the objective's passes and the conditional modes.

Each evaluation of the objective is one pass over the per-group statistics (two
for many fixed effects), never over rows.  See the package docstring
(:mod:`bigmixed._kernels`) for the conventions.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import _JIT

# --------------------------------------------------------------------------
# small dense helpers (inlined, q is a compile-time constant after inlining)
# --------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _chol_inplace(q, M):
    """Lower Cholesky of the SPD q x q matrix M, in place (upper part untouched)."""
    for j in range(q):
        s = M[j, j]
        for k in range(j):
            s -= M[j, k] * M[j, k]
        d = np.sqrt(s)
        M[j, j] = d
        for i in range(j + 1, q):
            t = M[i, j]
            for k in range(j):
                t -= M[i, k] * M[j, k]
            M[i, j] = t / d


@njit(inline="always", **_JIT)
def _build_M(q, A, i, lam, AL, M):
    """AL = A_i Lambda and M = Lambda' A_i Lambda + I (lower triangle filled)."""
    for a in range(q):
        for b in range(q):
            s = 0.0
            for k in range(q):
                s += A[i, a, k] * lam[k, b]
            AL[a, b] = s
    for a in range(q):
        for b in range(a + 1):
            s = 0.0
            for k in range(q):
                s += lam[k, a] * AL[k, b]
            M[a, b] = s
        M[a, a] += 1.0


@njit(inline="always", **_JIT)
def _chol_solve_vec(q, L, v):
    """Solve (L L') x = v in place."""
    for a in range(q):
        s = v[a]
        for k in range(a):
            s -= L[a, k] * v[k]
        v[a] = s / L[a, a]
    for a in range(q - 1, -1, -1):
        s = v[a]
        for k in range(a + 1, q):
            s -= L[k, a] * v[k]
        v[a] = s / L[a, a]


# --------------------------------------------------------------------------
# objective, pass 1: logdet and the Woodbury corrections to X'X, X'y, y'y
# --------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _pass1_range(q, p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S):
    AL = np.empty((q, q))
    M = np.zeros((q, q))
    U = np.empty((q, q))
    P = np.empty((q, p))
    u = np.empty(q)
    Nm = np.empty((q, q))
    T = np.empty((q, q))
    TD = np.empty((q, p + 1))
    ND = np.empty((q, p + 1))
    rd = np.empty(q)
    logdet = 0.0
    # det(M_i) >= 1, so a running product only grows: take its log rarely
    # instead of q logs per group (the logs were a third of the pass).
    detprod = 1.0
    Sh = 0.0
    for i in range(lo, hi):
        _build_M(q, A, i, lam, AL, M)
        _chol_inplace(q, M)
        d = 1.0
        for a in range(q):
            d *= M[a, a]
            rd[a] = 1.0 / M[a, a]  # one division per diagonal, multiplications below
        dd = d * d
        if dd > 1e100:
            logdet += np.log(dd)
        else:
            detprod *= dd
        if detprod > 1e200:
            logdet += np.log(detprod)
            detprod = 1.0
        # U = L^{-1} Lambda'  (forward substitution, column by column)
        for col in range(q):
            for a in range(q):
                s = lam[col, a]
                for k in range(a):
                    s -= M[a, k] * U[k, col]
                U[a, col] = s * rd[a]
        # P = U B_i, u = U c_i: then K_i = U'U, B'KB = P'P, B'Kc = P'u, c'Kc = u'u
        for a in range(q):
            s = 0.0
            for k in range(q):
                s += U[a, k] * c[i, k]
            u[a] = s
            Sh += s * s
            for m in range(p):
                s = 0.0
                for k in range(q):
                    s += U[a, k] * B[i, k, m]
                P[a, m] = s
        for m in range(p):
            for l in range(m, p):
                s = 0.0
                for a in range(q):
                    s += P[a, m] * P[a, l]
                SF[m, l] += s
            s = 0.0
            for a in range(q):
                s += P[a, m] * u[a]
            Sg[m] += s
        if fused:
            # Gradient pieces that do not depend on beta or F^-1 (DESIGN.md s.3):
            # with N = M^-1 Lambda' (= L^-T U), T = I - A Lambda N and D = [c | B],
            #   d r2     = -2 sum (T D) g g' (N D)'     with g = (1, -beta)
            #   d log|F| = -2 sum (T B) F^-1 (N B)'
            #   d logdet =  2 sum A N'
            # so S[a, b, k, l] = sum (T D)[a, k] (N D)[b, l] gives the whole
            # gradient after one pass, once beta and F^-1 are known.
            for col in range(q):
                for a in range(q - 1, -1, -1):
                    s = U[a, col]
                    for k in range(a + 1, q):
                        s -= M[k, a] * Nm[k, col]
                    Nm[a, col] = s * rd[a]
            for a in range(q):
                for b in range(q):
                    s = 0.0
                    for k in range(q):
                        s += AL[a, k] * Nm[k, b]
                    T[a, b] = -s
                T[a, a] += 1.0
            # Only the lower triangle (a >= b) of GA and S: theta lives there.
            for a in range(q):
                for b in range(a + 1):
                    s = 0.0
                    for k in range(q):
                        s += A[i, a, k] * Nm[b, k]
                    GA[a, b] += s
            for a in range(q):
                st = 0.0
                sn = 0.0
                for k in range(q):
                    st += T[a, k] * c[i, k]
                    sn += Nm[a, k] * c[i, k]
                TD[a, 0] = st
                ND[a, 0] = sn
                for m in range(p):
                    st = 0.0
                    sn = 0.0
                    for k in range(q):
                        st += T[a, k] * B[i, k, m]
                        sn += Nm[a, k] * B[i, k, m]
                    TD[a, m + 1] = st
                    ND[a, m + 1] = sn
            for a in range(q):
                for b in range(a + 1):
                    for k in range(p + 1):
                        tk = TD[a, k]
                        for l in range(p + 1):
                            S[a, b, k, l] += tk * ND[b, l]
    return logdet + np.log(detprod), Sh


@njit(**_JIT)
def _pass1_qn(q, p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S):
    # q >= 3 (q = 1 and 2 have entry points of their own): q = 3 as a literal so the
    # inlined body is specialised (unrolled).  Kept out of the prange body: the parfor
    # passes then see one call instead of two inlined copies (compile time lower).
    if q == 3:
        return _pass1_range(3, p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S)
    return _pass1_range(q, p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S)


# p as a literal too, for the usual few fixed effects: the loops of the gradient tensor over
# p + 1 then unroll (about a quarter off an evaluation with the gradient).  One function per
# q, called once per chunk: LLVM's time grows faster than the size of the function it optimises.
@njit(inline="always", **_JIT)
def _pass1_p(q, p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S):
    if p == 2:
        return _pass1_range(q, 2, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S)
    if p == 3:
        return _pass1_range(q, 3, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S)
    return _pass1_range(q, p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S)


@njit(**_JIT)
def _pass1_q1(p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S):
    return _pass1_p(1, p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S)


@njit(**_JIT)
def _pass1_q2(p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S):
    return _pass1_p(2, p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S)


def objective_fused(A, B, c, lam, nchunks, fused):
    """One pass over the groups: pass-1 sums and, if ``fused``, the gradient tensors.

    Returns per chunk ``(logdet, SF (p,p), Sg (p), Sh, GA (q,q), S (q,q,p+1,p+1))``
    (GA and S are zero when not ``fused``, and only their lower triangle in
    (a, b) is filled: the free entries of Lambda are there); the caller sums
    over chunks.
    See :func:`bigmixed.objective.gradient_from_fused` for the contraction.

    One compiled entry point per q (1, 2, any other): a process compiles or loads only the
    kernel of its model's q (each is a large function: compiling all of them for one model
    took most of a cold first fit).
    """
    q = A.shape[1]
    kernel = _fused_q1 if q == 1 else (_fused_q2 if q == 2 else _fused_qn)
    return kernel(A, B, c, lam, nchunks, fused)


@njit(inline="always", **_JIT)
def _fused_body(qlit, A, B, c, lam, nchunks, fused):
    # qlit is a literal of each entry point: the branches of the other sizes are pruned
    # before typing, so each entry compiles only its own pass 1
    G = A.shape[0]
    q = A.shape[1]
    p = B.shape[2]
    out_ld = np.zeros(nchunks)
    out_h = np.zeros(nchunks)
    out_F = np.zeros((nchunks, p, p))
    out_g = np.zeros((nchunks, p))
    out_GA = np.zeros((nchunks, q, q))
    ds = p + 1 if fused else 0
    out_S = np.zeros((nchunks, q, q, ds, ds))
    for t in prange(nchunks):
        lo = t * G // nchunks
        hi = (t + 1) * G // nchunks
        SF = np.zeros((p, p))
        Sg = np.zeros(p)
        GA = np.zeros((q, q))
        S = np.zeros((q, q, ds, ds))
        if qlit == 1:
            ld, sh = _pass1_q1(p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S)
        elif qlit == 2:
            ld, sh = _pass1_q2(p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S)
        else:
            ld, sh = _pass1_qn(q, p, A, B, c, lam, lo, hi, SF, Sg, fused, GA, S)
        out_ld[t] = ld
        out_h[t] = sh
        for m in range(p):
            out_g[t, m] = Sg[m]
            for l in range(m, p):
                out_F[t, m, l] = SF[m, l]
                out_F[t, l, m] = SF[m, l]
        for a in range(q):
            for b in range(q):
                out_GA[t, a, b] = GA[a, b]
                for k in range(ds):
                    for l in range(ds):
                        out_S[t, a, b, k, l] = S[a, b, k, l]
    return out_ld, out_F, out_g, out_h, out_GA, out_S


@njit(parallel=True, **_JIT)
def _fused_q1(A, B, c, lam, nchunks, fused):
    return _fused_body(1, A, B, c, lam, nchunks, fused)


@njit(parallel=True, **_JIT)
def _fused_q2(A, B, c, lam, nchunks, fused):
    return _fused_body(2, A, B, c, lam, nchunks, fused)


@njit(parallel=True, **_JIT)
def _fused_qn(A, B, c, lam, nchunks, fused):
    return _fused_body(0, A, B, c, lam, nchunks, fused)


def objective_pass1(A, B, c, lam, nchunks):
    """Pass 1 alone: per chunk ``(logdet, SF, Sg, Sh)`` (see :func:`objective_fused`)."""
    ld, SF, Sg, Sh, _, _ = objective_fused(A, B, c, lam, nchunks, False)
    return ld, SF, Sg, Sh


# --------------------------------------------------------------------------
# objective, pass 2: the gradient with respect to Lambda
# --------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _pass2_range(q, p, A, B, c, lam, beta, Finv, kappa, reml, lo, hi, Gr):
    AL = np.empty((q, q))
    M = np.zeros((q, q))
    R = np.empty((q, q))  # Lambda M^{-1}
    AR = np.empty((q, q))
    w = np.empty(q)
    s = np.empty(q)
    t = np.empty(q)
    col = np.empty(q)
    BF = np.empty((q, p))
    Q = np.empty((q, q))
    QR = np.empty((q, q))
    LQR = np.empty((q, q))
    for i in range(lo, hi):
        _build_M(q, A, i, lam, AL, M)
        _chol_inplace(q, M)
        # w = c - B beta ; s = M^{-1} Lambda' w
        for a in range(q):
            acc = c[i, a]
            for m in range(p):
                acc -= B[i, a, m] * beta[m]
            w[a] = acc
        for a in range(q):
            acc = 0.0
            for k in range(q):
                acc += lam[k, a] * w[k]
            s[a] = acc
        _chol_solve_vec(q, M, s)
        # R' = M^{-1} Lambda' column by column, R = Lambda M^{-1}
        for b in range(q):
            for a in range(q):
                col[a] = lam[b, a]
            _chol_solve_vec(q, M, col)
            for a in range(q):
                R[b, a] = col[a]
        # t = w - A Lambda s
        for a in range(q):
            acc = w[a]
            for k in range(q):
                acc -= AL[a, k] * s[k]
            t[a] = acc
        for a in range(q):
            for b in range(q):
                acc = 0.0
                for k in range(q):
                    acc += A[i, a, k] * R[k, b]
                AR[a, b] = acc
        # d logdet = 2 A Lambda M^{-1};  d r2 = -2 t s'
        for a in range(q):
            for b in range(q):
                Gr[a, b] += 2.0 * AR[a, b] - 2.0 * kappa * t[a] * s[b]
        if reml:
            # d log|F| = -2 (I - A K) B F^{-1} B' Lambda M^{-1} = -2 (QR - AR Lambda' QR)
            for a in range(q):
                for m in range(p):
                    acc = 0.0
                    for l in range(p):
                        acc += B[i, a, l] * Finv[l, m]
                    BF[a, m] = acc
            for a in range(q):
                for b in range(q):
                    acc = 0.0
                    for m in range(p):
                        acc += BF[a, m] * B[i, b, m]
                    Q[a, b] = acc
            for a in range(q):
                for b in range(q):
                    acc = 0.0
                    for k in range(q):
                        acc += Q[a, k] * R[k, b]
                    QR[a, b] = acc
            for a in range(q):
                for b in range(q):
                    acc = 0.0
                    for k in range(q):
                        acc += lam[k, a] * QR[k, b]
                    LQR[a, b] = acc
            for a in range(q):
                for b in range(q):
                    acc = QR[a, b]
                    for k in range(q):
                        acc -= AR[a, k] * LQR[k, b]
                    Gr[a, b] -= 2.0 * acc


@njit(**_JIT)
def _pass2_dispatch(q, p, A, B, c, lam, beta, Finv, kappa, reml, lo, hi, Gr):
    # q as a literal for the usual sizes (specialised, unrolled bodies); kept out of the
    # prange body, as _pass1_qn
    if q == 1:
        _pass2_range(1, p, A, B, c, lam, beta, Finv, kappa, reml, lo, hi, Gr)
    elif q == 2:
        _pass2_range(2, p, A, B, c, lam, beta, Finv, kappa, reml, lo, hi, Gr)
    elif q == 3:
        _pass2_range(3, p, A, B, c, lam, beta, Finv, kappa, reml, lo, hi, Gr)
    else:
        _pass2_range(q, p, A, B, c, lam, beta, Finv, kappa, reml, lo, hi, Gr)


@njit(parallel=True, **_JIT)
def objective_pass2(A, B, c, lam, beta, Finv, kappa, reml, nchunks):
    """Per chunk of groups: the q x q matrix d(deviance)/d(Lambda).

    ``kappa`` multiplies d r^2 (N / r^2 for ML, (N - p) / r^2 for REML, or
    1 / sigma^2 for the unprofiled deviance); ``reml`` adds d log|F|.
    """
    G = A.shape[0]
    q = A.shape[1]
    p = B.shape[2]
    out = np.zeros((nchunks, q, q))
    for t in prange(nchunks):
        lo = t * G // nchunks
        hi = (t + 1) * G // nchunks
        Gr = np.zeros((q, q))
        _pass2_dispatch(q, p, A, B, c, lam, beta, Finv, kappa, reml, lo, hi, Gr)
        for a in range(q):
            for b in range(q):
                out[t, a, b] = Gr[a, b]
    return out


# --------------------------------------------------------------------------
# conditional modes and their (unscaled) covariances
# --------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def conditional_modes(A, B, c, lam, beta, nchunks):
    """b_i = Lambda M_i^{-1} Lambda' w_i and K_i = Lambda M_i^{-1} Lambda'.

    The conditional covariance of b_i is sigma^2 K_i.
    """
    G = A.shape[0]
    q = A.shape[1]
    p = B.shape[2]
    bhat = np.empty((G, q))
    K = np.empty((G, q, q))
    for t in prange(nchunks):
        lo = t * G // nchunks
        hi = (t + 1) * G // nchunks
        AL = np.empty((q, q))
        M = np.zeros((q, q))
        s = np.empty(q)
        col = np.empty(q)
        R = np.empty((q, q))
        for i in range(lo, hi):
            _build_M(q, A, i, lam, AL, M)
            _chol_inplace(q, M)
            for a in range(q):
                acc = 0.0
                for k in range(q):
                    wk = c[i, k]
                    for m in range(p):
                        wk -= B[i, k, m] * beta[m]
                    acc += lam[k, a] * wk
                s[a] = acc
            _chol_solve_vec(q, M, s)
            for a in range(q):
                acc = 0.0
                for k in range(q):
                    acc += lam[a, k] * s[k]
                bhat[i, a] = acc
            for b in range(q):
                for a in range(q):
                    col[a] = lam[b, a]
                _chol_solve_vec(q, M, col)
                for a in range(q):
                    R[b, a] = col[a]
            for a in range(q):
                for b in range(q):
                    acc = 0.0
                    for k in range(q):
                        acc += R[a, k] * lam[b, k]
                    K[i, a, b] = acc
    return bhat, K
