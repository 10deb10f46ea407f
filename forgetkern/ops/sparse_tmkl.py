"""Sparse-base TMKL on logits: Triton kernels and launchers (the ``sparse_tmkl`` op's Triton backend).

The base side is a top-k record (``forgetkern._params.TopKBase``, docs/base_cache.md); the adapted
logits are streamed over the whole vocabulary, once in the forward (the kept log-sum-exp, the tail
bucket's log-sum-exp and, with ``T != 1``, the CE normalizer) and once in the backward (the
gradient), and gathered at the ``k`` support columns. A block finds the support columns that fall
in it with ``tl.histogram`` of the support indices over the block's columns (``k`` increments per
block, not ``k x BLOCK_V`` comparisons). The backward writes every non-support column while
streaming, then the support columns in one scatter: the two sets of stores never overlap.
"""
from __future__ import annotations

import torch

from .. import _params
from .._params import TMKLParams, accumulation_dtype
from ._tmkl_math import (NUM_STATS, STAT_KL, STAT_LS_CE, STAT_LS_Z, STAT_M_CE, STAT_M_Z, exp,
                         online_lse, safe_max, store_ignored_row, store_zero_row, with_target)
from ._triton import check_triton, constant, jit, next_power_of_2, tl
from .tmkl import launch_config as _dense_launch_config

SP_M_T = constant(_params.SP_M_T)
SP_LS_T = constant(_params.SP_LS_T)


@jit
def _logaddexp(a, b):
    m = safe_max(tl.maximum(a, b))
    return m + tl.log(exp(a - m) + exp(b - m))


@jit
def _support_in_block(idx, jm, start, BLOCK_V: tl.constexpr):
    """``[BLOCK_V]`` mask of the block's columns that are support tokens (``idx``: ``[BLOCK_K]``
    support indices, ``jm`` their valid slots, ``start`` the block's first column)."""
    rel = idx - start
    hit = tl.histogram(rel.to(tl.int32), BLOCK_V, mask=jm & (rel >= 0) & (rel < BLOCK_V))
    return hit > 0


