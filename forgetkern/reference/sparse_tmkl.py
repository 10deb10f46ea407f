"""The reference of sparse-base TMKL (docs/base_cache.md) on logits: the base
side is a top-k record (:class:`forgetkern._params.TopKBase`), the adapted side streams every column.

Per row the KL runs over coarse bins: one bin per support token (the record's ``k`` tokens, the
target removed when ``mask_target``; with ``mask_target=False`` the target joins them) and one tail
bin holding every other non-target token. ``P`` and ``Q`` are the base and adapted masses of the
bins. Gradients w.r.t. ``x = z/T`` (docs/math.md §2: ``d(T^2 KL)/dz = T dKL/dx``), for a column
``u`` in bin ``j``: forward ``q~_u (1 - P_j / Q_j)`` (``q~_u - p~_u`` on a support token),
reverse ``q~_u (log Q_j - log P_j - KL)``; zero on a masked target.

Interfaces (``forgetkern._backend.INTERFACES``), with ``base = (values (N, k), indices (N, k) int64,
lse (N,), tail_lse (N,), target (N,))`` as laid out by ``forgetkern._validate``:

* ``sparse_tmkl_forward(logits, base, labels, params) -> (loss, ce, kl, stats)``;
* ``sparse_tmkl_backward(logits, base, labels, stats, coef_ce, coef_kl, params, grad_out)``.

The fused-linear form runs these on each chunk of rows through :mod:`forgetkern._chunked`.
"""
from __future__ import annotations

import torch

from .._params import (NUM_STATS, SP_LS_T, SP_M_T, STAT_KL, STAT_LS_CE, STAT_LS_Z, STAT_M_CE,
                       STAT_M_Z, TMKLParams, accumulation_dtype, row_outputs)
from .tmkl import (CHUNK_TEMPORARIES, CHUNK_TEMPORARY_CAP,  # noqa: F401 (facts of this module too)
                   ce_normalizer, chunk_rows)

NEG_INF = float("-inf")


def _lse_pair(x: torch.Tensor):
    """Row ``(max, log-sum)`` of ``x`` (max ``0`` and log-sum ``-inf`` on an all ``-inf`` row)."""
    m = x.amax(dim=1)
    m = m.masked_fill(m == NEG_INF, 0.0)
    return m, (x - m[:, None]).exp().sum(dim=1).log()


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = torch.maximum(a, b)
    m = m.masked_fill(m == NEG_INF, 0.0)
    return m + ((a - m).exp() + (b - m).exp()).log()


def _bins(x, base, y, p: TMKLParams, m_z, ls_z, m_t, ls_t):
    """Log-masses ``(log Q, log P)`` of the row's bins, ``(R, k + 2)``: the ``k`` support slots, the
    target slot (active only with ``mask_target=False`` and the target outside the record) and the
    tail; ``-inf`` on inactive slots. Also returns the support mask ``(R, k)`` and target flag."""
    values, idx, lse, tail_lse, target = base
    inv_t = 1.0 / p.temperature
    acc = x.dtype
    on_y = idx == y[:, None]
    y_in = on_y.any(dim=1)
    b_y = target.to(acc) * inv_t
    lse = lse.to(acc)
    log_zb = lse if p.mask_target else _logaddexp(lse, b_y)  # the base's kept normalizer
    active = ~on_y if p.mask_target else torch.ones_like(on_y)
    lq = (x.gather(1, idx) - m_z[:, None]) - ls_z[:, None]
    lp = values.to(acc) * inv_t - log_zb[:, None]
    lq, lp = lq.masked_fill(~active, NEG_INF), lp.masked_fill(~active, NEG_INF)
    extra = (~y_in) & (not p.mask_target)
    lq_y = ((x.gather(1, y[:, None]).squeeze(1) - m_z) - ls_z).masked_fill(~extra, NEG_INF)
    lp_y = (b_y - log_zb).masked_fill(~extra, NEG_INF)
    lq_t = (m_t - m_z) + (ls_t - ls_z)
    lp_t = tail_lse.to(acc) - log_zb
    log_q = torch.cat([lq, lq_y[:, None], lq_t[:, None]], dim=1)
    log_p = torch.cat([lp, lp_y[:, None], lp_t[:, None]], dim=1)
    return log_q, log_p, active, extra


