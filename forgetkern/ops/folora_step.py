"""FoLoRA's element-wise Adam step for all parameters in one launch: Triton kernel and launcher.

Every parameter the optimizer updates is one *segment* of flat float32 buffers (its gradient
coordinates ``g``, moments ``m`` and ``v``, and the output step ``s``). A block table
(:class:`forgetkern._params.SegmentTable`) maps each program to one ``BLOCK``-sized piece of one
segment, so one launch covers all parameters of any sizes. Per element, with the per-segment
scalars of :data:`forgetkern._params.FOLORA_SCALARS` (the arithmetic of ``torch.optim.AdamW``; the
torch reference is :func:`forgetkern.reference.folora_step`)::

    m = m.lerp(g, w1)                                  # w1 = 1 - beta1
    v = beta2 * v + w2 * g * g                         # w2 = 1 - beta2
    s = neg_step_size * m / (v.sqrt() / bc2_sqrt + eps) * gate[col]   # gated segments only

The projections around it (into and out of spectral coordinates) are torch matmuls in
:class:`forgetkern.optim.FoLoRA`.
"""
from __future__ import annotations

import torch

from .._params import NUM_FOLORA_SCALARS, SegmentTable
from ._triton import check_triton, jit, tl


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@jit
def _adam_block(g_ptr, m_ptr, v_ptr, s_ptr, gate_ptr, offs, lo, hi, seg_start, cols, gate_off,
                neg_step, bc2_sqrt, eps, beta2, w1, w2, GATED: tl.constexpr, MASKED: tl.constexpr):
    """The step on the elements ``offs``: all of them (``MASKED=False``: no mask, so 16-byte
    vector loads and stores where ``offs`` starts on a 16-byte boundary), or those in
    ``[lo, hi)``."""
    if MASKED:
        mask = (offs >= lo) & (offs < hi)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    else:
        g = tl.load(g_ptr + offs)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    # m = lerp(m, g, w1), in torch's two-sided form
    m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))
    # v = beta2 v + (1 - beta2) g^2
    v = v * beta2 + (w2 * g) * g
    # s = -(lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    s = (m / denom) * neg_step  # the rounding order of torch's addcdiv
    if GATED:
        # gamma[column]: a gather (the columns of a row wrap around), read through the cache
        if MASKED:
            gamma = tl.load(gate_ptr + gate_off + (offs - seg_start) % cols, mask=mask, other=1.0)
        else:
            gamma = tl.load(gate_ptr + gate_off + (offs - seg_start) % cols)
        s = s * gamma
    if MASKED:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(s_ptr + offs, s, mask=mask)
    else:
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
        tl.store(s_ptr + offs, s)


@jit
def _adam_piece(g_ptr, m_ptr, v_ptr, s_ptr, gate_ptr, window, lo, hi, seg_start, cols, gate_off,
                neg_step, bc2_sqrt, eps, beta2, w1, w2, BLOCK: tl.constexpr, VEC: tl.constexpr,
                GATED: tl.constexpr):
    """The elements ``[lo, hi)`` of the window of ``BLOCK`` elements at ``window`` (a multiple of
    ``VEC``), and those of ``[window + BLOCK, hi)`` (fewer than ``VEC``)."""
    offs = window + tl.arange(0, BLOCK).to(tl.int64)
    if (window >= lo) & (window + BLOCK <= hi):  # inside the segment: unmasked, vectorized
        _adam_block(g_ptr, m_ptr, v_ptr, s_ptr, gate_ptr, offs, lo, hi, seg_start, cols, gate_off,
                    neg_step, bc2_sqrt, eps, beta2, w1, w2, GATED, False)
    else:  # the segment's first or last window
        _adam_block(g_ptr, m_ptr, v_ptr, s_ptr, gate_ptr, offs, lo, hi, seg_start, cols, gate_off,
                    neg_step, bc2_sqrt, eps, beta2, w1, w2, GATED, True)
        if window + BLOCK < hi:  # the segment's last few elements past its last window
            rest = window + BLOCK + tl.arange(0, VEC).to(tl.int64)
            _adam_block(g_ptr, m_ptr, v_ptr, s_ptr, gate_ptr, rest, lo, hi, seg_start, cols,
                        gate_off, neg_step, bc2_sqrt, eps, beta2, w1, w2, GATED, True)


