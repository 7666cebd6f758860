"""Kernels for crossed random-effects terms: closed-form leading term, dense rest.

Crossed terms (``(1 | user) + (1 | item)``, InstEval's ``(1|s) + (1|d) + (1|dept)``)
are factored as in MixedModels.jl (DESIGN.md section 8): the leading term (most random
effects) is block diagonal, one ``q0 x q0`` block per level; the other terms together
form the *rest*, ``m`` scalar random effects held densely.  With the leading term's
levels as rows:

    L_i   = chol(Lambda_0' A_i Lambda_0 + I)                       per level (closed form)
    V_e   = Lambda_j' W_e Lambda_0 L_i^-T                          per pair (level i, rest level)
    Omega = Lambda_R' A_R Lambda_R + I - sum_i V_i V_i'            dense m x m (LAPACK)

where ``W_e = Z_j'Z_0`` over the rows a leading level shares with one rest level (the
sparse pattern of L_21 is that of these pairs: no fill-in there).  Arrays:

    ptr (l0 + 1,)   pairs of level i are ptr[i]:ptr[i+1], sorted by rest position
    pcol (np,)      first rest (scalar) index of the pair's rest level
    pterm (np,)     rest term of the pair (index into lamR / qR)
    W (np, Qr, q0)  the pair blocks

``A_R`` is held by block rows (only the blocks with entries: a row has one level per term, so
it is sparse however dense Omega becomes); ``Omega`` is a buffer the backend reuses, of which
only the lower triangle is ever set or read.  :mod:`._crossed1` has the back-substitution
for scalar terms.

Every kernel splits its work in fixed chunks (of levels, or of rest rows owned by one
thread) and sums chunk results in chunk order: the same bits whatever the thread timing.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import _JIT
from ._nested import (_add_contracted, _add_gram, _add_tensor, _chol, _lam_t_times, _solve_lower_cols, _solve_lower_rows,
                      _solve_upper_cols, _solve_upper_rows)


@njit(parallel=True, **_JIT)
def crossed_forward(A0, D0, lam0, ptr, pterm, W, lamR, qR, chunks):
    """Per leading level: L_i, P_i = L_i^-1 Lambda_0' D_i and V_e; sums of logdet and P'P.

    Returns ``(logdet per chunk, SFD per chunk (p+1, p+1), L (l0, q0, q0), P (l0, q0, p+1),
    V (np, Qr, q0), ok per chunk)``.
    """
    l0 = A0.shape[0]
    q0 = A0.shape[1]
    p1 = D0.shape[2]
    npairs = W.shape[0]
    Qr = W.shape[1]
    nchunks = chunks.shape[0] - 1
    Lall = np.zeros((l0, q0, q0))
    Pall = np.zeros((l0, q0, p1))
    V = np.zeros((npairs, Qr, q0))
    out_ld = np.zeros(nchunks)
    out_SFD = np.zeros((nchunks, p1, p1))
    out_ok = np.ones(nchunks, dtype=np.bool_)
    for t in prange(nchunks):
        tmp = np.zeros((max(q0, Qr), q0))
        M = np.zeros((q0, q0))
        SFD = np.zeros((p1, p1))
        ld = 0.0
        for i in range(chunks[t], chunks[t + 1]):
            for a in range(q0):
                for b in range(q0):
                    s = 0.0
                    for k in range(q0):
                        s += A0[i, a, k] * lam0[k, b]
                    tmp[a, b] = s
            for a in range(q0):
                for b in range(a + 1):
                    s = 0.0
                    for k in range(q0):
                        s += lam0[k, a] * tmp[k, b]
                    M[a, b] = s + (1.0 if a == b else 0.0)
            if not _chol(q0, M, Lall[i]):
                out_ok[t] = False
                break
            for a in range(q0):
                ld += 2.0 * np.log(Lall[i, a, a])
            _lam_t_times(q0, lam0, D0[i], p1, Pall[i])
            _solve_lower_cols(q0, Lall[i], p1, Pall[i])
            _add_gram(q0, Pall[i], p1, SFD)
            for e in range(ptr[i], ptr[i + 1]):
                j = pterm[e]
                qj = qR[j]
                lj = lamR[j]
                for a in range(qj):
                    for b in range(q0):
                        s = 0.0
                        for k in range(q0):
                            s += W[e, a, k] * lam0[k, b]
                        tmp[a, b] = s
                for a in range(qj):
                    for b in range(q0):
                        s = 0.0
                        for k in range(qj):
                            s += lj[k, a] * tmp[k, b]
                        V[e, a, b] = s
                _solve_lower_rows(q0, Lall[i], qj, V[e])
        out_ld[t] = ld
        for a in range(p1):
            for b in range(a + 1):
                out_SFD[t, a, b] = SFD[a, b]
                out_SFD[t, b, a] = SFD[a, b]
    return out_ld, out_SFD, Lall, Pall, V, out_ok


@njit(parallel=True, **_JIT)
def crossed_update(ptr, pcol, pterm, qR, V, P, plev, eorder, eptr, Omega, OmegaD):
    """Omega -= sum_i V_i V_i' (lower triangle) and OmegaD -= sum_i V_i P_i, in place.

    Thread chunk ``t`` owns a range of rest rows: its pairs are ``eorder[eptr[t]:eptr[t+1]]``
    (pairs whose row is in the range, in level order; ``plev`` is each pair's leading level).
    No two threads write the same entry, and each entry sums its levels in level order.
    Within a level the pairs are sorted by ``pcol``, so every update lands below the diagonal.
    """
    q0 = V.shape[2]
    p1 = P.shape[2]
    nchunks = eptr.shape[0] - 1
    scalar = q0 == 1
    for j in range(qR.shape[0]):
        if qR[j] != 1:
            scalar = False
    for t in prange(nchunks):
        for idx in range(eptr[t], eptr[t + 1]):
            e = eorder[idx]
            i = plev[e]
            r = pcol[e]
            if scalar:  # (1 | a) + (1 | b) + ...: the common case, without the block loops
                ve = V[e, 0, 0]
                for e2 in range(ptr[i], e + 1):
                    Omega[r, pcol[e2]] -= ve * V[e2, 0, 0]
                for c in range(p1):
                    OmegaD[r, c] -= ve * P[i, 0, c]
                continue
            qe = qR[pterm[e]]
            for e2 in range(ptr[i], e + 1):
                r2 = pcol[e2]
                q2 = qR[pterm[e2]]
                for a in range(qe):
                    top = q2 if e2 < e else a + 1
                    for b in range(top):
                        s = 0.0
                        for k in range(q0):
                            s += V[e, a, k] * V[e2, b, k]
                        Omega[r + a, r2 + b] -= s
            for a in range(qe):
                for c in range(p1):
                    s = 0.0
                    for k in range(q0):
                        s += V[e, a, k] * P[i, k, c]
                    OmegaD[r + a, c] -= s


@njit(inline="always", **_JIT)
def _sym(S, i, j):
    """``S[i, j]`` of a symmetric matrix of which only the lower triangle is set."""
    return S[i, j] if i >= j else S[j, i]


@njit(parallel=True, **_JIT)
def rest_fill(Om, OmD, arptr, arcol, arval, DR, bstart, bq, bterm, lamR, border, rchunks):
    """``Om = Lambda_R' A_R Lambda_R + I`` (lower triangle) and ``OmD = Lambda_R' D_R``, in place.

    ``A_R`` is held by block rows (``arptr``, ``arcol``: the blocks with entries, both triangles;
    ``arval (nnz, Qr, Qr)``): each row of a block is cleared left of the diagonal, then the
    block's entries at or left of it are written.  Thread chunk ``t`` owns the blocks
    ``border[rchunks[t]:rchunks[t+1]]`` (blocks in position order), so no two threads write
    one row.  ``Om`` is a reused buffer: its upper triangle is left as it was.
    """
    p1 = DR.shape[1]
    for t in prange(rchunks.shape[0] - 1):
        for o in range(rchunks[t], rchunks[t + 1]):
            bi = border[o]
            ri = bstart[bi]
            qi = bq[bi]
            li = lamR[bterm[bi]]
            for a in range(qi):
                for c in range(ri + a + 1):
                    Om[ri + a, c] = 0.0
            for e in range(arptr[bi], arptr[bi + 1]):
                bj = arcol[e]
                rj = bstart[bj]
                if rj > ri:
                    continue
                qj = bq[bj]
                lj = lamR[bterm[bj]]
                for a in range(qi):
                    for b in range(qj):
                        s = 0.0
                        for k in range(qi):
                            lka = li[k, a]
                            if lka == 0.0:
                                continue
                            for m2 in range(qj):
                                s += lka * arval[e, k, m2] * lj[m2, b]
                        Om[ri + a, rj + b] = s
            for a in range(qi):
                Om[ri + a, ri + a] += 1.0
                for c in range(p1):
                    s = 0.0
                    for k in range(qi):
                        s += li[k, a] * DR[ri + k, c]
                    OmD[ri + a, c] = s


@njit(parallel=True, **_JIT)
def crossed_backward(A0, D0, lam0, ptr, pcol, pterm, W, lamR, qR, L, P, V, RR, SigR, chunks,
                     want_grad, want_modes, g, cf, kappa, reml, m):
    """Back-substitution and selected inverse per leading level, and the gradient pieces.

    ``RR`` = Omega^-T-solved rest modes (m, p+1); ``SigR`` = the dense rest block of M^-1, read in
    its lower triangle only (what dpotri sets).
    Returns per chunk ``GA0 (Q0, Q0)``, ``S0`` (tensor form) or ``GC0`` (contracted form), the
    rest's scattered pieces ``TRc (m, p+1)`` (to subtract from T_R) and ``GRc (m, Qr)`` (the
    leading levels' part of the rest's diagonal blocks of Z'Z Lambda Sigma), and the leading
    term's modes ``bhat (l0, q0)``, ``bcov (l0, q0, q0)``.
    """
    l0 = A0.shape[0]
    q0 = A0.shape[1]
    p1 = D0.shape[2]
    npairs = W.shape[0]
    Qr = W.shape[1]
    nchunks = chunks.shape[0] - 1
    tensor = want_grad and cf.shape[0] == 0
    sd = p1 if tensor else 0
    pp = p1 - 1
    out_GA = np.zeros((nchunks, q0, q0))
    out_S = np.zeros((nchunks, q0, q0, sd, sd))
    out_GC = np.zeros((nchunks, q0, q0))
    mg = m if want_grad else 0
    out_TR = np.zeros((nchunks, mg, p1))
    out_GR = np.zeros((nchunks, mg, Qr))
    nm = l0 if want_modes else 0
    bhat = np.zeros((nm, q0))
    bcov = np.zeros((nm, q0, q0))
    Su = np.zeros((npairs, Qr, q0))
    for t in prange(nchunks):
        R = np.zeros((q0, p1))
        T = np.zeros((q0, p1))
        Sd = np.zeros((q0, q0))
        Gi = np.zeros((q0, q0))
        tmp = np.zeros((max(q0, Qr), max(q0, Qr)))
        tmp2 = np.zeros((max(q0, Qr), max(q0, Qr)))
        GA = np.zeros((q0, q0))
        S = np.zeros((q0, q0, sd, sd))
        GC = np.zeros((q0, q0))
        TR = np.zeros((mg, p1))
        GR = np.zeros((mg, Qr))
        for i in range(chunks[t], chunks[t + 1]):
            Li = L[i]
            for a in range(q0):
                for c in range(p1):
                    R[a, c] = P[i, a, c]
            for e in range(ptr[i], ptr[i + 1]):
                r = pcol[e]
                qj = qR[pterm[e]]
                for a in range(q0):
                    for c in range(p1):
                        s = 0.0
                        for k in range(qj):
                            s += V[e, k, a] * RR[r + k, c]
                        R[a, c] -= s
            _solve_upper_cols(q0, Li, p1, R)
            # Su_e = -(sum_e2 Sigma_R[e, e2] V_e2) L^-1
            for e in range(ptr[i], ptr[i + 1]):
                r = pcol[e]
                qj = qR[pterm[e]]
                for a in range(qj):
                    for b in range(q0):
                        s = 0.0
                        for e2 in range(ptr[i], ptr[i + 1]):
                            r2 = pcol[e2]
                            q2 = qR[pterm[e2]]
                            for k in range(q2):
                                s += _sym(SigR, r + a, r2 + k) * V[e2, k, b]
                        Su[e, a, b] = -s
                _solve_upper_rows(q0, Li, qj, Su[e])
            # Sd = (L^-T - sum_e Su_e' V_e) L^-1
            for a in range(q0):
                for b in range(q0):
                    tmp[a, b] = 1.0 if a == b else 0.0
            _solve_lower_cols(q0, Li, q0, tmp)  # L^-1
            for a in range(q0):
                for b in range(q0):
                    s = tmp[b, a]
                    for e in range(ptr[i], ptr[i + 1]):
                        qj = qR[pterm[e]]
                        for k in range(qj):
                            s -= Su[e, k, a] * V[e, k, b]
                    Sd[a, b] = s
            _solve_upper_rows(q0, Li, q0, Sd)
            if want_modes:
                for a in range(q0):
                    s = 0.0
                    for k in range(q0):
                        u = 0.0
                        for c in range(p1):
                            u += R[k, c] * g[c]
                        s += lam0[a, k] * u
                    bhat[i, a] = s
                for a in range(q0):
                    for b in range(q0):
                        s = 0.0
                        for k in range(q0):
                            for m2 in range(q0):
                                s += lam0[a, k] * Sd[k, m2] * lam0[b, m2]
                        bcov[i, a, b] = s
            if not want_grad:
                continue
            # T_i, G_i and the rest's scattered parts
            for a in range(q0):
                for b in range(q0):
                    s = 0.0
                    for k in range(q0):
                        s += A0[i, a, k] * lam0[k, b]
                    tmp[a, b] = s
            for a in range(q0):
                for c in range(p1):
                    s = D0[i, a, c]
                    for k in range(q0):
                        s -= tmp[a, k] * R[k, c]
                    T[a, c] = s
                for b in range(q0):
                    s = 0.0
                    for k in range(q0):
                        s += tmp[a, k] * Sd[k, b]
                    Gi[a, b] = s
            for e in range(ptr[i], ptr[i + 1]):
                r = pcol[e]
                j = pterm[e]
                qj = qR[j]
                lj = lamR[j]
                for a in range(q0):  # tmp = W' Lambda_j (q0 x qj)
                    for b in range(qj):
                        s = 0.0
                        for k in range(qj):
                            s += W[e, k, a] * lj[k, b]
                        tmp[a, b] = s
                for a in range(q0):
                    for c in range(p1):
                        s = 0.0
                        for k in range(qj):
                            s += tmp[a, k] * RR[r + k, c]
                        T[a, c] -= s
                    for b in range(q0):
                        s = 0.0
                        for k in range(qj):
                            s += tmp[a, k] * Su[e, k, b]
                        Gi[a, b] += s
                for a in range(qj):  # tmp2 = W Lambda_0 (qj x q0)
                    for b in range(q0):
                        s = 0.0
                        for k in range(q0):
                            s += W[e, a, k] * lam0[k, b]
                        tmp2[a, b] = s
                for a in range(qj):
                    for c in range(p1):
                        s = 0.0
                        for k in range(q0):
                            s += tmp2[a, k] * R[k, c]
                        TR[r + a, c] += s
                    for b in range(qj):
                        s = 0.0
                        for k in range(q0):
                            s += tmp2[a, k] * Su[e, b, k]
                        GR[r + a, b] += s
            for a in range(q0):
                for b in range(a + 1):
                    GA[a, b] += Gi[a, b]
            if tensor:
                _add_tensor(q0, T, R, p1, S)
            else:
                _add_contracted(q0, T, R, Gi, g, cf, kappa, reml, GC)
        for a in range(q0):
            for b in range(q0):
                out_GA[t, a, b] = GA[a, b]
                out_GC[t, a, b] = GC[a, b]
                for k in range(sd):
                    for m2 in range(sd):
                        out_S[t, a, b, k, m2] = S[a, b, k, m2]
        for r in range(mg):
            for c in range(p1):
                out_TR[t, r, c] = TR[r, c]
            for b in range(Qr):
                out_GR[t, r, b] = GR[r, b]
    return out_GA, out_S, out_GC, out_TR, out_GR, bhat, bcov


@njit(parallel=True, **_JIT)
def rest_pieces(arptr, arcol, arval, DR, RR, SigR, TRsub, GRadd, bstart, bq, bterm, lamR, nterms,
                want_grad, want_modes, g, cf, kappa, reml):
    """The rest terms' gradient pieces (GA_j, S_j or GC_j) and modes, from the sparse ``A_R`` blocks.

    T_R = D_R - A_R Lambda_R R_R - TRsub;  G_R (diagonal blocks) = (A_R Lambda_R Sigma_R) + GRadd.
    ``SigR`` (the dense rest block of M^-1) is read in its lower triangle only.
    """
    p1 = DR.shape[1]
    nb = bstart.shape[0]
    Qr = lamR.shape[1]
    tensor = want_grad and cf.shape[0] == 0
    sd = p1 if tensor else 0
    GA = np.zeros((nb, Qr, Qr))
    S = np.zeros((nb, Qr, Qr, sd, sd))
    GC = np.zeros((nb, Qr, Qr))
    nbm = nb if want_modes else 0
    bhat = np.zeros((nbm, Qr))
    bcov = np.zeros((nbm, Qr, Qr))
    for bi in prange(nb):
        r = bstart[bi]
        q = bq[bi]
        lam = lamR[bterm[bi]]
        T = np.zeros((Qr, p1))
        Gb = np.zeros((Qr, Qr))
        if want_modes:
            for a in range(q):
                s = 0.0
                for k in range(q):
                    u = 0.0
                    for c in range(p1):
                        u += RR[r + k, c] * g[c]
                    s += lam[a, k] * u
                bhat[bi, a] = s
            for a in range(q):
                for b in range(q):
                    s = 0.0
                    for k in range(q):
                        for m2 in range(q):
                            s += lam[a, k] * _sym(SigR, r + k, r + m2) * lam[b, m2]
                    bcov[bi, a, b] = s
        if not want_grad:
            continue
        for a in range(q):
            for c in range(p1):
                T[a, c] = DR[r + a, c] - TRsub[r + a, c]
            for b in range(q):
                Gb[a, b] = GRadd[r + a, b]
        for e in range(arptr[bi], arptr[bi + 1]):
            bj = arcol[e]
            r2 = bstart[bj]
            q2 = bq[bj]
            lam2 = lamR[bterm[bj]]
            for a in range(q):
                for k in range(q2):
                    al = 0.0  # (A_R Lambda_R)[r + a, r2 + k]
                    for k2 in range(q2):
                        al += arval[e, a, k2] * lam2[k2, k]
                    if al == 0.0:
                        continue
                    for c in range(p1):
                        T[a, c] -= al * RR[r2 + k, c]
                    for b in range(q):
                        Gb[a, b] += al * _sym(SigR, r2 + k, r + b)
        for a in range(q):
            for b in range(a + 1):
                GA[bi, a, b] = Gb[a, b]
        # S[bi] and GC[bi] start at 0 (one block each)
        if tensor:
            _add_tensor(q, T, RR[r:r + q], p1, S[bi])
        else:
            _add_contracted(q, T, RR[r:r + q], Gb, g, cf, kappa, reml, GC[bi])
    # per-term sums in block order (deterministic)
    GAt = np.zeros((nterms, Qr, Qr))
    St = np.zeros((nterms, Qr, Qr, sd, sd))
    GCt = np.zeros((nterms, Qr, Qr))
    if want_grad:
        for bi in range(nb):
            j = bterm[bi]
            for a in range(Qr):
                for b in range(Qr):
                    GAt[j, a, b] += GA[bi, a, b]
                    GCt[j, a, b] += GC[bi, a, b]
                    for k in range(sd):
                        for m2 in range(sd):
                            St[j, a, b, k, m2] += S[bi, a, b, k, m2]
    return GAt, St, GCt, bhat, bcov
