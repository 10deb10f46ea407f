"""The chunked driver of the fused-linear loss (``forgetkern._chunked``): chunk sizing from a byte
budget, the GEMMs it runs per mode, where the kernels write ``dz``, the strategy choice, and the
GEMM call forms of the CUDA path (on meta tensors). Numerics against the fp64 oracle live in
``tests/test_linear_tmkl.py`` and ``tests/test_sparse_tmkl.py``."""
import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode

import forgetkern
from forgetkern import _backend, _chunked, topk_base
from forgetkern._params import LinearTMKLParams
from forgetkern.ops import linear_tmkl_fused as lt_ops

from .helpers import backend_skip_reason, backends, cuda_backend_on_cpu

V, D = 30, 8
_TRITON_REASON = backend_skip_reason("linear_tmkl", "triton")


# ------------------------------------------------------------------------------------------------
# chunk sizing
# ------------------------------------------------------------------------------------------------
class _Rows:
    """A stand-in for a logits op's implementation: only the facts the driver sizes chunks by."""

    def __init__(self, grad_any_dtype=True, temporaries=0, temporary_cap=None):
        self.grad_any_dtype, self.temporaries = grad_any_dtype, temporaries
        self.temporary_cap = temporary_cap


def _per_row(rows, **kw):
    """Bytes of one row of a chunk's working set (one-row chunks)."""
    return _chunked.plan(10**4, V, kw.pop("dtype", torch.float32), LinearTMKLParams(chunk_size=1, **kw),
                         rows, dense=kw.pop("dense", True)).bytes


@pytest.mark.parametrize("grad_any_dtype", [True, False], ids=["casting-kernels", "cuda-kernels"])
def test_default_chunk_at_the_headline_shape(grad_any_dtype):
    """N=8192, D=4096, V=128256, bf16 on a GPU's kernels (no temporaries): at least 512 rows per
    chunk, whole GEMM tiles, within the default budget; fp32 logits and bf16 dz cost 10 bytes per
    logit of the chunk (two logits rows, one gradient row)."""
    n, v = 8192, 128256
    rows = _Rows(grad_any_dtype=grad_any_dtype)
    plan = _chunked.plan(n, v, torch.bfloat16, LinearTMKLParams(), rows, dense=True)
    assert plan.useful and plan.rows >= 512 and plan.rows % _chunked.MIN_USEFUL_ROWS == 0
    assert plan.bytes <= _chunked.DEFAULT_BUDGET_CAP
    assert plan.bytes == plan.rows * v * (4 + 4 + 2)
    ce_alone = _chunked.plan(n, v, torch.bfloat16, LinearTMKLParams(kl_weight=0.0, compute_kl=False),
                             rows, dense=True)
    assert ce_alone.bytes == ce_alone.rows * v * (4 + 2) and ce_alone.rows >= plan.rows
    narrow = _chunked.plan(n, v, torch.bfloat16, LinearTMKLParams(chunk_dtype="input"), rows,
                           dense=True)
    assert narrow.bytes == narrow.rows * v * (2 + 2)  # dz written in place over the bf16 logits


def test_budget_chunk_size_and_temporaries():
    ref = _Rows(temporaries=10)
    per = V * (2 * 4 + 10 * 4)  # fp32: dz in place; the reference's temporaries
    assert _per_row(ref) == per
    plan = _chunked.plan(1000, V, torch.float32, LinearTMKLParams(memory_budget=10**6), ref,
                         dense=True)
    assert plan.bytes <= 10**6 < plan.bytes + 128 * per and plan.bytes == plan.rows * per
    assert plan.rows % 128 == 0 and plan.useful
    tight = _chunked.plan(1000, V, torch.float32, LinearTMKLParams(memory_budget=per * 5), ref,
                          dense=True)
    assert tight.rows == 5 and not tight.useful  # fewer than one GEMM tile of rows
    assert _chunked.plan(7, V, torch.float32, LinearTMKLParams(memory_budget=1), ref,
                         dense=True).rows == 1
    assert _chunked.plan(1000, V, torch.float32, LinearTMKLParams(chunk_size=7), ref,
                         dense=True).rows == 7
    small = _chunked.plan(40, V, torch.float32, LinearTMKLParams(), ref, dense=True)
    assert small.rows == 40 and small.useful  # every row in one chunk
    big = _chunked.plan(4000, V, torch.float32, LinearTMKLParams(), ref, dense=True)
    assert big.rows == _chunked.DEFAULT_MIN_ROWS  # the default budget holds at least 512 rows
    # no gradient buffers without gradients: bf16 costs what fp32 does (fp32 logits)
    assert _per_row(ref, dtype=torch.bfloat16) == V * (2 * 4 + 2 + 10 * 4)
    assert _chunked.plan(40, V, torch.bfloat16, LinearTMKLParams(chunk_size=1), ref, dense=True,
                         grads=False).bytes == per


