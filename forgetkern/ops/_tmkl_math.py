"""Triton math shared by the TMKL kernels on logits (``ops/tmkl.py``, ``ops/sparse_tmkl.py``) and
on hidden states (``ops/linear_tmkl_fused.py``): the online log-sum-exp, the streaming KL accumulator,
the gradient tile, the exponential; the host-side merge of the per-split partial records they
write is :func:`forgetkern._partials.merge_partials` (re-exported here), shared with the
vocab-parallel form.

Each streaming helper works on a 1-D block of one row (``AXIS=0``, row statistics are scalars) or a
2-D ``[rows, columns]`` tile (``AXIS=1``, row statistics are ``[rows]`` vectors, broadcast by the
caller where a helper takes them already shaped like the tile). The kernels on logits use the
2-D form on one row cut into *lanes* (:func:`lane_block`): a ``[BLOCK_V // VEC, VEC]`` block whose
rows are the 16-byte vectors a thread loads, so every lane keeps running statistics of its own,
folded with reductions inside one thread, and the lanes are merged once after the loop
(:func:`merge_lanes`).
"""
from __future__ import annotations

from .. import _params
from .._params import (PART_KL, PART_LS_B, PART_LS_CE, PART_LS_Z, PART_M_B, PART_M_CE, PART_M_Z,
                       PART_ZY)
from .._partials import merge_partials  # noqa: F401 - the host merge of the partial records
from ._triton import HAS_TRITON, constant, jit, tl

# The per-row statistics' columns (forgetkern._params.STAT_*), readable inside kernels.
NUM_STATS = constant(_params.NUM_STATS)
STAT_M_Z = constant(_params.STAT_M_Z)
STAT_LS_Z = constant(_params.STAT_LS_Z)
STAT_M_B = constant(_params.STAT_M_B)
STAT_LS_B = constant(_params.STAT_LS_B)
STAT_M_CE = constant(_params.STAT_M_CE)
STAT_LS_CE = constant(_params.STAT_LS_CE)
STAT_KL = constant(_params.STAT_KL)
# The per-(row, vocabulary split) partial record's columns (forgetkern._params.PART_*).
NUM_PART = constant(_params.NUM_PART)
P_M_Z = constant(PART_M_Z)
P_LS_Z = constant(PART_LS_Z)
P_M_B = constant(PART_M_B)
P_LS_B = constant(PART_LS_B)
P_KL = constant(PART_KL)
P_M_CE = constant(PART_M_CE)
P_LS_CE = constant(PART_LS_CE)
P_ZY = constant(PART_ZY)

#: Kernels compiled for a GPU evaluate fp32 exponentials as one ``ex2.approx.ftz`` instruction
#: (inline PTX, as the CUDA kernels do); the CPU interpreter, which runs no PTX, uses ``tl.exp``.
FAST_EXP = constant(HAS_TRITON and not _params.triton_interpret())
LOG2E = constant(1.4426950408889634)


@jit
def exp(x):
    """``e^x``. fp32 on a GPU: ``2^(x log2 e)`` with ``ex2.approx.ftz.f32`` (relative error about
    2^-22, results below 2^-126 flush to 0; -inf gives 0, NaN stays NaN), one MUFU instruction
    where ``tl.exp`` takes four; fp64, and anything under the interpreter: ``tl.exp``."""
    if FAST_EXP:
        if x.dtype == tl.float32:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * LOG2E],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.exp(x)
    else:
        return tl.exp(x)


@jit
def store_ignored_row(loss_ptr, ce_ptr, kl_ptr, stats_ptr, row, ACC_FP64: tl.constexpr):
    """An ignored row's outputs: loss, CE, KL and every statistics column zero."""
    zero = tl.zeros((), dtype=tl.float64 if ACC_FP64 else tl.float32)
    tl.store(loss_ptr + row, zero)
    tl.store(ce_ptr + row, zero)
    tl.store(kl_ptr + row, zero)
    for j in tl.static_range(NUM_STATS):
        tl.store(stats_ptr + row * NUM_STATS + j, zero)


