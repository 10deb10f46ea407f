"""Plain-PyTorch implementations of every op's interface (DESIGN.md "The math").

These are the test oracle, the CPU production path and the benchmark baseline. They compute in
float32 for float16/bfloat16/float32 inputs and in float64 for float64 inputs, and they process
rows in chunks so that memory stays bounded by a few copies of one chunk's ``rows x V`` whatever
the number of rows. Inputs arrive validated and laid out by ``forgetkern._validate``.

The interfaces, shared with every other backend (``forgetkern._backend.INTERFACES``):

* ``tmkl_forward(logits, base_logits, labels, params) -> (loss, ce, kl, stats)`` with ``(N, V)``
  logits, ``(N,)`` labels; per-row ``loss``/``ce``/``kl`` and ``(N, 4)`` statistics (layout in
  :mod:`forgetkern._params`); ignored rows give zeros.
* ``tmkl_backward(logits, base_logits, labels, stats, coef_ce, coef_kl, params, grad_out)``
  writes, for every row ``i``, ``coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz`` into ``grad_out``
  (which may be ``logits`` itself for an in-place backward) and returns it.
* ``linear_tmkl_forward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels, params,
  row_weight=None, needs=(False, False, False)) -> (loss, ce, kl, stats, pre)`` and
  ``linear_tmkl_backward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels, stats,
  coef_ce, coef_kl, params, needs) -> (grad_hidden, grad_weight, grad_bias)``; ``pre`` is the
  gradient precomputed for the upstream gradient ``row_weight`` per row, or ``None``.
* ``generalized_eigh(A, B, eps) -> (w, V, status)``.
* ``folora_step(g, m, v, s, table, active, scalars, gates) -> None``: the gated Adam step of every
  active segment of FoLoRA's flat buffers (``m``, ``v`` updated, ``s`` written).
"""
from __future__ import annotations

import torch

from ._params import (EIGH_NON_FINITE, EIGH_NOT_PD, EIGH_OK, NUM_STATS, STAT_KL, STAT_LS_B,
                      STAT_LS_CE, STAT_LS_Z, STAT_M_B, STAT_M_CE, STAT_M_Z, TMKLParams,
                      FOLORA_SCALARS, accumulation_dtype, row_outputs,
                      with_target)

NEG_INF = float("-inf")

#: Default memory budget of one chunk of rows (all temporaries of the chunk together).
REFERENCE_CHUNK_BYTES = 256 * 2**20
# Roughly how many rows x V temporaries the chunk computations keep alive at once.
_TEMPS_PER_CHUNK = 10