def test_capped_temporaries():
    """Kernels that work in sub-chunks cap their temporaries: beyond the cap a budget buys rows at
    the buffers' price alone."""
    capped = _Rows(temporaries=10, temporary_cap=100 * V * 40)
    buf, temp = V * 8, V * 40
    assert _chunked.plan(10**4, V, torch.float32, LinearTMKLParams(chunk_size=50), capped,
                         dense=True).bytes == 50 * (buf + temp)
    assert _chunked.plan(10**4, V, torch.float32, LinearTMKLParams(chunk_size=300), capped,
                         dense=True).bytes == 300 * buf + 100 * temp
    budget = 1000 * buf + 100 * temp
    plan = _chunked.plan(10**4, V, torch.float32, LinearTMKLParams(memory_budget=budget), capped,
                         dense=True)
    assert plan.rows == 896 and plan.bytes <= budget  # 1000 fit, in whole 128-row tiles


# ------------------------------------------------------------------------------------------------
# GEMMs per mode (counted as multiples of 2 N D V flops)
# ------------------------------------------------------------------------------------------------
class _Flops(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.flops, self.calls = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            self.calls.append((name, tuple(a.shape)))
        return func(*args, **kwargs)


def _gemms(train_weight=False, base="exact", chunk_size=8, n=20, **kw):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g).requires_grad_(train_weight)
    hb = torch.randn(n, D, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    if base == "topk":
        hb = topk_base(hb @ w.detach().T, y, 5)
    with _Flops() as mode:
        loss = forgetkern.linear_tmkl_loss(h, w, hb, y, backend="reference", chunk_size=chunk_size,
                                           **kw)
        loss.backward()
    return mode.flops / (2 * n * D * V), mode.calls


@pytest.mark.parametrize("mode,kw,gemms", [
    ("ce-alone", dict(kl_weight=0.0), 2),
    ("exact-base", dict(), 3),
    ("top-k-base", dict(base="topk"), 2),
    ("exact-base-trained-head", dict(train_weight=True), 4),
    ("top-k-trained-head", dict(base="topk", train_weight=True), 3),
    ("ce-alone-trained-head", dict(kl_weight=0.0, train_weight=True), 3),
])
def test_gemms_per_mode(mode, kw, gemms):
    """CE alone 2, exact base 3, top-k base 2, +1 for dW: the backward only rescales."""
    count, calls = _gemms(**kw)
    assert count == gemms, (count, calls)


def test_shared_head_reads_the_head_once_per_chunk():
    """With a shared head the adapted and base rows of a chunk go through one GEMM."""
    _, calls = _gemms(chunk_size=8, n=20)
    logits = [shape for name, shape in calls if shape[1] == D]
    assert logits == [(16, D), (16, D), (8, D)]  # chunks of 8, 8, 4 rows, both models stacked


# ------------------------------------------------------------------------------------------------
# where the kernels write dz
# ------------------------------------------------------------------------------------------------
def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + a.numel() * a.element_size()
    b1 = b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


@pytest.mark.parametrize("backend", backends("linear_tmkl"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dz_buffer(monkeypatch, backend, dtype):
    """A kernel writes a 16-bit dz over fp32 logits never in place (threads would read bytes
    that others have written): a buffer of its own, or, for kernels that write only the logits'
    dtype (CUDA), fp32 in place and a cast afterwards; same-dtype dz goes in place."""
    if backend == "cuda":
        cuda_backend_on_cpu(monkeypatch, "linear_tmkl")
    rows = _backend.implementation("tmkl", backend)
    seen = []

    def spy(logits, base, labels, stats, coef_ce, coef_kl, params, grad_out):
        seen.append((logits.dtype, grad_out.dtype, grad_out.data_ptr() == logits.data_ptr(),
                     _overlap(grad_out, logits)))
        return rows.backward(logits, base, labels, stats, coef_ce, coef_kl, params, grad_out)

    impl = _backend.chunked("linear_tmkl", dataclasses.replace(rows, backward=spy))
    monkeypatch.setitem(_backend._LOADED, ("linear_tmkl", backend), impl)
    h = torch.randn(6, D, dtype=dtype, requires_grad=True)
    w = torch.randn(V, D, dtype=dtype)
    forgetkern.linear_tmkl_loss(h, w, torch.randn(6, D, dtype=dtype), torch.randint(0, V, (6,)),
                                backend=backend, chunk_size=4).backward()
    assert len(seen) == 2
    for logits_dtype, grad_dtype, same, overlap in seen:
        assert logits_dtype == torch.float32
        if grad_dtype != logits_dtype:
            assert not overlap
        else:
            assert same  # in place
        assert grad_dtype == (dtype if rows.grad_any_dtype else torch.float32)
    assert h.grad.dtype == dtype and torch.isfinite(h.grad).all()


# ------------------------------------------------------------------------------------------------
# the strategy, chosen once per call
# ------------------------------------------------------------------------------------------------
def _spy_strategies(monkeypatch):
    taken = []
    real_pass, real_fused = _chunked.linear_pass, lt_ops.linear_tmkl_fused_forward
    monkeypatch.setattr(_chunked, "linear_pass",
                        lambda *a, **k: taken.append(("chunked", a[5].chunk_size)) or real_pass(*a, **k))
    monkeypatch.setattr(lt_ops, "linear_tmkl_fused_forward",
                        lambda *a, **k: taken.append(("fused", None)) or real_fused(*a, **k))
    monkeypatch.setattr(_backend, "_LOADED", {k: v for k, v in _backend._LOADED.items()
                                              if k[0] != "linear_tmkl_fused"})
    return taken


def _call(**kw):
    g = torch.Generator().manual_seed(1)
    h, hb = torch.randn(300, D, generator=g), torch.randn(300, D, generator=g)
    w = torch.randn(V, D, generator=g)
    y = torch.randint(0, V, (300,), generator=g)
    with torch.no_grad():
        return forgetkern.linear_tmkl_loss(h, w, hb, y, **kw)


def test_auto_strategy(monkeypatch):
    taken = _spy_strategies(monkeypatch)
    _call(backend="reference")
    assert taken == [("chunked", 300)]  # the default budget holds every row here (< 512)
    taken.clear()
    _call(backend="reference", memory_budget=1)  # no useful chunk fits, the reference stays
    assert taken == [("chunked", 1)]
    taken.clear()
    _call(backend="reference", memory_budget=10**5, strategy="chunked")
    assert taken[0][0] == "chunked" and 1 < taken[0][1] < 128
    taken.clear()
    _call(backend="reference", chunk_size=3, memory_budget=1)  # rows given: chunked
    assert taken == [("chunked", 3)]
    if _TRITON_REASON is None:
        taken.clear()
        _call(backend="triton", memory_budget=1)  # no useful chunk: the on-chip kernels
        assert taken == [("fused", None)]
        taken.clear()
        _call(backend="triton", memory_budget=1, logit_softcap=30.0)  # not on chip: chunked
        assert taken == [("chunked", 1)]
        taken.clear()
        _call(backend="triton", strategy="fused")
        assert taken == [("fused", None)]


def test_strategy_errors():
    with pytest.raises(ValueError, match="strategy must be one of"):
        _call(strategy="tiled")
    with pytest.raises(ValueError, match="logit_scale/logit_softcap"):
        _call(strategy="fused", logit_scale=0.5)
    with pytest.raises(RuntimeError, match="cannot run linear_tmkl_fused"):
        _call(strategy="fused", backend="reference")
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, D, generator=g), torch.randn(V, D, generator=g)
    y = torch.randint(0, V, (4,), generator=g)
    rec = topk_base(h @ w.T, y, 3)
    with pytest.raises(ValueError, match="no form for a TopKBase"):
        forgetkern.linear_tmkl_loss(h, w, rec, y, strategy="fused")


@pytest.mark.parametrize("option,value,error", [
    ("memory_budget", 0, ValueError), ("memory_budget", 1.5, TypeError),
    ("chunk_dtype", "float16", ValueError), ("logit_scale", 0.0, ValueError),
    ("logit_scale", None, TypeError), ("logit_softcap", -1.0, ValueError),
    ("logit_softcap", float("inf"), ValueError), ("strategy", None, ValueError),
])
def test_options_name_themselves(option, value, error):
    with pytest.raises(error, match=option):
        _call(**{option: value})
    with pytest.raises(error, match=option):
        forgetkern.LinearTMKLLoss(**{option: value})
    with pytest.raises(ValueError, match="compute_kl=False needs kl_weight == 0"):
        LinearTMKLParams(compute_kl=False)


# ------------------------------------------------------------------------------------------------
# the CUDA path's GEMM call forms (widening GEMMs exist on CUDA and on meta tensors, not on CPU)
# ------------------------------------------------------------------------------------------------
def test_widening_gemm_call_forms_on_meta():
    """``torch.mm(..., out_dtype=fp32)`` is probed per device: absent on the CPU (operands are
    upcast there), present on meta tensors, where the driver's call forms run shape-checked."""
    assert not _chunked._wide_mm(torch.device("cpu"), torch.bfloat16)
    meta = torch.device("meta")
    assert _chunked._wide_mm(meta, torch.bfloat16)
    w = torch.empty(V, D, dtype=torch.bfloat16, device=meta)
    bias = torch.empty(V, dtype=torch.bfloat16, device=meta)
    head = _chunked._Head(w, bias, torch.float32, 0.5)
    assert head.wide and not head.upcast and head.w is w
    out = torch.empty(12, V, dtype=torch.float32, device=meta)
    assert head.logits(out, torch.empty(12, D, dtype=torch.bfloat16, device=meta)) is out
    gw = torch.zeros(V, D, dtype=torch.float32, device=meta)
    dz = torch.empty(12, V, dtype=torch.bfloat16, device=meta)
    _chunked._weight_grad(gw, dz, torch.empty(12, D, dtype=torch.bfloat16, device=meta), 0.5, None)
    assert gw.shape == (V, D) and gw.dtype == torch.float32
