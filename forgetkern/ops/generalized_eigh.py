"""Batched generalized symmetric eigensolver: Triton kernel and launcher.

Solves ``A v = lambda (B + eps I) v`` for a batch of small matrices, one program per matrix,
everything in registers (``n <= EIGH_MAX_N``)::

    L = cholesky(B + eps I)                 # right-looking, one column per iteration
    Li = L^-1                               # forward substitution
    C = Li A Li^T                           # whitening (two ieee-precision tl.dot)
    C = U diag(w) U^T                       # parallel cyclic Jacobi, sweeps until off(C) <= tol
    V = Li^T U, sorted by ascending w       # back-transform: V^T (B + eps I) V = I

The Jacobi sweeps use the round-robin (circle method) ordering: each of the ``m - 1`` rounds of
a sweep rotates ``m / 2`` disjoint index pairs at once (``m`` = ``n`` rounded up to even), applied
as ``C <- J^T C J`` and ``U <- U J`` with one rotation matrix ``J`` (two nonzeros per row and
column), computed as O(n^2) gathers of partner rows and columns (``tl.gather``; dense products
on Triton versions without it). Padded indices
(``n <= i < BLOCK_N``) hold zeros in ``C`` and never rotate.

Every problem gets a status code (``forgetkern._params.EIGH_*``, the same as the CUDA kernel's):
``EIGH_NON_FINITE`` for NaN/inf in ``A`` or ``B`` (or a whitened matrix / result that overflowed),
``k + 1`` when the Cholesky factorization fails at column ``k`` (not positive definite),
``EIGH_NO_CONVERGENCE`` after ``EIGH_MAX_SWEEPS`` sweeps (the last iterate is returned). Failed
problems get NaN outputs; ``forgetkern.generalized_eigh`` turns the codes into errors and warnings.
The dispatch table sends this kernel ``n <= EIGH_TRITON_MAX_N`` (:func:`unsupported`); larger
problems go to the CUDA kernel where it runs, else to the reference (``forgetkern._backend``).
"""
from __future__ import annotations

import torch

from .._params import EIGH_MAX_N, EIGH_MAX_SWEEPS, EIGH_NO_CONVERGENCE, EIGH_NON_FINITE
from ._triton import HAS_TRITON, check_triton, jit, next_power_of_2, tl

#: Rotations by ``tl.gather`` (Triton >= 3.2); older Triton uses dense rotation products.
USE_GATHER = HAS_TRITON and hasattr(tl, "gather")


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@jit
def _any_nonfinite(x):
    """Whether a ``[BLOCK_N, BLOCK_N]`` tile holds a NaN or an inf (``x - x`` is NaN exactly then)."""
    return tl.sum(tl.sum(((x - x) != 0.0).to(tl.int32), axis=1), axis=0) > 0


@jit
def _off_and_total(c, eye):
    """``(sum_{i != j} C_ij^2, sum_ij C_ij^2)`` of ``C / max|C|``: scale-free, so entries near the
    dtype's range (1e30 in fp32) cannot overflow the squares and stop the sweeps early."""
    scale = tl.max(tl.max(tl.abs(c), axis=1), axis=0)
    cn = c / tl.where(scale > 0.0, scale, 1.0)
    total = tl.sum(tl.sum(cn * cn, axis=1), axis=0)
    off = tl.sum(tl.sum(tl.where(eye, 0.0, cn * cn), axis=1), axis=0)  # not total - diag: cancels
    return off, total


