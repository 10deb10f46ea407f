"""Triton math shared by the TMKL kernels on logits (``ops/tmkl.py``) and on hidden states
(``ops/linear_tmkl.py``): the online log-sum-exp, the streaming KL accumulator and the gradient
tile. Each helper works on a 1-D block of one row (``AXIS=0``, row statistics are scalars) or a
2-D ``[rows, columns]`` tile (``AXIS=1``, row statistics are ``[rows]`` vectors, broadcast by the
caller where a helper takes them already shaped like the tile).
"""
from __future__ import annotations

from .. import _params
from ._triton import constant, jit, tl

# The per-row statistics' columns (forgetkern._params.STAT_*), readable inside kernels.
NUM_STATS = constant(_params.NUM_STATS)
STAT_M_Z = constant(_params.STAT_M_Z)
STAT_LS_Z = constant(_params.STAT_LS_Z)
STAT_M_B = constant(_params.STAT_M_B)
STAT_LS_B = constant(_params.STAT_LS_B)
STAT_M_CE = constant(_params.STAT_M_CE)
STAT_LS_CE = constant(_params.STAT_LS_CE)
STAT_KL = constant(_params.STAT_KL)


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
def store_zero_row(g_row, V, BLOCK_V: tl.constexpr):
    """An ignored row's gradient: zero in every column (in the gradient's dtype)."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        tl.store(g_row + offs, tl.zeros((BLOCK_V,), dtype=g_row.dtype.element_ty), mask=offs < V)


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
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - tl.expand_dims(m_safe, AXIS))
    return m_new, s * alpha + tl.sum(e, axis=AXIS), alpha, e


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
    shift = (safe_max(m_b_old) - safe_max(m_b)) - (safe_max(m_z_old) - safe_max(m_z))
    if FORWARD_KL:
        # acc = sum_{v != y} exp(b_v/T - m_b) ((b_v/T - m_b) - (z_v/T - m_z)); -inf base entries add 0
        term = tl.where(u == float("-inf"), 0.0, e_b * (u_off - x_off))
        return alpha_b * (acc + tl.where(s_b == 0.0, 0.0, s_b * shift)) + tl.sum(term, axis=AXIS)
    else:
        # acc = sum_{v != y} exp(z_v/T - m_z) ((z_v/T - m_z) - (b_v/T - m_b))
        term = tl.where(x == float("-inf"), 0.0, e_z * (x_off - u_off))
        return alpha_z * (acc - tl.where(s_z == 0.0, 0.0, s_z * shift)) + tl.sum(term, axis=AXIS)


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
def load_scaled(z_row, b_row, offs, V, y, inv_t, ACC_FP64: tl.constexpr,
                MASK_TARGET: tl.constexpr):
    """One block of a row: the logits ``z`` (``-inf`` past ``V``, accumulation dtype), the scaled
    ``x = z/T`` and ``u = b/T`` with the target at ``-inf`` when masked, and the target mask."""
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    inb = offs < V
    z = tl.load(z_row + offs, mask=inb, other=float("-inf")).to(acc_dtype)
    b = tl.load(b_row + offs, mask=inb, other=float("-inf")).to(acc_dtype)
    is_y = offs == y
    x = z * inv_t
    u = b * inv_t
    if MASK_TARGET:
        x = tl.where(is_y, float("-inf"), x)
        u = tl.where(is_y, float("-inf"), u)
    return z, x, u, is_y


@jit
def grad_tile(z, x, u, is_y, m_z, ls_z, m_b, ls_b, m_c, ls_c, kl, a, c, inv_t,
              FORWARD_KL: tl.constexpr, MASK_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr):
    """``a * dCE/dz + c * dKL/dz`` on one block: ``z`` raw logits, ``x = z/T`` and ``u = b/T``
    masked (``-inf`` where dropped), ``is_y`` the target column; the saved row statistics (maxima
    ``m_*`` and log-sums ``ls_*`` apart, ``forgetkern._params.STAT_*``) and the row coefficients
    ``a``, ``c`` come shaped to broadcast against the block."""
    # log q~ = (z/T - m_z) - ls_z, log p~ = (b/T - m_b) - ls_b: shift-invariant
    log_q = (x - m_z) - ls_z
    log_p = (u - m_b) - ls_b
    q = tl.where(x == float("-inf"), 0.0, tl.exp(log_q))
    p = tl.where(u == float("-inf"), 0.0, tl.exp(log_p))
    if FORWARD_KL:
        # dKL/dz_v = (q~_v - p~_v) / T
        d_kl = (q - p) * inv_t
    else:
        # dKL/dz_v = q~_v (log q~_v - log p~_v - KL) / T  (NaN propagates, zero weight gives 0)
        d_kl = tl.where(q == 0.0, 0.0, q * (log_q - log_p - kl)) * inv_t
    # dCE/dz = softmax(z) - e_y
    if SEPARATE_CE:
        sm = tl.where(z == float("-inf"), 0.0, tl.exp((z - m_c) - ls_c))
    elif MASK_TARGET:
        # off the target softmax(z)_v = q~_v exp(LSE'(z) - LSE(z)) when T == 1
        sm = tl.where(is_y, tl.exp((z - m_c) - ls_c), q * tl.exp((m_z - m_c) + (ls_z - ls_c)))
    else:
        sm = q
    d_ce = sm - tl.where(is_y, 1.0, 0.0)
    # a zero coefficient never meets inf/nan
    return tl.where(a != 0.0, a * d_ce, 0.0) + tl.where(c != 0.0, c * d_kl, 0.0)


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
    kept = tl.where(s_z == 0.0, 0.0, s_z * tl.exp(safe_max(m_z) - m_c))
    return m_c, tl.log(kept + tl.exp(z_y - m_c))
