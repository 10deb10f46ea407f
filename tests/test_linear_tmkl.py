"""Fused-linear TMKL against the fp64 materialized oracle (``logits = hidden @ weight.T + bias``
then :func:`tests.helpers.oracle_tmkl`), forward and backward, on every variant: the chunked driver
over each backend's TMKL kernels (reference, Triton, the CUDA kernels in host emulation) and the
Triton on-chip kernels (``strategy="fused"``)."""
import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forgetkern
from forgetkern import _autograd, _backend, _chunked
from forgetkern._params import triton_interpret
from forgetkern.ops import linear_tmkl_fused as lt_ops
from forgetkern.ops import tmkl as tmkl_ops

from .helpers import (
    DEVICE,
    OPTION_IDS,
    OPTION_NAMES,
    OPTIONS,
    assert_close_to_ref,
    backend_skip_reason,
    backends,
    cuda_backend_on_cpu,
    oracle_tmkl,
    naive_tmkl_in_dtype,
    rel_err,
)
from .helpers import linear_tmkl_inputs as _inputs

_TRITON_REASON = backend_skip_reason("linear_tmkl", "triton")
needs_triton = pytest.mark.skipif(_TRITON_REASON is not None, reason=f"triton: {_TRITON_REASON}")
# every variant: the chunked driver on each backend of the table, and the on-chip Triton kernels
BACKENDS = backends("linear_tmkl") + [pytest.param(
    "fused", id="fused", marks=[] if _TRITON_REASON is None else pytest.mark.skip(
        reason=f"triton: {_TRITON_REASON}"))]
REAL_LAUNCH_CONFIG = lt_ops.launch_config  # before the fixture below replaces it


def _variant(name: str) -> dict:
    """The ``linear_tmkl_loss`` options of a test variant (``"fused"``: Triton's on-chip kernels;
    a backend name: the chunked strategy, which ``"auto"`` picks with the default budget)."""
    return dict(backend="triton", strategy="fused") if name == "fused" else dict(backend=name)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch, request):
    """Triton: 16-wide tiles, 3 vocabulary splits and 16-row backward launches so every test
    crosses tile, split, launch and ``D``-loop boundaries with a partial last tile (the
    interpreter is slow: keep shapes tiny). The CUDA variant runs its kernels in host emulation
    without a GPU."""
    original = lt_ops.launch_config

    def small(n, v, d, dtype, device=None, **kw):
        kw.update(block_n=16, block_v=16, block_d=16, splits=kw.get("splits") or 3,
                  bwd_rows=kw.get("bwd_rows") or 16)
        return original(n, v, d, dtype, device, **kw)

    monkeypatch.setattr(lt_ops, "launch_config", small)
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("backend") == "cuda":
        cuda_backend_on_cpu(monkeypatch, "linear_tmkl")


def _reduce(x, labels, reduction, num_items=None):
    if reduction == "none":
        return x.view(labels.shape)
    if reduction == "sum":
        return x.sum()
    denom = (labels != -100).sum().item() if num_items is None else num_items
    return x.sum() / max(denom, 1)


def _transform(x, logit_scale=1.0, logit_softcap=None):
    """A head's logit transform in plain torch: scale, then the soft cap."""
    x = x * logit_scale
    return x if logit_softcap is None else logit_softcap * torch.tanh(x / logit_softcap)


# options of the chunked driver alone: they change how, not what, is computed
DRIVER_OPTIONS = ("chunk_size", "memory_budget", "strategy", "chunk_dtype")


def _oracle(t, reduction="mean", num_items=None, return_components=False, grads=None,
            logit_scale=1.0, logit_softcap=None, **kw):
    """fp64 materialized: logits (transformed as the head says) then the independent TMKL oracle;
    returns outputs and the gradients of hidden, weight and bias for upstream ``grads`` (one per
    output)."""
    h = t["hidden"].detach().double().cpu().requires_grad_()
    w = t["weight"].detach().double().cpu().requires_grad_()
    b = t["bias"].detach().double().cpu().requires_grad_() if "bias" in t else None
    wb = t["base_weight"].detach().double().cpu() if "base_weight" in t else w.detach()
    if "base_bias" in t:
        bb = t["base_bias"].detach().double().cpu()
    else:
        bb = None if (b is None or "base_weight" in t) else b.detach()
    d = h.shape[-1]
    z = h.reshape(-1, d) @ w.T + (0 if b is None else b)
    zb = t["base_hidden"].detach().double().cpu().reshape(-1, d) @ wb.T + (0 if bb is None else bb)
    z, zb = (_transform(x, logit_scale, logit_softcap) for x in (z, zb))
    y = t["labels"].cpu().reshape(-1)
    outs = [_reduce(o, t["labels"].cpu(), reduction, num_items) for o in oracle_tmkl(z, zb, y, **kw)]
    if not return_components:
        outs = outs[:1]
    torch.autograd.backward(outs, [g.double().cpu() for g in grads])
    return [o.detach() for o in outs], (h.grad, w.grad, None if b is None else b.grad)


