"""The TMKL contract's edges, on every backend of both losses: layouts that must not change a result
(strided labels, strided rows), the non-finite policy, in-place backward that must never be
silently wrong, the forms of ``num_items_in_batch`` and shift invariance in fp32."""
import zlib

import pytest
import torch

import forgetkern

from .helpers import DEVICE, backends, cuda_backend_on_cpu, oracle_tmkl


@pytest.fixture(params=backends("tmkl"))
def backend(request, monkeypatch):
    """Each backend of ``tmkl`` (the CUDA kernels in host emulation without a GPU); the fused-linear
    cases run where ``linear_tmkl`` has the backend (the chunked driver over the same kernels),
    and the Triton on-chip kernels as ``fused``."""
    if request.param == "cuda":
        cuda_backend_on_cpu(monkeypatch, "linear_tmkl")
    return request.param


def _skip_linear_without(backend, loss):
    from forgetkern import _backend

    if loss == "linear" and backend not in _backend.OP_BACKENDS["linear_tmkl"]:
        pytest.skip(f"linear_tmkl has no {backend!r} backend")
    if loss == "fused" and backend not in _backend.OP_BACKENDS["linear_tmkl_fused"]:
        pytest.skip(f"the fused strategy has no {backend!r} backend")


def _rows(n=5, v=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64).mul_(2).to(dtype).to(DEVICE)
    b = torch.randn(n, v, generator=g, dtype=torch.float64).mul_(2).to(dtype).to(DEVICE)
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    return z, b, y


def _linear_as_tmkl(z, b, y, backend, **kw):
    """The fused-linear loss on an identity head: its logits are exactly ``z`` and ``b``."""
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    return forgetkern.linear_tmkl_loss(z, eye, b, y, backend=backend, **kw)


LOSSES = {"tmkl": forgetkern.tmkl_loss, "linear": _linear_as_tmkl,
          "fused": lambda *a, **kw: _linear_as_tmkl(*a, strategy="fused", **kw)}


