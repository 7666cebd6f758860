"""Kernels for nested random-effects terms: the blocked Cholesky factor one outer group at a time.

Nested terms (every level of a finer term lies in one level of each coarser term,
``(1 | school) + (1 | school:class)`` or ``(t | child) + (t | school)``) give a factor
``L`` of ``M = Lambda' Z'Z Lambda + I`` that is block diagonal by the levels of the
coarsest term and has no fill-in (DESIGN.md section 8).  The kernels see the levels of all
terms as *nodes*, laid out so that each outer group (a *root*) is one contiguous range,
finest term first and the root last:

    term  (n,)            term of each node (0 = finest)
    A     (n, Q, Q)       Z_e'Z_e over the node's rows (top-left q_e x q_e used)
    D     (n, Q, p + 1)   Z_e'[y | X] over the node's rows
    up    (n, K-1, Q, Q)  up[i, s] = Z_{e+1+s}' Z_e over node i's rows (q_{e+1+s} x q_e)
    anc   (n, K-1)        node index of the ancestor in term e + 1 + s (-1: none)
    roots (R + 1,)        node ranges of the outer groups

Per root: a forward sweep (finest first) factors each node and pushes its Schur updates
to its ancestors; a backward sweep (root first) solves ``L' R = P`` (the conditional modes
of every column of ``[y | X]``, ``R = M^-1 Lambda' Z'[y | X]``) and the selected inverse
``Sigma = M^-1`` on the pattern of ``L``.  Those give the gradient pieces of DESIGN.md
section 3 in the fused form of :func:`bigmixed.objective.gradient_from_fused`:

    GA_e = sum over nodes of term e of (Z'Z Lambda Sigma)_ii          (d logdet)
    S_e  = sum over nodes of term e of T_i (x) R_i,  T = Z'[y|X] - Z'Z Lambda R

All per-root work happens in per-chunk workspaces sized to the largest root (no
allocation per node); chunks of roots are fixed by the data, not by the thread count,
and their sums are added in chunk order, so the bits never depend on thread timing.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import _JIT


@njit(inline="always", **_JIT)
def _chol(q, M, L):
    """L = lower Cholesky of the SPD q x q matrix M (lower triangle read); False if not SPD."""
    for j in range(q):
        s = M[j, j]
        for k in range(j):
            s -= L[j, k] * L[j, k]
        if not s > 0.0:
            return False
        d = np.sqrt(s)
        L[j, j] = d
        for i in range(j + 1, q):
            t = M[i, j]
            for k in range(j):
                t -= L[i, k] * L[j, k]
            L[i, j] = t / d
        for i in range(j):
            L[i, j] = 0.0
    return True


@njit(inline="always", **_JIT)
def _solve_lower_rows(q, L, r, X):
    """X (r x q) <- X L^-T, i.e. solve Y L' = X row by row (forward substitution)."""
    for row in range(r):
        for a in range(q):
            s = X[row, a]
            for k in range(a):
                s -= X[row, k] * L[a, k]
            X[row, a] = s / L[a, a]


@njit(inline="always", **_JIT)
def _solve_lower_cols(q, L, c, X):
    """X (q x c) <- L^-1 X (forward substitution, column by column)."""
    for col in range(c):
        for a in range(q):
            s = X[a, col]
            for k in range(a):
                s -= L[a, k] * X[k, col]
            X[a, col] = s / L[a, a]


@njit(inline="always", **_JIT)
def _solve_upper_cols(q, L, c, X):
    """X (q x c) <- L^-T X (back substitution, column by column)."""
    for col in range(c):
        for a in range(q - 1, -1, -1):
            s = X[a, col]
            for k in range(a + 1, q):
                s -= L[k, a] * X[k, col]
            X[a, col] = s / L[a, a]


@njit(inline="always", **_JIT)
def _solve_upper_rows(q, L, r, X):
    """X (r x q) <- X L^-1, i.e. solve Y L = X row by row (back substitution)."""
    for row in range(r):
        for a in range(q - 1, -1, -1):
            s = X[row, a]
            for k in range(a + 1, q):
                s -= X[row, k] * L[k, a]
            X[row, a] = s / L[a, a]


@njit(inline="always", **_JIT)
def _lam_t_times(q, lam, D, p1, out):
    """out (q x p1) <- Lambda' D (the first q rows of D)."""
    for a in range(q):
        for c in range(p1):
            s = 0.0
            for k in range(q):
                s += lam[k, a] * D[k, c]
            out[a, c] = s