def _kl(log_q, log_p, p: TMKLParams):
    """``sum_j W_j (log W_j - log O_j)`` with ``W`` the weights' bins (base for forward)."""
    lw, lo = (log_p, log_q) if p.forward_kl else (log_q, log_p)
    w = lw.exp()
    return torch.where(w == 0, torch.zeros_like(w), w * (lw - lo)).sum(dim=1)


def _scaled(z, y, p: TMKLParams):
    """``(x, kept, tail)``: ``x = z/T`` in the accumulation dtype, the kept columns (target at
    ``-inf`` when masked) and the tail columns (support and target at ``-inf``)."""
    x = z.to(accumulation_dtype(z.dtype)) * (1.0 / p.temperature)
    kept = x.scatter(1, y[:, None], NEG_INF) if p.mask_target else x
    return x, kept


def _chunk_stats(z, base, y, p: TMKLParams):
    """Per-row ``(ce, kl, stats)`` of one chunk: ``z`` ``(R, V)``, ``base`` the record's rows, ``y``
    ``(R,)`` int64 labels (ignored rows replaced by a valid index)."""
    x, kept = _scaled(z, y, p)
    m_z, ls_z = _lse_pair(kept)
    tail = x.scatter(1, base[1], NEG_INF).scatter_(1, y[:, None], NEG_INF)
    m_t, ls_t = _lse_pair(tail)
    del tail
    log_q, log_p, _, _ = _bins(x, base, y, p, m_z, ls_z, m_t, ls_t)
    kl = _kl(log_q, log_p, p)
    z_y = z.gather(1, y[:, None]).squeeze(1).to(x.dtype)
    m_c, ls_c = ce_normalizer(z, z_y, m_z, ls_z, p)
    ce = (m_c - z_y) + ls_c
    return ce, kl, torch.stack([m_z, ls_z, m_t, ls_t, m_c, ls_c, kl], dim=1)


def _chunk_grad(z, base, y, valid, st, coef_ce, coef_kl, p: TMKLParams) -> torch.Tensor:
    """``coef_ce[i] dCE_i/dz + coef_kl[i] dKL_i/dz`` of one chunk (accumulation dtype), zero on
    invalid rows, from the saved statistics ``st``."""
    x, kept = _scaled(z, y, p)
    acc = x.dtype
    m_z, ls_z, kl = st[:, STAT_M_Z], st[:, STAT_LS_Z], st[:, STAT_KL]
    log_q, log_p, active, extra = _bins(x, base, y, p, m_z, ls_z, st[:, SP_M_T], st[:, SP_LS_T])
    a = coef_ce.to(acc).masked_fill(~valid, 0.0)[:, None]
    c = (coef_kl.to(acc).masked_fill(~valid, 0.0) / p.temperature)[:, None]
    q = ((kept - m_z[:, None]) - ls_z[:, None]).exp()  # q~ on every kept column, 0 elsewhere
    lq_t, lp_t = log_q[:, -1:], log_p[:, -1:]
    if p.forward_kl:
        # tail column: q~_u (1 - P_t / Q_t) = q~_u - P_t q~_u / Q_t; support: q~_u - p~_u
        ratio = torch.where(lp_t == NEG_INF, torch.zeros_like(lp_t), (lp_t - lq_t).exp())
        d_kl = q - torch.where(q == 0, torch.zeros_like(q), q * ratio)
        d_sup = log_q.exp() - log_p.exp()
    else:
        # q~_u (log Q_j - log P_j - KL), 0 where q~_u = 0
        d_kl = torch.where(q == 0, torch.zeros_like(q), q * (lq_t - lp_t - kl[:, None]))
        qj = log_q.exp()
        d_sup = torch.where(qj == 0, torch.zeros_like(qj), qj * (log_q - log_p - kl[:, None]))
    if p.mask_target:
        d_kl.scatter_(1, y[:, None], 0.0)
    else:  # the target slot (a support token when it is in the record: overwritten below)
        d_kl.scatter_(1, y[:, None], d_sup[:, -2:-1])
    d_kl.scatter_(1, base[1], d_sup[:, :-2].masked_fill(~active, 0.0))
    del q, kept
    sm = ((z.to(acc) - st[:, STAT_M_CE, None]) - st[:, STAT_LS_CE, None]).exp()
    sm.scatter_add_(1, y[:, None], torch.full_like(sm[:, :1], -1.0))
    # a zero coefficient gives exactly 0 (never 0 * inf or 0 * nan)
    g = torch.where(a == 0, torch.zeros_like(sm), sm * a)
    g += torch.where(c == 0, torch.zeros_like(d_kl), d_kl * c)
    del extra
    return g


