"""The two-term nested factor (one inner term in one outer term), specialised for small q.

The same quantities as :func:`bigmixed._kernels._nested.nested_evaluate` (see there and DESIGN.md
section 8) for the commonest nested model, ``(t | child) + (t | school)``: each outer group is
its children followed by itself, and per group

    forward   L_i = chol(Lambda_1'A_i Lambda_1 + I), V_i = Lambda_2'U_i Lambda_1 L_i^-T,
              P_i = L_i^-1 Lambda_1'D_i;  L_r = chol(Lambda_2'A_r Lambda_2 + I - sum V_i V_i'),
              P_r = L_r^-1 (Lambda_2'D_r - sum V_i P_i)
    backward  R_r = L_r^-T P_r,  R_i = L_i^-T (P_i - V_i'R_r)
    inverse   S_rr = (L_r L_r')^-1,  S_ri = -S_rr V_i L_i^-1,  S_ii = (L_i^-T - S_ri'V_i) L_i^-1

with ``U_i = Z_2'Z_1`` over child i's rows.  The sizes (q1, q2) = (1, 1) and (2, 2) are
compile-time constants of the inlined body (as in :mod:`._groups`), which the generic kernel
cannot have; other sizes use the generic kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import _JIT
from ._nested import (_add_contracted, _add_gram, _add_tensor, _chol, _lam_t_times, _solve_lower_cols, _solve_lower_rows,
                      _solve_upper_cols, _solve_upper_rows)


@njit(inline="always", **_JIT)
def _group(q1, q2, p1, lo, hi, A, D, up, lam1, lam2, want_grad, want_modes, g, cf, kappa, reml, ws, outs, tensor):
    """One outer group: children ``lo .. hi-2``, the group itself at ``hi - 1``; returns (logdet, ok).

    ``ws`` and ``outs`` are tuples of arrays (under 30 arguments, or Python 3.11 passes them as
    ``*args``, which numba cannot inline).
    """
    Li, Vi, Pi, Mr, Lr, Dr, Rr, Srr, Ri, Sri, Sii, Ti, tmp, tmp2, ALw, ULw = ws
    SFD, GA, S, GC, bhat, bcov = outs
    r = hi - 1
    nc = r - lo
    logdet = 0.0
    for a in range(q2):
        for b in range(q2):
            Mr[a, b] = 0.0
        for c in range(p1):
            Dr[a, c] = 0.0
    for j in range(nc):
        i = lo + j
        for a in range(q1):
            for b in range(q1):
                s = 0.0
                for k in range(q1):
                    s += A[i, a, k] * lam1[k, b]
                ALw[j, a, b] = s
        for a in range(q1):
            for b in range(a + 1):
                s = 0.0
                for k in range(q1):
                    s += lam1[k, a] * ALw[j, k, b]
                tmp2[a, b] = s + (1.0 if a == b else 0.0)
        if not _chol(q1, tmp2, Li[j]):
            return 0.0, False
        for a in range(q1):
            logdet += 2.0 * np.log(Li[j, a, a])
        # V = Lambda_2' U Lambda_1 L^-T
        for a in range(q2):
            for b in range(q1):
                s = 0.0
                for k in range(q1):
                    s += up[i, 0, a, k] * lam1[k, b]
                ULw[j, a, b] = s
        for a in range(q2):
            for b in range(q1):
                s = 0.0
                for k in range(q2):
                    s += lam2[k, a] * ULw[j, k, b]
                Vi[j, a, b] = s
        _solve_lower_rows(q1, Li[j], q2, Vi[j])
        _lam_t_times(q1, lam1, D[i], p1, Pi[j])
        _solve_lower_cols(q1, Li[j], p1, Pi[j])
        _add_gram(q1, Pi[j], p1, SFD)
        for a in range(q2):
            for b in range(a + 1):
                s = 0.0
                for k in range(q1):
                    s += Vi[j, a, k] * Vi[j, b, k]
                Mr[a, b] += s
            for c in range(p1):
                s = 0.0
                for k in range(q1):
                    s += Vi[j, a, k] * Pi[j, k, c]
                Dr[a, c] += s
    # the outer level
    for a in range(q2):
        for b in range(q2):
            s = 0.0
            for k in range(q2):
                s += A[r, a, k] * lam2[k, b]
            tmp[a, b] = s
    for a in range(q2):
        for b in range(a + 1):
            s = 0.0
            for k in range(q2):
                s += lam2[k, a] * tmp[k, b]
            tmp2[a, b] = s - Mr[a, b] + (1.0 if a == b else 0.0)
    if not _chol(q2, tmp2, Lr):
        return 0.0, False
    for a in range(q2):
        logdet += 2.0 * np.log(Lr[a, a])
    _lam_t_times(q2, lam2, D[r], p1, Rr)
    for a in range(q2):
        for c in range(p1):
            Rr[a, c] -= Dr[a, c]
    _solve_lower_cols(q2, Lr, p1, Rr)  # P_r, in place
    _add_gram(q2, Rr, p1, SFD)
    if not (want_grad or want_modes):
        return logdet, True
    _solve_upper_cols(q2, Lr, p1, Rr)  # R_r = L_r^-T P_r
    for a in range(q2):
        for b in range(q2):
            Srr[a, b] = 1.0 if a == b else 0.0
    _solve_lower_cols(q2, Lr, q2, Srr)
    _solve_upper_cols(q2, Lr, q2, Srr)  # (L L')^-1
    for j in range(nc):
        for a in range(q1):
            for c in range(p1):
                s = Pi[j, a, c]
                for k in range(q2):
                    s -= Vi[j, k, a] * Rr[k, c]
                Ri[j, a, c] = s
        _solve_upper_cols(q1, Li[j], p1, Ri[j])
        for a in range(q2):
            for b in range(q1):
                s = 0.0
                for k in range(q2):
                    s += Srr[a, k] * Vi[j, k, b]
                Sri[j, a, b] = -s
        _solve_upper_rows(q1, Li[j], q2, Sri[j])
        for a in range(q1):
            for b in range(q1):
                tmp[a, b] = 1.0 if a == b else 0.0
        _solve_lower_cols(q1, Li[j], q1, tmp)  # L^-1
        for a in range(q1):
            for b in range(q1):
                s = tmp[b, a]
                for k in range(q2):
                    s -= Sri[j, k, a] * Vi[j, k, b]
                Sii[j, a, b] = s
        _solve_upper_rows(q1, Li[j], q1, Sii[j])
    if want_modes:
        for j in range(nc + 1):
            i = lo + j
            q = q1 if j < nc else q2
            lam = lam1 if j < nc else lam2
            for a in range(q):
                s = 0.0
                for k in range(q):
                    u = 0.0
                    for c in range(p1):
                        u += (Ri[j, k, c] if j < nc else Rr[k, c]) * g[c]
                    s += lam[a, k] * u
                bhat[i, a] = s
            for a in range(q):
                for b in range(q):
                    s = 0.0
                    for k in range(q):
                        for m in range(q):
                            s += lam[a, k] * (Sii[j, k, m] if j < nc else Srr[k, m]) * lam[b, m]
                    bcov[i, a, b] = s
    if not want_grad:
        return logdet, True
    # T and G of the children; the children's parts of the outer level's (in Dr / Mr)
    pp = p1 - 1
    for a in range(q2):
        for b in range(q2):
            s = 0.0
            for k in range(q2):
                s += A[r, a, k] * lam2[k, b]
            tmp2[a, b] = s  # A_r Lambda_2
    for a in range(q2):
        for c in range(p1):
            s = D[r, a, c]
            for k in range(q2):
                s -= tmp2[a, k] * Rr[k, c]
            Dr[a, c] = s  # T_r, children's terms still to come
        for b in range(q2):
            s = 0.0
            for k in range(q2):
                s += tmp2[a, k] * Srr[k, b]
            Mr[a, b] = s  # G_r, likewise
    for j in range(nc):
        i = lo + j
        for a in range(q1):  # tmp2 = U' Lambda_2 (q1 x q2)
            for b in range(q2):
                s = 0.0
                for k in range(q2):
                    s += up[i, 0, k, a] * lam2[k, b]
                tmp2[a, b] = s
        for a in range(q1):
            for c in range(p1):
                s = D[i, a, c]
                for k in range(q1):
                    s -= ALw[j, a, k] * Ri[j, k, c]
                for k in range(q2):
                    s -= tmp2[a, k] * Rr[k, c]
                Ti[a, c] = s
            for b in range(q1):
                s = 0.0
                for k in range(q1):
                    s += ALw[j, a, k] * Sii[j, k, b]
                for k in range(q2):
                    s += tmp2[a, k] * Sri[j, k, b]
                tmp[a, b] = s  # G_i
        for a in range(q2):  # the outer level's row of Z'Z Lambda at this child: U Lambda_1
            for c in range(p1):
                s = 0.0
                for k in range(q1):
                    s += ULw[j, a, k] * Ri[j, k, c]
                Dr[a, c] -= s
            for b in range(q2):
                s = 0.0
                for k in range(q1):
                    s += ULw[j, a, k] * Sri[j, b, k]
                Mr[a, b] += s
        _accumulate(q1, p1, pp, 0, Ti, Ri[j], tmp, GA, S, GC, g, cf, kappa, reml, tensor)
    _accumulate(q2, p1, pp, 1, Dr, Rr, Mr, GA, S, GC, g, cf, kappa, reml, tensor)
    return logdet, True


@njit(inline="always", **_JIT)
def _accumulate(q, p1, pp, e, T, R, G, GA, S, GC, g, cf, kappa, reml, tensor):
    """Add one level's gradient pieces (see the generic kernel) to term e's sums."""
    for a in range(q):
        for b in range(a + 1):
            GA[e, a, b] += G[a, b]
    if tensor:
        _add_tensor(q, T, R, p1, S[e])
        return
    _add_contracted(q, T, R, G, g, cf, kappa, reml, GC[e])


@njit(inline="always", **_JIT)
def _chunk_body(q1, q2, p1, t, A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml, tensor,
                res):
    """Chunk ``t`` of outer groups into its slots of ``res`` (the output arrays)."""
    out_ld, out_SFD, out_GA, out_S, out_GC, out_ok, bhat, bcov = res
    Q = A.shape[1]
    sd = out_S.shape[4]
    L = maxlen
    gw = L if (want_grad or want_modes) else 0
    ws = (np.zeros((L, Q, Q)), np.zeros((L, Q, Q)), np.zeros((L, Q, p1)), np.zeros((Q, Q)), np.zeros((Q, Q)),
          np.zeros((Q, p1)), np.zeros((Q, p1)), np.zeros((Q, Q)), np.zeros((gw, Q, p1)), np.zeros((gw, Q, Q)),
          np.zeros((gw, Q, Q)), np.zeros((Q, p1)), np.zeros((Q, Q)), np.zeros((Q, Q)), np.zeros((L, Q, Q)),
          np.zeros((L, Q, Q)))
    SFD = np.zeros((p1, p1))
    GA = np.zeros((2, Q, Q))
    S = np.zeros((2, Q, Q, sd, sd))
    GC = np.zeros((2, Q, Q))
    outs = (SFD, GA, S, GC, bhat, bcov)
    ld = 0.0
    ok = True
    for r in range(chunks[t], chunks[t + 1]):
        v, good = _group(q1, q2, p1, roots[r], roots[r + 1], A, D, up, lams[0], lams[1], want_grad, want_modes,
                         g, cf, kappa, reml, ws, outs, tensor)
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
    for e in range(2):
        for a in range(Q):
            for b in range(Q):
                out_GA[t, e, a, b] = GA[e, a, b]
                out_GC[t, e, a, b] = GC[e, a, b]
                for k in range(sd):
                    for m in range(sd):
                        out_S[t, e, a, b, k, m] = S[e, a, b, k, m]


# Each specialisation is a plain (not inlined) function called from the prange loop: the parfor
# passes then see one call instead of the whole body (their cost grows with the body's size).
@njit(**_JIT)
def _chunk_11(t, A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml, tensor, res):
    _chunk_body(1, 1, D.shape[2], t, A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml,
                tensor, res)


@njit(**_JIT)
def _chunk_22(t, A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml, tensor, res):
    _chunk_body(2, 2, D.shape[2], t, A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml,
                tensor, res)


@njit(**_JIT)
def _chunk_22p3(t, A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml, tensor, res):
    # p + 1 = 3 (``y ~ t``) as a literal unrolls the column loops too: its evaluations are about a
    # third faster (an entry point of its own, compiled only when a session fits such a model)
    _chunk_body(2, 2, 3, t, A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml, tensor,
                res)


def _outputs(n_nodes, Q, p1, nchunks, want_grad, want_modes, tensor):
    sd = p1 if tensor else 0
    nm = n_nodes if want_modes else 0
    return (np.zeros(nchunks), np.zeros((nchunks, p1, p1)), np.zeros((nchunks, 2, Q, Q)),
            np.zeros((nchunks, 2, Q, Q, sd, sd)), np.zeros((nchunks, 2, Q, Q)), np.ones(nchunks, dtype=np.bool_),
            np.zeros((nm, Q)), np.zeros((nm, Q, Q)))


_outputs_jit = njit(**_JIT)(_outputs)


# One entry point per specialisation, so that only the sizes a session uses are compiled.  The chunk
# index is passed as int64: the prange index is typed int64 but lowered as uint64, and each type
# would compile the whole chunk function once more.
@njit(parallel=True, **_JIT)
def nested2_11(A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml):
    """Two nested random-intercept terms (q1 = q2 = 1): see :func:`nested2_evaluate`."""
    tensor = want_grad and cf.shape[0] == 0
    res = _outputs_jit(A.shape[0], A.shape[1], D.shape[2], chunks.shape[0] - 1, want_grad, want_modes, tensor)
    for t in prange(chunks.shape[0] - 1):
        _chunk_11(np.int64(t), A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml, tensor,
                  res)
    return res


@njit(parallel=True, **_JIT)
def nested2_22(A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml):
    """Two nested intercept-and-slope terms (q1 = q2 = 2): see :func:`nested2_evaluate`."""
    tensor = want_grad and cf.shape[0] == 0
    res = _outputs_jit(A.shape[0], A.shape[1], D.shape[2], chunks.shape[0] - 1, want_grad, want_modes, tensor)
    for t in prange(chunks.shape[0] - 1):
        _chunk_22(np.int64(t), A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml, tensor,
                  res)
    return res


@njit(parallel=True, **_JIT)
def nested2_22p3(A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml):
    """:func:`nested2_22` when ``D`` has p + 1 = 3 columns (two fixed effects, as in ``y ~ t``)."""
    tensor = want_grad and cf.shape[0] == 0
    res = _outputs_jit(A.shape[0], A.shape[1], D.shape[2], chunks.shape[0] - 1, want_grad, want_modes, tensor)
    for t in prange(chunks.shape[0] - 1):
        _chunk_22p3(np.int64(t), A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml,
                    tensor, res)
    return res


def nested2_evaluate(q1, q2, A, D, up, roots, chunks, lams, maxlen, want_grad, want_modes, g, cf, kappa, reml):
    """Two nested terms with (q1, q2) in {(1, 1), (2, 2)}: the outputs of
    :func:`bigmixed._kernels._nested.nested_evaluate` (other sizes: use that kernel)."""
    kernel = {(1, 1): nested2_11, (2, 2): nested2_22}[(int(q1), int(q2))]
    if kernel is nested2_22 and D.shape[2] == 3:
        kernel = nested2_22p3
    return kernel(A, D, up, roots, chunks, lams, maxlen, bool(want_grad), bool(want_modes), g, cf, float(kappa),
                  bool(reml))


NESTED2_SIZES = ((1, 1), (2, 2))
