"""The per-parameter math of FoLoRA as pure torch functions (the reference path).

:func:`adam_step` is the element-wise part for one parameter, written with exactly the torch
operations of ``torch.optim.AdamW`` (single-tensor path), so that with all gates equal to one
FoLoRA reproduces AdamW bit for bit. :func:`adam_step_segments` applies it to every segment of
the optimizer's flat buffers; :func:`forgetkern.ops.folora.folora_adam_step` is the fused Triton
kernel that replaces it.
"""
from __future__ import annotations

import torch


def bias_corrections(step: float, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """``(lr / (1 - beta1**step), sqrt(1 - beta2**step))`` in Python floats, as AdamW."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return lr / bias_correction1, bias_correction2**0.5


def adam_step(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
              step_size: float, bias_correction2_sqrt: float, beta1: float, beta2: float,
              eps: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Update the moments in place and return the (gated) step to add to the coordinates.

    In plain torch (the arithmetic of ``torch.optim.AdamW``)::

        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = -step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps)
        step = step * gate                       # gate: (cols,), broadcast over rows

    Args:
        g: gradient coordinates, any shape (the last dimension indexes spectral directions when
            ``gate`` is given).
        exp_avg, exp_avg_sq: moments, shaped like ``g`` (updated in place).
        step_size: ``lr / (1 - beta1**step)``.
        bias_correction2_sqrt: ``sqrt(1 - beta2**step)``.
        beta1, beta2, eps: Adam hyperparameters.
        gate: optional per-column gates ``(g.shape[-1],)``.

    Returns:
        The step, shaped like ``g``.
    """
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    step = torch.zeros_like(exp_avg).addcdiv_(exp_avg, denom, value=-step_size)
    if gate is not None:
        step.mul_(gate)
    return step


def adam_step_segments(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                       table, active, scalars: list[tuple[float, ...]],
                       gates: torch.Tensor | None) -> None:
    """Reference for :func:`forgetkern.ops.folora.folora_adam_step`: :func:`adam_step` on each
    active segment of the flat buffers.

    ``scalars[i]`` is ``(step_size, bias_correction2_sqrt, eps, beta1, beta2)`` of segment ``i``
    in Python floats.
    """
    for i in active:
        a, n, cols = table.start[i], table.numel[i], max(table.cols[i], 1)
        gate = None
        if gates is not None and table.gate[i] >= 0:
            gate = gates[table.gate[i]: table.gate[i] + cols]
        step_size, bc2_sqrt, eps, beta1, beta2 = scalars[i]
        view = (slice(a, a + n),)
        out = adam_step(
            g[view].view(-1, cols), m[view].view(-1, cols), v[view].view(-1, cols),
            step_size=step_size, bias_correction2_sqrt=bc2_sqrt, beta1=beta1, beta2=beta2,
            eps=eps, gate=gate,
        )
        s[view] = out.view(-1)