def chunk_rows(num_cols: int, dtype: torch.dtype, chunk_bytes: int | None = None) -> int:
    """Rows per chunk so that the chunk's temporaries fit in ``chunk_bytes``."""
    budget = REFERENCE_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    per_row = max(1, num_cols) * torch.finfo(accumulation_dtype(dtype)).bits // 8 * _TEMPS_PER_CHUNK
    return max(1, budget // per_row)


def _shifted(x: torch.Tensor):
    """Shift the rows of ``x`` in place by their max ``m`` (``0`` for a row that is all ``-inf``)
    and return ``(m, s)`` with ``s = sum exp(x - m)``: log-probabilities are then
    ``(x - m) - log s``, the max and the log-sum kept apart (never ``x - logsumexp(x)``, which
    carries the logits' rounding)."""
    m = x.amax(dim=1)
    m.masked_fill_(m == NEG_INF, 0.0)
    x.sub_(m[:, None])
    return m, x.exp().sum(dim=1)


def _scaled(z: torch.Tensor, y: torch.Tensor, p: TMKLParams) -> torch.Tensor:
    """A fresh ``z / T`` with the target column at ``-inf`` when masked."""
    x = z * (1.0 / p.temperature) if p.temperature != 1.0 else z.clone()
    if p.mask_target:
        x.scatter_(1, y[:, None], NEG_INF)
    return x


def _chunk_stats(z: torch.Tensor, b: torch.Tensor, y: torch.Tensor, p: TMKLParams):
    """Per-row ``(ce, kl, stats)`` of one chunk of rows, in the accumulation dtype.

    ``z``, ``b``: ``(R, V)`` adapted and base logits, already in the accumulation dtype (not
    modified); ``y``: ``(R,)`` int64 labels with ignored rows replaced by a valid index. The KL is
    ``sum_v w_v ((a_v - m_a) - (o_v - m_o)) / s_w - ls_w + ls_o`` with ``w = exp(a - m_a)`` the weight
    distribution's (base for forward, adapted for reverse) terms: differences of offsets to the row
    maxima, so shift-invariant. ``0`` where the weights have no mass, ``inf`` where they have mass
    the other distribution lacks; zero weights give exactly zero; NaN propagates.
    """
    xs = _scaled(z, y, p)
    m_z, s_z = _shifted(xs)
    us = _scaled(b, y, p)
    m_b, s_b = _shifted(us)
    ls_z, ls_b = s_z.log(), s_b.log()
    if p.forward_kl:
        w, terms, s_w, ls_w, ls_o = us.exp(), us.sub_(xs), s_b, ls_b, ls_z
    else:
        w, terms, s_w, ls_w, ls_o = xs.exp(), xs.sub_(us), s_z, ls_z, ls_b
    del xs, us
    kl = terms.mul_(w).masked_fill_(w == 0, 0.0).sum(dim=1).div_(s_w).sub_(ls_w).add_(ls_o)
    del w, terms
    kl = torch.where(ls_o == NEG_INF, torch.full_like(kl, float("inf")), kl)
    kl = torch.where(s_w == 0, torch.zeros_like(kl), kl)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    if p.separate_ce:
        zs = z.clone()
        m_c, s_c = _shifted(zs)
        del zs
        ls_c = s_c.log()
    elif p.mask_target:
        # the target joins the kept columns: LSE(z) = logaddexp(LSE'(z), z_y), max and sum apart
        m_c, ls_c = with_target(m_z, ls_z, z_y)
    else:
        m_c, ls_c = m_z, ls_z
    ce = (m_c - z_y) + ls_c
    return ce, kl, torch.stack([m_z, ls_z, m_b, ls_b, m_c, ls_c, kl], dim=1)


def _log_probs(z: torch.Tensor, y: torch.Tensor, m: torch.Tensor, ls: torch.Tensor,
               p: TMKLParams) -> torch.Tensor:
    """``log q~ = (z/T - m) - ls`` from the saved row max and log-sum (``-inf`` where dropped, and
    on a row with no mass)."""
    return _scaled(z, y, p).sub_(m[:, None]).sub_(ls.masked_fill(ls == NEG_INF, 0.0)[:, None])


def _chunk_grad(z, b, y, valid, st, coef_ce, coef_kl, p: TMKLParams) -> torch.Tensor:
    """``coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz`` for one chunk from its saved statistics
    ``st`` (``(R, NUM_STATS)``), zero on invalid rows; ``coef_*``: ``(R,)``. Result in z's dtype.

    Gradients (DESIGN.md), with ``KL`` unscaled: dCE/dz = softmax(z) - e_y; forward:
    dKL/dz_v = (q~_v - p~_v) / T; reverse: dKL/dz_v = q~_v (log q~_v - log p~_v - KL) / T; both zero
    at the target when ``mask_target``.
    """
    inv_t = 1.0 / p.temperature
    log_q = _log_probs(z, y, st[:, STAT_M_Z], st[:, STAT_LS_Z], p)
    log_p = _log_probs(b, y, st[:, STAT_M_B], st[:, STAT_LS_B], p)
    if p.forward_kl:
        # dKL/dz = (q~ - p~) / T
        d_kl = log_q.exp_().sub_(log_p.exp_())
    else:
        # dKL/dz = q~ (log q~ - log p~ - KL) / T, zero where q~ = 0 (NaN propagates)
        q = log_q.exp()
        d_kl = log_q.sub_(log_p).sub_(st[:, STAT_KL, None]).mul_(q).masked_fill_(q == 0, 0.0)
        del q
    del log_p
    if inv_t != 1.0:
        d_kl.mul_(inv_t)
    # dCE/dz = softmax(z) - e_y, softmax(z) = exp((z - m) - log s)
    d_ce = (z - st[:, STAT_M_CE, None]).sub_(st[:, STAT_LS_CE, None]).exp_()
    d_ce.scatter_add_(1, y[:, None], torch.full_like(d_ce[:, :1], -1.0))
    # a zero coefficient gives exactly 0 (never 0 * inf or 0 * nan)
    a = coef_ce.to(z.dtype).masked_fill(~valid, 0.0)[:, None]
    c = coef_kl.to(z.dtype).masked_fill(~valid, 0.0)[:, None]
    grad = d_ce.mul_(a)
    if bool((a == 0).any()):
        grad.masked_fill_(a == 0, 0.0)
    grad.add_(d_kl.mul_(c).masked_fill_(c == 0, 0.0) if bool((c == 0).any()) else d_kl.mul_(c))
    return grad


def _rows(logits, base_logits, labels, p: TMKLParams, chunk_bytes):
    n, v = logits.shape
    acc = accumulation_dtype(logits.dtype)
    step = chunk_rows(v, logits.dtype, chunk_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y = labels[start:stop].long()
        valid = y != p.ignore_index
        y_safe = torch.where(valid, y, torch.zeros_like(y))
        z = logits[start:stop].to(acc)
        b = base_logits[start:stop].to(acc)
        yield start, stop, z, b, y_safe, valid


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
        grad = _chunk_grad(z, b, y, valid, stats[start:stop], coef_ce[start:stop],
                           coef_kl[start:stop], params)
        grad_out[start:stop] = grad.to(grad_out.dtype)
    return grad_out


def generalized_eigh(A: torch.Tensor, B: torch.Tensor, eps: float = 0.0):
    """Solve ``A v = lambda (B + eps I) v`` for batched symmetric ``A`` and SPD ``B``.

    Cholesky whitening then ``eigh``::

        L = cholesky(B + eps I);  C = L^-1 A L^-T;  C = U diag(w) U^T;  V = L^-T U

    so that ``V^T (B + eps I) V = I`` and ``A V = (B + eps I) V diag(w)``.

    Args:
        A: ``(..., n, n)`` symmetric (only its symmetric part is used).
        B: ``(..., n, n)`` symmetric positive definite once ``eps * I`` is added.
        eps: non-negative damping added to the diagonal of ``B``.

    Returns:
        ``(w, V, status)``: eigenvalues ``(...,  n)`` in ascending order, eigenvectors
        ``(..., n, n)`` (columns), in float64 for float64 inputs and float32 otherwise, and the
        per-problem ``(...)`` int32 status (``forgetkern._params.EIGH_*``). Failed problems hold
        NaN; the public function turns the status into its error.
    """
    dtype = A.dtype  # the working dtype, chosen at the boundary (forgetkern._validate)
    n = A.shape[-1]
    batch = A.shape[:-2]
    A = 0.5 * (A + A.mT)
    B = 0.5 * (B + B.mT)
    if eps:
        B = B + eps * torch.eye(n, dtype=dtype, device=B.device)
    finite = torch.isfinite(A).all(-1).all(-1) & torch.isfinite(B).all(-1).all(-1)
    eye = torch.eye(n, dtype=dtype, device=B.device)
    # failed problems are replaced by the identity so that one bad entry cannot fail the batch
    B = torch.where(finite[..., None, None], B, eye)
    L, info = torch.linalg.cholesky_ex(B)
    pd = info == 0
    L = torch.where(pd[..., None, None], L, eye)
    A = torch.where((finite & pd)[..., None, None], A, torch.zeros_like(A))
    Y = torch.linalg.solve_triangular(L, A, upper=False)  # L^-1 A
    C = torch.linalg.solve_triangular(L, Y.mT, upper=False).mT  # L^-1 A L^-T
    C = 0.5 * (C + C.mT)
    whitened = torch.isfinite(C).all(-1).all(-1)  # overflow while whitening
    C = torch.where(whitened[..., None, None], C, torch.zeros_like(C))
    w, U = torch.linalg.eigh(C)
    V = torch.linalg.solve_triangular(L.mT, U, upper=True)  # L^-T U
    status = torch.full(batch, EIGH_OK, dtype=torch.int32, device=A.device)
    status = torch.where(pd, status, torch.full_like(status, EIGH_NOT_PD))
    status = torch.where(finite & whitened, status, torch.full_like(status, EIGH_NON_FINITE))
    ok = status == EIGH_OK
    w = torch.where(ok[..., None], w, torch.full_like(w, float("nan")))
    V = torch.where(ok[..., None, None], V, torch.full_like(V, float("nan")))
    return w, V, status


# ---------------------------------------------------------------------------------------------
# Fused-linear TMKL: the loss straight from hidden states, logits formed one chunk of rows at a time
# ---------------------------------------------------------------------------------------------
# Resident rows x V buffers of one fused-linear chunk per row of the chunk: about 9 are alive at once
# (both logits, the four distributions of _chunk, the two gradient parts), and glibc's per-thread
# arenas can keep freed chunk-sized blocks resident, up to ~1.6x that measured on CPU; the budget
# bounds the resident growth, so count that slack.
_LINEAR_TEMPS_PER_CHUNK = 16
#: Fewest rows per default chunk of the fused-linear reference (see :func:`linear_chunk_rows`).
LINEAR_MIN_ROWS = 64


def linear_chunk_rows(vocab: int, dtype: torch.dtype, chunk_size: int | None = None,
                      chunk_bytes: int | None = None, num_rows: int | None = None) -> int:
    """Rows per chunk of the fused-linear reference: ``chunk_size`` when given, else as many rows
    as fit the chunk's ``rows x V`` temporaries (counted as ``_LINEAR_TEMPS_PER_CHUNK`` per row,
    allocator slack included) in ``chunk_bytes``. By default the budget is sized to the problem:
    an eighth of what the ``num_rows x V`` logits would take, so the path's extra memory stays a
    small fraction of any materialized one whatever the shape, but at least
    :data:`LINEAR_MIN_ROWS` rows (each chunk reads the whole head: fewer rows make the pass
    bound by that traffic) and at most :data:`REFERENCE_CHUNK_BYTES`."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    row_bytes = max(1, vocab) * torch.finfo(accumulation_dtype(dtype)).bits // 8
    per_row = row_bytes * _LINEAR_TEMPS_PER_CHUNK
    if chunk_bytes is not None:
        return max(1, int(chunk_bytes) // per_row)
    cap = max(1, REFERENCE_CHUNK_BYTES // per_row)
    if num_rows is None:
        return cap
    return min(cap, max(LINEAR_MIN_ROWS, num_rows * row_bytes // 8 // per_row))


def _logits_chunk(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype):
    """``h @ w.T (+ bias)`` for ``(R, D)`` rows, the matmul in the inputs' dtype, result in ``acc``."""
    z = (h @ w.T).to(acc)
    if bias is not None:
        z += bias.to(acc)
    return z


@torch.no_grad()
def linear_tmkl_pass(hidden: torch.Tensor, weight: torch.Tensor, base_hidden: torch.Tensor,
                     base_weight: torch.Tensor, bias: torch.Tensor | None,
                     base_bias: torch.Tensor | None, labels: torch.Tensor, params: TMKLParams,
                     coef_ce: torch.Tensor | None = None, coef_kl: torch.Tensor | None = None,
                     needs: tuple[bool, bool, bool] = (False, False, False),
                     chunk_size: int | None = None, chunk_bytes: int | None = None):
    """One pass over the rows of a fused-linear TMKL, ``rows`` at a time (:func:`linear_chunk_rows`).

    ``hidden``/``base_hidden``: ``(N, D)``; ``weight``/``base_weight``: ``(V, D)`` (may be the same
    tensor); ``bias``/``base_bias``: ``(V,)`` or ``None``; ``labels``: ``(N,)``. Per chunk the
    logits ``z = h @ W.T + bias`` and ``b = h_b @ W_b.T + bias_b`` exist only for that chunk.

    Returns ``(loss, ce, kl, stats, grad_hidden, grad_weight, grad_bias)``: per-row values and
    ``(N, 4)`` stats as :func:`tmkl_forward`, and, for the gradients flagged in ``needs`` (hidden,
    weight, bias) when ``coef_ce``/``coef_kl`` (``(N,)``) are given, the gradient of
    ``sum_i coef_ce[i] * CE_i + coef_kl[i] * KL_i`` (``None`` otherwise). ``grad_hidden`` has
    ``hidden``'s dtype; ``grad_weight``/``grad_bias`` are accumulated in the accumulation dtype.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    dev = hidden.device
    loss = torch.zeros(n, dtype=acc, device=dev)
    ce_out = torch.zeros_like(loss)
    kl_out = torch.zeros_like(loss)
    stats = torch.zeros(n, NUM_STATS, dtype=acc, device=dev)
    want = coef_ce is not None and coef_kl is not None
    need_h, need_w, need_b = (bool(x) and want for x in needs)
    grad_h = torch.zeros(n, d, dtype=hidden.dtype, device=dev) if need_h else None
    grad_w = torch.zeros(v, d, dtype=acc, device=dev) if need_w else None
    grad_b = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    step = linear_chunk_rows(v, hidden.dtype, chunk_size, chunk_bytes, num_rows=n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y = labels[start:stop].long()
        valid = y != params.ignore_index
        y = torch.where(valid, y, torch.zeros_like(y))
        h = hidden[start:stop]
        z = _logits_chunk(h, weight, bias, acc)
        b = _logits_chunk(base_hidden[start:stop], base_weight, base_bias, acc)
        ce, kl, st = _chunk_stats(z, b, y, params)
        outs = row_outputs(ce, kl, st, valid, params)
        for out, value in zip((loss, ce_out, kl_out, stats), outs):
            out[start:stop] = value
        if need_h or need_w or need_b:
            # dL/dz per row, then through the linear layer: dh = dz W, dW = dz^T h, dbias = sum_rows dz
            g = _chunk_grad(z, b, y, valid, st, coef_ce[start:stop], coef_kl[start:stop], params)
            del z, b
            if need_h:
                grad_h[start:stop] = g.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(g.T, h.to(acc))
            if need_b:
                grad_b += g.sum(0)
            del g
        else:
            del z, b
    return loss, ce_out, kl_out, stats, grad_h, grad_w, grad_b


def linear_tmkl_forward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels,
                        params: TMKLParams, row_weight: torch.Tensor | None = None,
                        needs: tuple[bool, bool, bool] = (False, False, False)):
    """Per-row ``(loss, ce, kl, stats, pre)`` of the fused-linear TMKL (``base_weight=None``: the
    base uses ``weight``). With ``row_weight`` (the 0-dim upstream gradient each row's loss is
    expected to receive) and any of ``needs`` (hidden, weight, bias), the same pass also computes
    those gradients for exactly that upstream gradient and returns them as ``pre``."""
    wb = weight if base_weight is None else base_weight
    coef_ce = coef_kl = None
    if row_weight is not None and any(needs):
        acc = accumulation_dtype(hidden.dtype)
        ones = torch.ones(hidden.shape[0], dtype=acc, device=hidden.device) * row_weight.to(acc)
        coef_ce, coef_kl = ones * params.ce_weight, ones * params.kl_scale
    loss, ce, kl, stats, gh, gw, gb = linear_tmkl_pass(
        hidden, weight, base_hidden, wb, bias, base_bias, labels, params, coef_ce, coef_kl, needs,
        chunk_size=getattr(params, "chunk_size", None))
    return loss, ce, kl, stats, (None if coef_ce is None else (gh, gw, gb))


def linear_tmkl_backward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels, stats,
                         coef_ce, coef_kl, params: TMKLParams, needs):
    """``(grad_hidden, grad_weight, grad_bias)`` of ``sum_i coef_ce[i] CE_i + coef_kl[i] KL_i``,
    each ``None`` unless flagged in ``needs``; recomputed chunk by chunk (``stats`` unused)."""
    wb = weight if base_weight is None else base_weight
    return linear_tmkl_pass(hidden, weight, base_hidden, wb, bias, base_bias, labels, params,
                            coef_ce, coef_kl, needs, chunk_size=getattr(params, "chunk_size", None))[4:]


# --------------------------------------------------------------------------------------------
# FoLoRA: the gated Adam step of every segment of the optimizer's flat buffers
# --------------------------------------------------------------------------------------------


def folora_adam(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                neg_step_size: float, bc2_sqrt: float, eps: float, beta2: float, w1: float,
                w2: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """One segment's gated Adam step, with exactly the torch operations of ``torch.optim.AdamW``
    (single-tensor path), so that with no gate FoLoRA reproduces AdamW bit for bit::

        exp_avg.lerp_(g, w1)                                     # w1 = 1 - beta1
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=w2)          # w2 = 1 - beta2
        step = neg_step_size * exp_avg / (exp_avg_sq.sqrt() / bc2_sqrt + eps) * gate

    ``g``, ``exp_avg``, ``exp_avg_sq``: any one shape (moments updated in place); ``gate``:
    broadcastable to it (per column, or one multiplier per element). Returns the step, shaped
    like ``g``. The scalars are the columns of ``_params.FOLORA_SCALARS``.
    """
    exp_avg.lerp_(g, w1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=w2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    step = torch.zeros_like(exp_avg).addcdiv_(exp_avg, denom, value=neg_step_size)
    if gate is not None:
        step.mul_(gate)
    return step


def folora_step(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor, table,
                active, scalars: torch.Tensor, gates: torch.Tensor | None) -> None:
    """FoLoRA's element-wise step: :func:`folora_adam` on every ``active`` segment of flat buffers.

    In plain torch, for each active segment ``i`` (``a = table.start[i]``, ``n = table.numel[i]``,
    ``c = table.cols[i]``, ``o = table.gate[i]``)::

        sc = dict(zip(FOLORA_SCALARS, scalars[i].tolist()))
        gate = gates[o:o + c] if o >= 0 else None                    # (c,) per column
        s[a:a + n] = folora_adam(g[a:a + n].view(-1, c), m[a:a + n].view(-1, c),
                                 v[a:a + n].view(-1, c), gate=gate, **sc).view(-1)

    Args:
        g, m, v, s: ``(N,)`` float32 flat buffers of gradient coordinates, first and second
            moments (updated in place) and the step (written on active segments only).
        table: :class:`forgetkern._params.SegmentTable`, the segments' layout and gate offsets.
        active: indices of the segments to update; the others are left untouched.
        scalars: ``(S, NUM_FOLORA_SCALARS)`` float32 per-segment scalars, columns in
            ``_params.FOLORA_SCALARS`` order (rows of inactive segments are not read); the
            host builds it each step, and this path reads it on the host.
        gates: ``(G,)`` float32 gates of all gated segments, or ``None`` when none is gated.

    Adjacent active segments with equal scalars (the usual case: one parameter group) are updated
    as one run of the flat buffers, their gates expanded to one multiplier per element (cached on
    ``table``); element by element the arithmetic is that of the loop above.
    """
    rows = scalars.tolist()
    for run in _folora_runs(table, active, rows):
        a = table.start[run[0]]
        b = table.start[run[-1]] + table.numel[run[-1]]
        gate = None
        if gates is not None and any(table.gate[i] >= 0 for i in run):
            gate = _folora_expanded_gates(table, gates)[a:b]
        s[a:b] = folora_adam(g[a:b], m[a:b], v[a:b], gate=gate, **dict(zip(FOLORA_SCALARS, rows[run[0]])))


def _folora_runs(table, active, rows) -> list[list[int]]:
    """``active`` segments split into runs that are adjacent in the flat buffers and share scalars."""
    runs: list[list[int]] = []
    for i in active:
        if runs:
            j = runs[-1][-1]
            if table.start[j] + table.numel[j] == table.start[i] and rows[j] == rows[i]:
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


def _folora_expanded_gates(table, gates: torch.Tensor) -> torch.Tensor:
    """One gate per element of the flat buffers (1 where a segment is ungated), cached on
    ``table`` for this gate buffer."""
    key = ("expanded_gates", id(gates))
    hit = table._cache.get(key)
    if hit is not None and hit[0] is gates:
        return hit[1]
    total = table.start[-1] + table.numel[-1] if table.start else 0
    out = torch.ones(total, dtype=gates.dtype, device=gates.device)
    for a, n, cols, off in zip(table.start, table.numel, table.cols, table.gate):
        if off >= 0 and n:
            cols = max(cols, 1)
            out[a: a + n].view(-1, cols).copy_(gates[off: off + cols].expand(n // cols, cols))
    table._cache[key] = (gates, out)
    return out
