"""The reference generalized symmetric eigensolver (Cholesky whitening, then ``eigh``)."""
from __future__ import annotations

import torch

from .._params import EIGH_NON_FINITE, EIGH_NOT_PD, EIGH_OK


def generalized_eigh(A: torch.Tensor, B: torch.Tensor, eps: float = 0.0):
    """Solve ``A v = lambda (B + eps I) v`` for batched symmetric ``A`` and SPD ``B``.

    Cholesky whitening then ``eigh``::

        L = cholesky(B + eps I);  C = L^-1 A L^-T;  C = U diag(w) U^T;  V = L^-T U

    so that ``V^T (B + eps I) V = I`` and ``A V = (B + eps I) V diag(w)``.

    Args:
        A: ``(..., n, n)`` symmetric (only its symmetric part is used).
        B: ``(..., n, n)`` symmetric positive definite once ``eps * I`` is added.
        eps: non-negative damping added to the diagonal of ``B``.

    Returns:
        ``(w, V, status)``: eigenvalues ``(...,  n)`` in ascending order, eigenvectors
        ``(..., n, n)`` (columns), in float64 for float64 inputs and float32 otherwise, and the
        per-problem ``(...)`` int32 status (``forgetkern._params.EIGH_*``). Failed problems hold
        NaN; the public function turns the status into its error.
    """
    dtype = A.dtype  # the working dtype, chosen at the boundary (forgetkern._validate)
    n = A.shape[-1]
    batch = A.shape[:-2]
    A = 0.5 * (A + A.mT)
    B = 0.5 * (B + B.mT)
    if eps:
        B = B + eps * torch.eye(n, dtype=dtype, device=B.device)
    finite = torch.isfinite(A).all(-1).all(-1) & torch.isfinite(B).all(-1).all(-1)
    eye = torch.eye(n, dtype=dtype, device=B.device)
    # failed problems are replaced by the identity so that one bad entry cannot fail the batch
    B = torch.where(finite[..., None, None], B, eye)
    L, info = torch.linalg.cholesky_ex(B)
    pd = info == 0
    L = torch.where(pd[..., None, None], L, eye)
    A = torch.where((finite & pd)[..., None, None], A, torch.zeros_like(A))
    Y = torch.linalg.solve_triangular(L, A, upper=False)  # L^-1 A
    C = torch.linalg.solve_triangular(L, Y.mT, upper=False).mT  # L^-1 A L^-T
    C = 0.5 * (C + C.mT)
    whitened = torch.isfinite(C).all(-1).all(-1)  # overflow while whitening
    C = torch.where(whitened[..., None, None], C, torch.zeros_like(C))
    w, U = torch.linalg.eigh(C)
    V = torch.linalg.solve_triangular(L.mT, U, upper=True)  # L^-T U
    status = torch.full(batch, EIGH_OK, dtype=torch.int32, device=A.device)
    status = torch.where(pd, status, torch.full_like(status, EIGH_NOT_PD))
    status = torch.where(finite & whitened, status, torch.full_like(status, EIGH_NON_FINITE))
    ok = status == EIGH_OK
    w = torch.where(ok[..., None], w, torch.full_like(w, float("nan")))
    V = torch.where(ok[..., None, None], V, torch.full_like(V, float("nan")))
    return w, V, status
