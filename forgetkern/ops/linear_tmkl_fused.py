"""Fused-linear TMKL: the loss straight from hidden states, without an ``N x V`` logits tensor.

Per token (docs/math.md §6): ``z = h W^T (+ bias)``, ``b = h_b W_b^T (+ bias_b)``
and ``loss = ce_weight * CE(z, y) + kl_weight * T^2 * KL`` exactly as :mod:`forgetkern.ops.tmkl`.

Triton path (the on-chip ``fused`` form)
  * Forward: one program per ``(row block, vocabulary split)``. A program forms ``BLOCK_N x BLOCK_V``
    tiles of both logits on chip with ``tl.dot`` (fp32 accumulation) over ``D`` and folds them into
    per-row online statistics (target-excluded LSE of both models, the KL accumulator, the CE
    normalizer when ``T != 1``, the target logit). Each program writes one partial record per row;
    the ``splits`` partial records of a row are merged afterwards
    (:func:`forgetkern.ops._tmkl_math.merge_partials`) into the per-row statistics of
    :mod:`forgetkern._params`.
  * Backward: one program per ``(row block, vocabulary tile)`` recomputes both logit tiles, turns
    them into the tile of ``dL/dz`` with the saved statistics, and adds ``dz @ W`` into ``dh``
    (and ``dz^T @ h`` into ``dW``, ``sum_rows dz`` into ``dbias`` when those need gradients) with
    ``tl.dot`` and relaxed fp32 atomic adds (no memory fence); rows go in launches of ``bwd_rows``
    so ``dh`` is accumulated in fp32 only a few MiB at a time.
  * Both kernels run their programs in grouped order (:func:`_grouped`), and with
    ``params.compute_kl`` false (CE alone) neither reads the base side.

These kernels serve ``strategy="fused"`` (the ``linear_tmkl_fused`` op of the table); the
chunked strategy of the same loss is :mod:`forgetkern._chunked`. The autograd Function is
:class:`forgetkern._autograd.LinearTMKLFunction`.
"""
from __future__ import annotations

import torch

from .. import _params
from .._params import ENV_TMA, TMKLParams, accumulation_dtype, env_flag, triton_interpret
from ._tmkl_math import (NUM_PART, NUM_STATS, STAT_KL, STAT_LS_B, STAT_LS_CE, STAT_LS_Z, STAT_M_B,
                         STAT_M_CE, STAT_M_Z, exp, fold_block, grad_tile, merge_partials,
                         online_lse, store_part)