@jit
def store_zero_row(g_row, lo, hi, BLOCK_V: tl.constexpr):
    """An ignored row's gradient: zero in columns ``[lo, hi)`` (in the gradient's dtype)."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(lo, hi, BLOCK_V):
        offs = start + cols
        tl.store(g_row + offs, tl.zeros((BLOCK_V,), dtype=g_row.dtype.element_ty), mask=offs < hi)


@jit
def safe_max(m):
    """A running max for use as an offset: ``0`` where nothing finite has been seen (``-inf``)."""
    return tl.where(m == float("-inf"), 0.0, m)


@jit
def online_lse(m, s, x, AXIS: tl.constexpr):
    """Fold the block ``x`` into running row ``(max, sum)`` along ``AXIS``; returns ``(m_new,
    s_new, alpha, e)`` with ``alpha = exp(m - m_new)`` and ``e = exp(x - m_new)`` (offsets from
    :func:`safe_max`, so a fully ``-inf`` prefix keeps ``s = 0``)."""
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    m_safe = safe_max(m_new)
    alpha = exp(m - m_safe)
    e = exp(x - tl.expand_dims(m_safe, AXIS))
    return m_new, s * alpha + tl.sum(e, axis=AXIS), alpha, e


@jit
def rebase_kl(acc, s_z, s_b, m_z_old, m_b_old, m_z, m_b, alpha_z, alpha_b,
              FORWARD_KL: tl.constexpr):
    """The KL accumulator (:func:`kl_accumulate`) with its offsets moved from the maxima
    ``m_*_old`` to ``m_*`` (``alpha_* = exp(m_*_old - m_*)``, sums ``s_*`` before the move):
    every earlier term shifts by the change of the offsets, and the weights by ``alpha``."""
    shift = (safe_max(m_b_old) - safe_max(m_b)) - (safe_max(m_z_old) - safe_max(m_z))
    if FORWARD_KL:
        return alpha_b * (acc + tl.where(s_b == 0.0, 0.0, s_b * shift))
    else:
        return alpha_z * (acc - tl.where(s_z == 0.0, 0.0, s_z * shift))


@jit
def kl_accumulate(acc, s_z, s_b, m_z_old, m_b_old, m_z, m_b, x, u, alpha_z, e_z, alpha_b, e_b,
                  FORWARD_KL: tl.constexpr, AXIS: tl.constexpr):
    """The streaming KL accumulator after one block, from the block's scaled, masked logits
    ``x = z/T``, ``u = b/T``, the sums ``s_z``, ``s_b`` before the block, the maxima before
    (``*_old``) and after it, and the :func:`online_lse` outputs of both.

    ``acc = sum_v w_v ((a_v - m_a) - (o_v - m_o))`` over the columns so far, with ``w = exp(u - m_b)``,
    ``a, o = u, x`` (forward) or ``w = exp(x - m_z)``, ``a, o = x, u`` (reverse): every term is a
    difference of offsets to the row maxima (exactly 0 at a shared peak), so the KL keeps plain
    torch's shift invariance. When a max moves, earlier terms shift by the change of the offsets.
    """
    x_off = x - tl.expand_dims(safe_max(m_z), AXIS)
    u_off = u - tl.expand_dims(safe_max(m_b), AXIS)
    if FORWARD_KL:
        # acc = sum_{v != y} exp(b_v/T - m_b) ((b_v/T - m_b) - (z_v/T - m_z)); -inf base entries add 0
        term = tl.where(u == float("-inf"), 0.0, e_b * (u_off - x_off))
    else:
        # acc = sum_{v != y} exp(z_v/T - m_z) ((z_v/T - m_z) - (b_v/T - m_b))
        term = tl.where(x == float("-inf"), 0.0, e_z * (x_off - u_off))
    return rebase_kl(acc, s_z, s_b, m_z_old, m_b_old, m_z, m_b, alpha_z, alpha_b, FORWARD_KL) + \
        tl.sum(term, axis=AXIS)


@jit
def fold_block(m_z, s_z, m_b, s_b, acc, x, u, FORWARD_KL: tl.constexpr, AXIS: tl.constexpr):
    """One block ``x = z/T``, ``u = b/T`` (masked) folded into the running row state: both online
    log-sum-exps and the KL accumulator. Returns ``(m_z, s_z, m_b, s_b, acc)``."""
    m_z_new, s_z_new, alpha_z, e_z = online_lse(m_z, s_z, x, AXIS)
    m_b_new, s_b_new, alpha_b, e_b = online_lse(m_b, s_b, u, AXIS)
    acc = kl_accumulate(acc, s_z, s_b, m_z, m_b, m_z_new, m_b_new, x, u, alpha_z, e_z, alpha_b,
                        e_b, FORWARD_KL, AXIS)
    return m_z_new, s_z_new, m_b_new, s_b_new, acc


@jit
def lane_offsets(LANES: tl.constexpr, VEC: tl.constexpr):
    """Column offsets ``[LANES, VEC]`` (int32) of a block of ``LANES * VEC`` columns cut into
    lanes of ``VEC`` contiguous columns: a lane is one vector load of one thread (16 bytes), so the
    ``AXIS=1`` reductions of the streaming helpers over it stay inside the thread."""
    return tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@jit
def load_block(z_row, b_row, offs, V, y, inv_t, ACC_FP64: tl.constexpr, MASK_TARGET: tl.constexpr,
               SCALED: tl.constexpr, BOUNDED: tl.constexpr, TARGET: tl.constexpr):
    """One block of a row at column offsets ``offs`` (int32): the logits ``z`` (accumulation
    dtype), ``x = z/T`` and ``u = b/T`` and the target mask ``is_y``.

    ``BOUNDED``: columns past ``V`` load as ``-inf`` (the partial last block; full blocks load
    without a mask, so their loads stay 16-byte vectors whatever ``V`` is). ``TARGET``: the block
    may hold the target column ``y`` (int32): it is compared and, with ``MASK_TARGET``, dropped
    (``-inf``) from ``x`` and ``u``; other blocks skip the comparison (``is_y`` all false).
    ``SCALED``: ``T != 1`` (otherwise ``x = z`` and ``u = b`` exactly, with no multiply)."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    if BOUNDED:
        inb = offs < V
        z = tl.load(z_row + offs, mask=inb, other=float("-inf")).to(acc_dtype)
        b = tl.load(b_row + offs, mask=inb, other=float("-inf")).to(acc_dtype)
    else:
        z = tl.load(z_row + offs).to(acc_dtype)
        b = tl.load(b_row + offs).to(acc_dtype)
    if SCALED:
        x = z * inv_t
        u = b * inv_t
    else:
        x = z
        u = b
    if TARGET:
        is_y = offs == y
        if MASK_TARGET:
            x = tl.where(is_y, float("-inf"), x)
            u = tl.where(is_y, float("-inf"), u)
    else:
        is_y = tl.zeros(offs.shape, dtype=tl.int1)
    return z, x, u, is_y


