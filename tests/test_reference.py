"""The reference path (forgetkern.reference) against an independent fp64 computation."""
import itertools

import pytest
import torch

import forgetkern
from forgetkern import reference
from forgetkern._params import TMKLParams

from .helpers import oracle_tmkl

OPTIONS = list(itertools.product(["forward", "reverse"], [True, False], [1.0, 2.5]))


def _inputs(n=9, v=37, dtype=torch.float64, scale=3.0, ignore=(2,)):
    z = torch.randn(n, v, dtype=dtype) * scale
    b = torch.randn(n, v, dtype=dtype) * scale
    y = torch.randint(0, v, (n,))
    for i in ignore:
        if i < n:
            y[i] = -100
    return z, b, y


@pytest.mark.parametrize("direction,mask_target,temperature", OPTIONS)
def test_reference_matches_oracle_forward_and_backward(direction, mask_target, temperature):
    z, b, y = _inputs()
    kw = dict(direction=direction, mask_target=mask_target, temperature=temperature,
              kl_weight=0.7, ce_weight=1.3)
    z1 = z.clone().requires_grad_()
    loss, ce, kl = forgetkern.tmkl_loss(z1, b, y, reduction="none", return_components=True,
                                        backend="reference", **kw)
    z2 = z.clone().requires_grad_()
    o_loss, o_ce, o_kl = oracle_tmkl(z2, b, y, **kw)
    torch.testing.assert_close(loss, o_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, o_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, o_kl, rtol=1e-12, atol=1e-12)
    # backward through all three outputs with random upstream gradients
    g = [torch.randn(len(y), dtype=torch.float64) for _ in range(3)]
    torch.autograd.backward([loss, ce, kl], g)
    torch.autograd.backward([o_loss, o_ce, o_kl], g)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("mask_target", [True, False])
def test_reference_gradcheck(direction, mask_target):
    z, b, y = _inputs(n=4, v=7)
    z.requires_grad_()

    def fn(x):
        return forgetkern.tmkl_loss(x, b, y, direction=direction, mask_target=mask_target,
                                    temperature=1.7, kl_weight=0.5, reduction="none",
                                    return_components=True, backend="reference")

    assert torch.autograd.gradcheck(fn, (z,))


def test_chunking_does_not_change_results():
    z, b, y = _inputs(n=23, v=50)
    p = TMKLParams(direction="reverse", temperature=1.5)
    whole = reference.tmkl_forward(z, b, y, p)
    tiny = reference.tmkl_forward(z, b, y, p, chunk_bytes=1)  # one row per chunk
    assert reference.chunk_rows(50, torch.float64, 1) == 1
    for a, c in zip(whole, tiny):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    coef = torch.randn(23, dtype=torch.float64), torch.randn(23, dtype=torch.float64)
    g1 = reference.tmkl_backward(z, b, y, whole[3], *coef, p, torch.empty_like(z))
    g2 = reference.tmkl_backward(z, b, y, whole[3], *coef, p, torch.empty_like(z), chunk_bytes=1)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_reference_accumulates_in_fp32_for_half_inputs():
    z, b, y = _inputs(dtype=torch.bfloat16)
    loss, ce, kl, stats = reference.tmkl_forward(z, b, y, TMKLParams())
    assert loss.dtype == ce.dtype == kl.dtype == stats.dtype == torch.float32
    o_loss, _, _ = oracle_tmkl(z.double(), b.double(), y)
    torch.testing.assert_close(loss.double(), o_loss, rtol=1e-5, atol=1e-5)