from ._triton import check_triton, jit, multiprocessor_count, next_power_of_2, tl


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@jit
def _mma(a, b, acc, DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``acc + a @ b`` with ``tl.dot`` (fp32 operands in full IEEE precision, never TF32).
    ``DOT_UPCAST`` feeds bfloat16 operands as fp32 (exact: the same products and accumulation); it
    is set only under the CPU interpreter, whose ``tl.dot`` mishandles bfloat16."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if DOT_IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@jit
def _logit_tiles(
    h_ptr,  # [N, D] adapted hidden states
    stride_hn, stride_hd,
    w_ptr,  # [V, D] LM head
    stride_wv, stride_wd,
    bias_ptr,  # [V] head bias (read only when HAS_BIAS)
    hb_ptr,  # [N, D] base hidden states
    stride_hbn, stride_hbd,
    wb_ptr,  # [V, D] base head (read only when not SHARED_WEIGHT)
    stride_wbv, stride_wbd,
    bb_ptr,  # [V] base bias (read only when HAS_BASE_BIAS)
    h_desc, w_desc, hb_desc, wb_desc,  # TMA tensor descriptors of h, W, h_b, W_b (USE_TMA)
    rows,  # [BLOCK_N] int64 row indices
    cols,  # [BLOCK_V] int64 vocabulary indices
    row0, col0,  # first row and column of the tile (int32; rows/cols are contiguous ranges)
    N, V, D,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BASE_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr, COMPUTE_KL: tl.constexpr,
):
    """``z = h[rows] W[cols]^T (+ bias)`` and ``b = h_b[rows] W_b[cols]^T (+ bias_b)``, accumulated
    in fp32 (fp64 for fp64 inputs). Out-of-range rows/columns hold finite junk: callers mask them.
    Without ``COMPUTE_KL`` (CE alone) the base side is neither read nor multiplied: ``b`` is
    returned as zeros."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=acc_dtype)
    b = tl.zeros((BLOCK_N, BLOCK_V), dtype=acc_dtype)
    row_ok = rows < N
    col_ok = cols < V
    ks = tl.arange(0, BLOCK_D).to(tl.int64)
    for k0 in range(0, D, BLOCK_D):
        if USE_TMA:
            # bulk tile copies into shared memory; out-of-range rows/columns/k read as zero
            h = h_desc.load([row0, k0])
            w = w_desc.load([col0, k0])
            if COMPUTE_KL:
                hb = hb_desc.load([row0, k0])
                if SHARED_WEIGHT:
                    wb = w
                else:
                    wb = wb_desc.load([col0, k0])
        else:
            k = k0 + ks
            k_ok = k < D
            h = tl.load(h_ptr + rows[:, None] * stride_hn + k[None, :] * stride_hd,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_wv + k[None, :] * stride_wd,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if COMPUTE_KL:
                hb = tl.load(hb_ptr + rows[:, None] * stride_hbn + k[None, :] * stride_hbd,
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if SHARED_WEIGHT:
                    wb = w
                else:
                    wb = tl.load(wb_ptr + cols[:, None] * stride_wbv + k[None, :] * stride_wbd,
                                 mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        z = _mma(h, tl.trans(w), z, DOT_IEEE, DOT_UPCAST)
        if COMPUTE_KL:
            b = _mma(hb, tl.trans(wb), b, DOT_IEEE, DOT_UPCAST)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype)[None, :]
    if COMPUTE_KL and HAS_BASE_BIAS:
        b += tl.load(bb_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype)[None, :]
    return z, b


@jit
def _grouped(pid, row_blocks, per_row_block, GROUP_N: tl.constexpr):
    """``(row block, index)`` of program ``pid`` in grouped order: ``GROUP_N`` row blocks take
    their ``per_row_block`` programs (vocabulary splits or tiles) together, index by index, so
    the programs in flight at once read the same few head tiles and the same ``GROUP_N`` blocks
    of hidden rows, which stay in L2 (row-major order would stream the head once per row block)."""
    in_group = GROUP_N * per_row_block
    first = pid // in_group * GROUP_N
    size = tl.minimum(row_blocks - first, GROUP_N)
    local = pid % in_group
    return first + local % size, local // size


@jit
def _linear_tmkl_fused_fwd_kernel(
    h_ptr,  # [N, D] adapted hidden states
    stride_hn, stride_hd,
    w_ptr,  # [V, D] LM head
    stride_wv, stride_wd,
    bias_ptr,  # [V] head bias
    hb_ptr,  # [N, D] base hidden states
    stride_hbn, stride_hbd,
    wb_ptr,  # [V, D] base head
    stride_wbv, stride_wbd,
    bb_ptr,  # [V] base bias
    h_desc, w_desc, hb_desc, wb_desc,  # TMA descriptors of h, W, h_b, W_b (None unless USE_TMA)
    y_ptr,  # [N] integer labels
    part_ptr,  # [N, splits, 8] out: per-split partial records (_params.PART_* columns)
    N, V, D,
    splits,  # vocabulary splits per row block
    tiles_per_split,  # vocabulary tiles handled by one program
    inv_t,  # 1 / T
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    FORWARD_KL: tl.constexpr, MASK_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BASE_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr,
    COMPUTE_KL: tl.constexpr,  # False: CE alone, the base side is never read
    GROUP_N: tl.constexpr,  # row blocks that go through their splits together (_grouped)
):
    pid_n, pid_s = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), splits, GROUP_N)
    pid_n = pid_n.to(tl.int64)
    pid_s = pid_s.to(tl.int64)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    NEG_INF: tl.constexpr = float("-inf")
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row0 = tl.min(rows, axis=0).to(tl.int32)  # TMA tile offset (unused by the pointer path)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    m_z = tl.full((BLOCK_N,), NEG_INF, acc_dtype)
    s_z = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    m_b = tl.full((BLOCK_N,), NEG_INF, acc_dtype)
    s_b = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    kl_acc = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    m_c = tl.full((BLOCK_N,), NEG_INF, acc_dtype)
    s_c = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    z_y = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    num_tiles = tl.cdiv(V, BLOCK_V)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col0 = tl.min(cols, axis=0).to(tl.int32)  # TMA tile offset (unused by the pointer path)
        z, b = _logit_tiles(h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, bias_ptr,
                            hb_ptr, stride_hbn, stride_hbd, wb_ptr, stride_wbv, stride_wbd, bb_ptr,
                            h_desc, w_desc, hb_desc, wb_desc, rows, cols, row0, col0, N, V, D,
                            BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_BASE_BIAS, SHARED_WEIGHT,
                            ACC_FP64, DOT_IEEE, DOT_UPCAST, USE_TMA, COMPUTE_KL)
        col_ok = (cols < V)[None, :]
        is_y = cols[None, :] == y[:, None]
        z_y += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        drop = ~col_ok
        if MASK_TARGET:
            drop = drop | is_y
        x = tl.where(drop, NEG_INF, z * inv_t)
        if COMPUTE_KL:
            u = tl.where(drop, NEG_INF, b * inv_t)
            m_z, s_z, m_b, s_b, kl_acc = fold_block(m_z, s_z, m_b, s_b, kl_acc, x, u, FORWARD_KL, 1)
        else:  # CE alone: the adapted side's statistics only (the base record stays empty)
            m_z, s_z, _, _ = online_lse(m_z, s_z, x, 1)
        if SEPARATE_CE:
            m_c, s_c, _, _ = online_lse(m_c, s_c, tl.where(col_ok, z, NEG_INF), 1)
    # the split's partial record: its KL accumulator over its own weight distribution (base for
    # forward, adapted for reverse), offsets to the split's maxima
    out = part_ptr + (rows * splits + pid_s) * NUM_PART
    store_part(out, m_z, s_z, m_b, s_b, kl_acc, m_c, s_c, z_y, row_ok, FORWARD_KL, SEPARATE_CE)


@jit
def _linear_tmkl_fused_bwd_kernel(
    h_ptr,  # [N, D] adapted hidden states
    stride_hn, stride_hd,
    w_ptr,  # [V, D] LM head
    stride_wv, stride_wd,
    bias_ptr,  # [V] head bias
    hb_ptr,  # [N, D] base hidden states
    stride_hbn, stride_hbd,
    wb_ptr,  # [V, D] base head
    stride_wbv, stride_wbd,
    bb_ptr,  # [V] base bias
    h_desc, w_desc, hb_desc, wb_desc,  # TMA descriptors of h, W, h_b, W_b (None unless USE_TMA)
    y_ptr,  # [N] integer labels
    stats_ptr,  # [N, 7] m_z, ls_z, m_b, ls_b, m_ce, ls_ce, kl from the forward (_params.STAT_*)
    coef_ce_ptr,  # [N] upstream coefficient of dCE/dz per row (0 on ignored rows)
    coef_kl_ptr,  # [N] upstream coefficient of dKL/dz per row (KL unscaled; 0 on ignored rows)
    dh_ptr,  # [N, D] out (accumulated atomically, accumulation dtype, contiguous rows of this launch)
    dw_ptr,  # [V, D] out (accumulated atomically, accumulation dtype, contiguous)
    db_ptr,  # [V] out (accumulated atomically, accumulation dtype)
    N, V, D,
    inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    FORWARD_KL: tl.constexpr, MASK_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BASE_BIAS: tl.constexpr, SHARED_WEIGHT: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr,
    GRAD_H: tl.constexpr, GRAD_W: tl.constexpr, GRAD_BIAS: tl.constexpr,
    USE_TMA: tl.constexpr,
    COMPUTE_KL: tl.constexpr,  # False: CE alone, the base side is never read
    GROUP_N: tl.constexpr,  # row blocks that go through the vocabulary tiles together (_grouped)
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    pid_n = pid_n.to(tl.int64)
    pid_v = pid_v.to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row0 = tl.min(rows, axis=0).to(tl.int32)  # TMA tile offsets (unused by the pointer path)
    col0 = tl.min(cols, axis=0).to(tl.int32)
    row_ok = rows < N
    col_ok = cols < V
    a = tl.load(coef_ce_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(coef_kl_ptr + rows, mask=row_ok, other=0.0)
    # a row block whose rows all have zero coefficients (ignored tokens) contributes nothing
    if tl.max(tl.abs(a) + tl.abs(c), axis=0) > 0.0:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        st = stats_ptr + rows * NUM_STATS
        m_z = tl.load(st + STAT_M_Z, mask=row_ok, other=0.0)
        ls_z = tl.load(st + STAT_LS_Z, mask=row_ok, other=0.0)
        m_b = tl.load(st + STAT_M_B, mask=row_ok, other=0.0)
        ls_b = tl.load(st + STAT_LS_B, mask=row_ok, other=0.0)
        m_c = tl.load(st + STAT_M_CE, mask=row_ok, other=0.0)
        ls_c = tl.load(st + STAT_LS_CE, mask=row_ok, other=0.0)
        kl = tl.load(st + STAT_KL, mask=row_ok, other=0.0)
        z, b = _logit_tiles(h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, bias_ptr,
                            hb_ptr, stride_hbn, stride_hbd, wb_ptr, stride_wbv, stride_wbd, bb_ptr,
                            h_desc, w_desc, hb_desc, wb_desc, rows, cols, row0, col0, N, V, D,
                            BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_BASE_BIAS, SHARED_WEIGHT,
                            ACC_FP64, DOT_IEEE, DOT_UPCAST, USE_TMA, COMPUTE_KL)
        is_y = cols[None, :] == y[:, None]
        drop = ~col_ok[None, :]
        if MASK_TARGET:
            drop = drop | is_y
        x = tl.where(drop, NEG_INF, z * inv_t)
        u = tl.where(drop, NEG_INF, b * inv_t)
        # dL/dz = a * (softmax(z) - e_y) + c * dKL/dz
        sm_y = exp((z - m_c[:, None]) - ls_c[:, None])  # softmax(z), read at the target column
        g = grad_tile(z, x, u, is_y, m_z[:, None], ls_z[:, None], m_b[:, None], ls_b[:, None],
                      m_c[:, None], ls_c[:, None], kl[:, None], a[:, None], (c * inv_t)[:, None],
                      sm_y, FORWARD_KL, MASK_TARGET, SEPARATE_CE, COMPUTE_KL)
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        g_op = g.to(w_ptr.dtype.element_ty)
        ks = tl.arange(0, BLOCK_D).to(tl.int64)
        for k0 in range(0, D, BLOCK_D):
            k = k0 + ks
            k_ok = k < D
            if GRAD_H:
                # dh[rows, k] += dz @ W[cols, k]
                if USE_TMA:
                    w = w_desc.load([col0, k0])
                else:
                    w = tl.load(w_ptr + cols[:, None] * stride_wv + k[None, :] * stride_wd,
                                mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                dh = _mma(g_op, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_dtype), DOT_IEEE, DOT_UPCAST)
                # relaxed: a plain reduction, no ordering with other memory (the default acq_rel
                # puts a GPU-wide fence around every vector atomic)
                tl.atomic_add(dh_ptr + rows[:, None] * D + k[None, :], dh.to(dh_ptr.dtype.element_ty),
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if GRAD_W:
                # dW[cols, k] += dz^T @ h[rows, k]
                if USE_TMA:
                    h = h_desc.load([row0, k0])
                else:
                    h = tl.load(h_ptr + rows[:, None] * stride_hn + k[None, :] * stride_hd,
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                dw = _mma(tl.trans(g_op), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=acc_dtype),
                          DOT_IEEE, DOT_UPCAST)
                tl.atomic_add(dw_ptr + cols[:, None] * D + k[None, :], dw.to(dw_ptr.dtype.element_ty),
                              mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")
        if GRAD_BIAS:
            # dbias[cols] += sum over rows of dz
            tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0).to(db_ptr.dtype.element_ty), mask=col_ok,
                          sem="relaxed")


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
# Bytes of the fp32 grad_hidden scratch of one backward launch (see launch_config).
BWD_SCRATCH_BYTES = 4 * 2**20
# Bytes of hidden rows (adapted and base) that the programs in flight share through L2 in grouped
# order (see launch_config): a third of an H100's 50 MB L2.
GROUP_BYTES = 16 * 2**20


def launch_config(N: int, V: int, D: int, dtype: torch.dtype, device: torch.device | None = None,
                  *, block_n: int | None = None, block_v: int | None = None,
                  block_d: int | None = None, splits: int | None = None,
                  bwd_rows: int | None = None, shared_weight: bool = True,
                  tma: bool | None = None, group_n: int | None = None) -> dict:
    """Tile sizes, vocabulary splits, warps and pipeline stages of the fused-linear kernels.

    How they are chosen:
      * ``BLOCK_N x BLOCK_V`` (64..128 x 128) is the MMA tile. The forward keeps two fp32
        accumulators of that size (adapted and base logits) plus per-row statistics in registers;
        128 x 128 x 2 fp32 is 128 KiB, i.e. 128 registers per thread at 8 warps, which leaves room
        for the operand pipeline. Smaller row counts use a smaller ``BLOCK_N`` (down to 16, the
        smallest ``tl.dot`` operand) so a short batch does not waste most of a tile.
      * ``BLOCK_D`` (64 for 16-bit inputs, 32 for fp32) keeps each pipeline stage of operand tiles
        (``h``, ``h_b``, ``W`` and, when the base head differs, ``W_b``) at 16-32 KiB of shared memory,
        so 3 stages (2 when ``W_b`` is a separate tensor) fit in the shared memory of an SM.
      * ``splits``: the forward needs ``row blocks x splits`` programs to fill the GPU: enough splits
        for about four waves over the SMs, never more than there are vocabulary tiles. Each split
        costs one 8-float partial record per row (``_params.PART_*``), merged afterwards. The
        backward has one program per tile and needs no splits.
      * ``bwd_rows``: rows per backward launch, a multiple of ``BLOCK_N`` whose fp32 ``grad_hidden``
        scratch (``bwd_rows x D``) fits in :data:`BWD_SCRATCH_BYTES` (4 MiB: 256 rows at D=4096,
        still 2 row blocks x ~1000 vocabulary tiles = ~2000 programs per launch at V=128k). It
        bounds the backward's extra memory to about the gradient itself (Cut Cross-Entropy's
        footprint); the launches cost microseconds against a backward of tens of milliseconds.
      * ``GROUP_N``: programs run in grouped order (``_grouped``): ``GROUP_N`` row blocks go through
        their vocabulary splits (forward) or tiles (backward) together, so a wave of programs reads
        a few head tiles, each once from memory for ``GROUP_N`` row blocks, and keeps the group's
        hidden rows in L2 (up to 8 blocks and :data:`GROUP_BYTES` of rows: 8 at N=8192, D=4096).
        A backward launch groups at most its own ``bwd_rows / BLOCK_N`` row blocks.
      * ``tma``: load the ``h``/``W`` operand tiles with TMA tensor descriptors instead of pointer
        tensors (Hopper and newer, 16-bit inputs; others and inputs whose strides TMA cannot take
        use pointers anyway). Off
        unless ``FORGETKERN_TMA=1`` or ``tma=True``: compiled for sm_90 it removes the register
        spills of the pointer path (``benchmarks/sm90_kernels.py``), but it has not been timed.
    Overrides (``block_*``, ``splits``, ``bwd_rows``, ``tma``, ``group_n``) serve tests and tuning;
    autotuning is not built in.
    """
    if block_v is None:
        block_v = 128 if V >= 128 else max(16, next_power_of_2(V))
    if block_n is None:
        block_n = 128 if N >= 4096 else 64 if N >= 64 else max(16, next_power_of_2(N))
    if block_d is None:
        block_d = 64 if dtype in (torch.float16, torch.bfloat16) else 32
        block_d = min(block_d, max(16, next_power_of_2(D)))
    num_v_tiles = -(-V // block_v)
    if splits is None:
        sms = multiprocessor_count(device)
        row_blocks = max(1, -(-N // block_n))
        splits = -(-4 * sms // row_blocks)
    splits = max(1, min(int(splits), num_v_tiles))
    if bwd_rows is None:
        bwd_rows = BWD_SCRATCH_BYTES // (4 * max(1, D)) // block_n * block_n
    bwd_rows = max(block_n, int(bwd_rows))
    # 8 warps from 64 x 128 up: at 4 warps the two fp32 accumulator tiles and the softmax
    # temporaries spill about 6x more registers (benchmarks/sm90_kernels.py reports the spills)
    big = block_n * block_v >= 64 * 128
    if group_n is None:
        group_n = max(1, min(8, GROUP_BYTES // (2 * block_n * max(1, D) * dtype.itemsize)))
    return {
        "BLOCK_N": int(block_n), "BLOCK_V": int(block_v), "BLOCK_D": int(block_d),
        "GROUP_N": max(1, int(group_n)), "splits": splits, "bwd_rows": bwd_rows,
        "num_warps": 8 if big else 4,
        "num_stages": 3 if shared_weight else 2,
        "tma": env_flag(ENV_TMA) if tma is None else bool(tma),
    }


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether the kernels read the 2-D tensor ``t`` through TMA: 16-bit floats (fp32 operands
    compile to far worse spills with TMA than without), unit column stride, 16-byte aligned base
    and row stride, on a GPU with TMA (sm_90+) or under the interpreter."""
    if t.dtype not in (torch.bfloat16, torch.float16) or t.dim() != 2 or t.numel() == 0:
        return False
    size = t.element_size()
    if t.stride(1) != 1 or (t.stride(0) * size) % 16 or t.data_ptr() % 16:
        return False
    if t.device.type == "cuda":
        return torch.cuda.get_device_capability(t.device)[0] >= 9
    return triton_interpret()