def _run(t, backend, reduction="mean", return_components=False, grads=None, **kw):
    """forgetkern's outputs and gradients (hidden, weight, bias) for upstream ``grads``."""
    for name in ("hidden", "weight", "bias"):
        if name in t:
            t[name].grad = None
    t["hidden"].requires_grad_(True)
    opts = {k: t[k] for k in ("base_weight", "bias", "base_bias") if k in t}
    out = forgetkern.linear_tmkl_loss(t["hidden"], t["weight"], t["base_hidden"], t["labels"],
                                      reduction=reduction, return_components=return_components,
                                      **_variant(backend), **opts, **kw)
    outs = list(out) if return_components else [out]
    if grads is None:
        grads = [torch.randn(o.shape, dtype=o.dtype, device=o.device) for o in outs]
    torch.autograd.backward(outs, grads)
    gb = t["bias"].grad if "bias" in t else None
    return [o.detach() for o in outs], (t["hidden"].grad, t["weight"].grad, gb), grads


def _compare(t, backend, rtol=1e-9, atol=1e-11, **kw):
    """Run forgetkern and the oracle with the same random upstream gradients and compare."""
    outs, grads, g = _run(t, backend, **kw)
    opts = {k: v for k, v in kw.items() if k not in DRIVER_OPTIONS}
    num_items = opts.pop("num_items_in_batch", None)
    ref, ref_grads = _oracle(t, num_items=num_items, grads=g, **opts)
    for a, r in zip(outs, ref):
        torch.testing.assert_close(a.double().cpu(), r, rtol=rtol, atol=atol)
    for name, a, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        want = r is not None and (name == "hidden" or t.get(name) is not None and t[name].requires_grad)
        if not want:
            assert a is None, f"{name} must not receive a gradient"
            continue
        torch.testing.assert_close(a.double().cpu(), r, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return outs, grads


# ------------------------------------------------------------------------------------------------
# every option, both backends, fp64 (tight) with random upstream gradients on every output
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(OPTION_NAMES, OPTIONS, ids=OPTION_IDS)
def test_every_option_matches_oracle(backend, direction, mask_target, temperature):
    t = _inputs(bias=True, distinct_base=True, v=45, d=19, ignore=(2,))
    _compare(t, backend, reduction="none", return_components=True, direction=direction,
             mask_target=mask_target, temperature=temperature, kl_weight=0.7, ce_weight=1.3,
             chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("return_components", [False, True])
def test_reductions_and_components(backend, reduction, return_components):
    t = _inputs(shape=(2, 3), bias=True, ignore=(1, 4))  # 3-D inputs
    _compare(t, backend, reduction=reduction, return_components=return_components,
             temperature=1.5, chunk_size=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_in_batch(backend):
    t = _inputs(shape=(5,), ignore=(0,))
    _compare(t, backend, num_items_in_batch=11, return_components=True)
    t2 = _inputs(shape=(5,), ignore=(0,))
    _compare(t2, backend, num_items_in_batch=torch.tensor(7, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_inplace_backward(backend):
    """``ignore_index=-1`` with ``inplace_backward=True`` equals the oracle-checked default run on
    the same tokens with their ignored labels written as -100."""
    t = _inputs(shape=(7,), bias=True, ignore=(0, 5))
    outs, grads = _compare(t, backend, return_components=True, temperature=1.7)
    y = t["labels"].masked_fill(t["labels"] == -100, -1)
    for name in ("hidden", "weight", "bias"):
        t[name].grad = None
    out = forgetkern.linear_tmkl_loss(t["hidden"], t["weight"], t["base_hidden"], y, bias=t["bias"],
                                      ignore_index=-1, inplace_backward=True, temperature=1.7,
                                      return_components=True, **_variant(backend))
    g = [torch.randn_like(o) for o in out]
    torch.autograd.backward(out, g)
    _, ref_grads = _oracle(t, return_components=True, grads=g, temperature=1.7)
    for a, r in zip(out, outs):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    for a, r in zip((t["hidden"].grad, t["weight"].grad, t["bias"].grad), ref_grads):
        torch.testing.assert_close(a.double().cpu(), r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,distinct_base", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("train_weight", [True, False])
def test_bias_base_head_and_frozen_weight(backend, bias, distinct_base, train_weight):
    t = _inputs(shape=(7,), d=23, v=37, bias=bias, distinct_base=distinct_base,
                train_weight=train_weight, train_bias=not train_weight)
    _compare(t, backend, reduction="none", direction="reverse", temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_base_weight_is_not_copied_and_explicit_same_tensor_agrees(backend):
    t = _inputs(bias=True)
    out_default, grads_default, g = _run(t, backend, reduction="none")
    t2 = {k: (v.detach().clone().requires_grad_(v.requires_grad) if k != "labels" else v)
          for k, v in t.items()}
    t2["base_weight"] = t2["weight"]  # same tensor: base bias is then None unless given
    t2["base_bias"] = t2["bias"]
    out_same, grads_same, _ = _run(t2, backend, reduction="none", grads=g)
    # the default base head is weight itself, handed down without a copy: the chunked driver
    # stacks both models' rows into one GEMM over it, the kernels get no separate base head
    seen = []
    ptr = t["weight"].data_ptr()
    if backend == "fused":
        real = lt_ops.linear_tmkl_fused_forward
        spy = lambda *a, **k: seen.append(a[3] is None and a[1].data_ptr() == ptr) or real(*a, **k)  # noqa: E731
        target = (lt_ops, "linear_tmkl_fused_forward")
    else:
        real = _chunked.linear_pass
        spy = lambda *a, **k: seen.append(k["base_weight"] is None and a[2].data_ptr() == ptr) or real(*a, **k)  # noqa: E731
        target = (_chunked, "linear_pass")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(*target, spy)
        # the table loads the fused kernels' spy anew
        mp.setattr(_backend, "_LOADED", {k: v for k, v in _backend._LOADED.items()
                                         if k[0] != "linear_tmkl_fused"})
        forgetkern.linear_tmkl_loss(t["hidden"], t["weight"], t["base_hidden"], t["labels"],
                                    bias=t["bias"], **_variant(backend))
    assert seen == [True]
    torch.testing.assert_close(out_same[0], out_default[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_same, grads_default):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_to_base_side(backend):
    t = _inputs(bias=True, distinct_base=True)
    for name in ("base_hidden", "base_weight", "base_bias"):
        t[name].requires_grad_(True)
    _run(t, backend)
    for name in ("base_hidden", "base_weight", "base_bias"):
        assert t[name].grad is None, name
    assert t["hidden"].grad is not None and t["weight"].grad is not None and t["bias"].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_gradient_with_frozen_hidden(backend):
    """Only the head trains (hidden states are constants): weight and bias get the oracle's
    gradients, hidden gets none."""
    t = _inputs(shape=(6,), bias=True, ignore=(2,))
    t["hidden"].requires_grad_(False)
    loss = forgetkern.linear_tmkl_loss(t["hidden"], t["weight"], t["base_hidden"], t["labels"],
                                       bias=t["bias"], reduction="none", temperature=1.5,
                                       **_variant(backend))
    g = torch.randn_like(loss)
    loss.backward(g)
    _, ref_grads = _oracle(t, reduction="none", grads=[g], temperature=1.5)
    assert t["hidden"].grad is None
    torch.testing.assert_close(t["weight"].grad.cpu(), ref_grads[1], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(t["bias"].grad.cpu(), ref_grads[2], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes_single_row_and_ignored(backend):
    for shape, d, v in [((1,), 1, 1), ((1,), 17, 33), ((3,), 5, 2), ((18,), 16, 16), ((4, 5), 31, 50)]:
        t = _inputs(shape=shape, d=d, v=v, bias=True, ignore=(0, 3, 17))
        _compare(t, backend, reduction="sum", return_components=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_and_empty(backend):
    t = _inputs(shape=(20,), bias=True, ignore=range(20))  # a whole 16-row block ignored
    outs, grads = _compare(t, backend)
    assert outs[0].item() == 0.0
    assert all(torch.count_nonzero(gr) == 0 for gr in grads)
    h = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = forgetkern.linear_tmkl_loss(h, w, h.detach(), y, **_variant(backend))
    assert loss.item() == 0.0
    loss.backward()
    assert h.grad.shape == (0, 8) and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    t = _inputs(shape=(6,), d=20, v=40, bias=True)
    t["hidden"] = torch.randn(6, 40, dtype=torch.float64, device=DEVICE)[:, ::2]  # column stride 2
    t["weight"] = torch.randn(20, 40, dtype=torch.float64, device=DEVICE).t().requires_grad_()
    assert not t["hidden"].is_contiguous() and not t["weight"].is_contiguous()
    _compare(t, backend, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_vocabulary_with_neg_inf_bias(backend):
    t = _inputs(shape=(5,), d=12, v=40, bias=True, ignore=())
    t["labels"] = t["labels"] % 30
    with torch.no_grad():
        t["bias"][30:] = float("-inf")
    t["bias"].requires_grad_(False)
    outs, grads, g = _run(t, backend, reduction="none", return_components=True)
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all()
    _compare(t, backend, reduction="none", return_components=True)


# ------------------------------------------------------------------------------------------------
# the chunked driver: chunking, the precomputed-gradient fast path
# ------------------------------------------------------------------------------------------------
CHUNKED = backends("linear_tmkl")


@pytest.mark.parametrize("backend", CHUNKED)
def test_chunking_is_invisible(backend):
    """Any chunk size, given as rows or as a byte budget, gives the one-chunk results."""
    t = _inputs(shape=(13,), bias=True, dtype=torch.float64)
    base, grads_base, g = _run(t, backend, reduction="none", chunk_size=13)
    rows = _backend.implementation("tmkl", backend)
    two_rows = _chunked.plan(13, 45, torch.float64, _params(chunk_size=2), rows, dense=True).bytes
    for opts in (dict(chunk_size=1), dict(chunk_size=5), dict(memory_budget=two_rows)):
        outs, grads, _ = _run(t, backend, reduction="none", grads=g, **opts)
        torch.testing.assert_close(outs[0], base[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, grads_base):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _params(**kw):
    from forgetkern._params import LinearTMKLParams

    return LinearTMKLParams(**kw)


def test_precomputed_gradients_rescale_or_recompute(monkeypatch):
    """Exactly-1 upstream (mean, then .backward()), a uniform multiple, and per-component
    gradients (where the per-row CE/KL coefficients differ) must all give the oracle's gradients."""
    calls = []
    original = _chunked.linear_pass

    def counting(*a, **k):
        calls.append(k.get("needs"))
        return original(*a, **k)

    monkeypatch.setattr(_chunked, "linear_pass", counting)
    rescales = []  # (scale, whether the precomputed tensors came back untouched)
    real_rescale = _autograd._rescale

    def spy_rescale(grads, scale):
        out = real_rescale(grads, scale)
        rescales.append((float(scale), all(a is b for a, b in zip(out, grads))))
        return out

    monkeypatch.setattr(_autograd, "_rescale", spy_rescale)
    t = _inputs(shape=(9,), bias=True, ignore=(4,))
    cases = [
        # upstream exactly 1: one pass, the precomputed tensors returned as they are
        ("mean", False, lambda outs: [torch.ones_like(outs[0])], 1, [(1.0, True)]),
        # a uniform multiple: one pass, a rescale
        ("mean", False, lambda outs: [torch.full_like(outs[0], 3.5)], 1, [(3.5, False)]),
        # separate ce/kl gradients, per-row gradients: a second pass with the actual coefficients
        ("sum", True, lambda outs: [torch.full_like(o, 0.25) for o in outs], 2, []),
        ("none", False, lambda outs: [torch.randn_like(outs[0])], 2, []),
    ]
    for reduction, comps, make_grads, passes, want_rescales in cases:
        calls.clear()
        rescales.clear()
        opts = {k: t[k] for k in ("bias",)}
        out = forgetkern.linear_tmkl_loss(t["hidden"].requires_grad_(), t["weight"], t["base_hidden"],
                                          t["labels"], reduction=reduction, return_components=comps,
                                          backend="reference", temperature=2.0, **opts)
        outs = list(out) if comps else [out]
        g = make_grads(outs)
        for name in ("hidden", "weight", "bias"):
            t[name].grad = None
        torch.autograd.backward(outs, g)
        assert len(calls) == passes, (reduction, comps, calls)
        assert rescales == want_rescales, (reduction, comps, rescales)
        _, ref_grads = _oracle(t, reduction=reduction, return_components=comps, grads=g, temperature=2.0)
        for a, r in zip((t["hidden"].grad, t["weight"].grad, t["bias"].grad), ref_grads):
            torch.testing.assert_close(a.cpu(), r, rtol=1e-9, atol=1e-11)


def test_no_grad_skips_gradient_work(monkeypatch):
    seen = []
    original = _chunked.linear_pass
    monkeypatch.setattr(_chunked, "linear_pass",
                        lambda *a, **k: seen.append(k["coef_ce"] is not None) or original(*a, **k))
    t = _inputs()
    with torch.no_grad():
        forgetkern.linear_tmkl_loss(t["hidden"], t["weight"], t["base_hidden"], t["labels"],
                                    backend="reference")
    assert seen == [False]


# ------------------------------------------------------------------------------------------------
# lower precision: error within a small multiple of plain torch's own error in that dtype
# ------------------------------------------------------------------------------------------------
def _naive(t, g, reduction="none", temperature=1.0, direction="forward", mask_target=True,
           kl_weight=1.0, ce_weight=1.0, logit_scale=1.0, logit_softcap=None):
    """Plain torch in the inputs' own dtype on materialized logits (the baseline error): the loss
    and the gradients of hidden, weight and bias for the upstream gradient ``g``."""
    h = t["hidden"].detach().clone().requires_grad_()
    w = t["weight"].detach().clone().requires_grad_()
    b = t["bias"].detach().clone().requires_grad_() if "bias" in t else None
    wb = t["base_weight"] if "base_weight" in t else w.detach()
    bb = t.get("base_bias", None if b is None or "base_weight" in t else b.detach())
    d = h.shape[-1]
    z = h.reshape(-1, d) @ w.T + (0 if b is None else b)
    zb = t["base_hidden"].reshape(-1, d) @ wb.T + (0 if bb is None else bb)
    z, zb = (_transform(x, logit_scale, logit_softcap) for x in (z, zb))
    ce, kl = naive_tmkl_in_dtype(z, zb, t["labels"].reshape(-1), temperature=temperature,
                                 direction=direction, mask_target=mask_target)
    loss = _reduce(ce_weight * ce + kl_weight * temperature**2 * kl, t["labels"], reduction)
    (loss * g.to(loss.dtype)).sum().backward()
    return loss.detach().cpu(), (h.grad.cpu(), w.grad.cpu(), None if b is None else b.grad.cpu())


def _check_within_torch_own(t, backend, **kw):
    """Loss and gradients against the fp64 oracle, within a small multiple of plain torch's own
    error (:func:`_naive`): the gradients (in the inputs' dtype) against plain torch in that dtype,
    the loss (fp32) against plain fp32 torch on the same inputs, whose logits are fp32 too, or,
    with ``chunk_dtype="input"`` (logits rounded to the inputs' dtype), against plain torch in
    the inputs' dtype."""
    dtype = t["hidden"].dtype
    outs, grads, g = _run(t, backend, reduction="none", **kw)
    assert all(gr is None or gr.dtype == dtype for gr in grads)
    math = {k: v for k, v in kw.items() if k not in DRIVER_OPTIONS}
    ref, ref_grads = _oracle(t, reduction="none", grads=g, **math)
    naive, naive_grads = _naive(t, g[0], **math)
    if dtype in (torch.bfloat16, torch.float16) and kw.get("chunk_dtype") != "input":
        wide = {k: v.detach().float() if v.is_floating_point() else v for k, v in t.items()}
        naive32, _ = _naive(wide, g[0], **math)
        assert_close_to_ref(outs[0].cpu(), ref[0], torch.float32, baseline=naive32, what="loss")
    else:
        assert_close_to_ref(outs[0].cpu(), ref[0], dtype, baseline=naive, what="loss")
    for name, a, r, base in zip(("hidden", "weight", "bias"), grads, ref_grads, naive_grads):
        if r is not None:
            assert_close_to_ref(a.cpu(), r, dtype, baseline=base, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_within_torch_own(backend, dtype):
    t = _inputs(shape=(10,), d=24, v=50, dtype=dtype, bias=True, ignore=(3,))
    _check_within_torch_own(t, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(), dict(direction="reverse", temperature=0.5),
                                dict(mask_target=False, temperature=4.0)],
                         ids=["fwd-T1", "rev-T0.5", "full-T4"])
def test_large_logit_offsets(backend, kw):
    """+1000 on every logit (through the bias; the base's -1000): softmax is shift-invariant, so
    the fp32 error stays within a small multiple of plain fp32 torch's own on the same input."""
    t = _inputs(shape=(9,), d=20, v=45, dtype=torch.float32, bias=True, distinct_base=True,
                ignore=(2,))
    with torch.no_grad():
        t["bias"] += 1000.0
        t["base_bias"] -= 1000.0
    _check_within_torch_own(t, backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_confident_targets(backend, dtype):
    """Both models put ~all mass on the target (through the bias of the target column): the
    masked KL stays exact where a ``log(1 - p_y)`` shortcut returns 0 or NaN."""
    t = _inputs(shape=(6,), d=16, v=40, dtype=dtype, bias=True, distinct_base=True, ignore=(4,))
    t["labels"][t["labels"] != -100] = 7
    with torch.no_grad():
        t["bias"][7] = 60.0
        t["base_bias"][7] = 55.0
    kw = dict(reduction="none", return_components=True)
    if dtype == torch.float64:
        outs, _ = _compare(t, backend, **kw)
    else:
        outs, grads, g = _run(t, backend, **kw)
        _check_within_torch_own(t, backend)
    ref, _ = _oracle(t, grads=[torch.zeros(6)] * 3, **kw)
    valid = (t["labels"] != -100).cpu()
    assert (ref[2][valid] > 1e-3).all()
    torch.testing.assert_close(outs[2].double().cpu(), ref[2], rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_logits_beyond_the_fp16_range(backend):
    """fp16 hidden states and head whose logits are ~1e5 (> 65504, where plain fp16 torch gets
    inf and NaN): the logits are formed in fp32, so the loss is finite and within a small multiple
    of plain fp32 torch's error on the same inputs. The gradients come from an fp16 ``dz``: each
    within 4x plain fp32 torch's error plus the bound of a GEMM on a ``dz`` rounded to fp16
    (``|dz| |W|`` times a few fp16 units, plus fp16's subnormal step per entry; here ``dh`` is a
    cancelling sum, every row of ``W`` near the same vector)."""
    g = torch.Generator().manual_seed(3)
    n, d, v = 7, 16, 37
    e = torch.ones(d, dtype=torch.float64) * 82.0  # |h . w| ~ 16 * 82^2 ~ 1.1e5
    t = _inputs(shape=(n,), d=d, v=v, dtype=torch.float16, ignore=(2,))
    with torch.no_grad():
        t["hidden"] = (e + torch.randn(n, d, generator=g, dtype=torch.float64)).half()
        t["base_hidden"] = (e + torch.randn(n, d, generator=g, dtype=torch.float64)).half()
        t["weight"] = (e + 0.05 * torch.randn(v, d, generator=g, dtype=torch.float64)).half()
    t["weight"].requires_grad_()
    h64, w64 = t["hidden"].double(), t["weight"].detach().double()
    assert (h64 @ w64.T).min() > 65504 and not torch.isfinite(t["hidden"] @ t["weight"].detach().T).all()
    outs, grads, up = _run(t, backend, reduction="none")
    ref, ref_grads = _oracle(t, reduction="none", grads=up)
    wide = {k: v.detach().float() if v.is_floating_point() else v for k, v in t.items()}
    naive32, grads32 = _naive(wide, up[0])
    assert_close_to_ref(outs[0].cpu(), ref[0], torch.float32, baseline=naive32, what="loss")
    z = (h64 @ w64.T).requires_grad_()
    loss = oracle_tmkl(z, t["base_hidden"].double() @ w64.T, t["labels"])[0]
    (dz,) = torch.autograd.grad(loss, z, up[0].double())
    # |dz| rounded to fp16: relative error 2^-11, absolute 2^-24 (subnormals) per entry
    unit, tiny = 2.0**-11, 2.0**-24
    for name, got, want, base, bound in (
            ("hidden", grads[0], ref_grads[0], grads32[0], (unit * dz.abs() + tiny) @ w64.abs()),
            ("weight", grads[1], ref_grads[1], grads32[1], (unit * dz.abs() + tiny).T @ h64.abs())):
        assert torch.isfinite(got).all(), name
        err = (got.double().cpu() - want).norm()
        limit = 4 * (base.double() - want).norm() + (4 * bound + unit * want.abs()).norm()
        assert err <= limit, (name, float(err), float(limit))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_alone_reads_no_base(backend):
    """``kl_weight=0``: the base hidden states are not read (NaN there changes nothing) and the
    loss and gradients are the oracle's; asking for the components computes the KL."""
    t = _inputs(shape=(7,), bias=True, ignore=(2,))
    outs, grads, g = _run({**t, "base_hidden": torch.full_like(t["base_hidden"], float("nan"))},
                          backend, reduction="none", kl_weight=0.0)
    ref, ref_grads = _oracle(t, reduction="none", grads=g, kl_weight=0.0)
    torch.testing.assert_close(outs[0].double().cpu(), ref[0], rtol=1e-9, atol=1e-11)
    for a, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(a.double().cpu(), r, rtol=1e-9, atol=1e-11)
    outs, _ = _compare(t, backend, reduction="none", kl_weight=0.0, return_components=True)
    assert (outs[2] > 0).any()


TRANSFORMS = [(dict(logit_scale=0.4), False), (dict(logit_softcap=3.0), True),
              (dict(logit_scale=2.5, logit_softcap=4.0), False),
              (dict(logit_scale=2.5, logit_softcap=4.0), True)]


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("transform,distinct_base", TRANSFORMS,
                         ids=["scale", "cap-own-base-head", "scale-cap", "scale-cap-own-base-head"])
def test_logit_transforms_match_oracle(backend, transform, distinct_base):
    """``logit_scale`` and ``logit_softcap`` applied to both models' logits, forward and backward
    (hidden, head, bias), against the fp64 oracle on the transformed logits."""
    t = _inputs(shape=(7,), d=12, v=37, bias=True, distinct_base=distinct_base, ignore=(2,),
                scale=2.0)
    _compare(t, backend, reduction="none", return_components=True, temperature=1.5,
             chunk_size=4, **transform)


@pytest.mark.parametrize("backend", CHUNKED)
def test_softcap_in_bf16(backend):
    """The soft cap's derivative multiplies a bf16 ``dz``: gradients within a small multiple of
    plain bf16 torch's own error, the loss of plain fp32 torch's."""
    t = _inputs(shape=(10,), d=24, v=50, dtype=torch.bfloat16, bias=True, ignore=(3,), scale=3.0)
    _check_within_torch_own(t, backend, logit_scale=1.5, logit_softcap=5.0)


@pytest.mark.parametrize("backend", CHUNKED)
def test_input_dtype_chunks(backend):
    """``chunk_dtype="input"``: bf16 logits chunks (half the memory) carry bf16 rounding, within a
    small multiple of plain bf16 torch's own error; the default fp32 chunks are far closer."""
    t = _inputs(shape=(10,), d=24, v=50, dtype=torch.bfloat16, bias=True, ignore=(3,), scale=4.0)
    _check_within_torch_own(t, backend, chunk_dtype="input")
    errors = []
    for chunk_dtype in ("input", "accumulation"):
        outs, _, g = _run(t, backend, reduction="none", chunk_dtype=chunk_dtype)
        ref, _ = _oracle(t, reduction="none", grads=g)
        errors.append(rel_err(outs[0].cpu(), ref[0]))
    assert errors[1] * 100 < errors[0], errors


@needs_triton
def test_triton_chunk_rows_cross_blocks(monkeypatch):
    """The chunked driver over Triton's TMKL kernels streaming each row in 16-column blocks: a
    vocabulary of 45 ends in a partial block."""
    real = tmkl_ops.launch_config
    monkeypatch.setattr(tmkl_ops, "launch_config",
                        lambda v, dtype, block_v=None, *a, **k: real(v, dtype, 16, *a, **k))
    t = _inputs(shape=(7,), d=12, v=45, bias=True, distinct_base=True, ignore=(3,))
    for direction in ("forward", "reverse"):
        _compare(t, "triton", reduction="none", return_components=True, temperature=1.5,
                 direction=direction, chunk_size=3)


# ------------------------------------------------------------------------------------------------
# Triton specifics
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_triton_split_merge(monkeypatch, splits):
    t = _inputs(shape=(6,), d=18, v=77, bias=True, ignore=(5,))  # 5 vocabulary tiles
    small = lt_ops.launch_config
    monkeypatch.setattr(lt_ops, "launch_config",
                        lambda *a, **k: small(*a, **{**k, "splits": splits}))
    for direction in ("forward", "reverse"):
        _compare(t, "fused", reduction="none", return_components=True, direction=direction,
                 temperature=1.3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_backward_row_launches(monkeypatch, dtype):
    """grad_hidden from several row launches (16-bit: through the fp32 scratch) equals one launch
    exactly, and strided labels and bias are read correctly."""
    t = _inputs(shape=(37,), d=18, v=40, dtype=dtype, bias=True, ignore=(3, 20))
    t["labels"] = torch.stack([t["labels"], t["labels"]], 1).reshape(-1)[::2]  # stride 2
    t["bias"] = torch.stack([t["bias"].detach(), t["bias"].detach()], 1).reshape(-1)[::2].requires_grad_()
    assert t["labels"].stride() == (2,) and t["bias"].stride() == (2,)
    small = lt_ops.launch_config
    results = []
    for rows in (16, 48):  # three launches (the last partial), then one
        monkeypatch.setattr(lt_ops, "launch_config", lambda *a, r=rows, **k: small(*a, **{**k, "bwd_rows": r}))
        outs, grads, g = _run(t, "fused", reduction="none", grads=results[0][2] if results else None)
        results.append((outs, grads, g))
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)
    ref, ref_grads = _oracle(t, reduction="none", grads=results[0][2])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(results[0][0][0].double().cpu(), ref[0], **tol)
    for a, r in zip(results[0][1], ref_grads):
        torch.testing.assert_close(a.double().cpu(), r, **tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("distinct_base", [False, True])
def test_triton_tma_operand_loads(monkeypatch, dtype, distinct_base):
    """``tma=True`` (tensor-descriptor operand loads) is taken for aligned inputs and gives the
    pointer path's results: ragged rows, vocabulary and ``D`` tiles read as zero out of range."""
    t = _inputs(shape=(37,), d=24, v=45, dtype=dtype, bias=True, distinct_base=distinct_base,
                ignore=(3, 20))
    small = lt_ops.launch_config
    taken = []
    descriptors = lt_ops._descriptors

    def spy(*a, **k):
        out = descriptors(*a, **k)
        taken.append(out[0])
        return out

    monkeypatch.setattr(lt_ops, "_descriptors", spy)
    results = {}
    for tma in (False, True):
        monkeypatch.setattr(lt_ops, "launch_config", lambda *a, f=tma, **k: small(*a, **{**k, "tma": f}))
        taken.clear()
        g = results[False][2] if results else None
        results[tma] = _run(t, "fused", reduction="none", return_components=True, grads=g,
                            direction="reverse" if distinct_base else "forward", temperature=1.5)
        assert taken and all(x is tma for x in taken), taken  # forward + 3 backward launches
    (o0, g0, _), (o1, g1, _) = results[False], results[True]
    # the same tiles reach the same fp32 accumulation: the two paths agree to rounding
    for a, b in zip(o0 + list(g0), o1 + list(g1)):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)
    ref, ref_grads = _oracle(t, reduction="none", return_components=True, grads=results[False][2],
                             direction="reverse" if distinct_base else "forward", temperature=1.5)
    for a, r in zip(o1 + list(g1), ref + list(ref_grads)):
        torch.testing.assert_close(a.double().cpu(), r, rtol=3e-2, atol=3e-2)


def test_tma_falls_back_to_pointers_for_unaligned_or_fp64_inputs():
    cfg = {"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_D": 16}
    bf = dict(dtype=torch.bfloat16)
    h, w = torch.randn(8, 24, **bf), torch.randn(45, 24, **bf)
    assert lt_ops._descriptors(False, h, w, h, None, cfg)[0] is False
    if triton_interpret() and importlib.util.find_spec("triton") is not None:
        assert lt_ops._descriptors(True, h, w, h, None, cfg)[0] is True
    # a row stride of 20 bf16 (40 bytes) is not 16-byte aligned; fp32/fp64 never go through TMA
    h20 = torch.randn(8, 20, **bf)
    assert lt_ops._descriptors(True, h20, torch.randn(45, 20, **bf), h20, None, cfg) == (False, (None,) * 4)
    for dtype in (torch.float32, torch.float64):
        assert lt_ops._descriptors(True, h.to(dtype), w.to(dtype), h.to(dtype), None, cfg)[0] is False
    assert not lt_ops._tma_ok(torch.randn(24, 8, **bf).T)  # column stride != 1
    assert REAL_LAUNCH_CONFIG(64, 100, 32, torch.float32, tma=True)["tma"] is True


def test_tma_is_opt_in(monkeypatch):
    monkeypatch.delenv("FORGETKERN_TMA", raising=False)
    assert REAL_LAUNCH_CONFIG(64, 100, 32, torch.bfloat16)["tma"] is False
    monkeypatch.setenv("FORGETKERN_TMA", "1")
    assert REAL_LAUNCH_CONFIG(64, 100, 32, torch.bfloat16)["tma"] is True


def test_launch_config_defaults():
    real = REAL_LAUNCH_CONFIG
    big = real(8192, 128256, 4096, torch.bfloat16)
    assert (big["BLOCK_N"], big["BLOCK_V"], big["BLOCK_D"]) == (128, 128, 64)
    assert big["splits"] >= 1
    assert big["bwd_rows"] == 256  # 4 MiB of fp32 grad_hidden scratch at D=4096
    assert real(100, 50, 10**6, torch.bfloat16)["bwd_rows"] == 64  # never below one row block
    tiny = real(3, 5, 7, torch.float32)
    assert tiny["BLOCK_N"] == 16 and tiny["BLOCK_V"] == 16 and tiny["BLOCK_D"] == 16
    assert real(64, 1000, 32, torch.float32, splits=1000)["splits"] == 8  # at most one per tile


# ------------------------------------------------------------------------------------------------
# fuzz: reference and Triton against the oracle on random small problems
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 20), d=st.integers(1, 24), v=st.integers(1, 40),
    direction=st.sampled_from(["forward", "reverse"]), mask_target=st.booleans(),
    temperature=st.sampled_from([0.5, 1.0, 3.0]), bias=st.booleans(), distinct=st.booleans(),
    scale=st.floats(0.1, 5.0), seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_vs_oracle(backend, n, d, v, direction, mask_target, temperature, bias, distinct, scale, seed):
    torch.manual_seed(seed)
    t = _inputs(shape=(n,), d=d, v=v, bias=bias, distinct_base=distinct, scale=scale,
                ignore=[i for i in range(n) if i % 4 == 3])
    kw = dict(reduction="none", return_components=True, direction=direction,
              mask_target=mask_target, temperature=temperature)
    _compare(t, backend, **kw, **({"chunk_size": 3} if backend == "reference" else {}))


# ------------------------------------------------------------------------------------------------
# module form and validation
# ------------------------------------------------------------------------------------------------
def test_module_matches_function():
    t = _inputs(shape=(2, 4), bias=True)
    mod = forgetkern.LinearTMKLLoss(kl_weight=0.5, temperature=2.0, direction="reverse",
                                    chunk_size=3, backend="reference")
    assert "kl_weight=0.5" in repr(mod)
    a = mod(t["hidden"], t["weight"], t["base_hidden"], t["labels"], bias=t["bias"])
    b = forgetkern.linear_tmkl_loss(t["hidden"], t["weight"], t["base_hidden"], t["labels"],
                                    bias=t["bias"], kl_weight=0.5, temperature=2.0,
                                    direction="reverse", backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    opts = dict(strategy="chunked", memory_budget=2**20, chunk_dtype="input", logit_scale=0.5,
                logit_softcap=8.0)
    mod = forgetkern.LinearTMKLLoss(backend="reference", **opts)
    a = mod(t["hidden"], t["weight"], t["base_hidden"], t["labels"], bias=t["bias"])
    b = forgetkern.linear_tmkl_loss(t["hidden"], t["weight"], t["base_hidden"], t["labels"],
                                    bias=t["bias"], backend="reference", **opts)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert "logit_softcap=8.0" in repr(mod)
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        forgetkern.LinearTMKLLoss(chunk_size=0)
    with pytest.raises(ValueError, match="direction must be one of"):
        forgetkern.LinearTMKLLoss(direction="sideways")
    with pytest.raises(ValueError, match="reduction must be one of"):
        forgetkern.LinearTMKLLoss(reduction="avg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(backend):
    h, hb = torch.randn(4, 8), torch.randn(4, 8)
    w = torch.randn(10, 8)
    y = torch.randint(0, 10, (4,))
    cases = [
        (dict(base_hidden=torch.randn(4, 9)), ValueError, "base_hidden must have the same shape as hidden"),
        (dict(base_hidden=torch.randn(5, 8)), ValueError, "base_hidden must have the same shape"),
        (dict(weight=torch.randn(10, 7)), ValueError, r"weight must have D=8 columns"),
        (dict(weight=torch.randn(80)), ValueError, r"weight must be a \(V, D\) matrix"),
        (dict(weight=torch.randn(0, 8)), ValueError, "V > 0"),
        (dict(weight=w.double()), TypeError, "weight dtype torch.float64 does not match hidden"),
        (dict(base_hidden=hb.half()), TypeError, "base_hidden dtype torch.float16 does not match"),
        (dict(hidden=h.long()), TypeError, "hidden must be float16, bfloat16, float32 or float64"),
        (dict(hidden=torch.randn(4, 0), base_hidden=torch.randn(4, 0)), ValueError, "D > 0"),
        (dict(bias=torch.randn(9)), ValueError, r"bias must have shape \(10,\)"),
        (dict(bias=torch.randn(10).double()), TypeError, "bias dtype torch.float64"),
        (dict(base_bias=torch.randn(10, 1)), ValueError, r"base_bias must have shape \(10,\)"),
        (dict(base_weight=torch.randn(11, 8)), ValueError, "base_weight must have the same shape as weight"),
        (dict(base_weight=w.half()), TypeError, "base_weight dtype torch.float16"),
        (dict(base_weight=[1.0]), TypeError, "base_weight must be a torch.Tensor"),
        (dict(labels=torch.randint(0, 10, (5,))), ValueError, r"labels must have shape \(4,\) \(hidden"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, r"labels must be in \[0, 10\)"),
        (dict(labels=y.float()), TypeError, "labels must be an integer tensor"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be > 0"),
        (dict(chunk_size=0), ValueError, "chunk_size must be > 0"),
        (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
        (dict(direction="up"), ValueError, "direction must be one of"),
    ]
    for override, exc, msg in cases:
        args = dict(hidden=h, weight=w, base_hidden=hb, labels=y)
        opts = {}
        for k, val in override.items():
            (args if k in args else opts)[k] = val
        with pytest.raises(exc, match=msg):
            forgetkern.linear_tmkl_loss(args["hidden"], args["weight"], args["base_hidden"],
                                        args["labels"], backend=backend, **opts)


def test_backend_registered_and_dispatch():
    assert _backend.OP_BACKENDS["linear_tmkl"] == _backend.OP_BACKENDS["tmkl"]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            forgetkern.linear_tmkl_loss(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 4),
                                        torch.tensor([0, 1]), backend="cuda")


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_triton_default_tiles(monkeypatch, dtype):
    monkeypatch.undo()  # the real tile sizes
    n, d, v = 300, 256, 3001
    h = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
    hb = torch.randn(n, d, device="cuda", dtype=dtype)
    w = (torch.randn(v, d, device="cuda") / 8).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    y[::7] = -100
    loss = forgetkern.linear_tmkl_loss(h, w, hb, y, backend="triton", reduction="none")
    g = torch.randn_like(loss)
    (loss * g).sum().backward()
    hh = h.detach().double().requires_grad_()
    ww = w.detach().double().requires_grad_()
    ref, _, _ = oracle_tmkl((hh @ ww.T).cpu(), (hb.double() @ ww.detach().T).cpu(), y.cpu())
    (ref * g.double().cpu()).sum().backward()
    assert rel_err(loss.cpu(), ref.detach()) < (2e-2 if dtype == torch.bfloat16 else 1e-4)
    assert rel_err(h.grad.cpu(), hh.grad.cpu()) < (3e-2 if dtype == torch.bfloat16 else 1e-4)
    assert rel_err(w.grad.cpu(), ww.grad.cpu()) < (3e-2 if dtype == torch.bfloat16 else 1e-4)
