"""The on-chip fused-linear Triton kernels' own paths, against the fp64 materialized oracle: CE
alone without the base side (``compute_kl=False``), and the grouped program order over several
groups of row blocks (a partial last group, several backward launches)."""
import dataclasses

import pytest
import torch

from forgetkern._params import STAT_LS_B, LinearTMKLParams
from forgetkern.ops import linear_tmkl_fused as lt_ops

from .helpers import DEVICE, backend_skip_reason, oracle_tmkl
from .helpers import linear_tmkl_inputs as _inputs

_TRITON_REASON = backend_skip_reason("linear_tmkl", "triton")
pytestmark = pytest.mark.skipif(_TRITON_REASON is not None, reason=f"triton: {_TRITON_REASON}")

SMALL = dict(block_n=16, block_v=16, block_d=16, splits=3, bwd_rows=32)


def _params(**kw):
    """Fused-linear params with a ``compute_kl`` field (added to the dataclass here when the
    installed ``LinearTMKLParams`` lacks it, as the kernels read it with ``getattr``)."""
    cls = LinearTMKLParams
    if not any(f.name == "compute_kl" for f in dataclasses.fields(cls)):
        cls = dataclasses.make_dataclass("WithComputeKL", [("compute_kl", bool, True)], bases=(cls,),
                                         frozen=True)
    return cls(**kw)


def _oracle(t, coef_ce, coef_kl, **kw):
    """fp64 per-row (loss, ce, kl) of the materialized logits and the gradients of hidden and
    weight for ``sum coef_ce * ce + coef_kl * kl``."""
    h = t["hidden"].detach().double().cpu().requires_grad_()
    w = t["weight"].detach().double().cpu().requires_grad_()
    z = h @ w.T
    zb = t["base_hidden"].detach().double().cpu() @ w.detach().T
    loss, ce, kl = oracle_tmkl(z, zb, t["labels"].cpu(), **kw)
    (coef_ce.double().cpu() * ce + coef_kl.double().cpu() * kl).sum().backward()
    return (loss.detach(), ce.detach(), kl.detach()), (h.grad, w.grad)


def _run(t, params, coef_ce, coef_kl, base_hidden=None, **over):
    hb = t["base_hidden"] if base_hidden is None else base_hidden
    args = (t["hidden"], t["weight"], hb, None, None, None, t["labels"])
    loss, ce, kl, stats, _ = lt_ops.linear_tmkl_fused_forward(*args, params, **over)
    dh, dw, _ = lt_ops.linear_tmkl_fused_backward(*args, stats, coef_ce, coef_kl, params,
                                            (True, True, False), **over)
    return (loss, ce, kl), stats, (dh, dw)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=2.0, direction="reverse"),
                                dict(mask_target=False)], ids=["fwd-T1", "rev-T2", "full"])
def test_ce_alone_never_reads_the_base(kw):
    """``compute_kl=False`` (``kl_weight=0``): CE and its gradient match the oracle, the KL is
    reported as exactly 0, and the base hidden states are never read (NaN there changes nothing:
    the base statistics are those of an empty distribution)."""
    t = _inputs(shape=(37,), d=20, v=45, dtype=torch.float64, ignore=(3, 20), scale=2.0)
    n = t["labels"].numel()
    coef_ce = torch.randn(n, dtype=torch.float64, device=DEVICE)
    zero = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    params = _params(kl_weight=0.0, compute_kl=False, **kw)
    nan_base = torch.full_like(t["base_hidden"], float("nan"))
    outs, stats, grads = _run(t, params, coef_ce, zero, base_hidden=nan_base, **SMALL)
    (want_loss, want_ce, _), want_grads = _oracle(t, coef_ce, zero, kl_weight=0.0, **kw)
    valid = (t["labels"] != -100).cpu()
    torch.testing.assert_close(outs[1].cpu(), want_ce, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(outs[0].cpu(), want_loss, rtol=1e-10, atol=1e-11)
    assert torch.equal(outs[2], torch.zeros_like(outs[2]))
    assert (stats[:, STAT_LS_B].cpu()[valid] == float("-inf")).all()
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-11)
    # the same CE, bit for bit, as the kernels that also form the base logits
    full, _, full_grads = _run(t, _params(kl_weight=0.0, **kw), coef_ce, zero, **SMALL)
    assert torch.equal(full[1], outs[1])
    torch.testing.assert_close(full_grads[0], grads[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("group_n", [1, 2, 3])
def test_grouped_program_order(group_n):
    """Row blocks taken ``group_n`` at a time (a partial last group; the backward in launches of
    2 row blocks) give the oracle's loss and gradients."""
    t = _inputs(shape=(75,), d=20, v=50, dtype=torch.float64, ignore=(3, 70), scale=2.0)
    n = t["labels"].numel()  # 5 row blocks of 16
    coef_ce = torch.randn(n, dtype=torch.float64, device=DEVICE)
    coef_kl = torch.randn(n, dtype=torch.float64, device=DEVICE)
    params = _params(direction="reverse", temperature=1.5)
    outs, _, grads = _run(t, params, coef_ce, coef_kl, **SMALL, group_n=group_n)
    want, want_grads = _oracle(t, coef_ce, coef_kl, direction="reverse", temperature=1.5)
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-11)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-11)


def test_group_size_from_l2_budget():
    cfg = lt_ops.launch_config
    assert cfg(8192, 128256, 4096, torch.bfloat16)["GROUP_N"] == 8
    assert cfg(8192, 128256, 16384, torch.float32)["GROUP_N"] == 1  # 16 MiB per row block
    assert cfg(100, 1000, 64, torch.float32, group_n=3)["GROUP_N"] == 3