def _descriptors(use_tma: bool, hidden, weight, base_hidden, base_weight, cfg: dict):
    """``(USE_TMA, (h_desc, w_desc, hb_desc, wb_desc))``: tensor descriptors with the kernels' tile
    shapes when ``use_tma`` and every operand allows it, else ``(False, (None,) * 4)``."""
    none = (False, (None, None, None, None))
    if not use_tma:
        return none
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # a Triton without host-side tensor descriptors
        return none
    wb = weight if base_weight is None else base_weight
    if not all(_tma_ok(t) for t in (hidden, weight, base_hidden, wb)):
        return none
    rows = [cfg["BLOCK_N"], cfg["BLOCK_D"]]
    cols = [cfg["BLOCK_V"], cfg["BLOCK_D"]]
    w_desc = TensorDescriptor.from_tensor(weight, cols)
    wb_desc = w_desc if base_weight is None else TensorDescriptor.from_tensor(wb, cols)
    return True, (TensorDescriptor.from_tensor(hidden, rows), w_desc,
                  TensorDescriptor.from_tensor(base_hidden, rows), wb_desc)


def _tensor_args(hidden, weight, base_hidden, base_weight, bias, base_bias):
    """Pointer/stride arguments shared by both kernels (a missing bias/base head passes a dummy).
    The kernels index biases with unit stride: a strided ``(V,)`` bias is copied (it is small)."""
    wb = weight if base_weight is None else base_weight
    bias = None if bias is None else bias.contiguous()
    base_bias = None if base_bias is None else base_bias.contiguous()
    return (
        hidden, hidden.stride(0), hidden.stride(1),
        weight, weight.stride(0), weight.stride(1),
        weight if bias is None else bias,
        base_hidden, base_hidden.stride(0), base_hidden.stride(1),
        wb, wb.stride(0), wb.stride(1),
        weight if base_bias is None else base_bias,
    )


