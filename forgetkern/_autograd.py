"""The autograd Functions of the two losses. They know only the interface of the implementation
they are given (``forgetkern._backend.Implementation``): the public functions validate, resolve the
backend once and pass its implementation in, so nothing here branches on a backend.
"""
from __future__ import annotations

import torch

from ._backend import Implementation
from ._params import LinearTMKLParams, TMKLParams


def coefficients(g_loss, g_ce, g_kl, p: TMKLParams, n: int, dtype, device):
    """Per-row coefficients of dCE/dz and dKL/dz from the upstream gradients of ``(loss, ce, kl)``::

        coef_ce = g_loss * ce_weight + g_ce;   coef_kl = g_loss * kl_weight * T**2 + g_kl
    """
    zeros = torch.zeros(n, dtype=dtype, device=device)
    g_loss = zeros if g_loss is None else g_loss.to(dtype)
    coef_ce = g_loss * p.ce_weight + (zeros if g_ce is None else g_ce.to(dtype))
    coef_kl = g_loss * p.kl_scale + (zeros if g_kl is None else g_kl.to(dtype))
    return coef_ce, coef_kl


class TMKLFunction(torch.autograd.Function):
    """Per-row TMKL ``(loss, ce, kl)`` of ``(N, V)`` logits; reductions happen outside.

    ``forward(logits (N, V), base_logits (N, V), labels (N,), params, impl)``. Backward combines
    the three upstream gradients into two per-row coefficients (:func:`coefficients`) and has the
    implementation recompute the gradient from the logits. ``base_logits`` never gets a gradient.
    """

    @staticmethod
    def forward(ctx, logits, base_logits, labels, params: TMKLParams, impl: Implementation):
        loss, ce, kl, stats = impl.forward(logits, base_logits, labels, params)
        ctx.save_for_backward(logits, base_logits, labels, stats)
        ctx.params = params
        ctx.impl = impl
        ctx.set_materialize_grads(False)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kl):
        logits, base_logits, labels, stats = ctx.saved_tensors
        p: TMKLParams = ctx.params
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        coef_ce, coef_kl = coefficients(g_loss, g_ce, g_kl, p, logits.shape[0], stats.dtype,
                                        logits.device)
        if p.inplace_backward:
            grad = logits
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad = ctx.impl.backward(logits, base_logits, labels, stats, coef_ce, coef_kl, p, grad)
        if p.inplace_backward:
            # the logits' storage now holds the gradient: bump its version so that any other node
            # that saved these logits (or a second backward through this one) raises torch's
            # in-place error instead of reading the gradient as logits
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None


def _uniform_scale(g_loss: torch.Tensor, valid: torch.Tensor, row_weight: torch.Tensor):
    """``s`` such that ``g_loss == s * row_weight`` on every valid row, or ``None`` when the valid
    rows' upstream gradients differ (one host sync)."""
    g = g_loss[valid]
    if g.numel() == 0:
        return torch.ones((), dtype=row_weight.dtype, device=row_weight.device)
    if not bool((g == g[0]).all()):
        return None
    return g[0] / row_weight


def _rescale(grads: tuple, scale: torch.Tensor) -> tuple:
    """The precomputed gradients times ``scale``; the very same tensors when ``scale`` is exactly 1
    (the usual ``loss.backward()`` of a reduced loss: backward does no arithmetic at all)."""
    if bool(scale == 1):
        return grads
    return tuple(None if t is None else t * scale.to(t.dtype) for t in grads)


def _precomputed(ctx, g_loss, g_ce, g_kl, labels, stats, row_weight, p):
    """The fused-linear forward's precomputed gradients, rescaled, when the upstream gradient is a
    uniform multiple of the one they were computed for (the usual ``loss.backward()``); else
    ``None`` (the backward recomputes)."""
    if ctx.pre is None or g_ce is not None or g_kl is not None or g_loss is None:
        return None
    valid = labels.long() != p.ignore_index
    scale = _uniform_scale(g_loss.to(stats.dtype), valid, row_weight.to(stats.dtype))
    return None if scale is None else _rescale(ctx.pre, scale)