def _row_base(base, start, stop):
    return tuple(t[start:stop] for t in base)


def _safe_labels(labels, start, stop, p: TMKLParams):
    y = labels[start:stop].long()
    valid = y != p.ignore_index
    return torch.where(valid, y, torch.zeros_like(y)), valid


@torch.no_grad()
def sparse_tmkl_forward(logits, base, labels, params: TMKLParams, chunk_bytes: int | None = None):
    """Per-row ``(loss, ce, kl, stats)`` of sparse-base TMKL on ``(N, V)`` logits."""
    n, v = logits.shape
    acc = accumulation_dtype(logits.dtype)
    loss = torch.zeros(n, dtype=acc, device=logits.device)
    ce_out, kl_out = torch.zeros_like(loss), torch.zeros_like(loss)
    stats = torch.zeros(n, NUM_STATS, dtype=acc, device=logits.device)
    step = chunk_rows(v, logits.dtype, chunk_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y, valid = _safe_labels(labels, start, stop, params)
        ce, kl, st = _chunk_stats(logits[start:stop], _row_base(base, start, stop), y, params)
        for out, value in zip((loss, ce_out, kl_out, stats), row_outputs(ce, kl, st, valid, params)):
            out[start:stop] = value
    return loss, ce_out, kl_out, stats


@torch.no_grad()
def sparse_tmkl_backward(logits, base, labels, stats, coef_ce, coef_kl, params: TMKLParams,
                         grad_out, chunk_bytes: int | None = None):
    """Write the per-row weighted gradient into ``grad_out`` (may be ``logits`` itself)."""
    n, v = logits.shape
    step = chunk_rows(v, logits.dtype, chunk_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y, valid = _safe_labels(labels, start, stop, params)
        g = _chunk_grad(logits[start:stop], _row_base(base, start, stop), y, valid,
                        stats[start:stop], coef_ce[start:stop], coef_kl[start:stop], params)
        grad_out[start:stop].copy_(g)
    return grad_out


@torch.no_grad()
def topk_record(base_logits: torch.Tensor, labels: torch.Tensor, k: int, temperature: float,
                ignore_index: int, chunk_bytes: int | None = None):
    """``(values, indices int32, lse, tail_lse, target)`` of ``(N, V)`` base logits (see
    :class:`forgetkern._params.TopKBase`), every log-sum-exp computed directly over its own
    columns; float32 (float64 for float64 logits); rows of ignored labels use label 0."""
    n, v = base_logits.shape
    acc = accumulation_dtype(base_logits.dtype)
    dev = base_logits.device
    values = torch.empty(n, k, dtype=acc, device=dev)
    indices = torch.empty(n, k, dtype=torch.int32, device=dev)
    lse, tail, target = (torch.empty(n, dtype=acc, device=dev) for _ in range(3))
    step = chunk_rows(v, base_logits.dtype, chunk_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y = labels[start:stop].long()
        y = torch.where(y == ignore_index, torch.zeros_like(y), y)
        b = base_logits[start:stop].to(acc)
        top = b.topk(k, dim=1)
        u = (b / temperature).scatter_(1, y[:, None], NEG_INF)
        m, ls = _lse_pair(u)
        lse[start:stop] = m + ls
        m, ls = _lse_pair(u.scatter_(1, top.indices, NEG_INF))
        tail[start:stop] = m + ls
        values[start:stop] = top.values
        indices[start:stop] = top.indices.to(torch.int32)
        target[start:stop] = b.gather(1, y[:, None]).squeeze(1)
    return values, indices, lse, tail, target