@jit
def _generalized_eigh_kernel(
    a_ptr,  # [batch, n, n] symmetric A (only its symmetric part is used), contiguous
    b_ptr,  # [batch, n, n] symmetric B + eps I (damping added by the launcher), contiguous
    w_ptr,  # [batch, n] out: eigenvalues, ascending (NaN where the problem failed)
    v_ptr,  # [batch, n, n] out: eigenvectors as columns, V^T (B + eps I) V = I
    status_ptr,  # [batch] out int32: EIGH_* status (k + 1: Cholesky failed at column k)
    sweeps_ptr,  # [batch] out int32: Jacobi sweeps used
    n,  # matrix size (<= BLOCK_N)
    tol2,  # stop when sum_{i != j} C_ij^2 <= tol2 * sum_ij C_ij^2
    BLOCK_N: tl.constexpr,
    MAX_SWEEPS: tl.constexpr,  # EIGH_MAX_SWEEPS
    NON_FINITE: tl.constexpr,  # EIGH_NON_FINITE
    NO_CONVERGENCE: tl.constexpr,  # EIGH_NO_CONVERGENCE
    ACC_FP64: tl.constexpr,
    USE_GATHER: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    dt = tl.float64 if ACC_FP64 else tl.float32
    base = pid * n * n
    idx = tl.arange(0, BLOCK_N)
    r2 = idx[:, None]
    c2 = idx[None, :]
    inb = (r2 < n) & (c2 < n)
    eye = r2 == c2
    offs = base + r2.to(tl.int64) * n + c2
    a = tl.load(a_ptr + offs, mask=inb, other=0.0).to(dt)
    b = tl.load(b_ptr + offs, mask=inb, other=0.0).to(dt)
    # a NaN or inf input is reported as such (not as "not positive definite")
    status = tl.where(_any_nonfinite(a) | _any_nonfinite(b), NON_FINITE, 0)
    # symmetric parts, halved before the sum (no overflow near the dtype's max)
    a = 0.5 * a + 0.5 * tl.trans(a)
    b = 0.5 * b + 0.5 * tl.trans(b)
    zero2 = tl.zeros((BLOCK_N, BLOCK_N), dtype=dt)
    one2 = zero2 + 1.0
    # M = B + eps I on the n x n block, identity on the padding
    m = tl.where(inb, b, tl.where(eye, one2, zero2))

    # ---- Cholesky M = L L^T (right-looking) -------------------------------------------------
    low = zero2
    for k in range(0, n):
        col = tl.sum(tl.where(c2 == k, m, 0.0), axis=1)  # M[:, k]
        d = tl.sum(tl.where(idx == k, col, 0.0), axis=0)  # M[k, k]
        status = tl.where((status == 0) & ((d <= 0.0) | (d != d)), k + 1, status)
        d_safe = tl.where(d > 0.0, d, 1.0)
        # L[:, k] = M[k:, k] / sqrt(M[k, k]);  M -= L[:, k] L[:, k]^T
        lk = tl.where(idx >= k, col / tl.sqrt(d_safe), 0.0)
        low = tl.where(c2 == k, lk[:, None], low)
        m = m - lk[:, None] * lk[None, :]
    low = tl.where(inb, low, tl.where(eye, one2, zero2))

    # ---- Li = L^-1 by forward substitution: Li[i, :] = (e_i - L[i, :i] Li[:i, :]) / L[i, i] --
    li = tl.where(inb, zero2, tl.where(eye, one2, zero2))
    for i in range(0, n):
        lrow = tl.sum(tl.where(r2 == i, low, 0.0), axis=0)  # L[i, :]
        lii = tl.sum(tl.where(idx == i, lrow, 0.0), axis=0)
        lii = tl.where(lii > 0.0, lii, 1.0)
        strict = tl.where(idx < i, lrow, 0.0)
        contrib = tl.sum(strict[:, None] * li, axis=0)
        new_row = (tl.where(idx == i, 1.0, 0.0) - contrib) / lii
        li = tl.where(r2 == i, new_row[None, :], li)

    # ---- whitening C = Li A Li^T ----------------------------------------------------------------
    c = tl.dot(tl.dot(li, a, input_precision="ieee"), tl.trans(li), input_precision="ieee")
    c = 0.5 * c + 0.5 * tl.trans(c)
    status = tl.where((status == 0) & _any_nonfinite(c), NON_FINITE, status)  # overflow
    c = tl.where(status == 0, c, 0.0)  # a failed problem sweeps nothing (its outputs are NaN)

    # ---- parallel cyclic Jacobi: C = U diag(w) U^T --------------------------------------------
    u = tl.where(eye, one2, zero2)
    players = n + (n % 2)  # even number of players for the circle method
    last = players - 1
    off, total = _off_and_total(c, eye)
    sweeps = tl.zeros((), dtype=tl.int32)
    while (sweeps < MAX_SWEEPS) & (off > tol2 * total) & (status == 0):
        for rnd in range(0, last):
            # partner of i in round rnd (player `last` fixed, the others rotate); padding: itself
            pr = (2 * rnd - idx + 2 * last) % last
            pr = tl.where(idx == rnd, last, pr)
            pr = tl.where(idx == last, rnd, pr)
            pr = tl.where(idx >= players, idx, pr)
            is_partner = c2 == pr[:, None]
            diag = tl.sum(tl.where(eye, c, 0.0), axis=1)  # C[i, i]
            # C[i, partner(i)] and C[partner(i), i], averaged: both ends of a pair must compute the
            # same rotation (with C_pp ~ C_qq, theta = (C_qq - C_pp) / 2 C_pq is ill-conditioned,
            # and the row and column updates leave C_pq, C_qp a rounding apart)
            cpq = 0.5 * (tl.sum(tl.where(is_partner, c, 0.0), axis=1)
                         + tl.sum(tl.where(r2 == pr[None, :], c, 0.0), axis=0))
            dpart = tl.sum(tl.where(is_partner, diag[None, :], 0.0), axis=1)  # C[partner, partner]
            lower = idx < pr
            app = tl.where(lower, diag, dpart)
            aqq = tl.where(lower, dpart, diag)
            rotate = cpq != 0.0
            # theta = (a_qq - a_pp) / (2 a_pq);  t = sign(theta) / (|theta| + sqrt(theta^2 + 1))
            theta = (aqq - app) / (2.0 * tl.where(rotate, cpq, 1.0))
            big = tl.abs(theta) > 1e15
            theta_s = tl.where(big, 1.0, theta)
            t = 1.0 / (tl.abs(theta_s) + tl.sqrt(theta_s * theta_s + 1.0))
            t = tl.where(big, 0.5 / tl.abs(tl.where(big, theta, 1.0)), t)
            t = tl.where(theta < 0.0, -t, t)
            cs = 1.0 / tl.sqrt(t * t + 1.0)
            sn = t * cs
            cs = tl.where(rotate, cs, 1.0)
            sn = tl.where(rotate, sn, 0.0)
            # J[p, p] = J[q, q] = c, J[p, q] = s, J[q, p] = -s  (p < q): C <- J^T C J zeroes C[p, q].
            # J has two nonzeros per column, J[j, j] = cs[j] and J[pr[j], j] = off[j].
            off_j = tl.where(lower, -sn, sn)
            if USE_GATHER:  # O(n^2): gather the partner column / row
                pr_col = tl.broadcast_to(pr[None, :], (BLOCK_N, BLOCK_N))  # [i, j] -> pr[j]
                pr_row = tl.broadcast_to(pr[:, None], (BLOCK_N, BLOCK_N))  # [i, j] -> pr[i]
                # (C J)[:, j] = cs[j] C[:, j] + off[j] C[:, pr[j]]
                c = c * cs[None, :] + tl.gather(c, pr_col, axis=1) * off_j[None, :]
                # (J^T M)[i, :] = cs[i] M[i, :] + off[i] M[pr[i], :]
                c = c * cs[:, None] + tl.gather(c, pr_row, axis=0) * off_j[:, None]
                u = u * cs[None, :] + tl.gather(u, pr_col, axis=1) * off_j[None, :]
            else:  # Triton without tl.gather: J as a dense matrix, O(n^3) products
                jrot = tl.where(eye, cs[None, :], tl.where(r2 == pr[None, :], off_j[None, :], 0.0))
                c = tl.dot(tl.trans(jrot), tl.dot(c, jrot, input_precision="ieee"), input_precision="ieee")
                u = tl.dot(u, jrot, input_precision="ieee")
        c = 0.5 * c + 0.5 * tl.trans(c)
        sweeps += 1
        off, total = _off_and_total(c, eye)
    status = tl.where((status == 0) & (off > tol2 * total), NO_CONVERGENCE, status)

    # ---- back-transform V = Li^T U and ascending sort -----------------------------------------
    v = tl.dot(tl.trans(li), u, input_precision="ieee")
    w = tl.sum(tl.where(eye, c, 0.0), axis=1)
    solved = (status == 0) | (status == NO_CONVERGENCE)
    status = tl.where(solved & (_any_nonfinite(v) | _any_nonfinite(tl.where(eye, c, 0.0))),
                      NON_FINITE, status)  # a result that overflowed is a failure, never returned
    w = tl.where(idx < n, w, float("inf"))
    # rank_i = #{j : w_j < w_i or (w_j == w_i and j < i)};  V_sorted = V P with P[i, rank_i] = 1
    before = (w[None, :] < w[:, None]) | ((w[None, :] == w[:, None]) & (c2 < r2))
    rank = tl.sum(before.to(tl.int32), axis=1)
    perm = tl.where(rank[:, None] == c2, one2, zero2)
    v = tl.dot(v, perm, input_precision="ieee")
    w_sorted = tl.sum(tl.where(rank[:, None] == c2, w[:, None], 0.0), axis=0)
    failed = (status != 0) & (status != NO_CONVERGENCE)
    v = tl.where(failed, float("nan"), v)
    w_sorted = tl.where(failed, float("nan"), w_sorted)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=inb)
    tl.store(w_ptr + pid * n + idx, w_sorted.to(w_ptr.dtype.element_ty), mask=idx < n)
    tl.store(status_ptr + pid, status)
    tl.store(sweeps_ptr + pid, sweeps)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