@jit
def _base_bins(val_row, idx, jm, lse_ptr, tail_ptr, tgt_ptr, row, y, inv_t,
               ACC_FP64: tl.constexpr, MASK_TARGET: tl.constexpr):
    """The record's side of one row: ``(log p~ of the support slots [BLOCK_K] (-inf when
    inactive), active slots, log P_tail, log p~_y of the target slot (-inf unless active), whether
    the target slot is active)``: with ``mask_target=False`` and the target outside the record."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    j = tl.arange(0, idx.shape[0])
    b_sup = tl.load(val_row + j, mask=jm, other=float("-inf")).to(acc_dtype) * inv_t
    lse = tl.load(lse_ptr + row).to(acc_dtype)
    b_y = tl.load(tgt_ptr + row).to(acc_dtype) * inv_t
    on_y = jm & (idx == y)
    y_in = tl.sum(on_y.to(tl.int32), axis=0) > 0
    if MASK_TARGET:
        log_zb = lse
        active = jm & (idx != y)
        extra = y_in & False
        lp_y = tl.full((), float("-inf"), acc_dtype)
    else:
        log_zb = _logaddexp(lse, b_y)
        active = jm
        extra = ~y_in
        lp_y = tl.where(extra, b_y - log_zb, float("-inf"))
    lp = tl.where(active, b_sup - log_zb, float("-inf"))
    lp_t = tl.load(tail_ptr + row).to(acc_dtype) - log_zb
    return lp, active, lp_t, lp_y, extra


@jit
def _sparse_tmkl_fwd_kernel(
    z_ptr,  # [N, V] adapted logits, unit stride along V
    stride_z,
    val_ptr,  # [N, K] base logits of the support (raw), contiguous
    idx_ptr,  # [N, K] int64 support token ids, contiguous
    lse_ptr,  # [N] LSE_{u != y}(b_u / T)
    tail_ptr,  # [N] LSE over the tail (outside the support, u != y) of b_u / T
    tgt_ptr,  # [N] b_y (raw)
    y_ptr,  # [N] labels
    loss_ptr,  # [N] out
    ce_ptr,  # [N] out
    kl_ptr,  # [N] out: KL over the bins (unscaled)
    stats_ptr,  # [N, 7] out: m_z, ls_z, m_t, ls_t, m_ce, ls_ce, kl
    V,
    K,
    ignore_index,
    inv_t,
    ce_weight,
    kl_scale,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FORWARD_KL: tl.constexpr,
    MASK_TARGET: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
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
        j = tl.arange(0, BLOCK_K)
        jm = j < K
        idx = tl.load(idx_ptr + row * K + j, mask=jm, other=-1).to(tl.int64)
        cols = tl.arange(0, BLOCK_V)
        m_z = tl.full((), NEG_INF, acc_dtype)
        s_z = tl.zeros((), dtype=acc_dtype)
        m_t = tl.full((), NEG_INF, acc_dtype)
        s_t = tl.zeros((), dtype=acc_dtype)
        m_c = tl.full((), NEG_INF, acc_dtype)
        s_c = tl.zeros((), dtype=acc_dtype)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(z_row + offs, mask=offs < V, other=NEG_INF).to(acc_dtype)
            x = z * inv_t
            is_y = offs == y
            if MASK_TARGET:
                kept = tl.where(is_y, NEG_INF, x)
            else:
                kept = x
            m_z, s_z, _, _ = online_lse(m_z, s_z, kept, 0)
            # the tail: neither a support token nor the target
            in_sup = _support_in_block(idx, jm, start, BLOCK_V)
            m_t, s_t, _, _ = online_lse(m_t, s_t, tl.where(in_sup | is_y, NEG_INF, x), 0)
            if SEPARATE_CE:
                m_c, s_c, _, _ = online_lse(m_c, s_c, z, 0)
        m_z = safe_max(m_z)
        ls_z = tl.log(s_z)
        m_t = safe_max(m_t)
        ls_t = tl.log(s_t)
        lp, active, lp_t, lp_y, extra = _base_bins(val_ptr + row * K, idx, jm, lse_ptr, tail_ptr,
                                            tgt_ptr, row, y, inv_t, ACC_FP64, MASK_TARGET)
        # log q~ of the support slots, gathered: (z_v/T - m_z) - ls_z
        z_sup = tl.load(z_row + idx, mask=jm, other=NEG_INF).to(acc_dtype)
        lq = tl.where(active, (z_sup * inv_t - m_z) - ls_z, NEG_INF)
        z_y = tl.load(z_row + y).to(acc_dtype)
        lq_y = tl.where(extra, (z_y * inv_t - m_z) - ls_z, NEG_INF)
        lq_t = (m_t - m_z) + (ls_t - ls_z)
        # KL = sum_bins W (log W - log O), W the base's bins (forward) or the adapted's (reverse)
        if FORWARD_KL:
            w, lw, lo, w_y, lw_y, lo_y, lw_t, lo_t = exp(lp), lp, lq, exp(lp_y), lp_y, lq_y, lp_t, lq_t
        else:
            w, lw, lo, w_y, lw_y, lo_y, lw_t, lo_t = exp(lq), lq, lp, exp(lq_y), lq_y, lp_y, lq_t, lp_t
        w_t = exp(lw_t)
        kl = tl.sum(tl.where(w == 0.0, 0.0, w * (lw - lo)), axis=0)
        kl += tl.where(w_y == 0.0, 0.0, w_y * (lw_y - lo_y))
        kl += tl.where(w_t == 0.0, 0.0, w_t * (lw_t - lo_t))
        if SEPARATE_CE:
            m_c = safe_max(m_c)
            ls_c = tl.log(s_c)
        elif MASK_TARGET:
            m_c, ls_c = with_target(m_z, s_z, z_y)
        else:
            m_c = m_z
            ls_c = ls_z
        ce = (m_c - z_y) + ls_c
        kl_out = tl.where(kl < 0.0, 0.0, kl)
        loss = tl.where(ce_weight != 0.0, ce_weight * ce, 0.0) + \
            tl.where(kl_scale != 0.0, kl_scale * kl_out, 0.0)
        tl.store(loss_ptr + row, loss)
        tl.store(ce_ptr + row, ce)
        tl.store(kl_ptr + row, kl_out)
        st = stats_ptr + row * NUM_STATS
        tl.store(st + STAT_M_Z, m_z)
        tl.store(st + STAT_LS_Z, ls_z)
        tl.store(st + SP_M_T, m_t)
        tl.store(st + SP_LS_T, ls_t)
        tl.store(st + STAT_M_CE, m_c)
        tl.store(st + STAT_LS_CE, ls_c)
        tl.store(st + STAT_KL, kl)


@jit
def _sparse_grad(z, lq, lp, kl, a, c, m_c, ls_c, is_y, FORWARD_KL: tl.constexpr):
    """``a (softmax(z) - e_y) + c dKL/dx`` on columns whose bin has log-masses ``lq``/``lp`` and
    whose own ``log q~`` is ``lq`` too (support and target slots; ``c`` already holds ``1/T``)."""
    q = exp(lq)
    if FORWARD_KL:
        # dKL/dx_v = q~_v - p~_v
        d_kl = q - exp(lp)
    else:
        # dKL/dx_v = q~_v (log q~_v - log p~_v - KL)
        d_kl = tl.where(q == 0.0, 0.0, q * (lq - lp - kl))
    # dCE/dz = softmax(z) - e_y
    d_ce = tl.where(z == float("-inf"), 0.0, exp((z - m_c) - ls_c)) - tl.where(is_y, 1.0, 0.0)
    return tl.where(a != 0.0, a * d_ce, 0.0) + tl.where(c != 0.0, c * d_kl, 0.0)


@jit
def _sparse_tmkl_bwd_kernel(
    z_ptr,  # [N, V] adapted logits
    stride_z,
    val_ptr,  # [N, K] base support logits
    idx_ptr,  # [N, K] int64 support ids
    lse_ptr,  # [N]
    tail_ptr,  # [N]
    tgt_ptr,  # [N]
    y_ptr,  # [N]
    stats_ptr,  # [N, 7] from the forward
    coef_ce_ptr,  # [N] upstream coefficient of dCE/dz
    coef_kl_ptr,  # [N] upstream coefficient of dKL/dz (KL unscaled)
    g_ptr,  # [N, V] out: gradient (may alias z_ptr)
    stride_g,
    V,
    K,
    ignore_index,
    inv_t,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FORWARD_KL: tl.constexpr,
    MASK_TARGET: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    NEG_INF: tl.constexpr = float("-inf")
    y = tl.load(y_ptr + row).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = g_ptr + row * stride_g
    cols = tl.arange(0, BLOCK_V)
    if y == ignore_index:
        store_zero_row(g_row, 0, V, BLOCK_V)
    else:
        st = stats_ptr + row * NUM_STATS
        m_z = tl.load(st + STAT_M_Z)
        ls_z = tl.load(st + STAT_LS_Z)
        lq_t = (tl.load(st + SP_M_T) - m_z) + (tl.load(st + SP_LS_T) - ls_z)
        m_c = tl.load(st + STAT_M_CE)
        ls_c = tl.load(st + STAT_LS_CE)
        kl = tl.load(st + STAT_KL)
        a = tl.load(coef_ce_ptr + row).to(acc_dtype)
        c = tl.load(coef_kl_ptr + row).to(acc_dtype) * inv_t
        j = tl.arange(0, BLOCK_K)
        jm = j < K
        idx = tl.load(idx_ptr + row * K + j, mask=jm, other=-1).to(tl.int64)
        lp, active, lp_t, lp_y, extra = _base_bins(val_ptr + row * K, idx, jm, lse_ptr, tail_ptr,
                                            tgt_ptr, row, y, inv_t, ACC_FP64, MASK_TARGET)
        # the tail's factor: forward 1 - P_t / Q_t, reverse log Q_t - log P_t - KL
        if FORWARD_KL:
            f_t = 1.0 - tl.where(lp_t == NEG_INF, 0.0, exp(lp_t - lq_t))
        else:
            f_t = lq_t - lp_t - kl
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(z_row + offs, mask=offs < V, other=NEG_INF).to(acc_dtype)
            x = z * inv_t
            is_y = offs == y
            lq = (x - m_z) - ls_z
            q = tl.where(x == NEG_INF, 0.0, exp(lq))
            # tail column u: dKL/dx_u = q~_u * f_t
            d_kl = tl.where(q == 0.0, 0.0, q * f_t)
            if MASK_TARGET:
                d_kl = tl.where(is_y, 0.0, d_kl)
            else:  # the target slot (its column is rewritten below when y is a support token)
                if FORWARD_KL:
                    d_y = q - exp(lp_y)
                else:
                    d_y = tl.where(q == 0.0, 0.0, q * (lq - lp_y - kl))
                d_kl = tl.where(is_y, d_y, d_kl)
            d_ce = tl.where(z == NEG_INF, 0.0, exp((z - m_c) - ls_c)) - tl.where(is_y, 1.0, 0.0)
            g = tl.where(a != 0.0, a * d_ce, 0.0) + tl.where(c != 0.0, c * d_kl, 0.0)
            in_sup = _support_in_block(idx, jm, start, BLOCK_V)
            tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=(offs < V) & ~in_sup)
        # the support columns, in one scatter (disjoint from the stores above)
        z_sup = tl.load(z_row + idx, mask=jm, other=NEG_INF).to(acc_dtype)
        lq_s = tl.where(active, (z_sup * inv_t - m_z) - ls_z, NEG_INF)
        g_s = _sparse_grad(z_sup, lq_s, lp, kl, a, c, m_c, ls_c, idx == y, FORWARD_KL)
        tl.store(g_row + idx, g_s.to(g_ptr.dtype.element_ty), mask=jm)


def launch_config(V: int, K: int, dtype: torch.dtype, block_v: int | None = None) -> dict:
    """``BLOCK_V`` and warps of the dense TMKL kernels (``ops/tmkl.py``), and ``BLOCK_K``, the
    support's power-of-two width."""
    cfg = _dense_launch_config(V, dtype, block_v)
    for key in ("VEC", "splits", "split_cols"):
        cfg.pop(key)
    cfg["BLOCK_K"] = max(2, next_power_of_2(K))
    return cfg


