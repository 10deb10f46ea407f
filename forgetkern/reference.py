"""Plain-PyTorch implementations of the forgetkern contract (DESIGN.md "The math").

These are the test oracle, the CPU production path and the benchmark baseline. They compute in
float32 for float16/bfloat16/float32 inputs and in float64 for float64 inputs, and they process
rows in chunks so that memory stays bounded by a few copies of one chunk's ``rows x V`` whatever
the number of rows.

The TMKL functions share one interface with every other backend:

* ``tmkl_forward(logits, base_logits, labels, params) -> (loss, ce, kl, stats)`` with ``(N, V)``
  logits, ``(N,)`` labels; per-row ``loss``/``ce``/``kl`` and ``(N, 4)`` statistics (layout in
  :mod:`forgetkern.ops.params`); ignored rows give zeros.
* ``tmkl_backward(logits, base_logits, labels, stats, coef_ce, coef_kl, params, grad_out)``
  writes, for every row ``i``, ``coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz`` into ``grad_out``
  (which may be ``logits`` itself for an in-place backward) and returns it.
"""
from __future__ import annotations

import torch

from .ops.params import NUM_STATS, TMKLParams

NEG_INF = float("-inf")

#: Default memory budget of one chunk of rows (all temporaries of the chunk together).
REFERENCE_CHUNK_BYTES = 256 * 2**20
# Roughly how many rows x V temporaries the chunk computations keep alive at once.
_TEMPS_PER_CHUNK = 10


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(num_cols: int, dtype: torch.dtype, chunk_bytes: int | None = None) -> int:
    """Rows per chunk so that the chunk's temporaries fit in ``chunk_bytes``."""
    budget = REFERENCE_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    per_row = max(1, num_cols) * torch.finfo(accumulation_dtype(dtype)).bits // 8 * _TEMPS_PER_CHUNK
    return max(1, budget // per_row)


def _log_normalize(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``x - lse`` row-wise, keeping ``-inf`` entries ``-inf`` even when ``lse`` is ``-inf``."""
    return torch.where(x == NEG_INF, x, x - lse[:, None])


def _guarded(weight: float, value: torch.Tensor) -> torch.Tensor:
    """``weight * value`` with a zero weight giving exactly zero (never ``0 * inf = nan``)."""
    return value * weight if weight != 0.0 else torch.zeros_like(value)


def _chunk(z: torch.Tensor, b: torch.Tensor, y: torch.Tensor, p: TMKLParams):
    """Everything one chunk of rows needs, in the accumulation dtype.

    ``z``, ``b``: ``(R, V)`` adapted and base logits, already in the accumulation dtype;
    ``y``: ``(R,)`` int64 labels with ignored rows replaced by a valid index.
    """
    x = z / p.temperature
    u = b / p.temperature
    if p.mask_target:
        target = torch.zeros_like(x, dtype=torch.bool).scatter_(1, y[:, None], True)
        x = x.masked_fill(target, NEG_INF)
        u = u.masked_fill(target, NEG_INF)
    lse_z = torch.logsumexp(x, dim=1)
    lse_b = torch.logsumexp(u, dim=1)
    log_q = _log_normalize(x, lse_z)  # log q~ (adapted), -inf at the target when masked
    log_p = _log_normalize(u, lse_b)  # log p~ (base)
    del x, u  # chunk-sized temporaries: free them before the next ones
    q = log_q.exp()
    pb = log_p.exp()
    # (in place, so one chunk-sized temporary; zero weight gives exactly 0, never 0 * inf)
    if p.forward_kl:
        terms = (log_p - log_q).mul_(pb).masked_fill_(~(pb > 0), 0.0)
    else:
        terms = (log_q - log_p).mul_(q).masked_fill_(~(q > 0), 0.0)
    kl = terms.sum(dim=1)
    del terms
    lse_ce = torch.logsumexp(z, dim=1)
    ce = lse_ce - z.gather(1, y[:, None]).squeeze(1)
    return ce, kl, lse_z, lse_b, lse_ce, log_q, log_p, q, pb


def _chunk_outputs(parts, valid, p: TMKLParams):
    """Per-row ``(loss, ce, kl, stats)`` of one chunk from :func:`_chunk`'s ``parts``; loss, CE
    and KL are zero on invalid rows."""
    ce, kl, lse_z, lse_b, lse_ce, *_ = parts
    zero = torch.zeros_like(ce)
    ce = torch.where(valid, ce, zero)
    kl = torch.where(valid, kl, zero)
    loss = _guarded(p.ce_weight, ce) + _guarded(p.kl_scale, kl)
    stats = torch.stack([lse_z, lse_b, lse_ce, kl], dim=1)
    return loss, ce, kl, stats


def _chunk_grad(z, y, valid, parts, coef_ce, coef_kl, p: TMKLParams) -> torch.Tensor:
    """``coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz`` for one chunk, zero on invalid rows.

    ``parts`` is what :func:`_chunk` returned for ``z``; ``coef_*``: ``(R,)``. Result in z's dtype.
    """
    _, kl, _, _, lse_ce, log_q, log_p, q, pb = parts
    # (in place throughout: two chunk-sized buffers; a zero coefficient gives exactly 0)
    # dCE/dz = softmax(z) - e_y
    d_ce = _log_normalize(z, lse_ce).exp_()
    d_ce.scatter_add_(1, y[:, None], torch.full_like(d_ce[:, :1], -1.0))
    if p.forward_kl:
        # dKL/dz = (q~ - p~) / T
        d_kl = (q - pb).mul_(1.0 / p.temperature)
    else:
        # dKL/dz = q~ (log q~ - log p~ - KL) / T, zero where q~ = 0
        d_kl = (log_q - log_p).sub_(kl[:, None]).mul_(q).masked_fill_(~(q > 0), 0.0)
        d_kl.mul_(1.0 / p.temperature)
    a = coef_ce.to(z.dtype)[:, None]
    c = coef_kl.to(z.dtype)[:, None]
    grad = d_ce.mul_(a).masked_fill_(a == 0, 0.0)
    grad += d_kl.mul_(c).masked_fill_(c == 0, 0.0)
    return grad.masked_fill_(~valid[:, None], 0.0)


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
        outs = _chunk_outputs(_chunk(z, b, y, params), valid, params)
        for out, value in zip((loss, ce_out, kl_out, stats), outs):
            out[start:stop] = value
    return loss, ce_out, kl_out, stats


@torch.no_grad()
def tmkl_backward(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                  stats: torch.Tensor | None, coef_ce: torch.Tensor, coef_kl: torch.Tensor,
                  params: TMKLParams, grad_out: torch.Tensor, chunk_bytes: int | None = None):
    """Write ``coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz`` for every row into ``grad_out``.

    Gradients (DESIGN.md), with ``KL`` unscaled:
      dCE/dz = softmax(z) - e_y;
      forward: dKL/dz_v = (q~_v - p~_v) / T;  reverse: dKL/dz_v = q~_v (log q~_v - log p~_v - KL) / T;
      both zero at the target when ``mask_target``.
    ``stats`` is accepted for interface parity and not needed: the reference recomputes.
    """
    for start, stop, z, b, y, valid in _rows(logits, base_logits, labels, params, chunk_bytes):
        grad = _chunk_grad(z, y, valid, _chunk(z, b, y, params), coef_ce[start:stop],
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
        ``(w, V)``: eigenvalues ``(..., n)`` in ascending order and eigenvectors ``(..., n, n)``
        (columns), in float64 for float64 inputs and float32 otherwise.

    Raises:
        ValueError: mismatched shapes, non-square matrices, negative ``eps``, or a ``B + eps I``
        that is not positive definite (the message lists the failing batch entries).
    """
    from ._validate import check_generalized_eigh_inputs

    check_generalized_eigh_inputs(A, B, eps)
    dtype = accumulation_dtype(A.dtype if A.dtype == torch.float64 else B.dtype)
    n = A.shape[-1]
    A = A.to(dtype)
    B = B.to(dtype)
    A = 0.5 * (A + A.mT)
    B = 0.5 * (B + B.mT)
    if eps:
        B = B + eps * torch.eye(n, dtype=dtype, device=B.device)
    L, info = torch.linalg.cholesky_ex(B)
    if bool((info != 0).any()):
        bad = torch.nonzero(info.reshape(-1)).flatten()[:8].tolist()
        raise ValueError(
            f"B + eps*I is not positive definite (eps={eps}) for batch entries {bad} "
            "(flattened indices); increase eps"
        )
    Y = torch.linalg.solve_triangular(L, A, upper=False)  # L^-1 A
    C = torch.linalg.solve_triangular(L, Y.mT, upper=False).mT  # L^-1 A L^-T
    C = 0.5 * (C + C.mT)
    w, U = torch.linalg.eigh(C)
    V = torch.linalg.solve_triangular(L.mT, U, upper=True)  # L^-T U
    return w, V


# ---------------------------------------------------------------------------------------------
# Fused-linear TMKL: the loss straight from hidden states, logits formed one chunk of rows at a time
# ---------------------------------------------------------------------------------------------
# Resident rows x V buffers of one fused-linear chunk per row of the chunk: about 9 are alive at once
# (both logits, the four distributions of _chunk, the two gradient parts), and glibc's per-thread
# arenas can keep freed chunk-sized blocks resident, up to ~1.6x that measured on CPU; the budget
# bounds the resident growth, so count that slack.
_LINEAR_TEMPS_PER_CHUNK = 16


def linear_chunk_rows(vocab: int, dtype: torch.dtype, chunk_size: int | None = None,
                      chunk_bytes: int | None = None) -> int:
    """Rows per chunk of the fused-linear reference: ``chunk_size`` when given, else as many rows
    as fit the chunk's ``rows x V`` temporaries (counted as ``_LINEAR_TEMPS_PER_CHUNK`` per row,
    allocator slack included) in ``chunk_bytes`` (default :data:`REFERENCE_CHUNK_BYTES`)."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    budget = REFERENCE_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    per_row = max(1, vocab) * torch.finfo(accumulation_dtype(dtype)).bits // 8 * _LINEAR_TEMPS_PER_CHUNK
    return max(1, budget // per_row)


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
    step = linear_chunk_rows(v, hidden.dtype, chunk_size, chunk_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y = labels[start:stop].long()
        valid = y != params.ignore_index
        y = torch.where(valid, y, torch.zeros_like(y))
        h = hidden[start:stop]
        z = _logits_chunk(h, weight, bias, acc)
        b = _logits_chunk(base_hidden[start:stop], base_weight, base_bias, acc)
        parts = _chunk(z, b, y, params)
        del b
        outs = _chunk_outputs(parts, valid, params)
        for out, value in zip((loss, ce_out, kl_out, stats), outs):
            out[start:stop] = value
        if need_h or need_w or need_b:
            # dL/dz per row, then through the linear layer: dh = dz W, dW = dz^T h, dbias = sum_rows dz
            g = _chunk_grad(z, y, valid, parts, coef_ce[start:stop], coef_kl[start:stop], params)
            del parts, z
            if need_h:
                grad_h[start:stop] = g.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(g.T, h.to(acc))
            if need_b:
                grad_b += g.sum(0)
            del g
        else:
            del parts, z
    return loss, ce_out, kl_out, stats, grad_h, grad_w, grad_b