def test_masked_kl_gradient_is_zero_at_target_and_sums_to_zero():
    z, b, y = _inputs(ignore=())
    z.requires_grad_()
    _, _, kl = forgetkern.tmkl_loss(z, b, y, reduction="sum", return_components=True,
                                    backend="reference")
    (grad,) = torch.autograd.grad(kl, z)
    at_target = grad.gather(1, y[:, None]).squeeze(1)
    assert torch.equal(at_target, torch.zeros_like(at_target))
    torch.testing.assert_close(grad.sum(1), torch.zeros(len(y), dtype=torch.float64), atol=1e-14, rtol=0)
    # the full KL does push on the target
    _, _, kl_full = forgetkern.tmkl_loss(z, b, y, reduction="sum", return_components=True,
                                         mask_target=False, backend="reference")
    (grad_full,) = torch.autograd.grad(kl_full, z)
    assert grad_full.gather(1, y[:, None]).abs().min() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_kl_matches_torch_kl_div(temperature):
    z, b, y = _inputs(ignore=())
    _, _, kl = forgetkern.tmkl_loss(z, b, y, mask_target=False, temperature=temperature,
                                    reduction="none", return_components=True, backend="reference")
    expected = torch.nn.functional.kl_div(
        (z / temperature).log_softmax(-1), (b / temperature).log_softmax(-1), log_target=True,
        reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)
    _, _, kl_rev = forgetkern.tmkl_loss(z, b, y, mask_target=False, temperature=temperature,
                                        direction="reverse", reduction="none",
                                        return_components=True, backend="reference")
    expected_rev = torch.nn.functional.kl_div(
        (b / temperature).log_softmax(-1), (z / temperature).log_softmax(-1), log_target=True,
        reduction="none").sum(-1)
    torch.testing.assert_close(kl_rev, expected_rev, rtol=1e-12, atol=1e-12)


def test_confident_target_rows_are_exact():
    """Both models put ~all mass on the target: a log(1 - p_y) shortcut returns 0 or NaN here."""
    n, v = 4, 40
    z = torch.randn(n, v, dtype=torch.float64)
    b = torch.randn(n, v, dtype=torch.float64)
    y = torch.arange(n)
    z[torch.arange(n), y] = 60.0  # p_y = 1 - O(e^-57): 1 - p_y underflows in fp64
    b[torch.arange(n), y] = 55.0
    for dtype in (torch.float32, torch.float64):
        _, _, kl = forgetkern.tmkl_loss(z.to(dtype), b.to(dtype), y, reduction="none",
                                        return_components=True, backend="reference")
        _, _, o_kl = oracle_tmkl(z, b, y)
        assert (o_kl > 1e-3).all()
        torch.testing.assert_close(kl.double(), o_kl, rtol=1e-5, atol=0)


def test_neg_inf_padded_vocabulary():
    z, b, y = _inputs(n=5, v=20, ignore=())
    y = y % 15
    z[:, 15:] = float("-inf")
    b[:, 15:] = float("-inf")
    z.requires_grad_()
    loss, ce, kl = forgetkern.tmkl_loss(z, b, y, reduction="none", return_components=True,
                                        backend="reference")
    o_loss, o_ce, o_kl = oracle_tmkl(z.detach()[:, :15], b[:, :15], y)
    torch.testing.assert_close(loss, o_loss)
    g = torch.randn(5, dtype=torch.float64)
    (loss * g).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert torch.equal(z.grad[:, 15:], torch.zeros(5, 5, dtype=torch.float64))


def test_base_mass_where_adapted_has_none_gives_infinite_kl():
    z, b, y = _inputs(n=2, v=6, ignore=())
    y[:] = 0
    z[0, 3] = float("-inf")  # base puts mass on column 3, adapted none
    _, _, kl = forgetkern.tmkl_loss(z, b, y, reduction="none", return_components=True,
                                    backend="reference")
    assert kl[0].item() == float("inf")
    assert torch.isfinite(kl[1])


def test_single_column_vocabulary():
    z = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 1, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    loss, ce, kl = forgetkern.tmkl_loss(z, b, y, return_components=True, backend="reference")
    assert loss.item() == 0.0 and kl.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_generalized_eigh_reference():
    n = 6
    a = torch.randn(3, n, n, dtype=torch.float64)
    a = a + a.mT
    m = torch.randn(3, n, n, dtype=torch.float64)
    bm = m @ m.mT + 0.1 * torch.eye(n, dtype=torch.float64)
    w, vecs, status = reference.generalized_eigh(a, bm, eps=1e-3)
    assert (status == 0).all()
    bd = bm + 1e-3 * torch.eye(n, dtype=torch.float64)
    assert (w[:, 1:] >= w[:, :-1]).all()
    torch.testing.assert_close(vecs.mT @ bd @ vecs, torch.eye(n, dtype=torch.float64).expand(3, n, n),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(a @ vecs, bd @ vecs * w[:, None, :], atol=1e-9, rtol=0)
    _, _, status = reference.generalized_eigh(a, -bm)
    assert (status > 0).all()
    with pytest.raises(ValueError, match="not positive definite"):
        forgetkern.generalized_eigh(a, -bm, backend="reference")
