"""FoLoRA's gates: the per-direction multipliers ``gamma(lambda)`` of the Adam step (pure torch)."""
from __future__ import annotations

import math

import torch

from .._params import GATES  # noqa: F401  (the gate names, re-exported)
from .._validate import check_gate


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