@njit(inline="always", **_JIT)
def _add_gram(q, P, p1, SFD):
    """SFD += P'P on and below the diagonal (P: q x p1)."""
    for c in range(p1):
        for c2 in range(c + 1):
            s = 0.0
            for a in range(q):
                s += P[a, c] * P[a, c2]
            SFD[c, c2] += s


@njit(inline="always", **_JIT)
def _add_tensor(q, T, R, p1, S):
    """S[a, b] += T[a] R[b]' for b <= a: the gradient tensor of one block (contracted on the driver)."""
    for a in range(q):
        for b in range(a + 1):
            for k in range(p1):
                tk = T[a, k]
                for m in range(p1):
                    S[a, b, k, m] += tk * R[b, m]


@njit(inline="always", **_JIT)
def _add_contracted(q, T, R, G, g, cf, kappa, reml, GC):
    """GC += 2 G - 2 kappa (T g)(R g)' - [REML] 2 (T_X C)(R_X C)' on and below the diagonal (one block).

    ``C = cf`` is lower triangular (C[k, m] = 0 for k < m), so its inner sums start at m.
    """
    p1 = g.shape[0]
    pp = p1 - 1
    for a in range(q):
        tg = 0.0
        for k in range(p1):
            tg += T[a, k] * g[k]
        for b in range(a + 1):
            rg = 0.0
            for k in range(p1):
                rg += R[b, k] * g[k]
            GC[a, b] += 2.0 * G[a, b] - 2.0 * kappa * tg * rg
    if reml:
        for a in range(q):
            for b in range(a + 1):
                s = 0.0
                for m in range(pp):
                    ta = 0.0
                    rb = 0.0
                    for k in range(m, pp):
                        ta += T[a, 1 + k] * cf[k, m]
                        rb += R[b, 1 + k] * cf[k, m]
                    s += ta * rb
                GC[a, b] -= 2.0 * s


