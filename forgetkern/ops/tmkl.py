"""Target-masked KL (TMKL) on logits: Triton kernels and launchers (the ``tmkl`` op's Triton backend).

Per token (docs/math.md §1): ``loss = ce_weight * CE + kl_weight * T^2 * KL`` with
``CE = LSE(z) - z_y`` and KL between the base and adapted distributions over ``v != y``, both
renormalized (``mask_target=True``), or over the whole vocabulary (``mask_target=False``).

Forward streams each row once over the vocabulary in blocks, keeping online, target-excluded
log-sum-exp statistics for both models and the KL accumulator; with ``T == 1`` the CE normalizer
is ``logaddexp(LSE'(z), z_y)``, so no second set of statistics. The statistics are kept per lane
(``ops/_tmkl_math.py``: each thread's 16-byte vectors fold their own running maxima, sums and
accumulator) and merged across lanes once per row. Full blocks load without masks and without
comparing the target; only the target's block and the partial last block do. When there are too
few rows to fill the GPU, each row's vocabulary is split over several programs whose partial
records are merged on the host (:func:`forgetkern.ops._tmkl_math.merge_partials`). It saves seven
floats per row (``forgetkern._params.STAT_*``). Backward recomputes from the logits (over the same
splits) and writes the gradient in the logits' dtype (optionally into the logits themselves).
"""
from __future__ import annotations

import torch

from .. import _params
from .._params import TMKLParams, accumulation_dtype
from ._tmkl_math import (NUM_PART, NUM_STATS, STAT_KL, STAT_LS_B, STAT_LS_CE, STAT_LS_Z, STAT_M_B,
                         STAT_M_CE, STAT_M_Z, exp, finish_kl, fold_block, grad_tile, lane_offsets,
                         load_block, merge_lane_lse, merge_lanes, merge_partials, online_lse,
                         safe_max, store_ignored_row, store_part, store_zero_row, with_target)
from ._triton import check_triton, jit, multiprocessor_count, next_power_of_2, tl


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@jit
def _fold_lanes(m_z, s_z, m_b, s_b, kl_acc, m_c, s_c, z_row, b_row, offs, V, y, inv_t,
                FORWARD_KL: tl.constexpr, MASK_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr,
                ACC_FP64: tl.constexpr, BOUNDED: tl.constexpr, TARGET: tl.constexpr):
    """One ``[LANES, VEC]`` block folded into the per-lane running statistics (``load_block``
    says what ``BOUNDED`` and ``TARGET`` change)."""
    # online LSEs of z/T and b/T over the kept columns, and the KL accumulator
    z, x, u, _ = load_block(z_row, b_row, offs, V, y, inv_t, ACC_FP64, MASK_TARGET, SEPARATE_CE,
                            BOUNDED, TARGET)
    m_z, s_z, m_b, s_b, kl_acc = fold_block(m_z, s_z, m_b, s_b, kl_acc, x, u, FORWARD_KL, 1)
    if SEPARATE_CE:
        # CE's own normalizer over every column of z (T != 1)
        m_c, s_c, _, _ = online_lse(m_c, s_c, z, 1)
    return m_z, s_z, m_b, s_b, kl_acc, m_c, s_c