def sparse_tmkl_forward(logits, base, labels, params: TMKLParams, block_v: int | None = None):
    """Triton forward: per-row ``(loss, ce, kl, stats)``; ``base`` as laid out by ``_validate``."""
    check_triton()
    n, v = logits.shape
    values, idx, lse, tail, target = base
    acc = accumulation_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    ce, kl = torch.empty_like(loss), torch.empty_like(loss)
    stats = torch.empty(n, _params.NUM_STATS, dtype=acc, device=logits.device)
    if n == 0:
        return loss, ce, kl, stats
    cfg = launch_config(v, idx.shape[1], logits.dtype, block_v)
    _sparse_tmkl_fwd_kernel[(n,)](
        logits, logits.stride(0), values, idx, lse, tail, target, labels, loss, ce, kl, stats,
        v, idx.shape[1], params.ignore_index, 1.0 / params.temperature, params.ce_weight,
        params.kl_scale, FORWARD_KL=params.forward_kl, MASK_TARGET=params.mask_target,
        SEPARATE_CE=params.separate_ce, ACC_FP64=acc == torch.float64, **cfg)
    return loss, ce, kl, stats


def sparse_tmkl_backward(logits, base, labels, stats, coef_ce, coef_kl, params: TMKLParams,
                         grad_out, block_v: int | None = None):
    """Triton backward: the per-row weighted gradient into ``grad_out`` (may be ``logits``)."""
    check_triton()
    n, v = logits.shape
    if n == 0:
        return grad_out
    values, idx, lse, tail, target = base
    acc = accumulation_dtype(logits.dtype)
    cfg = launch_config(v, idx.shape[1], logits.dtype, block_v)
    _sparse_tmkl_bwd_kernel[(n,)](
        logits, logits.stride(0), values, idx, lse, tail, target, labels, stats,
        coef_ce.to(acc).contiguous(), coef_kl.to(acc).contiguous(), grad_out, grad_out.stride(0),
        v, idx.shape[1], params.ignore_index, 1.0 / params.temperature,
        FORWARD_KL=params.forward_kl, MASK_TARGET=params.mask_target,
        ACC_FP64=acc == torch.float64, **cfg)
    return grad_out