@njit(**_JIT)
def _root(lo, hi, term, qv, A, D, up, anc, lams, p1, K, want_grad, want_modes, g, cf, kappa, reml,
          Ld, Lu, P, Mw, Mu, Dw, R, T, Sd, Su, G, tmp, tmp2, SFD, GA, S, GC, bhat, bcov):
    """Factor (and with ``want_grad`` or ``want_modes``, solve and invert) one root's nodes ``[lo, hi)``.

    Returns (logdet, ok).  ``cf`` is empty for the tensor form (``S``), else the Cholesky
    factor of F^-1 for the contracted form (``GC``: the gradient of the deviance directly).
    """
    n = hi - lo
    ks = K - 1
    for li in range(n):
        for a in range(Mw.shape[1]):
            for b in range(Mw.shape[2]):
                Mw[li, a, b] = 0.0
            for c in range(p1):
                Dw[li, a, c] = 0.0
        for s in range(ks):
            for a in range(Mu.shape[2]):
                for b in range(Mu.shape[3]):
                    Mu[li, s, a, b] = 0.0
    logdet = 0.0
    # ---- forward sweep: finest nodes first, the root last
    for li in range(n):
        i = lo + li
        e = term[i]
        q = qv[e]
        lam = lams[e]
        # tmp = A_i Lambda_e; M = Lambda_e' tmp + I - updates
        for a in range(q):
            for b in range(q):
                s = 0.0
                for k in range(q):
                    s += A[i, a, k] * lam[k, b]
                tmp[a, b] = s
        for a in range(q):
            for b in range(a + 1):
                s = 0.0
                for k in range(q):
                    s += lam[k, a] * tmp[k, b]
                tmp2[a, b] = s - Mw[li, a, b] + (1.0 if a == b else 0.0)
        if not _chol(q, tmp2, Ld[li]):
            return 0.0, False
        for a in range(q):
            logdet += 2.0 * np.log(Ld[li, a, a])
        for s_ in range(ks):
            if anc[i, s_] < 0:
                break
            e2 = e + 1 + s_
            q2 = qv[e2]
            lam2 = lams[e2]
            # Lu = (Lambda_e2' up Lambda_e - updates) L^-T
            for a in range(q2):
                for b in range(q):
                    s = 0.0
                    for k in range(q):
                        s += up[i, s_, a, k] * lam[k, b]
                    tmp[a, b] = s
            for a in range(q2):
                for b in range(q):
                    s = 0.0
                    for k in range(q2):
                        s += lam2[k, a] * tmp[k, b]
                    Lu[li, s_, a, b] = s - Mu[li, s_, a, b]
            _solve_lower_rows(q, Ld[li], q2, Lu[li, s_])
        # P = L^-1 (Lambda_e' D_i - updates)
        _lam_t_times(q, lam, D[i], p1, P[li])
        for a in range(q):
            for c in range(p1):
                P[li, a, c] -= Dw[li, a, c]
        _solve_lower_cols(q, Ld[li], p1, P[li])
        _add_gram(q, P[li], p1, SFD)
        # Schur updates of the ancestors' blocks
        for s_ in range(ks):
            ai = anc[i, s_]
            if ai < 0:
                break
            la = ai - lo
            q2 = qv[e + 1 + s_]
            for a in range(q2):
                for b in range(a + 1):
                    s = 0.0
                    for k in range(q):
                        s += Lu[li, s_, a, k] * Lu[li, s_, b, k]
                    Mw[la, a, b] += s
                for c in range(p1):
                    s = 0.0
                    for k in range(q):
                        s += Lu[li, s_, a, k] * P[li, k, c]
                    Dw[la, a, c] += s
            for s2 in range(s_):  # block M(ancestor s_, ancestor s2) lives at ancestor s2
                lb = anc[i, s2] - lo
                q3 = qv[e + 1 + s2]
                slot = s_ - s2 - 1
                for a in range(q2):
                    for b in range(q3):
                        s = 0.0
                        for k in range(q):
                            s += Lu[li, s_, a, k] * Lu[li, s2, b, k]
                        Mu[lb, slot, a, b] += s
    if not (want_grad or want_modes):
        return logdet, True
    # ---- backward sweep: the root first.  R = L^-T (P - sum Lu' R_anc)
    for li in range(n - 1, -1, -1):
        i = lo + li
        e = term[i]
        q = qv[e]
        for a in range(q):
            for c in range(p1):
                R[li, a, c] = P[li, a, c]
        for s_ in range(ks):
            ai = anc[i, s_]
            if ai < 0:
                break
            la = ai - lo
            q2 = qv[e + 1 + s_]
            for a in range(q):
                for c in range(p1):
                    s = 0.0
                    for k in range(q2):
                        s += Lu[li, s_, k, a] * R[la, k, c]
                    R[li, a, c] -= s
        _solve_upper_cols(q, Ld[li], p1, R[li])
        # selected inverse: Su[s] = -(sum_s2 Sigma(anc s, anc s2) Lu[s2]) L^-1
        for s_ in range(ks):
            if anc[i, s_] < 0:
                break
            q2 = qv[e + 1 + s_]
            for a in range(q2):
                for b in range(q):
                    Su[li, s_, a, b] = 0.0
            for s2 in range(ks):
                if anc[i, s2] < 0:
                    break
                q3 = qv[e + 1 + s2]
                la = anc[i, s_] - lo
                lb = anc[i, s2] - lo
                for a in range(q2):
                    for b in range(q):
                        s = 0.0
                        for k in range(q3):
                            if s2 == s_:
                                sig = Sd[la, a, k]
                            elif s_ > s2:  # anc s_ is an ancestor of anc s2
                                sig = Su[lb, s_ - s2 - 1, a, k]
                            else:
                                sig = Su[la, s2 - s_ - 1, k, a]
                            s += sig * Lu[li, s2, k, b]
                        Su[li, s_, a, b] -= s
            _solve_upper_rows(q, Ld[li], q2, Su[li, s_])
        # Sd = (L^-T - sum_s Su[s]' Lu[s]) L^-1
        for a in range(q):
            for b in range(q):
                tmp[a, b] = 0.0
        for a in range(q):  # L^-T: the transpose of L^-1 (forward substitution of I)
            tmp[a, a] = 1.0
        _solve_lower_cols(q, Ld[li], q, tmp)
        for a in range(q):
            for b in range(q):
                s = tmp[b, a]
                for s_ in range(ks):
                    if anc[i, s_] < 0:
                        break
                    q2 = qv[e + 1 + s_]
                    for k in range(q2):
                        s -= Su[li, s_, k, a] * Lu[li, s_, k, b]
                tmp2[a, b] = s
        for a in range(q):
            for b in range(q):
                Sd[li, a, b] = tmp2[a, b]
        _solve_upper_rows(q, Ld[li], q, Sd[li])
    if want_modes:
        for li in range(n):
            i = lo + li
            e = term[i]
            q = qv[e]
            lam = lams[e]
            for a in range(q):  # b = Lambda R g
                s = 0.0
                for k in range(q):
                    u = 0.0
                    for c in range(p1):
                        u += R[li, k, c] * g[c]
                    s += lam[a, k] * u
                bhat[i, a] = s
            for a in range(q):  # Lambda Sigma_ii Lambda'
                for b in range(q):
                    s = 0.0
                    for k in range(q):
                        for m in range(q):
                            s += lam[a, k] * Sd[li, k, m] * lam[b, m]
                    bcov[i, a, b] = s
    if not want_grad:
        return logdet, True
    # ---- T = Z'[y|X] - Z'Z Lambda R and G = Z'Z Lambda Sigma (diagonal blocks)
    for li in range(n):
        i = lo + li
        e = term[i]
        q = qv[e]
        lam = lams[e]
        for a in range(q):
            for b in range(q):
                s = 0.0
                for k in range(q):
                    s += A[i, a, k] * lam[k, b]
                tmp[a, b] = s
        for a in range(q):
            for c in range(p1):
                s = D[i, a, c]
                for k in range(q):
                    s -= tmp[a, k] * R[li, k, c]
                T[li, a, c] = s
            for b in range(q):
                s = 0.0
                for k in range(q):
                    s += tmp[a, k] * Sd[li, k, b]
                G[li, a, b] = s
    for li in range(n):
        i = lo + li
        e = term[i]
        q = qv[e]
        lam = lams[e]
        for s_ in range(ks):
            ai = anc[i, s_]
            if ai < 0:
                break
            la = ai - lo
            e2 = e + 1 + s_
            q2 = qv[e2]
            lam2 = lams[e2]
            # tmp = up' Lambda_e2 (q x q2): this node's row of Z'Z Lambda at the ancestor
            for a in range(q):
                for b in range(q2):
                    s = 0.0
                    for k in range(q2):
                        s += up[i, s_, k, a] * lam2[k, b]
                    tmp[a, b] = s
            for a in range(q):
                for c in range(p1):
                    s = 0.0
                    for k in range(q2):
                        s += tmp[a, k] * R[la, k, c]
                    T[li, a, c] -= s
                for b in range(q):
                    s = 0.0
                    for k in range(q2):
                        s += tmp[a, k] * Su[li, s_, k, b]
                    G[li, a, b] += s
            # tmp2 = up Lambda_e (q2 x q): the ancestor's row of Z'Z Lambda at this node
            for a in range(q2):
                for b in range(q):
                    s = 0.0
                    for k in range(q):
                        s += up[i, s_, a, k] * lam[k, b]
                    tmp2[a, b] = s
            for a in range(q2):
                for c in range(p1):
                    s = 0.0
                    for k in range(q):
                        s += tmp2[a, k] * R[li, k, c]
                    T[la, a, c] -= s
                for b in range(q2):
                    s = 0.0
                    for k in range(q):
                        s += tmp2[a, k] * Su[li, s_, b, k]
                    G[la, a, b] += s
    contracted = cf.shape[0] > 0
    pp = p1 - 1
    for li in range(n):
        i = lo + li
        e = term[i]
        q = qv[e]
        for a in range(q):
            for b in range(a + 1):
                GA[e, a, b] += G[li, a, b]
        if not contracted:
            _add_tensor(q, T[li], R[li], p1, S[e])
        else:
            # d(deviance) = 2 GA - 2 kappa (T g)(R g)' - [REML] 2 (T_X C)(R_X C)'
            _add_contracted(q, T[li], R[li], G[li], g, cf, kappa, reml, GC[e])
    return logdet, True


