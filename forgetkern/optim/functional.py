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
    in Python floats. Adjacent active segments with equal scalars (the usual case: one parameter
    group) are updated as one run of the flat buffers, with their gates expanded to one
    multiplier per element (cached on ``table``); element by element the arithmetic is that of
    :func:`adam_step` on each segment.
    """
    for run in _runs(table, active, scalars):
        a = table.start[run[0]]
        b = table.start[run[-1]] + table.numel[run[-1]]
        step_size, bc2_sqrt, eps, beta1, beta2 = scalars[run[0]]
        gate = None
        if gates is not None and any(table.gate[i] >= 0 for i in run):
            gate = _expanded_gates(table, gates)[a:b]
        view = (slice(a, b),)
        s[view] = adam_step(
            g[view], m[view], v[view], step_size=step_size, bias_correction2_sqrt=bc2_sqrt,
            beta1=beta1, beta2=beta2, eps=eps, gate=gate,
        )


def _runs(table, active, scalars) -> list[list[int]]:
    """``active`` segments split into runs that are adjacent in the flat buffers and share scalars."""
    runs: list[list[int]] = []
    for i in active:
        if runs:
            j = runs[-1][-1]
            if table.start[j] + table.numel[j] == table.start[i] and scalars[j] == scalars[i]:
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


def _expanded_gates(table, gates: torch.Tensor) -> torch.Tensor:
    """One gate per element of the flat buffers (1 where a segment is ungated), cached on
    ``table`` for this gate buffer."""
    key = ("expanded_gates", id(gates))
    hit = table._cache.get(key)
    if hit is not None and hit[0] is gates:
        return hit[1]
    total = table.start[-1] + table.numel[-1] if table.start else 0
    out = torch.ones(total, dtype=gates.dtype, device=gates.device)
    for a, n, cols, off in zip(table.start, table.numel, table.cols, table.gate):
        if off >= 0 and n:
            cols = max(cols, 1)
            out[a: a + n].view(-1, cols).copy_(gates[off: off + cols].expand(n // cols, cols))
    table._cache[key] = (gates, out)
    return out
