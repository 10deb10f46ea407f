"""The reference of the TMKL op on logits: rows in chunks, the max and the log-sum of every
normalizer kept apart (see :mod:`forgetkern.reference`). ``base_logits`` may be ``logits`` itself
(CE alone, as the chunked fused-linear driver passes it): the KL is then exactly 0 and its work is
skipped.
"""
from __future__ import annotations

import torch

from .._params import (NUM_STATS, STAT_KL, STAT_LS_B, STAT_LS_CE, STAT_LS_Z, STAT_M_B, STAT_M_CE,
                       STAT_M_Z, TMKLParams, accumulation_dtype, row_outputs, with_target)

NEG_INF = float("-inf")

#: Default memory budget of one chunk of rows (all temporaries of the chunk together).
REFERENCE_CHUNK_BYTES = 256 * 2**20
# Roughly how many rows x V temporaries the chunk computations keep alive at once.
_TEMPS_PER_CHUNK = 10
#: ``rows x V`` temporaries (accumulation dtype) per row of logits the TMKL ops here allocate, and
#: at most :data:`REFERENCE_CHUNK_BYTES` of them (rows go in chunks of :func:`chunk_rows`): the
#: chunked fused-linear driver counts them in its memory budget (``_backend.Implementation``).
CHUNK_TEMPORARIES = _TEMPS_PER_CHUNK
CHUNK_TEMPORARY_CAP = REFERENCE_CHUNK_BYTES