#: Largest ``n`` the dispatch table sends to this kernel: above it the straight-line parts spill
#: (:func:`launch_config`), so larger problems go to the CUDA kernel where it runs (``n <=
#: EIGH_MAX_N``), else to the reference. Called directly, the launcher takes ``n <= EIGH_MAX_N``.
EIGH_TRITON_MAX_N = 32


def unsupported(op: str, size: int | None) -> str | None:
    """Why this kernel does not serve a problem of ``size`` (``n``; ``None``: it does); read by
    ``forgetkern._backend``."""
    if size is not None and not 1 <= size <= EIGH_TRITON_MAX_N:
        return f"the Triton eigensolver serves 1 <= n <= {EIGH_TRITON_MAX_N}, got n={size}"
    return None


def launch_config(n: int) -> dict:
    """Tile size and warps for :func:`_generalized_eigh_kernel`.

    One program holds a few ``BLOCK_N x BLOCK_N`` tiles (C, U, Li and a rotation) in registers;
    ``tl.dot`` needs ``BLOCK_N >= 16``. 2 warps for 16 x 16 tiles, 8 above: compiled for sm_90
    (``benchmarks/sm90_kernels.py``) neither spills for ``n <= 32`` in fp32 or fp64 (4 warps at
    ``n = 32`` spill). At ``n = 64`` the straight-line parts (loads, whitening, back-transform and
    sort) spill about 1.5 KB per thread in fp32; the Cholesky, substitution and Jacobi loops do not.
    """
    block = max(16, next_power_of_2(n))
    num_warps = 2 if block <= 16 else 8
    return {"BLOCK_N": block, "num_warps": num_warps}


