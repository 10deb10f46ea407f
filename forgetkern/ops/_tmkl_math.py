"""Triton math shared by the TMKL kernels on logits (``ops/tmkl.py``) and on hidden states
(``ops/linear_tmkl.py``): the online log-sum-exp, the streaming KL accumulator and the gradient
tile. Each helper works on a 1-D block of one row (``AXIS=0``, row statistics are scalars) or a
2-D ``[rows, columns]`` tile (``AXIS=1``, row statistics are ``[rows]`` vectors, broadcast by the
caller where a helper takes them already shaped like the tile).
"""
from __future__ import annotations

from ._triton import jit, tl


@jit
def logaddexp(a, b):
    """``log(exp(a) + exp(b))`` element-wise, ``-inf`` when both are ``-inf``."""
    mx = tl.maximum(a, b)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.exp(a - mx_safe) + tl.exp(b - mx_safe))


@jit
def online_lse(m, s, x, AXIS: tl.constexpr):
    """Fold the block ``x`` into running row ``(max, sum)`` along ``AXIS``; returns ``(m_new,
    s_new, alpha, e)`` with ``alpha = exp(m - m_new)`` and ``e = exp(x - m_new)`` (a fully ``-inf``
    prefix keeps ``s = 0``)."""
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - tl.expand_dims(m_safe, AXIS))
    return m_new, s * alpha + tl.sum(e, axis=AXIS), alpha, e


@jit
def kl_accumulate(acc, x, u, alpha_z, e_z, alpha_b, e_b, FORWARD_KL: tl.constexpr,
                  AXIS: tl.constexpr):
    """The streaming KL accumulator after one block, from the block's scaled, masked logits
    ``x = z/T``, ``u = b/T`` and the :func:`online_lse` outputs of both."""
    if FORWARD_KL:
        # acc = sum_{v != y} exp(b_v/T - m_b) (b_v - z_v) / T ; -inf base entries add 0
        term = tl.where(u == float("-inf"), 0.0, e_b * (u - x))
        return acc * alpha_b + tl.sum(term, axis=AXIS)
    else:
        # acc = sum_{v != y} exp(z_v/T - m_z) (z_v - b_v) / T
        term = tl.where(x == float("-inf"), 0.0, e_z * (x - u))
        return acc * alpha_z + tl.sum(term, axis=AXIS)


@jit
def grad_tile(z, x, u, is_y, lse_z, lse_b, lse_ce, kl, a, c, inv_t,
              FORWARD_KL: tl.constexpr, MASK_TARGET: tl.constexpr, SEPARATE_CE: tl.constexpr):
    """``a * dCE/dz + c * dKL/dz`` on one block: ``z`` raw logits, ``x = z/T`` and ``u = b/T``
    masked (``-inf`` where dropped), ``is_y`` the target column; the saved row statistics and the
    row coefficients ``a``, ``c`` come shaped to broadcast against the block."""
    log_q = x - lse_z
    log_p = u - lse_b
    q = tl.where(x == float("-inf"), 0.0, tl.exp(log_q))
    p = tl.where(u == float("-inf"), 0.0, tl.exp(log_p))
    if FORWARD_KL:
        # dKL/dz_v = (q~_v - p~_v) / T
        d_kl = (q - p) * inv_t
    else:
        # dKL/dz_v = q~_v (log q~_v - log p~_v - KL) / T
        d_kl = tl.where(q > 0.0, q * (log_q - log_p - kl), 0.0) * inv_t
    # dCE/dz = softmax(z) - e_y
    if SEPARATE_CE:
        sm = tl.where(z == float("-inf"), 0.0, tl.exp(z - lse_ce))
    elif MASK_TARGET:
        # off the target softmax(z)_v = q~_v exp(LSE'(z) - LSE(z)) when T == 1
        sm = tl.where(is_y, tl.exp(z - lse_ce), q * tl.exp(lse_z - lse_ce))
    else:
        sm = q
    d_ce = sm - tl.where(is_y, 1.0, 0.0)
    # a zero coefficient never meets inf/nan
    return tl.where(a != 0.0, a * d_ce, 0.0) + tl.where(c != 0.0, c * d_kl, 0.0)