def _flags(hidden, base_weight, bias, base_bias, params: TMKLParams) -> dict:
    """The kernels' constexpr switches. ``COMPUTE_KL`` is ``params.compute_kl`` where the params
    carry it (``False``: CE alone, the base side is never read and the KL is reported as 0)."""
    return dict(
        FORWARD_KL=params.forward_kl, MASK_TARGET=params.mask_target,
        SEPARATE_CE=params.separate_ce, HAS_BIAS=bias is not None,
        HAS_BASE_BIAS=base_bias is not None, SHARED_WEIGHT=base_weight is None,
        COMPUTE_KL=bool(getattr(params, "compute_kl", True)),
        ACC_FP64=hidden.dtype == torch.float64,
        DOT_IEEE=hidden.dtype in (torch.float32, torch.float64),
        DOT_UPCAST=hidden.dtype == torch.bfloat16 and triton_interpret(),
    )


def linear_tmkl_fused_forward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels,
                              params: TMKLParams, row_weight=None, needs=(False, False, False),
                              **overrides):
    """Triton forward: per-row ``(loss, ce, kl, stats, None)`` for ``(N, D)`` hidden states and
    ``(V, D)`` heads (``base_weight=None``: the base uses ``weight``). The backward recomputes, so
    no gradient is precomputed (``row_weight`` and ``needs`` are unused). ``overrides`` go to
    :func:`launch_config`."""
    check_triton()
    n, d = hidden.shape
    v = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    labels = labels.contiguous()  # the kernels index labels with unit stride
    if n == 0:
        empty = torch.zeros(0, dtype=acc, device=hidden.device)
        return (empty, empty.clone(), empty.clone(),
                torch.zeros(0, _params.NUM_STATS, dtype=acc, device=hidden.device), None)
    cfg = launch_config(n, v, d, hidden.dtype, hidden.device, shared_weight=base_weight is None,
                        **overrides)
    splits = cfg.pop("splits")
    cfg.pop("bwd_rows")
    use_tma, descs = _descriptors(cfg.pop("tma"), hidden, weight, base_hidden, base_weight, cfg)
    tiles_per_split = -(-(-(-v // cfg["BLOCK_V"])) // splits)
    part = torch.empty(n, splits, _params.NUM_PART, dtype=acc, device=hidden.device)
    grid = (-(-n // cfg["BLOCK_N"]) * splits,)
    _linear_tmkl_fused_fwd_kernel[grid](
        *_tensor_args(hidden, weight, base_hidden, base_weight, bias, base_bias), *descs, labels,
        part, n, v, d, splits, tiles_per_split, 1.0 / params.temperature,
        **_flags(hidden, base_weight, bias, base_bias, params), USE_TMA=use_tma, **cfg,
    )
    loss, ce, kl, stats = merge_partials(part, labels, params)
    if not getattr(params, "compute_kl", True):  # CE alone: no base statistics, KL reported as 0
        kl = torch.zeros_like(kl)
        stats[:, _params.STAT_KL] = 0.0
    return loss, ce, kl, stats, None


def linear_tmkl_fused_backward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels,
                               stats, coef_ce, coef_kl, params: TMKLParams, needs, **overrides):
    """Triton backward: ``(grad_hidden, grad_weight, grad_bias)`` of
    ``sum_i coef_ce[i] CE_i + coef_kl[i] KL_i``, each ``None`` unless flagged in ``needs``.

    ``grad_hidden`` is returned in ``hidden``'s dtype; ``grad_weight``/``grad_bias`` in the
    accumulation dtype (fp32, fp64 for fp64 inputs). Rows go in launches of ``bwd_rows``
    (:func:`launch_config`): each launch accumulates its rows' ``grad_hidden`` in an fp32 scratch
    of ``bwd_rows x D`` and casts it into the output, so the backward's extra memory beyond the
    gradient itself stays a few MiB instead of an fp32 copy of ``N x D``.
    """
    check_triton()
    n, d = hidden.shape
    v = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    need_h, need_w, need_b = (bool(x) for x in needs)
    dev = hidden.device
    dh = torch.zeros(n, d, dtype=hidden.dtype, device=dev) if need_h else None
    dw = torch.zeros(v, d, dtype=acc, device=dev) if need_w else None
    db = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    if n == 0 or not (need_h or need_w or need_b):
        return dh, dw, db
    labels = labels.contiguous()  # the kernels index labels, stats and coefficients with unit stride
    stats = stats.contiguous()
    valid = labels.long() != params.ignore_index
    zero = torch.zeros((), dtype=acc, device=dev)
    coef_ce = torch.where(valid, coef_ce.to(acc), zero).contiguous()
    coef_kl = torch.where(valid, coef_kl.to(acc), zero).contiguous()
    cfg = launch_config(n, v, d, hidden.dtype, dev, shared_weight=base_weight is None, **overrides)
    cfg.pop("splits")
    rows = cfg.pop("bwd_rows")
    want_tma = cfg.pop("tma")
    # fp32/fp64 inputs accumulate straight into the output; 16-bit ones into an fp32 scratch
    scratch = None
    if need_h and dh.dtype != acc:
        scratch = torch.empty(min(rows, n), d, dtype=acc, device=dev)
    dummy = coef_ce
    flags = _flags(hidden, base_weight, bias, base_bias, params)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        m = r1 - r0
        dh_part = dummy
        if need_h:
            dh_part = dh[r0:r1] if scratch is None else scratch[:m].zero_()
        grid = (-(-m // cfg["BLOCK_N"]) * -(-v // cfg["BLOCK_V"]),)
        use_tma, descs = _descriptors(want_tma, hidden[r0:r1], weight, base_hidden[r0:r1],
                                      base_weight, cfg)
        _linear_tmkl_fused_bwd_kernel[grid](
            *_tensor_args(hidden[r0:r1], weight, base_hidden[r0:r1], base_weight, bias, base_bias),
            *descs, labels[r0:r1], stats[r0:r1], coef_ce[r0:r1], coef_kl[r0:r1],
            dh_part, dummy if dw is None else dw, dummy if db is None else db,
            m, v, d, 1.0 / params.temperature, **flags,
            GRAD_H=need_h, GRAD_W=need_w, GRAD_BIAS=need_b, USE_TMA=use_tma, **cfg,
        )
        if scratch is not None:
            dh[r0:r1].copy_(dh_part)
    return dh, dw, db
