"""The chunked driver of every fused-linear form: the loss from hidden states with the logits formed
one chunk of rows at a time by a vendor GEMM, and the backend's own TMKL kernels run on each chunk.

Per chunk of ``R`` rows (``docs/linear_tmkl.md`` gives GEMM counts and bytes per mode)::

    L = [h; h_b] @ W.T (+ bias)            # one GEMM: adapted and base rows stacked (shared head)
    L = c * tanh(s * L / c)                # logit_scale s, logit_softcap c (when set)
    loss, ce, kl, stats = rows.forward(z, b, y)            # the logits op's kernels, fp32 inside
    dz = rows.backward(z, b, y, stats, coef_ce, coef_kl)   # dL/dz for the reduction's weight
    dh[rows] = s * (dz * tanh') @ W        # one GEMM straight into its rows
    dW += s * dz'^T h;  dbias += s * sum(dz')              # only when the head trains

``rows`` is the per-chunk implementation of a logits op (``tmkl`` for a dense base, ``sparse_tmkl``
for a :class:`~forgetkern._params.TopKBase` record), given by the dispatch layer: any backend's.
Modes: exact base (the ``b`` rows of ``L``, 3 GEMMs), top-k base (the record's rows instead, 2
GEMMs) and CE alone (``compute_kl=False``: ``b`` is ``z`` itself, whose KL is exactly zero, 2
GEMMs); ``+1`` GEMM for ``dW``.

Precision: by default the chunk holds fp32 logits for 16-bit inputs (the GEMM writes fp32 with
``out_dtype`` where torch supports it, on CUDA; elsewhere the operands are upcast), as plain fp32
torch on the same inputs would; ``dz`` is handed to the ``dh`` GEMM in the inputs' dtype (tensor
cores), written by the kernels into a buffer of its own: a 16-bit gradient written over fp32 logits
in place would race between threads that read and write different bytes. ``chunk_dtype="input"``
keeps the chunk in the inputs' dtype (half the memory, logits rounded to that dtype).

The vocab-parallel form (:mod:`forgetkern.distributed`) runs this same pass on each rank's rows of
the head: the forward's per-row statistics of the shard are merged over the ranks afterwards
(:func:`forgetkern._partials.merge_partials`), the backward pass's ``rows.forward`` hands back the
merged statistics, and ``dh`` is summed across ranks after the loop.

Layer 1: imports only :mod:`forgetkern._params` and torch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._params import NUM_STATS, LinearTMKLParams, accumulation_dtype

#: Most bytes a default chunk's working set takes (logits buffers, gradient buffers and the
#: per-chunk kernels' temporaries; outputs and gradients are not counted), unless that is less than
#: :data:`DEFAULT_MIN_ROWS` rows' worth.
DEFAULT_BUDGET_CAP = 1 << 30
#: Rows of the smallest useful chunk, and the granularity of larger ones: one GEMM tile of rows.
#: With fewer the GEMMs run partial tiles and the head is read once per few rows.
MIN_USEFUL_ROWS = 128
#: Rows a default budget holds at least (or every row): from about here on the GEMMs run at their
#: full rate (on the CPU at D=256, V=50000, 128-row GEMMs take 1.4-1.8x the time per row of
#: 512-row ones; on an H200 at D=4096, V=128256, reading the head once per 512 rows costs a fifth
#: of the chunk's GEMM time).
DEFAULT_MIN_ROWS = 512


class Plan(NamedTuple):
    """Rows per chunk, the bytes of that chunk's working set, and whether the chunk is useful (at
    least :data:`MIN_USEFUL_ROWS` rows, or every row)."""

    rows: int
    bytes: int
    useful: bool


def _size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _dtypes(dtype: torch.dtype, p: LinearTMKLParams, rows):
    """``(chunk dtype, dtype the kernels write dz in, whether dz needs a buffer of its own,
    whether a cast into an input-dtype buffer follows)``."""
    cdt = accumulation_dtype(dtype) if p.chunk_dtype == "accumulation" else dtype
    gdt = dtype if getattr(rows, "grad_any_dtype", True) else cdt
    return cdt, gdt, gdt != cdt or p.logit_softcap is not None, gdt != dtype


def _costs(v: int, dtype: torch.dtype, p: LinearTMKLParams, rows, dense: bool, grads: bool):
    """``(buffer bytes per row, temporaries' bytes per row, cap of the temporaries' bytes)``: the
    logits (two rows per row with an exact base), the gradient buffers when ``grads``, and the
    per-chunk kernels' ``rows.temporaries`` rows in the accumulation dtype, at most
    ``rows.temporary_cap`` bytes whatever the chunk (kernels that work in sub-chunks)."""
    cdt, gdt, separate, cast = _dtypes(dtype, p, rows)
    per = _size(cdt) * (2 if dense and p.compute_kl else 1)
    if grads:
        per += (_size(gdt) if separate else 0) + (_size(dtype) if cast else 0)
    temp = getattr(rows, "temporaries", 0) * _size(accumulation_dtype(dtype)) * max(1, v)
    cap = getattr(rows, "temporary_cap", None)
    return per * max(1, v), temp, float("inf") if cap is None else max(temp, cap)


def plan(n: int, v: int, dtype: torch.dtype, p: LinearTMKLParams, rows, *, dense: bool,
         grads: bool = True) -> Plan:
    """Rows per chunk: ``p.chunk_size`` when given, else as many as ``p.memory_budget`` bytes hold
    (a multiple of :data:`MIN_USEFUL_ROWS` when at least that many). The default budget is a
    quarter of the ``n x V`` logits in fp32, at most :data:`DEFAULT_BUDGET_CAP`, and never less
    than :data:`DEFAULT_MIN_ROWS` rows' worth (or every row's)."""
    per, temp, cap = _costs(v, dtype, p, rows, dense, grads)

    def cost(r: int) -> int:
        return int(r * per + min(r * temp, cap))

    def fit(budget: int) -> int:
        r = budget // (per + temp)
        return max(r, int(budget - cap) // per) if r * temp >= cap else r

    need = max(1, min(n, MIN_USEFUL_ROWS))
    if p.chunk_size is not None:
        return Plan(p.chunk_size, cost(p.chunk_size), p.chunk_size >= need)
    budget = p.memory_budget
    if budget is None:
        quarter = n * max(1, v) * _size(accumulation_dtype(dtype)) // 4
        budget = max(cost(max(1, min(n, DEFAULT_MIN_ROWS))), min(DEFAULT_BUDGET_CAP, quarter))
    room = fit(budget)
    rows_ = min(max(1, n), max(1, room))
    if rows_ >= MIN_USEFUL_ROWS and rows_ < n:
        rows_ -= rows_ % MIN_USEFUL_ROWS
    return Plan(rows_, cost(rows_), room >= need)


# --------------------------------------------------------------------------------------------
# GEMMs into preallocated buffers
# --------------------------------------------------------------------------------------------
_WIDE_MM: dict = {}  # device type -> whether torch.mm writes fp32 from 16-bit operands (out_dtype)


def _wide_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands on
    ``device`` (CUDA in recent torch; checked once per device type and dtype)."""
    key = (device.type, dtype)
    if key not in _WIDE_MM:
        try:
            a = torch.zeros(1, 1, dtype=dtype, device=device)
            torch.mm(a, a, out_dtype=torch.float32)
            _WIDE_MM[key] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _WIDE_MM[key] = False
    return _WIDE_MM[key]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether ``a`` and ``b`` are the same values in memory (``detach`` gives a new object)."""
    if a is None or b is None:
        return a is b
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _scaled_mm(out, a, b, scale: float):
    """``out = scale * a @ b`` into ``out`` (the inputs' dtype)."""
    if scale == 1.0:
        return torch.mm(a, b, out=out)
    return torch.addmm(out, a, b, beta=0.0, alpha=scale, out=out)


class _Head:
    """One LM head ``(V, D)`` and its bias as the logits GEMM reads them: ``logits(out, h)`` writes
    ``s * (h @ W.T + bias)`` into ``out`` (any float dtype at least as wide as ``h``'s)."""

    def __init__(self, weight, bias, out_dtype, scale: float):
        self.weight, self.scale = weight, scale
        self.wide = out_dtype != weight.dtype and _wide_mm(weight.device, weight.dtype)
        self.upcast = out_dtype != weight.dtype and not self.wide
        # without a widening GEMM the operands are upcast: the head once per pass
        self.w = weight.to(out_dtype) if self.upcast else weight
        self.bias = None if bias is None else bias.to(out_dtype if self.upcast else bias.dtype)

    def logits(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        s = self.scale
        if self.wide:
            torch.mm(h, self.weight.T, out_dtype=out.dtype, out=out)
            if self.bias is not None:
                out.add_(self.bias)
            if s != 1.0:
                out.mul_(s)
            return out
        if self.upcast:
            h = h.to(out.dtype)
        if self.bias is not None:
            return torch.addmm(self.bias, h, self.w.T, beta=s, alpha=s, out=out)
        return _scaled_mm(out, h, self.w.T, s)


def logits_chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """A fresh ``h @ weight.T (+ bias)`` in ``dtype`` (fp32 GEMM output for 16-bit operands)."""
    out = torch.empty(h.shape[0], weight.shape[0], dtype=dtype, device=h.device)
    return _Head(weight, bias, dtype, 1.0).logits(out, h)


def _weight_grad(gw, dz, h, scale, spare):
    """``gw += scale * dz^T h`` with ``gw`` in the accumulation dtype; ``spare``: an idle
    accumulation-dtype buffer shaped like ``dz``, or ``None``."""
    if dz.dtype == gw.dtype:
        gw.addmm_(dz.T, h, alpha=scale)
    elif _wide_mm(dz.device, dz.dtype):
        gw.add_(torch.mm(dz.T, h, out_dtype=gw.dtype), alpha=scale)
    else:
        wide = dz.to(gw.dtype) if spare is None else spare.copy_(dz)
        gw.addmm_(wide.T, h.to(gw.dtype), alpha=scale)


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def linear_pass(rows, hidden, weight, bias, labels, params: LinearTMKLParams, *, base_hidden=None,
                base_weight=None, base_bias=None, record=None, coef_ce=None, coef_kl=None,
                needs=(False, False, False)):
    """One pass over the rows of a fused-linear loss (module docstring), ``plan(...).rows`` at a
    time.

    ``hidden`` ``(N, D)``; ``weight`` ``(V, D)``; ``bias`` ``(V,)`` or ``None``; ``labels``
    ``(N,)``; the base as ``base_hidden`` ``(N, D)`` with ``base_weight`` (``None``: ``weight``)
    and ``base_bias``, or as ``record`` (a top-k record's rows); neither is read when
    ``params.compute_kl`` is false. ``coef_ce``/``coef_kl`` ``(N,)``: the upstream gradient of each
    row's CE and KL; with them, the gradients flagged in ``needs`` (hidden, weight, bias).

    Returns ``(loss, ce, kl, stats, grad_hidden, grad_weight, grad_bias)``: per-row values and
    ``(N, NUM_STATS)`` statistics in the accumulation dtype, ``grad_hidden`` in ``hidden``'s dtype,
    ``grad_weight``/``grad_bias`` in the accumulation dtype (``None`` unless computed).
    """
    p = params
    n, d = hidden.shape
    v = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    acc = accumulation_dtype(dtype)
    loss = torch.zeros(n, dtype=acc, device=dev)
    ce_out, kl_out = torch.zeros_like(loss), torch.zeros_like(loss)
    stats = torch.zeros(n, NUM_STATS, dtype=acc, device=dev)
    want = coef_ce is not None and coef_kl is not None
    need_h, need_w, need_b = (bool(x) and want for x in needs)
    grads = need_h or need_w or need_b
    gh = torch.empty(n, d, dtype=dtype, device=dev) if need_h else None
    gw = torch.zeros(v, d, dtype=acc, device=dev) if need_w else None
    gb = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    if n == 0:
        return loss, ce_out, kl_out, stats, gh, gw, gb
    dense = record is None and p.compute_kl
    shared = dense and base_weight is None
    cdt, gdt, separate, cast = _dtypes(dtype, p, rows)
    r_max = min(n, plan(n, v, dtype, p, rows, dense=dense, grads=grads).rows)
    s, cap = p.logit_scale, p.logit_softcap
    pre = s / cap if cap is not None else s  # the GEMM's scale; the cap's tanh follows
    head = _Head(weight, bias, cdt, pre)
    base_head = None
    if dense and not shared:
        base_head = _Head(base_weight, base_bias, cdt, pre)
    elif shared and not _same(base_bias, bias):  # the base has a bias of its own: two GEMMs
        shared, base_head = False, _Head(weight, base_bias, cdt, pre)
    logits = torch.empty((2 if dense else 1) * r_max, v, dtype=cdt, device=dev)
    stack = torch.empty(2 * r_max, d, dtype=dtype, device=dev) if shared else None
    g_buf = torch.empty(r_max, v, dtype=gdt, device=dev) if grads and separate else None
    d_buf = torch.empty(r_max, v, dtype=dtype, device=dev) if grads and cast else None
    for start in range(0, n, r_max):
        stop = min(n, start + r_max)
        r = stop - start
        h, y = hidden[start:stop], labels[start:stop]
        if shared:  # adapted and base rows in one GEMM: the head is read once
            stack[:r].copy_(h)
            stack[r:2 * r].copy_(base_hidden[start:stop])
            zb = head.logits(logits[:2 * r], stack[:2 * r])
            z, b = zb[:r], zb[r:]
        else:
            z = head.logits(logits[:r], h)
            if dense:
                b = base_head.logits(logits[r_max:r_max + r], base_hidden[start:stop])
            else:
                b = z if record is None else tuple(t[start:stop] for t in record)
        if cap is not None:
            (logits[:2 * r] if shared else z).tanh_().mul_(cap)
            if base_head is not None:
                b.tanh_().mul_(cap)
        outs = rows.forward(z, b, y, p)
        for out, value in zip((loss, ce_out, kl_out, stats), outs):
            if out is not kl_out or p.compute_kl:
                out[start:stop] = value
        if not grads:
            continue
        # dz in the kernels' dtype: in place over z, or a buffer of its own (module docstring)
        g = z if g_buf is None else g_buf[:r]
        rows.backward(z, b, y, stats[start:stop], coef_ce[start:stop], coef_kl[start:stop], p, g)
        if cap is not None:
            # d(c tanh(u / c))/du = 1 - tanh^2, from the capped logits (z is free now)
            g.mul_(z.div_(cap).square_().neg_().add_(1.0))
        if d_buf is not None:
            g = d_buf[:r].copy_(g)
        if need_h:
            _scaled_mm(gh[start:stop], g, weight, s)
        if need_w:
            spare = z if cdt == acc and g is not z else None
            _weight_grad(gw, g, h, s, spare)
        if need_b:
            gb.add_(g.sum(0, dtype=acc), alpha=s)
    return loss, ce_out, kl_out, stats, gh, gw, gb


# --------------------------------------------------------------------------------------------
# The interfaces of the fused-linear ops (forgetkern._backend binds ``rows``)
# --------------------------------------------------------------------------------------------
def _coefficients(hidden, params, row_weight, needs):
    if row_weight is None or not any(needs):
        return None, None
    acc = accumulation_dtype(hidden.dtype)
    ones = torch.ones(hidden.shape[0], dtype=acc, device=hidden.device) * row_weight.to(acc)
    return ones * params.ce_weight, ones * params.kl_scale


def linear_tmkl_forward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels, params,
                        row_weight=None, needs=(False, False, False), *, rows):
    """The ``linear_tmkl`` forward: per-row ``(loss, ce, kl, stats, pre)``; with ``row_weight``
    (the 0-dim upstream gradient each row's loss is expected to receive) and any of ``needs``, the
    same pass computes those gradients for it (``pre``)."""
    coef_ce, coef_kl = _coefficients(hidden, params, row_weight, needs)
    *outs, gh, gw, gb = linear_pass(rows, hidden, weight, bias, labels, params,
                                    base_hidden=base_hidden, base_weight=base_weight,
                                    base_bias=base_bias, coef_ce=coef_ce, coef_kl=coef_kl,
                                    needs=needs)
    return (*outs, None if coef_ce is None else (gh, gw, gb))


def linear_tmkl_backward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels, stats,
                         coef_ce, coef_kl, params, needs, *, rows):
    """``(grad_hidden, grad_weight, grad_bias)`` for per-row coefficients, recomputed by the same
    pass (``stats`` unused)."""
    return linear_pass(rows, hidden, weight, bias, labels, params, base_hidden=base_hidden,
                       base_weight=base_weight, base_bias=base_bias, coef_ce=coef_ce,
                       coef_kl=coef_kl, needs=needs)[4:]


def linear_sparse_tmkl_forward(hidden, weight, bias, base, labels, params, row_weight=None,
                               needs=(False, False, False), *, rows):
    """The ``linear_sparse_tmkl`` forward (``base``: the top-k record's rows), as
    :func:`linear_tmkl_forward`."""
    coef_ce, coef_kl = _coefficients(hidden, params, row_weight, needs)
    *outs, gh, gw, gb = linear_pass(rows, hidden, weight, bias, labels, params, record=base,
                                    coef_ce=coef_ce, coef_kl=coef_kl, needs=needs)
    return (*outs, None if coef_ce is None else (gh, gw, gb))


def linear_sparse_tmkl_backward(hidden, weight, bias, base, labels, stats, coef_ce, coef_kl,
                                params, needs, *, rows):
    """``(grad_hidden, grad_weight, grad_bias)`` of the sparse form, recomputed by the same pass."""
    return linear_pass(rows, hidden, weight, bias, labels, params, record=base, coef_ce=coef_ce,
                       coef_kl=coef_kl, needs=needs)[4:]
