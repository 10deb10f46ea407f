"""FoLoRA's element-wise Adam step for all parameters in one launch: Triton kernel and launcher.

Every parameter the optimizer updates is one *segment* of flat float32 buffers (its gradient
coordinates ``g``, moments ``m`` and ``v``, and the output step ``s``). A block table maps each
program to one ``BLOCK``-sized piece of one segment, so one launch covers all parameters of any
sizes. Per element (the arithmetic of ``torch.optim.AdamW``, see
:func:`forgetkern.optim.functional.adam_step`)::

    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    s = -(lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps))     # bc_i = 1 - beta_i ** step
    s = s * gate[col]                                        # gated segments only

The projections around it (into and out of spectral coordinates) are torch matmuls in
:class:`forgetkern.optim.FoLoRA`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import HAS_TRITON, jit, tl

#: Columns of the per-segment scalar table.
SCALARS = ("neg_step_size", "bc2_sqrt", "eps", "beta2", "w1", "w2")
NUM_SCALARS = len(SCALARS)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@jit
def _folora_adam_kernel(
    g_ptr,  # [N] float32 gradient coordinates of all segments, flattened
    m_ptr,  # [N] float32 first moments (updated in place)
    v_ptr,  # [N] float32 second moments (updated in place)
    s_ptr,  # [N] float32 out: the step to add (lr and bias corrections included, gated)
    blk_seg_ptr,  # [num_blocks] int32 segment of each program
    blk_start_ptr,  # [num_blocks] int64 first flat element of each program
    seg_start_ptr,  # [S] int64 first flat element of each segment
    seg_end_ptr,  # [S] int64 one past the last flat element of each segment
    seg_cols_ptr,  # [S] int64 row length of the segment's matrix (gate index = column)
    seg_gate_ptr,  # [S] int64 offset of the segment's gates in gate_ptr, -1: ungated
    scal_ptr,  # [S, 6] float32 neg_step_size, bc2_sqrt, eps, beta2, w1 = 1 - beta1, w2 = 1 - beta2
    gate_ptr,  # [G] float32 gates of all gated segments
    BLOCK: tl.constexpr,
    HAS_GATES: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid).to(tl.int64)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(seg_end_ptr + seg)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < end
    neg_step = tl.load(scal_ptr + seg * 6 + 0)
    bc2_sqrt = tl.load(scal_ptr + seg * 6 + 1)
    eps = tl.load(scal_ptr + seg * 6 + 2)
    beta2 = tl.load(scal_ptr + seg * 6 + 3)
    w1 = tl.load(scal_ptr + seg * 6 + 4)
    w2 = tl.load(scal_ptr + seg * 6 + 5)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    # m = lerp(m, g, w1), in torch's two-sided form
    m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))
    # v = beta2 v + (1 - beta2) g^2
    v = v * beta2 + (w2 * g) * g
    # s = -(lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    s = (m / denom) * neg_step  # the rounding order of torch's addcdiv
    if HAS_GATES:
        gate_off = tl.load(seg_gate_ptr + seg)
        if gate_off >= 0:
            seg_start = tl.load(seg_start_ptr + seg)
            cols = tl.load(seg_cols_ptr + seg)
            gamma = tl.load(gate_ptr + gate_off + (offs - seg_start) % cols, mask=mask, other=1.0)
            s = s * gamma
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(s_ptr + offs, s, mask=mask)


# --------------------------------------------------------------------------------------------
# Segment tables and launcher
# --------------------------------------------------------------------------------------------
def launch_config(total: int) -> dict:
    """Block size and warps for :func:`_folora_adam_kernel`: 1024 elements per program
    (4 KiB of each of the four float32 streams), 4 warps; small problems use 256."""
    block = 1024 if total >= 1 << 16 else 256
    return {"BLOCK": block, "num_warps": 4}


@dataclass
class SegmentTable:
    """Where each segment lives in the flat buffers and which gates it uses.

    Host lists (``start``, ``numel``, ``cols``, ``gate``) serve the reference path; the device
    block table for the kernel is built on demand by :meth:`device_tables` and cached per set of
    active segments.
    """

    start: list[int]
    numel: list[int]
    cols: list[int]
    gate: list[int]  # offset into the flat gate buffer, -1 when ungated
    device: torch.device

    def __post_init__(self):
        self._cache: dict = {}

    def device_tables(self, active: tuple[int, ...], block: int):
        """``(blk_seg, blk_start, seg_start, seg_end, seg_cols, seg_gate)`` for ``active``
        segments (indices into this table), as device tensors."""
        key = (active, block)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        blk_seg, blk_start = [], []
        for i in active:
            for off in range(self.start[i], self.start[i] + self.numel[i], block):
                blk_seg.append(i)
                blk_start.append(off)
        dev = self.device
        tables = (
            torch.tensor(blk_seg, dtype=torch.int32, device=dev),
            torch.tensor(blk_start, dtype=torch.int64, device=dev),
            torch.tensor(self.start, dtype=torch.int64, device=dev),
            torch.tensor([s + n for s, n in zip(self.start, self.numel)], dtype=torch.int64, device=dev),
            torch.tensor([max(c, 1) for c in self.cols], dtype=torch.int64, device=dev),
            torch.tensor(self.gate, dtype=torch.int64, device=dev),
        )
        if len(self._cache) > 8:
            self._cache.clear()
        self._cache[key] = tables
        return tables


def folora_adam_step(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                     table: SegmentTable, active: tuple[int, ...], scalars: torch.Tensor,
                     gates: torch.Tensor | None, block: int | None = None) -> None:
    """Triton: the element-wise Adam step of every ``active`` segment in one launch.

    Args:
        g, m, v, s: ``(N,)`` float32 flat buffers (``m``, ``v`` updated; ``s`` written).
        table: segment layout.
        active: indices of the segments to update (the others are left untouched).
        scalars: ``(len(table.start), 6)`` float32 per-segment scalars (:data:`SCALARS`), on
            the buffers' device.
        gates: ``(G,)`` float32 flat gates, or ``None`` when no segment is gated.
    """
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package")
    if not active:
        return
    total = sum(table.numel[i] for i in active)
    cfg = launch_config(total) if block is None else {"BLOCK": int(block), "num_warps": 4}
    blk_seg, blk_start, seg_start, seg_end, seg_cols, seg_gate = table.device_tables(active, cfg["BLOCK"])
    has_gates = gates is not None and any(table.gate[i] >= 0 for i in active)
    gate_buf = gates if has_gates else s  # unused pointer when ungated
    _folora_adam_kernel[(blk_seg.numel(),)](
        g, m, v, s, blk_seg, blk_start, seg_start, seg_end, seg_cols, seg_gate,
        scalars, gate_buf, HAS_GATES=has_gates, **cfg,
    )