@njit(parallel=True, **_JIT)
def nested_evaluate(term, qv, A, D, up, anc, roots, chunks, lams, maxlen, want_grad, want_modes,
                    g, cf, kappa, reml):
    """One pass over the outer groups: the deviance sums and, if asked, the gradient pieces or the modes.

    Returns per chunk of roots ``(logdet, SFD (p+1, p+1), GA (K, Q, Q), S (K, Q, Q, p+1, p+1),
    GC (K, Q, Q), ok)`` and the per-node ``bhat (n, Q)``, ``bcov (n, Q, Q)`` (``Lambda u`` and
    ``Lambda Sigma_ii Lambda'``, for ``g = (1, -beta)``; empty unless ``want_modes``).
    ``SFD`` = sum P'P over the nodes (lower triangle): row/column 0 is y, then X.
    ``cf`` empty: tensor form ``S``; else ``GC`` holds d(deviance)/d(Lambda_e) contracted with
    ``g``, ``kappa`` and ``cf`` = chol(F^-1) (two-pass form, for many fixed effects).
    """
    n_nodes = term.shape[0]
    K = qv.shape[0]
    Q = A.shape[1]
    p1 = D.shape[2]
    nchunks = chunks.shape[0] - 1
    ks = max(K - 1, 1)
    tensor = want_grad and cf.shape[0] == 0
    out_ld = np.zeros(nchunks)
    out_ok = np.ones(nchunks, dtype=np.bool_)
    out_SFD = np.zeros((nchunks, p1, p1))
    out_GA = np.zeros((nchunks, K, Q, Q))
    sd = p1 if tensor else 0
    out_S = np.zeros((nchunks, K, Q, Q, sd, sd))
    out_GC = np.zeros((nchunks, K, Q, Q))
    nm = n_nodes if want_modes else 0
    bhat = np.zeros((nm, Q))
    bcov = np.zeros((nm, Q, Q))
    for t in prange(nchunks):
        L = maxlen
        Ld = np.zeros((L, Q, Q))
        Lu = np.zeros((L, ks, Q, Q))
        P = np.zeros((L, Q, p1))
        Mw = np.zeros((L, Q, Q))
        Mu = np.zeros((L, ks, Q, Q))
        Dw = np.zeros((L, Q, p1))
        gw = want_grad or want_modes
        Lg = L if gw else 0
        R = np.zeros((Lg, Q, p1))
        T = np.zeros((L if want_grad else 0, Q, p1))
        Sd = np.zeros((Lg, Q, Q))
        Su = np.zeros((Lg, ks, Q, Q))
        G = np.zeros((L if want_grad else 0, Q, Q))
        tmp = np.zeros((Q, Q))
        tmp2 = np.zeros((Q, Q))
        SFD = np.zeros((p1, p1))
        GA = np.zeros((K, Q, Q))
        S = np.zeros((K, Q, Q, sd, sd))
        GC = np.zeros((K, Q, Q))
        ld = 0.0
        ok = True
        for r in range(chunks[t], chunks[t + 1]):
            v, good = _root(roots[r], roots[r + 1], term, qv, A, D, up, anc, lams, p1, K, want_grad,
                            want_modes, g, cf, kappa, reml, Ld, Lu, P, Mw, Mu, Dw, R, T, Sd, Su, G,
                            tmp, tmp2, SFD, GA, S, GC, bhat, bcov)
            if not good:
                ok = False
                break
            ld += v
        out_ld[t] = ld
        out_ok[t] = ok
        for a in range(p1):
            for b in range(a + 1):
                out_SFD[t, a, b] = SFD[a, b]
                out_SFD[t, b, a] = SFD[a, b]
        for e in range(K):
            for a in range(Q):
                for b in range(Q):
                    out_GA[t, e, a, b] = GA[e, a, b]
                    out_GC[t, e, a, b] = GC[e, a, b]
                    for k in range(sd):
                        for m in range(sd):
                            out_S[t, e, a, b, k, m] = S[e, a, b, k, m]
    return out_ld, out_SFD, out_GA, out_S, out_GC, out_ok, bhat, bcov


# --------------------------------------------------------------------------
# the layout: levels of all terms as nodes grouped by outer group
# --------------------------------------------------------------------------


@njit(**_JIT)
def bucket_order(key, nbuckets):
    """The stable order of ``key`` (integers in ``[0, nbuckets)``): a counting sort, O(n)."""
    start = np.zeros(nbuckets + 1, dtype=np.int64)
    for i in range(key.shape[0]):
        start[key[i] + 1] += 1
    for b in range(nbuckets):
        start[b + 1] += start[b]
    out = np.empty(key.shape[0], dtype=np.int64)
    for i in range(key.shape[0]):
        k = key[i]
        out[start[k]] = i
        start[k] += 1
    return out


@njit(parallel=True, **_JIT)
def scatter_blocks(dst, rows, src, qa, qb, width, base):
    """``dst[rows[i], base + a * width + b] = src[i, a * qb + b]`` for ``a < qa``, ``b < qb``.

    One level's ``(qa, qb)`` block into the row-major ``(., width)`` block of its node (rows
    distinct: each node is written by one thread).
    """
    for i in prange(rows.shape[0]):
        r = rows[i]
        for a in range(qa):
            for b in range(qb):
                dst[r, base + a * width + b] = src[i, a * qb + b]