def _tolerance(dtype: torch.dtype, n: int) -> float:
    """Squared relative off-diagonal tolerance: ``(n * machine epsilon)^2``."""
    return (max(n, 1) * torch.finfo(dtype).eps) ** 2


def generalized_eigh(A: torch.Tensor, B: torch.Tensor, eps: float = 0.0, *,
                     return_sweeps: bool = False):
    """Triton batched ``A v = lambda (B + eps I) v``: one program per matrix, ``n <= 64``.

    The ``solve`` interface of the ``generalized_eigh`` op: inputs already validated
    (``forgetkern._validate``), ``1 <= n <= EIGH_MAX_N`` (the table sends it ``n <=
    EIGH_TRITON_MAX_N``, see :func:`unsupported`); the caller turns ``status`` into errors (``_validate.check_eigh_status``).
    In plain torch::

        L = torch.linalg.cholesky(B + eps * I)
        w, U = torch.linalg.eigh(L.inverse() @ A @ L.inverse().mT)
        V = L.inverse().mT @ U

    Args:
        A: ``(..., n, n)`` symmetric (only its symmetric part is used).
        B: ``(..., n, n)`` symmetric, positive definite once ``eps * I`` is added.
        eps: non-negative damping.
        return_sweeps: also return the ``(...)`` int32 Jacobi sweep counts.

    Returns:
        ``(w, V, status)``: ascending eigenvalues ``(..., n)``, eigenvectors ``(..., n, n)``
        (columns), float64 if ``A`` or ``B`` is float64 and float32 otherwise, and the ``(...)``
        int32 status codes (``forgetkern._params.EIGH_*``; NaN outputs where a problem failed).
    """
    check_triton()
    n = A.shape[-1]
    if not 1 <= n <= EIGH_MAX_N:
        raise ValueError(f"the Triton eigensolver handles 1 <= n <= {EIGH_MAX_N}, got n={n} "
                         "(forgetkern._backend sends it n <= EIGH_TRITON_MAX_N)")
    dtype = A.dtype  # the working dtype, chosen at the boundary (forgetkern._validate)
    batch_shape = A.shape[:-2]
    a = A.reshape(-1, n, n).contiguous()
    b = B.reshape(-1, n, n)
    if eps:
        # in the working dtype, as the reference does (a float kernel argument would be fp32)
        b = b + eps * torch.eye(n, dtype=dtype, device=b.device)
    b = b.contiguous()
    count = a.shape[0]
    w = torch.empty(count, n, dtype=dtype, device=A.device)
    V = torch.empty(count, n, n, dtype=dtype, device=A.device)
    status = torch.zeros(count, dtype=torch.int32, device=A.device)
    sweeps = torch.zeros(count, dtype=torch.int32, device=A.device)
    if count:
        _generalized_eigh_kernel[(count,)](
            a, b, w, V, status, sweeps, n, _tolerance(dtype, n),
            MAX_SWEEPS=EIGH_MAX_SWEEPS, NON_FINITE=EIGH_NON_FINITE, NO_CONVERGENCE=EIGH_NO_CONVERGENCE,
            ACC_FP64=dtype == torch.float64, USE_GATHER=USE_GATHER, **launch_config(n),
        )
    out = (w.reshape(*batch_shape, n), V.reshape(*batch_shape, n, n), status.reshape(batch_shape))
    return (*out, sweeps.reshape(batch_shape)) if return_sweeps else out