def chunk_rows(num_cols: int, dtype: torch.dtype, chunk_bytes: int | None = None) -> int:
    """Rows per chunk so that the chunk's temporaries fit in ``chunk_bytes``."""
    budget = REFERENCE_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    per_row = max(1, num_cols) * torch.finfo(accumulation_dtype(dtype)).bits // 8 * _TEMPS_PER_CHUNK
    return max(1, budget // per_row)


def _shifted(x: torch.Tensor):
    """Shift the rows of ``x`` in place by their max ``m`` (``0`` for a row that is all ``-inf``)
    and return ``(m, s, e)`` with ``e = exp(x - m)`` and ``s = sum e``: log-probabilities are then
    ``(x - m) - log s``, the max and the log-sum kept apart (never ``x - logsumexp(x)``, which
    carries the logits' rounding)."""
    m = x.amax(dim=1)
    m.masked_fill_(m == NEG_INF, 0.0)
    x.sub_(m[:, None])
    e = x.exp()
    return m, e.sum(dim=1), e


def ce_normalizer(z: torch.Tensor, z_y: torch.Tensor, m_z: torch.Tensor, ls_z: torch.Tensor,
                  p: TMKLParams):
    """The CE normalizer ``(max, log-sum)`` over every column of the raw logits ``z``: a pass of
    its own when ``T != 1`` (``separate_ce``), else the KL's normalizer of the kept columns, the
    target joining them when it was masked (``LSE(z) = logaddexp(LSE'(z), z_y)``, max and sum
    apart)."""
    if p.separate_ce:
        m_c, s_c, _ = _shifted(z.to(ls_z.dtype, copy=True))
        return m_c, s_c.log()
    if p.mask_target:
        return with_target(m_z, ls_z, z_y)
    return m_z, ls_z


def set_target(t: torch.Tensor, y: torch.Tensor, value, *, add: bool = False) -> None:
    """``t[i, y[i]] = value[i]`` (``+=`` with ``add``) for every row whose target column lies in
    this block of columns; ``y < 0`` marks a row whose target is elsewhere (another vocabulary
    shard). ``value``: a float or an ``(R, 1)`` tensor."""
    if torch.is_tensor(value):
        value = value.to(t.dtype)
    if bool((y >= 0).all()):
        fn = t.scatter_add_ if add else t.scatter_
        fn(1, y[:, None], value if torch.is_tensor(value) else torch.full_like(t[:, :1], value))
        return
    rows = (y >= 0).nonzero().squeeze(1)
    vals = value[rows, 0] if torch.is_tensor(value) else torch.full_like(rows, 0, dtype=t.dtype) + value
    t.index_put_((rows, y[rows]), vals, accumulate=add)


def _scaled(z: torch.Tensor, y: torch.Tensor, p: TMKLParams, shift=None) -> torch.Tensor:
    """A fresh ``z / T - shift`` in the accumulation dtype (``shift``: a per-row column or
    ``None``), with the target column at ``-inf`` when masked (rows with ``y < 0`` have no target
    column here). One pass from accumulation-dtype logits at ``T = 1``."""
    acc = accumulation_dtype(z.dtype)
    if p.temperature != 1.0:
        x = torch.mul(z if z.dtype == acc else z.to(acc), 1.0 / p.temperature)
        if shift is not None:
            x.sub_(shift)
    elif shift is not None:
        x = torch.sub(z, shift.to(acc))  # promotes 16-bit logits to the accumulation dtype
    else:
        x = z.to(acc, copy=True)
    if p.mask_target:
        set_target(x, y, NEG_INF)
    return x


def _kl(xs, e_z, b, y, s_z, p: TMKLParams):
    """``(kl, m_b, ls_b, ls_z)`` of a chunk from the adapted side's shifted ``xs``, its exponentials
    ``e_z`` and sum ``s_z`` (:func:`_chunk_stats`); ``xs`` is consumed."""
    if p.forward_kl:
        del e_z  # only the weights' exponentials are needed
    us = _scaled(b, y, p)
    m_b, s_b, e_b = _shifted(us)
    ls_z, ls_b = s_z.log(), s_b.log()
    if p.forward_kl:
        w, terms, s_w, ls_w, ls_o = e_b, us.sub_(xs), s_b, ls_b, ls_z
    else:
        del e_b
        w, terms, s_w, ls_w, ls_o = e_z, xs.sub_(us), s_z, ls_z, ls_b
    del xs, us
    # a zero weight times an infinite or undefined term (a -inf column, the masked target) adds
    # nothing; a NaN or +inf logit still makes the row NaN through its normalizers (s_w, ls_o)
    terms.mul_(w).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    kl = terms.sum(dim=1).div_(s_w).sub_(ls_w).add_(ls_o)
    del w, terms
    kl = torch.where(ls_o == NEG_INF, torch.full_like(kl, float("inf")), kl)
    kl = torch.where(s_w == 0, torch.zeros_like(kl), kl)
    return kl, m_b, ls_b, ls_z


def _chunk_stats(z: torch.Tensor, b: torch.Tensor, y: torch.Tensor, p: TMKLParams):
    """Per-row ``(ce, kl, stats)`` of one chunk of rows, in the accumulation dtype.

    ``z``, ``b``: ``(R, V)`` adapted and base logits in any float dtype (not modified; the math
    runs in the accumulation dtype), ``b`` ``None`` when the base is ``z`` itself; ``y``: ``(R,)``
    int64 labels with ignored rows replaced by a valid index. The KL is
    ``sum_v w_v ((a_v - m_a) - (o_v - m_o)) / s_w - ls_w + ls_o`` with ``w = exp(a - m_a)`` the weight
    distribution's (base for forward, adapted for reverse) terms: differences of offsets to the row
    maxima, so shift-invariant. ``0`` where the weights have no mass, ``inf`` where they have mass
    the other distribution lacks; zero weights give exactly zero; NaN propagates.
    """
    if b is None:
        return _ce_alone(z, y)
    xs = _scaled(z, y, p)
    m_z, s_z, e_z = _shifted(xs)
    kl, m_b, ls_b, ls_z = _kl(xs, e_z, b, y, s_z, p)
    z_y = z.gather(1, y[:, None]).squeeze(1).to(ls_z.dtype)
    m_c, ls_c = ce_normalizer(z, z_y, m_z, ls_z, p)
    ce = (m_c - z_y) + ls_c
    return ce, kl, torch.stack([m_z, ls_z, m_b, ls_b, m_c, ls_c, kl], dim=1)


def _ce_alone(z: torch.Tensor, y: torch.Tensor):
    """Per-row ``(ce, kl = 0, stats)`` when the base is ``z`` itself: ``CE = -log_softmax(z)_y``
    from torch's row-wise log-softmax, which forms ``(z - m) - log s`` (shift-invariant), and the
    normalizer ``(m, log s)`` with ``log s = -log_softmax(z)`` at the row's argmax, exactly. No KL is
    formed: every normalizer column of ``stats`` holds this one, over every column."""
    zf = z.to(accumulation_dtype(z.dtype))
    m, top = zf.max(dim=1)
    lsm = torch.log_softmax(zf, dim=1)
    ls = -lsm.gather(1, top[:, None]).squeeze(1)
    ce = -lsm.gather(1, y[:, None]).squeeze(1)
    del lsm
    m = m.masked_fill(m == NEG_INF, 0.0)
    kl = torch.zeros_like(ce)
    return ce, kl, torch.stack([m, ls, m, ls, m, ls, kl], dim=1)


def _log_probs(z: torch.Tensor, y: torch.Tensor, m: torch.Tensor, ls: torch.Tensor,
               p: TMKLParams) -> torch.Tensor:
    """``log q~ = (z/T - m) - ls`` from the saved row max and log-sum (``-inf`` where dropped, and
    on a row with no mass)."""
    return _scaled(z, y, p, m[:, None]).sub_(ls.masked_fill(ls == NEG_INF, 0.0)[:, None])


def _chunk_grad(z, b, y, valid, st, coef_ce, coef_kl, p: TMKLParams, out=None) -> torch.Tensor:
    """``coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz`` for one chunk from its saved statistics
    ``st`` (``(R, NUM_STATS)``), zero on invalid rows; ``coef_*``: ``(R,)``. Result in the
    accumulation dtype, or written into ``out`` (any float dtype; it may be ``z`` itself) when the
    last pass can write there; the caller copies otherwise. ``z``, ``b`` may be one vocabulary
    shard of the rows (``st`` then holds the whole rows' statistics and ``y < 0`` marks rows whose
    target lies in another shard).

    Gradients (docs/math.md §2), with ``KL`` unscaled: dCE/dz = softmax(z) - e_y; forward:
    dKL/dz_v = (q~_v - p~_v) / T; reverse: dKL/dz_v = q~_v (log q~_v - log p~_v - KL) / T; both zero
    at the target when ``mask_target``. With ``T = 1``, off the target ``softmax(z)_v = r q~_v``
    with the row scalar ``r = exp((m_z - m_ce) + (ls_z - ls_ce))``, so the whole gradient is a few
    fused passes over ``q~`` and ``p~``.
    """
    inv_t = 1.0 / p.temperature
    acc = st.dtype
    a = coef_ce.to(acc).masked_fill(~valid, 0.0)[:, None]
    c = coef_kl.to(acc).masked_fill(~valid, 0.0)[:, None] * inv_t
    m_c, ls_c = st[:, STAT_M_CE, None], st[:, STAT_LS_CE, None]
    z_y = z.gather(1, y.clamp_min(0)[:, None]).to(acc)  # before anything writes out (maybe z)
    if p.separate_ce:
        r = None
    elif p.mask_target:
        r = ((st[:, STAT_M_Z, None] - m_c) + (st[:, STAT_LS_Z, None] - ls_c)).exp()
    else:
        r = torch.ones_like(a)
    if b is None:  # the base is z itself: the KL's gradient is exactly 0, in either direction
        sm = torch.softmax(z.to(acc), dim=1)  # row-wise: exp((z - m) - log s)
        grad = torch.mul(sm, a, **({} if out is None else {"out": out}))
        del sm
        set_target(grad, y, -a, add=True)
        return grad.masked_fill_(a == 0, 0.0) if bool((a == 0).any()) else grad
    # the last pass writes out directly unless the CE term still reads z afterwards (r is None)
    last = {} if out is None or r is None else {"out": out}
    log_q = _log_probs(z, y, st[:, STAT_M_Z], st[:, STAT_LS_Z], p)
    log_p = _log_probs(b, y, st[:, STAT_M_B], st[:, STAT_LS_B], p)
    # a zero coefficient gives exactly 0 (never 0 * inf or 0 * nan): the base side of a row with
    # c = 0 is dropped before it can meet c
    drop_base = c == 0
    if p.forward_kl:
        # a softmax(z) + c (q~ - p~) = q~ (a r + c) - c p~
        q = log_q.exp_()
        pb = log_p.exp_()
        if bool(drop_base.any()):
            pb.masked_fill_(drop_base, 0.0)
        grad = torch.addcmul(q.mul_(c if r is None else a * r + c), pb, c, value=-1.0, **last)
        del pb, q
    else:
        # a softmax(z) + c q~ (log q~ - log p~ - KL) = q~ (a r + c (log q~ - log p~ - KL)), with 0 where
        # q~ = 0 (NaN propagates)
        q = log_q.exp()
        if bool(drop_base.any()):
            log_p.masked_fill_(drop_base, 0.0)
        t = log_q.sub_(log_p).sub_(st[:, STAT_KL, None]).mul_(c)
        del log_p
        if r is not None:
            t.add_(a * r)
        grad = t.mul_(q).masked_fill_(q == 0, 0.0)
        del q
    return _finish_grad(grad, z, z_y, y, a, c, r, m_c, ls_c, p)


def _finish_grad(grad, z, z_y, y, a, c, r, m_c, ls_c, p: TMKLParams) -> torch.Tensor:
    """The CE terms :func:`_chunk_grad` has not folded into ``grad`` yet (``softmax(z)`` over every
    column when it keeps its own normalizer, ``- e_y``; ``z_y`` the target logits), and zero on
    rows whose coefficients are both zero."""
    if r is None:
        # a softmax(z) over every column, softmax(z) = exp((z - m) - log s)
        sm = torch.sub(z, m_c).sub_(ls_c).exp_()
        grad.add_(sm.mul_(a).masked_fill_(a == 0, 0.0) if bool((a == 0).any()) else sm.mul_(a))
        del sm
    if p.mask_target and r is not None:
        # the target column: q~_y = p~_y = 0, softmax(z)_y = exp((z_y - m) - log s)
        set_target(grad, y, a * (((z_y - m_c) - ls_c).exp() - 1.0))
    else:
        set_target(grad, y, -a, add=True)
    dead = (a == 0) & (c == 0)  # ignored rows, or rows whose both coefficients are 0
    if bool(dead.any()):
        grad.masked_fill_(dead, 0.0)
    return grad


def _rows(logits, base_logits, labels, p: TMKLParams, chunk_bytes):
    """Chunks of rows as ``(start, stop, z, b, y, valid)``: views of the inputs in their own dtype,
    labels with ignored rows replaced by a valid index."""
    n, v = logits.shape
    same = base_logits is logits  # the base is the adapted model itself (CE alone)
    step = chunk_rows(v, logits.dtype, chunk_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y = labels[start:stop].long()
        valid = y != p.ignore_index
        y_safe = torch.where(valid, y, torch.zeros_like(y))
        b = None if same else base_logits[start:stop]
        yield start, stop, logits[start:stop], b, y_safe, valid


@torch.no_grad()
def tmkl_forward(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                 params: TMKLParams, chunk_bytes: int | None = None):
    """Per-row TMKL loss, CE, KL and saved statistics (see the module docstring)."""
    n = logits.shape[0]
    acc = accumulation_dtype(logits.dtype)
    loss = torch.zeros(n, dtype=acc, device=logits.device)
    ce_out = torch.zeros_like(loss)
    kl_out = torch.zeros_like(loss)
    stats = torch.zeros(n, NUM_STATS, dtype=acc, device=logits.device)
    for start, stop, z, b, y, valid in _rows(logits, base_logits, labels, params, chunk_bytes):
        ce, kl, st = _chunk_stats(z, b, y, params)
        outs = row_outputs(ce, kl, st, valid, params)
        for out, value in zip((loss, ce_out, kl_out, stats), outs):
            out[start:stop] = value
    return loss, ce_out, kl_out, stats


@torch.no_grad()
def tmkl_backward(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                  stats: torch.Tensor | None, coef_ce: torch.Tensor, coef_kl: torch.Tensor,
                  params: TMKLParams, grad_out: torch.Tensor, chunk_bytes: int | None = None):
    """Write ``coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz`` for every row into ``grad_out``,
    from the forward's statistics (:func:`_chunk_grad`)."""
    for start, stop, z, b, y, valid in _rows(logits, base_logits, labels, params, chunk_bytes):
        out = grad_out[start:stop]
        grad = _chunk_grad(z, b, y, valid, stats[start:stop], coef_ce[start:stop],
                           coef_kl[start:stop], params, out=out)
        if grad is not out:
            out.copy_(grad)  # one pass, converting to the gradient's dtype
    return grad_out
