"""Triton TMKL kernels (interpreted on CPU, compiled on GPU) against the fp64 references."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import forgetkern
from forgetkern.ops import tmkl as tmkl_ops

from .helpers import assert_close_to_ref, naive_tmkl_in_dtype, oracle_tmkl, rel_err, run_tmkl

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPTIONS = list(itertools.product(["forward", "reverse"], [True, False], [1.0, 2.0]))


@pytest.fixture
def small_blocks(monkeypatch):
    """Force 32-column blocks so rows span several blocks (with a partial last one)."""
    original = tmkl_ops.launch_config
    monkeypatch.setattr(tmkl_ops, "launch_config", lambda v, dtype, block_v=None: original(v, dtype, 32))


def _inputs(n, v, dtype=torch.float32, scale=2.0, ignore=(1,)):
    z = (torch.randn(n, v, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    b = (torch.randn(n, v, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    y = torch.randint(0, v, (n,), device=DEVICE)
    for i in ignore:
        if i < n:
            y[i] = -100
    return z, b, y


def _run(z, b, y, backend, g=None, **kw):
    return run_tmkl(z, b, y, backend, g, grad_dtype=torch.float32, **kw)


@pytest.mark.parametrize("direction,mask_target,temperature", OPTIONS)
def test_triton_matches_reference_every_option(small_blocks, direction, mask_target, temperature):
    z, b, y = _inputs(6, 101, ignore=(2,))  # 101 = 3 full blocks of 32 + 5
    kw = dict(direction=direction, mask_target=mask_target, temperature=temperature,
              kl_weight=0.8, ce_weight=1.1)
    outs_t, grad_t, g = _run(z, b, y, "triton", **kw)
    outs_r, grad_r, _ = _run(z, b, y, "reference", g=g, **kw)
    for a, r in zip(outs_t, outs_r):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad_t, grad_r, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_triton_fp64_matches_oracle(small_blocks, direction):
    z, b, y = _inputs(4, 45, dtype=torch.float64)
    kw = dict(direction=direction, temperature=1.5, kl_weight=0.3)
    outs, grad, g = _run(z, b, y, "triton", **kw)
    zz = z.detach().cpu().clone().requires_grad_()
    o = oracle_tmkl(zz, b.cpu(), y.cpu(), **kw)
    torch.autograd.backward(list(o), [gi.double().cpu() for gi in g])
    for a, r in zip(outs, o):
        torch.testing.assert_close(a.cpu(), r.detach(), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(grad.cpu(), zz.grad, rtol=1e-10, atol=1e-12)


def test_triton_gradcheck_fp64(small_blocks):
    z, b, y = _inputs(3, 40, dtype=torch.float64)
    z = z.requires_grad_()
    fn = lambda x: forgetkern.tmkl_loss(x, b, y, direction="reverse", temperature=1.3,  # noqa: E731
                                        reduction="none", return_components=True, backend="triton")
    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_half_precision_error_within_torch_own(small_blocks, dtype, direction):
    z, b, y = _inputs(8, 70, dtype=dtype, ignore=(3,))
    kw = dict(direction=direction, temperature=1.0)
    x = z.detach().clone().requires_grad_()
    loss = forgetkern.tmkl_loss(x, b, y, reduction="none", backend="triton", **kw)
    g = torch.randn(8, device=z.device)
    (loss * g).sum().backward()
    assert x.grad.dtype == dtype
    # fp64 oracle on the same (rounded) inputs
    zo = z.detach().double().cpu().requires_grad_()
    o_loss, _, _ = oracle_tmkl(zo, b.double().cpu(), y.cpu(), **kw)
    (o_loss * g.double().cpu()).sum().backward()
    # plain torch computing in the half dtype itself
    zn = z.detach().clone().requires_grad_()
    ce, kl = naive_tmkl_in_dtype(zn, b, y, **kw)
    ((ce + kl) * g.to(dtype)).sum().backward()
    assert_close_to_ref(loss.cpu(), o_loss.detach(), dtype, baseline=(ce + kl).detach().cpu(), what="loss")
    assert_close_to_ref(x.grad.cpu(), zo.grad, dtype, baseline=zn.grad.cpu(), what="grad")


def test_single_row_and_shapes(small_blocks):
    for n, v in [(1, 1), (1, 33), (2, 5), (3, 64)]:
        z, b, y = _inputs(n, v, ignore=())
        outs_t, grad_t, g = _run(z, b, y, "triton", temperature=1.0)
        outs_r, grad_r, _ = _run(z, b, y, "reference", g=g, temperature=1.0)
        for a, r in zip(outs_t, outs_r):
            torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(grad_t, grad_r, rtol=2e-5, atol=2e-6)


def test_three_d_inputs_and_reductions(small_blocks):
    z = torch.randn(2, 3, 50, device=DEVICE)
    b = torch.randn(2, 3, 50, device=DEVICE)
    y = torch.randint(0, 50, (2, 3), device=DEVICE)
    y[0, 1] = -100
    for reduction in ("mean", "sum", "none"):
        xt = z.clone().requires_grad_()
        xr = z.clone().requires_grad_()
        lt = forgetkern.tmkl_loss(xt, b, y, reduction=reduction, backend="triton")
        lr = forgetkern.tmkl_loss(xr, b, y, reduction=reduction, backend="reference")
        assert lt.shape == lr.shape == ((2, 3) if reduction == "none" else ())
        torch.testing.assert_close(lt, lr, rtol=2e-5, atol=2e-5)
        g = torch.randn_like(lt)
        (lt * g).sum().backward()
        (lr * g).sum().backward()
        torch.testing.assert_close(xt.grad, xr.grad, rtol=2e-5, atol=2e-6)
    # mean divides by the non-ignored count
    per = forgetkern.tmkl_loss(z, b, y, reduction="none", backend="triton")
    mean = forgetkern.tmkl_loss(z, b, y, reduction="mean", backend="triton")
    torch.testing.assert_close(mean, per.sum() / 5)
    mean_n = forgetkern.tmkl_loss(z, b, y, reduction="mean", num_items_in_batch=20, backend="triton")
    torch.testing.assert_close(mean_n, per.sum() / 20)


def test_non_contiguous_rows(small_blocks):
    big = torch.randn(10, 90, device=DEVICE)
    bigb = torch.randn(10, 90, device=DEVICE)
    z = big[::2, 5:75]  # row stride 180, unit column stride
    b = bigb[1::2, 10:80]
    assert not z.is_contiguous() and z.stride(-1) == 1
    y = torch.randint(0, 70, (5,), device=DEVICE)
    outs_t, grad_t, g = _run(z, b, y, "triton")
    outs_r, grad_r, _ = _run(z.contiguous(), b.contiguous(), y, "reference", g=g)
    for a, r in zip(outs_t, outs_r):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad_t, grad_r, rtol=2e-5, atol=2e-6)
    # a column-strided view (stride along V != 1) is copied, still correct
    zt = torch.randn(70, 5, device=DEVICE).t()
    outs_c, _, _ = _run(zt, b, y, "triton", g=g)
    outs_cr, _, _ = _run(zt.contiguous(), b, y, "reference", g=g)
    torch.testing.assert_close(outs_c[0], outs_cr[0], rtol=2e-5, atol=2e-5)


def test_all_rows_ignored_gives_zero_loss_and_grad(small_blocks):
    z, b, _ = _inputs(4, 40)
    y = torch.full((4,), -100, device=DEVICE)
    for backend in ("triton", "reference"):
        x = z.clone().requires_grad_()
        loss = forgetkern.tmkl_loss(x, b, y, backend=backend)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_empty_batch():
    z = torch.randn(0, 10, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = forgetkern.tmkl_loss(z, z.detach(), y, backend="triton")
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad.shape == (0, 10)


def test_confident_targets(small_blocks):
    n, v = 4, 70
    z = torch.randn(n, v, device=DEVICE)
    b = torch.randn(n, v, device=DEVICE)
    y = torch.arange(n, device=DEVICE) * 17
    z[torch.arange(n), y] = 40.0
    b[torch.arange(n), y] = 35.0
    outs, _, _ = _run(z, b, y, "triton")
    o = oracle_tmkl(z.double().cpu(), b.double().cpu(), y.cpu())
    assert (o[2] > 1e-3).all()
    torch.testing.assert_close(outs[2].double().cpu(), o[2], rtol=1e-5, atol=0)
    torch.testing.assert_close(outs[1].double().cpu(), o[1], rtol=1e-3, atol=1e-6)


def test_padded_neg_inf_columns(small_blocks):
    z, b, y = _inputs(5, 80, ignore=())
    y = y % 40
    z[:, 40:] = float("-inf")
    b[:, 40:] = float("-inf")
    outs_t, grad_t, g = _run(z, b, y, "triton")
    outs_r, grad_r, _ = _run(z, b, y, "reference", g=g)
    assert torch.isfinite(grad_t).all()
    for a, r in zip(outs_t, outs_r):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad_t, grad_r, rtol=2e-5, atol=2e-6)
    # adapted -inf where the base has mass: infinite forward KL, reported
    z[0, 5 if int(y[0]) != 5 else 6] = float("-inf")
    loss, ce, kl = forgetkern.tmkl_loss(z, b, y, reduction="none", return_components=True, backend="triton")
    assert kl[0].item() == float("inf") and torch.isfinite(kl[1:]).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_inplace_backward(small_blocks, direction):
    z, b, y = _inputs(5, 60)
    g = torch.randn(5, device=DEVICE)
    x = z.clone().requires_grad_()
    (forgetkern.tmkl_loss(x, b, y, reduction="none", backend="triton", direction=direction) * g).sum().backward()
    leaf = z.clone().requires_grad_()
    logits = leaf * 1.0  # non-leaf: its storage receives the gradient
    loss = forgetkern.tmkl_loss(logits, b, y, reduction="none", backend="triton", direction=direction,
                                inplace_backward=True)
    (loss * g).sum().backward()
    torch.testing.assert_close(leaf.grad, x.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits.detach(), x.grad, rtol=1e-6, atol=1e-7)


def test_zero_weights_are_exact(small_blocks):
    z, b, y = _inputs(4, 50)
    outs, grad, g = _run(z, b, y, "triton", kl_weight=0.0)
    ce_only = torch.nn.functional.cross_entropy(z, y, reduction="none", ignore_index=-100)
    torch.testing.assert_close(outs[0], ce_only, rtol=1e-5, atol=1e-5)


def test_no_gradient_to_base_logits(small_blocks):
    z, b, y = _inputs(3, 40)
    b = b.clone().requires_grad_()
    x = z.clone().requires_grad_()
    forgetkern.tmkl_loss(x, b, y, backend="triton").backward()
    assert b.grad is None and x.grad is not None


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 5),
    v=st.integers(1, 70),
    direction=st.sampled_from(["forward", "reverse"]),
    mask_target=st.booleans(),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    scale=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_triton_vs_reference(n, v, direction, mask_target, temperature, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=gen) * scale).to(DEVICE)
    b = (torch.randn(n, v, generator=gen) * scale).to(DEVICE)
    y = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    y[torch.rand(n, generator=gen).to(DEVICE) < 0.2] = -100
    g = [torch.randn(n, generator=gen).to(DEVICE) for _ in range(3)]
    kw = dict(direction=direction, mask_target=mask_target, temperature=temperature)
    original = tmkl_ops.launch_config
    tmkl_ops.launch_config = lambda vv, dtype, block_v=None: original(vv, dtype, 16)
    try:
        outs_t, grad_t, _ = _run(z, b, y, "triton", g=g, **kw)
    finally:
        tmkl_ops.launch_config = original
    # fp32 kernel error vs fp64 must stay within a small multiple of the fp32 reference's own error
    outs_r, grad_r, _ = _run(z, b, y, "reference", g=g, **kw)
    outs_64, grad_64, _ = _run(z.double(), b.double(), y, "reference", g=g, **kw)
    for name, a, r, e in zip(("loss", "ce", "kl"), outs_t, outs_r, outs_64):
        assert rel_err(a, e) <= max(4 * rel_err(r, e), 2e-6), name
    assert rel_err(grad_t, grad_64) <= max(4 * rel_err(grad_r, grad_64), 2e-6), "grad"
