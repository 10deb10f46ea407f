"""FoLoRA spectral math: trace normalization, the generalized eigenbasis, gates, sketches.

All functions are pure torch and backend-agnostic except :func:`spectral_basis`, which calls
:func:`forgetkern.generalized_eigh` with the chosen backend.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

GATES = ("soft", "sigmoid", "hard", "topk", "none")


def check_gate(gate: str, tau: float, sharpness: float = 4.0) -> None:
    """Validate a gate name and its parameters (see :func:`gate_values`)."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau!r}")
    if gate in ("soft", "hard") and tau < 0:
        raise ValueError(f"tau must be >= 0 for gate={gate!r}, got {tau}")
    if gate == "sigmoid":
        if tau <= 0:
            raise ValueError(f"tau must be > 0 for gate='sigmoid' (the ratio where the gate is 1/2), got {tau}")
        if not (isinstance(sharpness, (int, float)) and math.isfinite(sharpness) and sharpness > 0):
            raise ValueError(f"sharpness must be a finite number > 0, got {sharpness!r}")
    if gate == "topk" and not (0.0 < tau <= 1.0):
        raise ValueError(f"tau must be in (0, 1] for gate='topk' (fraction of directions kept), got {tau}")


def gate_values(lam: torch.Tensor, gate: str, tau: float, sharpness: float = 4.0,
                dim: int | None = None) -> torch.Tensor:
    """Per-direction gates ``gamma(lambda)`` for ascending ratios ``lam`` ``(..., k)``.

    * ``soft``: ``lambda / (lambda + tau)`` (``tau = 0``: all 1);
    * ``sigmoid``: ``sigmoid(sharpness * log(lambda / tau))`` = ``lambda^s / (lambda^s + tau^s)``
      (``sharpness = 1`` is ``soft``);
    * ``hard``: ``1`` where ``lambda >= tau``, else ``0``;
    * ``topk``: the ``ceil(tau * dim)`` largest ratios of the ``dim``-dimensional space get ``1``,
      the others ``0``; ``lam`` may hold only the ``k`` smallest of the ``dim`` ratios (low-rank
      mode: the directions not stored are the largest and stay open);
    * ``none``: all ``1``.

    Negative ratios (round-off of a positive semi-definite task statistic) count as ``0``.
    """
    check_gate(gate, tau, sharpness)
    lam = lam.clamp_min(0.0)
    if gate == "none" or (gate == "soft" and tau == 0):
        return torch.ones_like(lam)
    if gate == "soft":
        return lam / (lam + tau)
    if gate == "sigmoid":
        return torch.sigmoid(sharpness * (torch.log(lam) - math.log(tau)))
    if gate == "hard":
        return (lam >= tau).to(lam.dtype)
    k = lam.shape[-1]
    dim = k if dim is None else int(dim)
    closed = min(k, dim - math.ceil(tau * dim))
    g = torch.ones_like(lam)
    g[..., :closed] = 0.0  # lam is ascending: the smallest ratios close
    return g


def trace_normalize(S: torch.Tensor, name: str = "statistic") -> torch.Tensor:
    """``S * n / trace(S)`` (mean eigenvalue 1) for ``(..., n, n)``; symmetrized.

    Raises:
        ValueError: non-finite entries or a non-positive trace.
    """
    if not bool(torch.isfinite(S).all()):
        raise ValueError(f"{name} has non-finite entries")
    n = S.shape[-1]
    tr = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1)
    if bool((tr <= 0).any()):
        raise ValueError(f"{name} has a non-positive trace; statistics must be E[x x^T] of real data")
    S = 0.5 * (S + S.mT)
    return S * (n / tr)[..., None, None]


def damped(S: torch.Tensor, damping: float) -> torch.Tensor:
    """``S + damping * I``."""
    if not damping:
        return S
    return S + damping * torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)


class Basis(NamedTuple):
    """Generalized eigenbasis of ``(task, proxy + damping I)`` (both trace-normalized).

    ``V^T (proxy + damping I) V = I`` over the kept directions and
    ``task V = (proxy + damping I) V diag(lam)``.

    Attributes:
        lam: ``(..., k)`` ascending ratios (task utility per unit proxy penalty).
        V: ``(..., n, k)`` eigenvectors (columns).
        W: ``(..., n, k)`` ``(proxy + damping I) V``; ``W^T = V^-1`` when ``k = n``. The spectral
            coefficients of a vector ``u`` are ``u W`` and ``u = (u W) V^T`` (row convention).
    """

    lam: torch.Tensor
    V: torch.Tensor
    W: torch.Tensor


def spectral_basis(task: torch.Tensor, proxy: torch.Tensor, damping: float, k: int | None = None,
                   backend: str | None = None) -> Basis:
    """Generalized eigenbasis of already trace-normalized ``task`` and ``proxy`` ``(..., n, n)``.

    Keeps the ``k`` lowest-ratio directions (all when ``k`` is ``None`` or ``>= n``).

    Raises:
        ValueError: ``proxy + damping I`` is not positive definite (message names ``proxy_cov``).
    """
    from ..functional import generalized_eigh

    try:
        lam, V = generalized_eigh(task, proxy, eps=damping, backend=backend)
    except ValueError as exc:
        if "positive definite" in str(exc):
            raise ValueError(
                f"proxy_cov (trace-normalized) + damping*I is not positive definite with "
                f"damping={damping}; increase damping ({exc})"
            ) from None
        raise
    n = task.shape[-1]
    if k is not None and k < n:
        lam, V = lam[..., :k].contiguous(), V[..., :k].contiguous()
    W = damped(proxy.to(V.dtype), damping) @ V
    return Basis(lam, V, W)


class Sketch(NamedTuple):
    """Low-rank-plus-isotropic approximation ``S ~ Q diag(s) Q^T + rho (I - Q Q^T)`` of a
    trace-normalized statistic (exact when ``Q`` has all ``n`` columns)."""

    Q: torch.Tensor  # (n, k) top-k eigenvectors
    s: torch.Tensor  # (k,) their eigenvalues
    rho: torch.Tensor  # () mean of the remaining eigenvalues


def sketch(S: torch.Tensor, k: int) -> Sketch:
    """Top-``k`` eigenpairs of a symmetric ``(n, n)`` ``S`` plus the mean of the rest."""
    n = S.shape[-1]
    evals, evecs = torch.linalg.eigh(S)
    k = min(k, n)
    s = evals[n - k:].clamp_min(0.0).contiguous()
    Q = evecs[:, n - k:].contiguous()
    rest = (torch.diagonal(S).sum() - s.sum()) / max(n - k, 1)
    rho = rest.clamp_min(0.0) if k < n else torch.zeros((), dtype=S.dtype, device=S.device)
    return Sketch(Q, s, rho)


def project(A: torch.Tensor, stat) -> torch.Tensor:
    """``A S A^T`` for ``A`` ``(r, n)`` and a dense ``S`` ``(n, n)`` or a :class:`Sketch`."""
    if isinstance(stat, Sketch):
        AQ = A @ stat.Q
        # A (Q diag(s - rho) Q^T + rho I) A^T
        out = (AQ * (stat.s - stat.rho)) @ AQ.mT + stat.rho * (A @ A.mT)
        return 0.5 * (out + out.mT)
    out = (A @ stat) @ A.mT
    return 0.5 * (out + out.mT)
