"""The reference of FoLoRA's gated Adam step over the optimizer's flat buffers."""
from __future__ import annotations

import torch

from .._params import FOLORA_SCALARS


def folora_adam(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                neg_step_size: float, bc2_sqrt: float, eps: float, beta2: float, w1: float,
                w2: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """One segment's gated Adam step, with exactly the torch operations of ``torch.optim.AdamW``
    (single-tensor path), so that with no gate FoLoRA reproduces AdamW bit for bit::

        exp_avg.lerp_(g, w1)                                     # w1 = 1 - beta1
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=w2)          # w2 = 1 - beta2
        step = neg_step_size * exp_avg / (exp_avg_sq.sqrt() / bc2_sqrt + eps) * gate

    ``g``, ``exp_avg``, ``exp_avg_sq``: any one shape (moments updated in place); ``gate``:
    broadcastable to it (per column, or one multiplier per element). Returns the step, shaped
    like ``g``. The scalars are the columns of ``_params.FOLORA_SCALARS``.
    """
    exp_avg.lerp_(g, w1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=w2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    step = torch.zeros_like(exp_avg).addcdiv_(exp_avg, denom, value=neg_step_size)
    if gate is not None:
        step.mul_(gate)
    return step


def folora_step(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor, table,
                active, scalars: torch.Tensor, gates: torch.Tensor | None) -> None:
    """FoLoRA's element-wise step: :func:`folora_adam` on every ``active`` segment of flat buffers.

    In plain torch, for each active segment ``i`` (``a = table.start[i]``, ``n = table.numel[i]``,
    ``c = table.cols[i]``, ``o = table.gate[i]``)::

        sc = dict(zip(FOLORA_SCALARS, scalars[i].tolist()))
        gate = gates[o:o + c] if o >= 0 else None                    # (c,) per column
        s[a:a + n] = folora_adam(g[a:a + n].view(-1, c), m[a:a + n].view(-1, c),
                                 v[a:a + n].view(-1, c), gate=gate, **sc).view(-1)

    Args:
        g, m, v, s: ``(N,)`` float32 flat buffers of gradient coordinates, first and second
            moments (updated in place) and the step (written on active segments only).
        table: :class:`forgetkern._params.SegmentTable`, the segments' layout and gate offsets.
        active: indices of the segments to update; the others are left untouched.
        scalars: ``(S, NUM_FOLORA_SCALARS)`` float32 per-segment scalars, columns in
            ``_params.FOLORA_SCALARS`` order (rows of inactive segments are not read); the
            host builds it each step, and this path reads it on the host.
        gates: ``(G,)`` float32 gates of all gated segments, or ``None`` when none is gated.

    Adjacent active segments with equal scalars (the usual case: one parameter group) are updated
    as one run of the flat buffers, their gates expanded to one multiplier per element (cached on
    ``table``); element by element the arithmetic is that of the loop above.
    """
    rows = scalars.tolist()
    for run in _folora_runs(table, active, rows):
        a = table.start[run[0]]
        b = table.start[run[-1]] + table.numel[run[-1]]
        gate = None
        if gates is not None and any(table.gate[i] >= 0 for i in run):
            gate = _folora_expanded_gates(table, gates)[a:b]
        s[a:b] = folora_adam(g[a:b], m[a:b], v[a:b], gate=gate, **dict(zip(FOLORA_SCALARS, rows[run[0]])))


def _folora_runs(table, active, rows) -> list[list[int]]:
    """``active`` segments split into runs that are adjacent in the flat buffers and share scalars."""
    runs: list[list[int]] = []
    for i in active:
        if runs:
            j = runs[-1][-1]
            if table.start[j] + table.numel[j] == table.start[i] and rows[j] == rows[i]:
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


def _folora_expanded_gates(table, gates: torch.Tensor) -> torch.Tensor:
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
