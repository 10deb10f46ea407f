"""Shared test utilities: an independent fp64 TMKL oracle and dtype-aware tolerances."""
from __future__ import annotations

import os

import torch

HALF = (torch.float16, torch.bfloat16)


def oracle_tmkl(z, b, y, *, temperature=1.0, direction="forward", mask_target=True,
                ignore_index=-100, kl_weight=1.0, ce_weight=1.0):
    """Per-row (loss, ce, kl) in float64, written independently of forgetkern.

    Gathers the non-target columns of each row explicitly and normalizes over them; differentiable
    with autograd with respect to ``z``. ``z``/``b``: (N, V); ``y``: (N,).
    """
    z = z.double()
    b = b.double().detach()
    n, v = z.shape
    losses, ces, kls = [], [], []
    for i in range(n):
        yi = int(y[i])
        if yi == ignore_index:
            zero = z[i].sum() * 0.0
            losses.append(zero), ces.append(zero), kls.append(zero)
            continue
        keep = torch.ones(v, dtype=torch.bool)
        if mask_target:
            keep[yi] = False
        idx = torch.nonzero(keep).flatten()
        zs = z[i, idx] / temperature
        bs = b[i, idx] / temperature
        lq = zs - torch.logsumexp(zs, 0)
        lp = bs - torch.logsumexp(bs, 0)
        if direction == "forward":
            w = lp.exp()
            kl = (w * (lp - lq)).where(w > 0, torch.zeros_like(w)).sum()
        else:
            w = lq.exp()
            kl = (w * (lq - lp)).where(w > 0, torch.zeros_like(w)).sum()
        ce = torch.logsumexp(z[i], 0) - z[i, yi]
        losses.append(ce_weight * ce + kl_weight * temperature**2 * kl)
        ces.append(ce)
        kls.append(kl)
    return torch.stack(losses), torch.stack(ces), torch.stack(kls)


def naive_tmkl_in_dtype(z, b, y, *, temperature=1.0, direction="forward", mask_target=True,
                        ignore_index=-100):
    """What plain torch computes in the input dtype itself (the error baseline for half types)."""
    valid = y != ignore_index
    ys = torch.where(valid, y, torch.zeros_like(y))
    ce = torch.nn.functional.cross_entropy(z, ys, reduction="none")
    x, u = z / temperature, b / temperature
    if mask_target:
        hit = torch.nn.functional.one_hot(ys, z.shape[-1]).bool()
        x = x.masked_fill(hit, float("-inf"))
        u = u.masked_fill(hit, float("-inf"))
    lq, lp = x.log_softmax(-1), u.log_softmax(-1)
    if direction == "forward":
        kl = (lp.exp() * (lp - lq)).nan_to_num(0.0).sum(-1)
    else:
        kl = (lq.exp() * (lq - lp)).nan_to_num(0.0).sum(-1)
    return ce.where(valid, 0), kl.where(valid, 0)


def rel_err(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute when ``expected`` is 0)."""
    a = actual.double()
    e = expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_to_ref(actual, expected, dtype, baseline=None, factor=4.0, what="value"):
    """Kernel error vs the fp64 reference must be within ``factor`` times plain torch's own error
    in ``dtype`` (``baseline``), or within the dtype's plain tolerance when no baseline is given."""
    err = rel_err(actual, expected)
    floor = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}[dtype]
    limit = floor
    if baseline is not None:
        limit = max(floor, factor * rel_err(baseline, expected))
    assert err <= limit, f"{what}: relative error {err:.3e} exceeds {limit:.3e} ({dtype})"


def run_tmkl(z, b, y, backend, g=None, grad_dtype=torch.float32, **kw):
    """Per-row ``(loss, ce, kl)`` of ``tmkl_loss`` and the gradient for upstream grads ``g``.

    ``g`` defaults to three fresh random row vectors (``grad_dtype``); returns ``(outs, grad, g)``.
    """
    import forgetkern

    x = z.detach().clone().requires_grad_()
    outs = forgetkern.tmkl_loss(x, b, y, reduction="none", return_components=True, backend=backend, **kw)
    if g is None:
        g = [torch.randn(y.shape, dtype=grad_dtype, device=z.device) for _ in range(3)]
    torch.autograd.backward(list(outs), [gi.to(outs[0].dtype) for gi in g])
    return [o.detach() for o in outs], x.grad, g


def aot_compile_env(tmp_path) -> dict:
    """Environment of a subprocess that compiles Triton kernels for a real GPU target (no
    interpreter, a fresh cache under ``tmp_path``, none left behind); skips the calling test when
    Triton's NVIDIA backend is not installed."""
    import pytest
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    return env