@jit
def merge_lanes(m_z, s_z, m_b, s_b, acc, FORWARD_KL: tl.constexpr):
    """The row's ``(m_z, s_z, m_b, s_b, acc)`` scalars from per-lane running statistics
    (``[LANES]`` vectors): maxima and sums merged apart, each lane's KL accumulator moved to the
    row's maxima (:func:`rebase_kl`)."""
    m_z_row = tl.max(m_z, axis=0)
    m_b_row = tl.max(m_b, axis=0)
    alpha_z = exp(m_z - safe_max(m_z_row))
    alpha_b = exp(m_b - safe_max(m_b_row))
    acc = tl.sum(rebase_kl(acc, s_z, s_b, m_z, m_b, m_z_row, m_b_row, alpha_z, alpha_b, FORWARD_KL),
                 axis=0)
    return m_z_row, tl.sum(s_z * alpha_z, axis=0), m_b_row, tl.sum(s_b * alpha_b, axis=0), acc


@jit
def merge_lane_lse(m, s):
    """The row's ``(max, sum)`` from per-lane ``[LANES]`` running ``(max, sum)`` pairs."""
    m_row = tl.max(m, axis=0)
    return m_row, tl.sum(s * exp(m - safe_max(m_row)), axis=0)


@jit
def store_part(out, m_z, s_z, m_b, s_b, acc, m_c, s_c, z_y, mask, FORWARD_KL: tl.constexpr,
               SEPARATE_CE: tl.constexpr):
    """Write one vocabulary split's partial record (``forgetkern._params.PART_*`` columns at
    ``out``) from its running statistics: maxima and log-sums apart, the KL accumulator as an
    expectation under the split's own weight distribution (0 when it has no mass), the CE
    normalizer (``T != 1``; else the kept columns' own), and ``z_y`` (0 unless the split holds
    the target)."""
    if FORWARD_KL:
        kl_part = tl.where(s_b == 0.0, 0.0, acc / s_b)
    else:
        kl_part = tl.where(s_z == 0.0, 0.0, acc / s_z)
    tl.store(out + P_M_Z, safe_max(m_z), mask=mask)
    tl.store(out + P_LS_Z, tl.log(s_z), mask=mask)
    tl.store(out + P_M_B, safe_max(m_b), mask=mask)
    tl.store(out + P_LS_B, tl.log(s_b), mask=mask)
    tl.store(out + P_KL, kl_part, mask=mask)
    if SEPARATE_CE:
        tl.store(out + P_M_CE, safe_max(m_c), mask=mask)
        tl.store(out + P_LS_CE, tl.log(s_c), mask=mask)
    else:
        tl.store(out + P_M_CE, safe_max(m_z), mask=mask)
        tl.store(out + P_LS_CE, tl.log(s_z), mask=mask)
    tl.store(out + P_ZY, z_y, mask=mask)