@jit
def _tmkl_fwd_kernel(
    z_ptr,  # [N, V] adapted logits, unit stride along V
    stride_z,  # row stride of z (elements)
    b_ptr,  # [N, V] base logits
    stride_b,
    y_ptr,  # [N] integer labels
    loss_ptr,  # [N] out: ce_weight * CE + kl_weight * T^2 * KL (0 for ignored rows)
    ce_ptr,  # [N] out: CE
    kl_ptr,  # [N] out: KL (unscaled)
    stats_ptr,  # [N, 7] out: m_z, ls_z, m_b, ls_b, m_ce, ls_ce, kl (_params.STAT_*)
    part_ptr,  # [N, splits, 8] out when SPLIT: per-split partial records (_params.PART_*)
    V,
    ignore_index,
    inv_t,  # 1 / T
    ce_weight,
    kl_scale,  # kl_weight * T^2
    split_cols,  # columns per vocabulary split (a multiple of BLOCK_V)
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,  # columns per lane: one 16-byte vector
    FORWARD_KL: tl.constexpr,
    MASK_TARGET: tl.constexpr,
    SEPARATE_CE: tl.constexpr,  # T != 1: CE needs its own LSE over z
    ACC_FP64: tl.constexpr,
    SPLIT: tl.constexpr,  # several programs per row: write partial records, merged on the host
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    LANES: tl.constexpr = BLOCK_V // VEC
    NEG_INF: tl.constexpr = float("-inf")
    y = tl.load(y_ptr + row).to(tl.int64)
    part = part_ptr + (row * tl.num_programs(1) + split) * NUM_PART
    if y == ignore_index:
        if SPLIT:
            # a record with no mass, so that the host merge never reads uninitialized memory
            zero = tl.zeros((), dtype=acc_dtype)
            empty = tl.full((), NEG_INF, acc_dtype)
            store_part(part, empty, zero, empty, zero, zero, empty, zero, zero, True, FORWARD_KL,
                       SEPARATE_CE)
        else:
            store_ignored_row(loss_ptr, ce_ptr, kl_ptr, stats_ptr, row, ACC_FP64)
    else:
        z_row = z_ptr + row * stride_z
        b_row = b_ptr + row * stride_b
        y32 = y.to(tl.int32)  # a column index: compared in int32
        lo = split * split_cols
        hi = tl.minimum(lo + split_cols, V)
        full_hi = lo + (hi - lo) // BLOCK_V * BLOCK_V  # end of the full blocks
        y_blk = -1  # the block holding the target, taken out of the unmasked loop when masked
        if MASK_TARGET:
            y_blk = y32 // BLOCK_V * BLOCK_V
        offs = lane_offsets(LANES, VEC)
        m_z = tl.full((LANES,), NEG_INF, acc_dtype)
        s_z = tl.zeros((LANES,), dtype=acc_dtype)
        m_b = tl.full((LANES,), NEG_INF, acc_dtype)
        s_b = tl.zeros((LANES,), dtype=acc_dtype)
        kl_acc = tl.zeros((LANES,), dtype=acc_dtype)
        m_c = tl.full((LANES,), NEG_INF, acc_dtype)
        s_c = tl.zeros((LANES,), dtype=acc_dtype)
        for start in range(lo, full_hi, BLOCK_V):
            if start != y_blk:  # full blocks: no column mask, no target comparison
                m_z, s_z, m_b, s_b, kl_acc, m_c, s_c = _fold_lanes(
                    m_z, s_z, m_b, s_b, kl_acc, m_c, s_c, z_row, b_row, start + offs, V, y32,
                    inv_t, FORWARD_KL, MASK_TARGET, SEPARATE_CE, ACC_FP64, False, False)
        if (y_blk >= lo) & (y_blk < full_hi):  # the target's block
            m_z, s_z, m_b, s_b, kl_acc, m_c, s_c = _fold_lanes(
                m_z, s_z, m_b, s_b, kl_acc, m_c, s_c, z_row, b_row, y_blk + offs, V, y32,
                inv_t, FORWARD_KL, MASK_TARGET, SEPARATE_CE, ACC_FP64, False, True)
        if full_hi < hi:  # the partial last block
            m_z, s_z, m_b, s_b, kl_acc, m_c, s_c = _fold_lanes(
                m_z, s_z, m_b, s_b, kl_acc, m_c, s_c, z_row, b_row, full_hi + offs, V, y32,
                inv_t, FORWARD_KL, MASK_TARGET, SEPARATE_CE, ACC_FP64, True, True)
        # the lanes merged once per row
        m_z, s_z, m_b, s_b, kl_acc = merge_lanes(m_z, s_z, m_b, s_b, kl_acc, FORWARD_KL)
        if SEPARATE_CE:
            m_c, s_c = merge_lane_lse(m_c, s_c)
        if SPLIT:
            in_split = (y32 >= lo) & (y32 < hi)
            z_y = tl.load(z_row + y, mask=in_split, other=0.0).to(acc_dtype)
            store_part(part, m_z, s_z, m_b, s_b, kl_acc, m_c, s_c, z_y, True, FORWARD_KL,
                       SEPARATE_CE)
        else:
            kl = finish_kl(kl_acc, s_z, s_b, FORWARD_KL)
            z_y = tl.load(z_row + y).to(acc_dtype)
            # CE = (m_ce - z_y) + ls_ce: the max and the log-sum apart
            if SEPARATE_CE:
                m_c = safe_max(m_c)
                ls_c = tl.log(s_c)
            elif MASK_TARGET:
                m_c, ls_c = with_target(m_z, s_z, z_y)
            else:
                m_c = safe_max(m_z)
                ls_c = tl.log(s_z)
            ce = (m_c - z_y) + ls_c
            kl_out = tl.where(kl < 0.0, 0.0, kl)  # below zero by rounding only (NaN stays NaN)
            loss = tl.where(ce_weight != 0.0, ce_weight * ce, 0.0) + \
                tl.where(kl_scale != 0.0, kl_scale * kl_out, 0.0)
            tl.store(loss_ptr + row, loss)
            tl.store(ce_ptr + row, ce)
            tl.store(kl_ptr + row, kl_out)
            st = stats_ptr + row * NUM_STATS
            tl.store(st + STAT_M_Z, safe_max(m_z))
            tl.store(st + STAT_LS_Z, tl.log(s_z))
            tl.store(st + STAT_M_B, safe_max(m_b))
            tl.store(st + STAT_LS_B, tl.log(s_b))
            tl.store(st + STAT_M_CE, m_c)
            tl.store(st + STAT_LS_CE, ls_c)
            tl.store(st + STAT_KL, kl)


@jit
def _grad_block(z_row, b_row, g_row, offs, V, y, inv_t, m_z, ls_z, m_b, ls_b, m_c, ls_c, kl, a, c,
                FORWARD_KL: tl.constexpr, MASK_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr,
                ACC_FP64: tl.constexpr, BOUNDED: tl.constexpr, TARGET: tl.constexpr):
    """The gradient of one ``[LANES, VEC]`` block, stored in the gradient's dtype."""
    z, x, u, is_y = load_block(z_row, b_row, offs, V, y, inv_t, ACC_FP64, MASK_TARGET,
                               SEPARATE_CE, BOUNDED, TARGET)
    # softmax(z)_y, the target column's CE term (T == 1, masked), from the block itself: with an
    # in-place backward another program may already have overwritten z_y outside this block
    sm_y = 0.0
    if TARGET:
        sm_y = exp((z - m_c) - ls_c)
    # dL/dz = a * (softmax(z) - e_y) + c * dKL/dz
    g = grad_tile(z, x, u, is_y, m_z, ls_z, m_b, ls_b, m_c, ls_c, kl, a, c, sm_y,
                  FORWARD_KL, MASK_TARGET, SEPARATE_CE)
    if BOUNDED:
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=offs < V)
    else:
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty))


