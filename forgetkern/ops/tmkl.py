"""Target-masked KL (TMKL) on logits: Triton kernels and launchers (the ``tmkl`` op's Triton backend).

Per token (DESIGN.md): ``loss = ce_weight * CE + kl_weight * T^2 * KL`` with
``CE = LSE(z) - z_y`` and KL between the base and adapted distributions over ``v != y``, both
renormalized (``mask_target=True``), or over the whole vocabulary (``mask_target=False``).

Forward streams each row once over the vocabulary in blocks, keeping online, target-excluded
log-sum-exp statistics for both models and the KL accumulator; with ``T == 1`` the CE normalizer
is ``logaddexp(LSE'(z), z_y)``, so no second set of statistics. It saves four floats per row.
Backward recomputes from the logits and writes the gradient in the logits' dtype (optionally into
the logits themselves).
"""
from __future__ import annotations

import torch

from .. import _params
from .._params import TMKLParams, accumulation_dtype
from ._tmkl_math import (NUM_STATS, STAT_KL, STAT_LS_B, STAT_LS_CE, STAT_LS_Z, STAT_M_B, STAT_M_CE,
                         STAT_M_Z, finish_kl, fold_block, grad_tile, load_scaled, online_lse,
                         safe_max, store_ignored_row, store_zero_row, with_target)
from ._triton import check_triton, jit, next_power_of_2, tl


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
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
    V,
    ignore_index,
    inv_t,  # 1 / T
    ce_weight,
    kl_scale,  # kl_weight * T^2
    BLOCK_V: tl.constexpr,
    FORWARD_KL: tl.constexpr,
    MASK_TARGET: tl.constexpr,
    SEPARATE_CE: tl.constexpr,  # T != 1: CE needs its own LSE over z
    ACC_FP64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    y = tl.load(y_ptr + row).to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")
    if y == ignore_index:
        store_ignored_row(loss_ptr, ce_ptr, kl_ptr, stats_ptr, row, ACC_FP64)
    else:
        z_row = z_ptr + row * stride_z
        b_row = b_ptr + row * stride_b
        cols = tl.arange(0, BLOCK_V)
        m_z = tl.full((), NEG_INF, acc_dtype)
        s_z = tl.zeros((), dtype=acc_dtype)
        m_b = tl.full((), NEG_INF, acc_dtype)
        s_b = tl.zeros((), dtype=acc_dtype)
        kl_acc = tl.zeros((), dtype=acc_dtype)
        m_c = tl.full((), NEG_INF, acc_dtype)
        s_c = tl.zeros((), dtype=acc_dtype)
        for start in range(0, V, BLOCK_V):
            # online LSEs of z/T and b/T over the kept columns, and the KL accumulator
            z, x, u, _ = load_scaled(z_row, b_row, start + cols, V, y, inv_t, ACC_FP64, MASK_TARGET)
            m_z, s_z, m_b, s_b, kl_acc = fold_block(m_z, s_z, m_b, s_b, kl_acc, x, u, FORWARD_KL, 0)
            if SEPARATE_CE:
                m_c, s_c, _, _ = online_lse(m_c, s_c, z, 0)
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
    BLOCK_V: tl.constexpr,
    FORWARD_KL: tl.constexpr,
    MASK_TARGET: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    y = tl.load(y_ptr + row).to(tl.int64)
    z_row = z_ptr + row * stride_z
    b_row = b_ptr + row * stride_b
    g_row = g_ptr + row * stride_g
    cols = tl.arange(0, BLOCK_V)
    if y == ignore_index:
        store_zero_row(g_row, V, BLOCK_V)
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
        c = tl.load(coef_kl_ptr + row).to(acc_dtype)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z, x, u, is_y = load_scaled(z_row, b_row, offs, V, y, inv_t, ACC_FP64, MASK_TARGET)
            # dL/dz = a * (softmax(z) - e_y) + c * dKL/dz
            g = grad_tile(z, x, u, is_y, m_z, ls_z, m_b, ls_b, m_c, ls_c, kl, a, c, inv_t,
                          FORWARD_KL, MASK_TARGET, SEPARATE_CE)
            tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < V)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def launch_config(V: int, dtype: torch.dtype, block_v: int | None = None) -> dict:
    """Block size and warps for the TMKL kernels.

    One program per row streams the row in ``BLOCK_V`` columns: 16 KiB of each input per block
    (8192 16-bit or 4096 32-bit elements) keeps enough loads in flight per SM while the whole
    block's registers fit at 16 warps. Rows shorter than that use one power-of-two block.
    """
    if block_v is None:
        cap = 8192 if dtype in (torch.float16, torch.bfloat16) else 4096
        if dtype == torch.float64:
            cap = 2048
        block_v = min(cap, next_power_of_2(V))
    block_v = max(16, int(block_v))
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    return {"BLOCK_V": block_v, "num_warps": num_warps}


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
    cfg = launch_config(v, logits.dtype, block_v)
    _tmkl_fwd_kernel[(n,)](
        logits, logits.stride(0), base_logits, base_logits.stride(0), labels,
        loss, ce, kl, stats, v, params.ignore_index, 1.0 / params.temperature,
        params.ce_weight, params.kl_scale,
        FORWARD_KL=params.forward_kl, MASK_TARGET=params.mask_target,
        SEPARATE_CE=params.separate_ce, ACC_FP64=acc == torch.float64, **cfg,
    )
    return loss, ce, kl, stats


def tmkl_backward(logits, base_logits, labels, stats, coef_ce, coef_kl, params: TMKLParams,
                  grad_out, block_v: int | None = None):
    """Triton backward: writes the per-row weighted gradient into ``grad_out`` (may be ``logits``)."""
    check_triton()
    n, v = logits.shape
    if n == 0:
        return grad_out
    cfg = launch_config(v, logits.dtype, block_v)
    acc = accumulation_dtype(logits.dtype)
    _tmkl_bwd_kernel[(n,)](
        logits, logits.stride(0), base_logits, base_logits.stride(0), labels, stats,
        coef_ce.to(acc).contiguous(), coef_kl.to(acc).contiguous(), grad_out, grad_out.stride(0),
        v, params.ignore_index, 1.0 / params.temperature,
        FORWARD_KL=params.forward_kl, MASK_TARGET=params.mask_target,
        SEPARATE_CE=params.separate_ce, ACC_FP64=acc == torch.float64, **cfg,
    )
    return grad_out