class LinearTMKLFunction(torch.autograd.Function):
    """Per-row fused-linear TMKL ``(loss, ce, kl)``; reductions happen outside.

    ``forward(hidden (N, D), weight (V, D), base_hidden (N, D), base_weight (V, D) or None,
    bias (V,) or None, base_bias (V,) or None, labels (N,), row_weight (0-dim), precompute,
    params, impl)``. ``row_weight`` is the upstream gradient each row's loss is expected to receive
    (the reduction's ``1/denominator``); with ``precompute`` an implementation that can (the
    reference) computes the gradients for exactly that upstream gradient during the forward, and
    the backward rescales them when the actual one is a uniform multiple of it, else recomputes.
    Only ``hidden``, ``weight`` and ``bias`` get gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, base_hidden, base_weight, bias, base_bias, labels, row_weight,
                precompute: bool, params: LinearTMKLParams, impl: Implementation):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[4])
        ctx.params = params
        ctx.impl = impl
        ctx.needs = needs
        ctx.set_materialize_grads(False)
        loss, ce, kl, stats, ctx.pre = impl.forward(
            hidden, weight, base_hidden, base_weight, bias, base_bias, labels, params,
            row_weight if precompute else None, needs)
        ctx.save_for_backward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels,
                              stats, row_weight)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kl):
        hidden, weight, base_hidden, base_weight, bias, base_bias, labels, stats, row_weight = \
            ctx.saved_tensors
        p: LinearTMKLParams = ctx.params
        needs = ctx.needs
        if not any(needs):
            return (None,) * 11
        grads = _precomputed(ctx, g_loss, g_ce, g_kl, labels, stats, row_weight, p)
        if grads is None:
            coef_ce, coef_kl = coefficients(g_loss, g_ce, g_kl, p, hidden.shape[0], stats.dtype,
                                            hidden.device)
            grads = ctx.impl.backward(hidden, weight, base_hidden, base_weight, bias, base_bias,
                                      labels, stats, coef_ce, coef_kl, p, needs)
        ctx.pre = None
        gh, gw, gb = grads
        gh = None if gh is None else gh.to(hidden.dtype)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
        return gh, gw, None, None, gb, None, None, None, None, None, None


class SparseTMKLFunction(torch.autograd.Function):
    """Per-row sparse-base TMKL ``(loss, ce, kl)`` of ``(N, V)`` logits against a top-k record.

    ``forward(logits (N, V), values (N, k), indices (N, k), lse (N,), tail_lse (N,), target (N,),
    labels (N,), params, impl)``; only ``logits`` gets a gradient (recomputed in backward).
    """

    @staticmethod
    def forward(ctx, logits, values, indices, lse, tail_lse, target, labels, params: TMKLParams,
                impl: Implementation):
        base = (values, indices, lse, tail_lse, target)
        loss, ce, kl, stats = impl.forward(logits, base, labels, params)
        ctx.save_for_backward(logits, *base, labels, stats)
        ctx.params, ctx.impl = params, impl
        ctx.set_materialize_grads(False)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kl):
        logits, *base, labels, stats = ctx.saved_tensors
        p: TMKLParams = ctx.params
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        coef_ce, coef_kl = coefficients(g_loss, g_ce, g_kl, p, logits.shape[0], stats.dtype,
                                        logits.device)
        grad = logits if p.inplace_backward else torch.empty_like(logits)
        grad = ctx.impl.backward(logits, tuple(base), labels, stats, coef_ce, coef_kl, p, grad)
        if p.inplace_backward:
            torch.autograd.graph.increment_version(logits)
        return (grad,) + (None,) * 8


class LinearSparseTMKLFunction(torch.autograd.Function):
    """Per-row fused-linear sparse-base TMKL ``(loss, ce, kl)``.

    ``forward(hidden (N, D), weight (V, D), bias (V,) or None, values, indices, lse, tail_lse,
    target, labels (N,), row_weight (0-dim), precompute, params, impl)``: gradients precomputed
    for ``row_weight`` as in :class:`LinearTMKLFunction`; only ``hidden``, ``weight``, ``bias``
    get gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, values, indices, lse, tail_lse, target, labels,
                row_weight, precompute: bool, params: LinearTMKLParams, impl: Implementation):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[2])
        base = (values, indices, lse, tail_lse, target)
        ctx.params, ctx.impl, ctx.needs = params, impl, needs
        ctx.set_materialize_grads(False)
        loss, ce, kl, stats, ctx.pre = impl.forward(hidden, weight, bias, base, labels, params,
                                                    row_weight if precompute else None, needs)
        ctx.save_for_backward(hidden, weight, bias, *base, labels, stats, row_weight)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kl):
        hidden, weight, bias, *rest = ctx.saved_tensors
        base, (labels, stats, row_weight) = tuple(rest[:5]), rest[5:]
        p: LinearTMKLParams = ctx.params
        if not any(ctx.needs):
            return (None,) * 13
        grads = _precomputed(ctx, g_loss, g_ce, g_kl, labels, stats, row_weight, p)
        if grads is None:
            coef_ce, coef_kl = coefficients(g_loss, g_ce, g_kl, p, hidden.shape[0], stats.dtype,
                                            hidden.device)
            grads = ctx.impl.backward(hidden, weight, bias, base, labels, stats, coef_ce, coef_kl,
                                      p, ctx.needs)
        ctx.pre = None
        gh, gw, gb = grads
        gh = None if gh is None else gh.to(hidden.dtype)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
        return (gh, gw, gb) + (None,) * 10