@jit
def grad_tile(z, x, u, is_y, m_z, ls_z, m_b, ls_b, m_c, ls_c, kl, a, c, sm_y,
              FORWARD_KL: tl.constexpr, MASK_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr,
              COMPUTE_KL: tl.constexpr = True):
    """``a * dCE/dz + c * T dKL/dz`` on one block: ``z`` raw logits, ``x = z/T`` and ``u = b/T``
    masked (``-inf`` where dropped), ``is_y`` the target column; the saved row statistics (maxima
    ``m_*`` and log-sums ``ls_*`` apart, ``forgetkern._params.STAT_*``), the row coefficients
    ``a`` and ``c`` (the KL's coefficient already divided by ``T``) and ``sm_y = softmax(z)_y``
    (read only with ``MASK_TARGET`` and ``T == 1``) come shaped to broadcast against the block.
    Without ``COMPUTE_KL`` (CE alone) ``u``, the base statistics and ``c`` are not read."""
    # a distribution with no mass (log-sum -inf) has every probability 0: divide by +inf instead,
    # so that no column meets inf - inf
    lz = tl.where(ls_z == float("-inf"), float("inf"), ls_z)
    # log q~ = (z/T - m_z) - ls_z, log p~ = (b/T - m_b) - ls_b: shift-invariant
    log_q = (x - m_z) - lz
    q = exp(log_q)
    if COMPUTE_KL:
        lb = tl.where(ls_b == float("-inf"), float("inf"), ls_b)
        log_p = (u - m_b) - lb
        p = exp(log_p)
        if FORWARD_KL:
            # T dKL/dz_v = q~_v - p~_v
            d_kl = q - p
        else:
            # T dKL/dz_v = q~_v (log q~_v - log p~_v - KL)  (NaN propagates, zero weight gives 0)
            d_kl = tl.where(q == 0.0, 0.0, q * (log_q - log_p - kl))
    # dCE/dz = softmax(z) - e_y
    if SEPARATE_CE:
        sm = exp((z - m_c) - tl.where(ls_c == float("-inf"), float("inf"), ls_c))
    elif MASK_TARGET:
        # off the target softmax(z)_v = q~_v exp(LSE'(z) - LSE(z)) when T == 1
        sm = tl.where(is_y, sm_y, q * exp((m_z - m_c) + (ls_z - ls_c)))
    else:
        sm = q
    d_ce = sm - tl.where(is_y, 1.0, 0.0)
    # a zero coefficient never meets inf/nan
    if COMPUTE_KL:
        return tl.where(a != 0.0, a * d_ce, 0.0) + tl.where(c != 0.0, c * d_kl, 0.0)
    else:
        return tl.where(a != 0.0, a * d_ce, 0.0)


@jit
def finish_kl(acc, s_z, s_b, FORWARD_KL: tl.constexpr):
    """The row's KL from the accumulator and the sums: ``acc / s_w - log s_w + log s_o``; 0 where
    the weight distribution has no mass, ``inf`` where it has mass the other one lacks."""
    if FORWARD_KL:
        kl = acc / s_b - tl.log(s_b) + tl.log(s_z)
        kl = tl.where(s_z == 0.0, float("inf"), kl)
        return tl.where(s_b == 0.0, 0.0, kl)
    else:
        kl = acc / s_z - tl.log(s_z) + tl.log(s_b)
        kl = tl.where(s_b == 0.0, float("inf"), kl)
        return tl.where(s_z == 0.0, 0.0, kl)


@jit
def with_target(m_z, s_z, z_y):
    """``(max, log-sum)`` of the CE normalizer ``LSE(z) = logaddexp(LSE'(z), z_y)`` from the kept
    columns' running ``(max, sum)`` and the target logit (``T == 1``, target masked)."""
    m_c = safe_max(tl.maximum(m_z, z_y))
    kept = tl.where(s_z == 0.0, 0.0, s_z * exp(safe_max(m_z) - m_c))
    return m_c, tl.log(kept + exp(z_y - m_c))