@jit
def _tmkl_bwd_kernel(
    z_ptr,  # [N, V] adapted logits
    stride_z,
    b_ptr,  # [N, V] base logits
    stride_b,
    y_ptr,  # [N] labels
    stats_ptr,  # [N, 7] m_z, ls_z, m_b, ls_b, m_ce, ls_ce, kl from the forward
    coef_ce_ptr,  # [N] upstream coefficient of dCE/dz per row
    coef_kl_ptr,  # [N] upstream coefficient of dKL/dz per row (KL unscaled)
    g_ptr,  # [N, V] out: gradient, may alias z_ptr (in-place backward)
    stride_g,
    V,
    ignore_index,
    inv_t,
    split_cols,  # columns per vocabulary split (a multiple of BLOCK_V)
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    FORWARD_KL: tl.constexpr,
    MASK_TARGET: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    LANES: tl.constexpr = BLOCK_V // VEC
    y = tl.load(y_ptr + row).to(tl.int64)
    z_row = z_ptr + row * stride_z
    b_row = b_ptr + row * stride_b
    g_row = g_ptr + row * stride_g
    lo = split * split_cols
    hi = tl.minimum(lo + split_cols, V)
    if y == ignore_index:
        store_zero_row(g_row, lo, hi, BLOCK_V)
    else:
        st = stats_ptr + row * NUM_STATS
        m_z = tl.load(st + STAT_M_Z)
        ls_z = tl.load(st + STAT_LS_Z)
        m_b = tl.load(st + STAT_M_B)
        ls_b = tl.load(st + STAT_LS_B)
        m_c = tl.load(st + STAT_M_CE)
        ls_c = tl.load(st + STAT_LS_CE)
        kl = tl.load(st + STAT_KL)
        a = tl.load(coef_ce_ptr + row).to(acc_dtype)
        c = tl.load(coef_kl_ptr + row).to(acc_dtype) * inv_t
        y32 = y.to(tl.int32)
        full_hi = lo + (hi - lo) // BLOCK_V * BLOCK_V
        y_blk = y32 // BLOCK_V * BLOCK_V  # the block holding the target (e_y of dCE/dz)
        offs = lane_offsets(LANES, VEC)
        for start in range(lo, full_hi, BLOCK_V):
            if start != y_blk:  # full blocks: no column mask, no target comparison
                _grad_block(z_row, b_row, g_row, start + offs, V, y32, inv_t, m_z, ls_z, m_b, ls_b,
                            m_c, ls_c, kl, a, c, FORWARD_KL, MASK_TARGET, SEPARATE_CE,
                            ACC_FP64, False, False)
        if (y_blk >= lo) & (y_blk < full_hi):  # the target's block
            _grad_block(z_row, b_row, g_row, y_blk + offs, V, y32, inv_t, m_z, ls_z, m_b, ls_b,
                        m_c, ls_c, kl, a, c, FORWARD_KL, MASK_TARGET, SEPARATE_CE,
                        ACC_FP64, False, True)
        if full_hi < hi:  # the partial last block
            _grad_block(z_row, b_row, g_row, full_hi + offs, V, y32, inv_t, m_z, ls_z, m_b, ls_b,
                        m_c, ls_c, kl, a, c, FORWARD_KL, MASK_TARGET, SEPARATE_CE,
                        ACC_FP64, True, True)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
#: Programs per streaming multiprocessor the TMKL kernels aim for: below this many rows per SM the
#: vocabulary of each row is split over several programs.
ROWS_PER_SM = 2


def launch_config(V: int, dtype: torch.dtype, block_v: int | None = None, n: int | None = None,
                  device: torch.device | None = None, splits: int | None = None,
                  aligned: bool = True) -> dict:
    """Block size, lane width, warps and vocabulary splits of the TMKL kernels.

    * ``VEC``: the lane width. Rows that start on 16-byte boundaries (``aligned``: base addresses
      and row strides divisible by 16, which the JIT sees) use one 16-byte vector (8 16-bit, 4
      32-bit, 2 64-bit elements): each thread folds its vectors' columns into running statistics of
      its own, so the streaming loop has no cross-thread reduction and no barrier, and costs about
      one exponential per column and model. Other rows cannot be read with vector loads and use
      one column per lane (two exponentials per column and model).
    * ``BLOCK_V``: one program streams its columns in blocks of 16 KiB of each input (8192 16-bit
      or 4096 32-bit elements), enough loads in flight per SM; 8 KiB with one column per lane (its
      per-column statistics take the registers). Rows shorter than that use one power-of-two block.
    * ``num_warps``: 16 warps for 8192-wide blocks, 8 from 2048 columns, else 4; with one column
      per lane, 16 bytes of each input per thread and block (up to 16 warps), which keeps the
      per-column statistics in registers.
    * ``splits``: programs per row. With fewer than :data:`ROWS_PER_SM` rows per SM of ``device``
      (the CPU interpreter counts one SM), each row's vocabulary is split into up to that many
      ranges of whole blocks, so that small batches still fill the GPU; the forward merges the
      splits' partial records on the host. ``split_cols``: columns per split.
    """
    vec = 16 // dtype.itemsize if aligned else 1
    if block_v is None:
        cap = 8192 if dtype in (torch.float16, torch.bfloat16) else 4096
        if dtype == torch.float64:
            cap = 2048
        block_v = min(cap if vec > 1 else cap // 2, next_power_of_2(V))
    block_v = max(16, int(block_v))
    if vec > 1:
        num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    else:
        num_warps = max(1, min(16, block_v * dtype.itemsize // 512))
    blocks = max(1, -(-V // block_v))
    if splits is None:
        want = ROWS_PER_SM * multiprocessor_count(device)
        splits = 1 if n is None or n >= want else -(-want // max(1, n))
    per_split = -(-blocks // max(1, min(int(splits), blocks)))
    return {"BLOCK_V": block_v, "VEC": min(vec, block_v), "num_warps": num_warps,
            "splits": -(-blocks // per_split), "split_cols": per_split * block_v}


def rows_aligned(*tensors: torch.Tensor) -> bool:
    """Whether every row of every ``(N, V)`` tensor starts on a 16-byte boundary in a way the JIT
    can prove: base address divisible by 16 bytes and row stride divisible by 16 elements."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in tensors)


def tmkl_forward(logits, base_logits, labels, params: TMKLParams, block_v: int | None = None):
    """Triton forward: ``(loss, ce, kl, stats)`` per row for ``(N, V)`` logits (unit column stride)."""
    check_triton()
    n, v = logits.shape
    acc = accumulation_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    ce = torch.empty_like(loss)
    kl = torch.empty_like(loss)
    stats = torch.empty(n, _params.NUM_STATS, dtype=acc, device=logits.device)
    if n == 0:
        return loss, ce, kl, stats
    cfg = launch_config(v, logits.dtype, block_v, n, logits.device,
                        aligned=rows_aligned(logits, base_logits))
    splits = cfg.pop("splits")
    part = torch.empty(n, splits, _params.NUM_PART, dtype=acc, device=logits.device) \
        if splits > 1 else stats
    _tmkl_fwd_kernel[(n, splits)](
        logits, logits.stride(0), base_logits, base_logits.stride(0), labels,
        loss, ce, kl, stats, part, v, params.ignore_index, 1.0 / params.temperature,
        params.ce_weight, params.kl_scale, cfg.pop("split_cols"),
        FORWARD_KL=params.forward_kl, MASK_TARGET=params.mask_target,
        SEPARATE_CE=params.separate_ce, ACC_FP64=acc == torch.float64, SPLIT=splits > 1, **cfg,
    )
    if splits > 1:
        return merge_partials(part, labels, params)
    return loss, ce, kl, stats


def tmkl_backward(logits, base_logits, labels, stats, coef_ce, coef_kl, params: TMKLParams,
                  grad_out, block_v: int | None = None):
    """Triton backward: writes the per-row weighted gradient into ``grad_out`` (may be ``logits``)."""
    check_triton()
    n, v = logits.shape
    if n == 0:
        return grad_out
    cfg = launch_config(v, logits.dtype, block_v, n, logits.device,
                        aligned=rows_aligned(logits, base_logits, grad_out))
    splits = cfg.pop("splits")
    acc = accumulation_dtype(logits.dtype)
    _tmkl_bwd_kernel[(n, splits)](
        logits, logits.stride(0), base_logits, base_logits.stride(0), labels, stats,
        coef_ce.to(acc).contiguous(), coef_kl.to(acc).contiguous(), grad_out, grad_out.stride(0),
        v, params.ignore_index, 1.0 / params.temperature, cfg.pop("split_cols"),
        FORWARD_KL=params.forward_kl, MASK_TARGET=params.mask_target,
        SEPARATE_CE=params.separate_ce, ACC_FP64=acc == torch.float64, **cfg,
    )
    return grad_out