@jit
def _folora_step_kernel(
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
    scal_ptr,  # [S, NUM_SCALARS] float32 per-segment scalars, columns in FOLORA_SCALARS order
    gate_ptr,  # [G] float32 gates of all gated segments
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16-byte vector
    NUM_SCALARS: tl.constexpr,
    HAS_GATES: tl.constexpr,
):
    # Program k of a segment [start, end) owns the piece [start + k BLOCK, ...) of the block table
    # but reads the window of BLOCK elements from that piece's first element rounded down to a
    # multiple of VEC: consecutive windows tile the segment on 16-byte boundaries (the first one
    # starts at the segment, the last one also takes the segment's last < VEC elements), so every
    # window inside a segment loads and stores 16-byte vectors whatever the segments' offsets.
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid).to(tl.int64)
    piece = tl.load(blk_start_ptr + pid)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_end_ptr + seg)
    window = tl.multiple_of(piece // VEC * VEC, VEC)
    lo = tl.maximum(window, start)
    hi = tl.where(piece + BLOCK >= end, end, tl.minimum(window + BLOCK, end))
    row = scal_ptr + seg * NUM_SCALARS  # FOLORA_SCALARS: neg_step_size, bc2_sqrt, eps, beta2, w1, w2
    neg_step = tl.load(row + 0)
    bc2_sqrt = tl.load(row + 1)
    eps = tl.load(row + 2)
    beta2 = tl.load(row + 3)
    w1 = tl.load(row + 4)
    w2 = tl.load(row + 5)
    cols = tl.load(seg_cols_ptr + seg)
    gate_off = -1
    if HAS_GATES:
        gate_off = tl.load(seg_gate_ptr + seg)
    if gate_off >= 0:
        _adam_piece(g_ptr, m_ptr, v_ptr, s_ptr, gate_ptr, window, lo, hi, start, cols, gate_off,
                    neg_step, bc2_sqrt, eps, beta2, w1, w2, BLOCK, VEC, True)
    else:
        _adam_piece(g_ptr, m_ptr, v_ptr, s_ptr, gate_ptr, window, lo, hi, start, cols, gate_off,
                    neg_step, bc2_sqrt, eps, beta2, w1, w2, BLOCK, VEC, False)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def launch_config(total: int) -> dict:
    """Block size and warps for :func:`_folora_step_kernel`: 1024 elements per program
    (4 KiB of each of the four float32 streams), 4 warps; small problems use 256. ``VEC``: float32
    elements per 16-byte vector (windows start on multiples of it)."""
    block = 1024 if total >= 1 << 16 else 256
    return {"BLOCK": block, "VEC": 4, "num_warps": 4}


def folora_step(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                table: SegmentTable, active: tuple[int, ...], scalars: torch.Tensor,
                gates: torch.Tensor | None) -> None:
    """Triton: the gated Adam step of every ``active`` segment in one launch (the interface of
    :func:`forgetkern.reference.folora_step`, which documents the arguments)."""
    check_triton()
    if not active:
        return
    active = tuple(active)
    cfg = launch_config(sum(table.numel[i] for i in active))
    blk_seg, blk_start, seg_start, seg_end, seg_cols, seg_gate = table.device_tables(active, cfg["BLOCK"])
    scalars = scalars.to(device=g.device, dtype=torch.float32, non_blocking=True).contiguous()
    has_gates = gates is not None and any(table.gate[i] >= 0 for i in active)
    gate_buf = gates if has_gates else s  # unused pointer when ungated
    _folora_step_kernel[(blk_seg.numel(),)](
        g, m, v, s, blk_seg, blk_start, seg_start, seg_end, seg_cols, seg_gate,
        scalars, gate_buf, NUM_SCALARS=NUM_FOLORA_SCALARS, HAS_GATES=has_gates, **cfg,
    )