@pytest.mark.parametrize("loss", ["tmkl", "linear", "fused"])
def test_strided_labels_are_read_as_their_values(backend, loss):
    _skip_linear_without(backend, loss)
    """A column of a 2-D label tensor (stride 3) gives what its contiguous copy gives."""
    z, b, _ = _rows()
    table = torch.randint(0, z.shape[1], (z.shape[0], 3), device=DEVICE)
    table[1, 1] = -100
    y = table[:, 1]
    assert y.stride(0) == 3
    fn = LOSSES[loss]
    outs = []
    for labels in (y, y.contiguous()):
        x = z.clone().requires_grad_()
        loss_v = fn(x, b, labels, backend=backend, reduction="none")
        g = torch.linspace(0.5, 1.5, z.shape[0], device=DEVICE)
        (loss_v * g).sum().backward()
        outs.append((loss_v.detach(), x.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["tmkl", "linear", "fused"])
@pytest.mark.parametrize("where", ["base", "adapted"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_pos_inf_make_their_row_nan(backend, loss, where, value):
    _skip_linear_without(backend, loss)
    """NaN or +inf anywhere in a valid row makes that row's loss NaN (never a finite loss with the
    KL dropped); other rows are untouched; ignored rows stay 0."""
    z, b, y = _rows()
    y[3] = -100
    clean = LOSSES[loss](z, b, y, backend=backend, reduction="none")
    (b if where == "base" else z)[1, 7] = value
    (b if where == "base" else z)[3, 2] = value  # an ignored row
    out = LOSSES[loss](z, b, y, backend=backend, reduction="none")
    assert torch.isnan(out[1]), out
    assert out[3] == 0
    keep = torch.tensor([0, 2, 4], device=DEVICE)
    torch.testing.assert_close(out[keep], clean[keep], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss", ["tmkl", "linear"])
def test_neg_inf_pads_columns_and_reports_an_infinite_kl(backend, loss):
    _skip_linear_without(backend, loss)
    z, b, y = _rows(v=40)
    y = y % 30
    z[:, 30:] = float("-inf")
    b[:, 30:] = float("-inf")
    if loss == "linear":  # an identity head cannot carry -inf logits: compare on the logits path
        pytest.skip("-inf logits come from a bias or a mask, not from h @ W.T")
    x = z.clone().requires_grad_()
    out = LOSSES[loss](x, b, y, backend=backend, reduction="none")
    out.sum().backward()
    ref = oracle_tmkl(z[:, :30].double().cpu(), b[:, :30].double().cpu(), y.cpu())[0]
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x.grad).all() and (x.grad[:, 30:] == 0).all()
    z[0, (int(y[0]) + 1) % 30] = float("-inf")  # adapted has no mass where the base has some
    _, _, kl = forgetkern.tmkl_loss(z, b, y, backend=backend, reduction="none",
                                    return_components=True)
    assert kl[0] == float("inf") and torch.isfinite(kl[1:]).all()


def test_inplace_backward_never_silently_wrong(backend):
    """When another node saved the same logits, in-place backward raises torch's in-place error
    (or gives the exact gradient when that node ran first), never a wrong gradient."""
    z, b, y = _rows()
    g = torch.randn(z.shape[0], device=DEVICE)

    def grads(inplace, extra):
        leaf = z.clone().requires_grad_()
        logits = leaf * 1.0
        total = (forgetkern.tmkl_loss(logits, b, y, reduction="none", backend=backend,
                                      inplace_backward=inplace) * g).sum()
        total = total + extra(logits)
        total.backward()
        return leaf.grad

    for extra in (lambda t: (t ** 2).sum() * 1e-2, lambda t: t.exp().mean()):
        want = grads(False, extra)
        try:
            got = grads(True, extra)
        except RuntimeError as exc:
            assert "modified by an inplace operation" in str(exc)
        else:
            torch.testing.assert_close(got, want)
    # the logits are the output of an op that saved them (exp): its backward runs after ours
    leaf = z.clone().requires_grad_()
    logits = leaf.exp()
    loss = forgetkern.tmkl_loss(logits, b, y, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # a second backward through the graph
    logits = z.clone().requires_grad_() * 1.0
    loss = forgetkern.tmkl_loss(logits, b, y, backend=backend, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("bad", [torch.tensor(0), torch.tensor(-3.0), torch.tensor(2.5), 0, -1,
                                 2.5, torch.tensor([4, 4])])
def test_num_items_in_batch_must_be_a_positive_count(bad):
    z, b, y = _rows()
    with pytest.raises((ValueError, TypeError), match="num_items_in_batch"):
        forgetkern.tmkl_loss(z, b, y, num_items_in_batch=bad)
    with pytest.raises((ValueError, TypeError), match="num_items_in_batch"):
        _linear_as_tmkl(z, b, y, "reference", num_items_in_batch=bad)


@pytest.mark.parametrize("good", [7, 7.0, torch.tensor(7), torch.tensor(7.0), torch.tensor([7])])
def test_num_items_in_batch_forms_agree(good):
    z, b, y = _rows()
    per = forgetkern.tmkl_loss(z, b, y, reduction="none")
    torch.testing.assert_close(forgetkern.tmkl_loss(z, b, y, num_items_in_batch=good),
                               per.sum() / 7)


def _plain_fp32(z, b, y, temperature, direction, mask_target):
    """Plain fp32 torch: cross-entropy plus log_softmax over the gathered non-target columns."""
    n, v = z.shape
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    if mask_target:
        keep = ~torch.nn.functional.one_hot(y, v).bool()
        x, u = z[keep].view(n, v - 1), b[keep].view(n, v - 1)
    else:
        x, u = z, b
    lq, lp = (x / temperature).log_softmax(-1), (u / temperature).log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1) if direction == "forward" else (lq.exp() * (lq - lp)).sum(-1)
    return ce + temperature**2 * kl


REGIMES = ["offset", "large", "peaked"]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("mask_target", [True, False])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_fp32_error_within_four_times_plain_torch(backend, regime, direction, mask_target,
                                                   temperature):
    """Softmax is shift-invariant and so must the results be: with every logit offset by 1e3, with
    |logits| up to 1e3, and on rows where both models are nearly certain of the target, the fp32
    loss and gradient errors against fp64 stay within 4x plain fp32 torch's own, plus a floor of
    fp32 rounding at the scale of a log-probability: ``8 eps`` per row for the loss (a peaked row's
    CE and KL are far below one ulp of the log-sum they come from, so there a single case's error
    is rounding luck, for torch and forgetkern alike) and ``8 eps |upstream|`` for the gradient."""
    n, v = 6, 97
    gen = torch.Generator().manual_seed(
        zlib.crc32(f"{regime}-{direction}-{mask_target}-{temperature}".encode()))
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    b = z + 0.05 * torch.randn(n, v, generator=gen, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=gen)
    if regime == "offset":
        z, b = z + 1000, b + 1000
    elif regime == "large":
        z = z * 400
        b = z + torch.randn(n, v, generator=gen, dtype=torch.float64)
    else:  # target probability > 1 - 1e-6 in both models
        z[torch.arange(n), y] = 25.0
        b[torch.arange(n), y] = 24.0
    z32, b32 = z.float().to(DEVICE), b.float().to(DEVICE)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    kw = dict(temperature=temperature, direction=direction, mask_target=mask_target)
    z64 = z32.double().cpu().requires_grad_()
    want = oracle_tmkl(z64, b32.double().cpu(), y, **kw)[0]
    (want * g).sum().backward()
    zp = z32.cpu().clone().requires_grad_()
    plain = _plain_fp32(zp, b32.cpu(), y, **kw)
    (plain * g.float()).sum().backward()
    x = z32.clone().requires_grad_()
    got = forgetkern.tmkl_loss(x, b32, y.to(DEVICE), reduction="none", backend=backend, **kw)
    (got * g.float().to(DEVICE)).sum().backward()
    eps = torch.finfo(torch.float32).eps

    def err(a, e):
        return float((a.double().cpu() - e).norm())

    want_l, want_g = want.detach(), z64.grad
    err_l, err_g = err(got.detach(), want_l), err(x.grad, want_g)
    base_l, base_g = err(plain.detach(), want_l), err(zp.grad, want_g)
    floor_l, floor_g = 8 * eps * n**0.5, 8 * eps * float(g.norm())
    assert err_l <= 4 * base_l + floor_l, f"loss error {err_l:.2e} vs torch {base_l:.2e}"
    assert err_g <= 4 * base_g + floor_g, f"grad error {err_g:.2e} vs torch {base_g:.2e}"


@pytest.mark.parametrize("option,value,error", [
    ("mask_target", "no", TypeError), ("inplace_backward", 1, TypeError),
    ("ignore_index", None, TypeError), ("ignore_index", 1.0, TypeError),
    ("temperature", torch.tensor(2.0), TypeError), ("kl_weight", float("nan"), ValueError),
])
def test_options_are_checked_not_coerced(option, value, error):
    """An option of the wrong type raises naming it (``"no"`` is not silently ``True``)."""
    z, b, y = _rows()
    with pytest.raises(error, match=option):
        forgetkern.tmkl_loss(z, b, y, **{option: value})
    with pytest.raises(error, match=option):
        forgetkern.TMKLLoss(**{option: value})
