"""The pieces of the vocab-parallel form in one process, for every backend that runs a shard
(``forgetkern.distributed.SHARD_BACKENDS``; Triton in the CPU interpreter here):

* a shard's ``tmkl`` kernels with rows whose target lies in another shard (label ``ABSENT``):
  statistics and gradient against an fp64 computation on the shard's columns;
* the shards' statistics as partial records, merged by the one merge of vocabulary parts
  (``forgetkern._partials.merge_partials``), and each shard's backward from the merged statistics:
  the whole rows' loss, components and gradient, forward and backward with a random upstream
  gradient.

The same on real process groups (gloo) is tests/test_distributed.py."""
import pytest
import torch

from forgetkern import _backend, distributed
from forgetkern._params import (STAT_KL, STAT_LS_B, STAT_LS_CE, STAT_LS_Z, STAT_M_B, STAT_M_CE,
                                STAT_M_Z, TMKLParams)
from forgetkern._partials import merge_partials, stats_to_part
from tests.helpers import backend_skip_reason

V = 37
SPLITS = (0, 13, 14, 37)  # a one-column shard among them


def _backends():
    return [pytest.param(name, id=name, marks=() if backend_skip_reason("tmkl", name) is None
                         else pytest.mark.skip(reason=backend_skip_reason("tmkl", name)))
            for name in distributed.SHARD_BACKENDS]


OPTIONS = [dict(direction=d, mask_target=m, temperature=t)
           for d in ("forward", "reverse") for m in (True, False) for t in (1.0, 2.0)]


def _inputs(seed: int, n: int = 6, v: int = V, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    b = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    return z, b, gen


def _shard_oracle(z, b, y, temperature, direction, mask_target):
    """Per row, in fp64 and differentiable in ``z``: the CE normalizer ``LSE(z)`` over the
    shard's columns, the target term ``z_y`` (0 where ``y < 0``: not in this shard) and the KL of
    the shard's own distributions (the target dropped where it is here and masked)."""
    lse, zy, kls = [], [], []
    for i in range(z.shape[0]):
        yi = int(y[i])
        keep = torch.ones(z.shape[1], dtype=torch.bool)
        if mask_target and yi >= 0:
            keep[yi] = False
        zs, bs = z[i, keep] / temperature, b[i, keep] / temperature
        lq, lp = zs - torch.logsumexp(zs, 0), bs - torch.logsumexp(bs, 0)
        w, a, o = (lp.exp(), lp, lq) if direction == "forward" else (lq.exp(), lq, lp)
        kls.append((w * (a - o)).sum())
        lse.append(torch.logsumexp(z[i], 0))
        zy.append(z[i, yi] if yi >= 0 else z[i].sum() * 0)
    return torch.stack(lse), torch.stack(zy), torch.stack(kls)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: f"{o['direction']}-m{int(o['mask_target'])}-T{o['temperature']}")
def test_shard_kernels_take_a_target_in_another_shard(backend, opts):
    """Labels below 0 (not ``ignore_index``): nothing masked, the shard's own statistics, CE
    ``+inf``; the backward from those statistics is the gradient of ``a LSE(z) + c KL`` on the
    shard (no ``-e_y`` term). Rows with their target here and an ignored row alongside."""
    z, b, gen = _inputs(1)
    y = torch.tensor([3, -1, 0, -1, -100, V - 1])
    params = TMKLParams(kl_weight=0.7, ce_weight=1.1, **opts)
    impl = _backend.implementation("tmkl", backend)
    loss, ce, kl, stats = impl.forward(z, b, y, params)
    valid = y != -100
    zf = z.clone().requires_grad_()
    lse, zy, want_kl = _shard_oracle(zf, b, y.clamp_min(-1), **opts)
    absent = y == -1
    torch.testing.assert_close(kl[valid], want_kl[valid].detach().clamp_min(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats[valid, STAT_KL], want_kl[valid].detach(), rtol=1e-10, atol=1e-12)
    assert torch.isinf(ce[absent]).all() and (ce[absent] > 0).all()
    torch.testing.assert_close(ce[valid & ~absent], (lse - zy)[valid & ~absent].detach(), rtol=1e-10,
                               atol=1e-12)
    t = opts["temperature"]
    for m, ls, x in ((STAT_M_Z, STAT_LS_Z, z), (STAT_M_B, STAT_LS_B, b)):
        xs = (x / t)[absent]  # nothing masked on the absent rows
        torch.testing.assert_close(stats[absent, m] + stats[absent, ls], torch.logsumexp(xs, 1),
                                   rtol=1e-12, atol=1e-12)
    if params.separate_ce:
        torch.testing.assert_close(stats[valid, STAT_M_CE] + stats[valid, STAT_LS_CE],
                                   lse[valid].detach(), rtol=1e-12, atol=1e-12)
    # backward from the shard's own statistics, a random upstream gradient per row
    coef_ce = torch.randn(6, generator=gen, dtype=torch.float64)
    coef_kl = torch.randn(6, generator=gen, dtype=torch.float64)
    grad = impl.backward(z, b, y, stats, coef_ce, coef_kl, params, torch.empty_like(z))
    f = (coef_ce * (lse - zy) + coef_kl * want_kl)[valid].sum()
    f.backward()
    torch.testing.assert_close(grad, zf.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: f"{o['direction']}-m{int(o['mask_target'])}-T{o['temperature']}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
def test_shards_merged_by_the_one_merge_equal_whole_rows(backend, opts, dtype):
    """Each shard's statistics from the backend, as partial records, merged along one dimension
    (as a vocab-parallel group merges them across ranks), equal the reference on the whole rows;
    each shard's backward from the merged statistics is its slice of the whole rows' gradient."""
    z, b, gen = _inputs(2, n=7, dtype=dtype)
    y = torch.tensor([V - 1, 0, -100, 13, 20, 5, 36])
    params = TMKLParams(kl_weight=0.7, ce_weight=1.1, **opts)
    ref = _backend.implementation("tmkl", "reference")
    want = ref.forward(z, b, y, params)
    coef_ce = torch.randn(7, generator=gen, dtype=want[0].dtype)
    coef_kl = torch.randn(7, generator=gen, dtype=want[0].dtype)
    want_grad = ref.backward(z, b, y, want[3], coef_ce, coef_kl, params, torch.empty_like(z))
    rows = _backend.implementation("tmkl", backend)
    shards = list(zip(SPLITS[:-1], SPLITS[1:]))
    parts = []
    for lo, hi in shards:
        impl = distributed.vocab_parallel_tmkl(None, lo, rows)
        y_loc = distributed.shard_labels(y, lo, hi - lo, params.ignore_index)
        z_y, _, _, st = distributed._with_target_logits(rows).forward(
            z[:, lo:hi], b[:, lo:hi], y_loc, distributed._shard_params(params))
        parts.append(stats_to_part(st, z_y, params))
        assert impl.backend == backend
    got = merge_partials(torch.stack(parts, dim=1), y, params)
    # fp32 accumulation for fp32 and bf16 inputs; the gradient is written in the inputs' dtype
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    grad_tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else tol
    for g, w, name in zip(got, want, ("loss", "ce", "kl", "stats")):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}: {m}")
    for lo, hi in shards:
        impl = distributed.vocab_parallel_tmkl(None, lo, rows)
        grad = impl.backward(z[:, lo:hi], b[:, lo:hi], y, got[3], coef_ce, coef_kl, params,
                             torch.empty_like(z[:, lo:hi]))
        torch.testing.assert_close(grad, want_grad[:, lo:hi], **grad_tol,
                                   msg=lambda m: f"grad [{lo}, {hi}): {m}")


@pytest.mark.parametrize("opts", OPTIONS[::3], ids=lambda o: f"{o['direction']}-m{int(o['mask_target'])}-T{o['temperature']}")
def test_triton_shards_split_over_programs(monkeypatch, opts):
    """Triton with 16-column blocks and each shard's row split over 2 programs (partial records
    merged on the host by the same merge, rows whose target is in another shard included): the
    shards merged equal whole rows."""
    if backend_skip_reason("tmkl", "triton") is not None:
        pytest.skip(backend_skip_reason("tmkl", "triton"))
    from forgetkern.ops import tmkl as tmkl_ops

    original = tmkl_ops.launch_config
    used = []

    def forced(v, dtype, block_v=None, n=None, device=None, splits=None, aligned=True):
        cfg = original(v, dtype, 16, n, device, 2, aligned)
        used.append(cfg["splits"])
        return cfg

    monkeypatch.setattr(tmkl_ops, "launch_config", forced)
    test_shards_merged_by_the_one_merge_equal_whole_rows("triton", opts, torch.float64)
    assert 2 in used


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("opts", OPTIONS[::5], ids=lambda o: f"{o['direction']}-m{int(o['mask_target'])}-T{o['temperature']}")
def test_merged_shards_in_fp32_with_logits_offset_by_1000_and_a_certain_row(backend, opts):
    """fp32 logits shifted by +1000 (softmax is shift-invariant: so must the result be) with a row
    the model is nearly certain of: the merged shards' loss and gradient stay within 4x the fp32
    error of the whole-row reference on the same inputs (against fp64 on the unshifted ones)."""
    z, b, gen = _inputs(5, n=7)
    y = torch.tensor([V - 1, 0, -100, 13, 20, 5, 36])
    z[1, 0] += 40.0  # nearly certain of its target
    b[1, 0] += 40.0
    params = TMKLParams(kl_weight=0.7, ce_weight=1.1, **opts)
    ref = _backend.implementation("tmkl", "reference")
    exact = ref.forward(z, b, y, params)
    coef_ce = torch.randn(7, generator=gen, dtype=torch.float64)
    coef_kl = torch.randn(7, generator=gen, dtype=torch.float64)
    exact_grad = ref.backward(z, b, y, exact[3], coef_ce, coef_kl, params, torch.empty_like(z))
    z32, b32 = (z + 1000).float(), (b + 1000).float()
    c_ce, c_kl = coef_ce.float(), coef_kl.float()
    plain = ref.forward(z32, b32, y, params)
    plain_grad = ref.backward(z32, b32, y, plain[3], c_ce, c_kl, params, torch.empty_like(z32))
    rows = _backend.implementation("tmkl", backend)
    shards = list(zip(SPLITS[:-1], SPLITS[1:]))
    parts = []
    for lo, hi in shards:
        y_loc = distributed.shard_labels(y, lo, hi - lo, params.ignore_index)
        z_y, _, _, st = distributed._with_target_logits(rows).forward(
            z32[:, lo:hi], b32[:, lo:hi], y_loc, distributed._shard_params(params))
        parts.append(stats_to_part(st, z_y, params))
    got = merge_partials(torch.stack(parts, dim=1), y, params)
    grad = torch.cat([distributed.vocab_parallel_tmkl(None, lo, rows).backward(
        z32[:, lo:hi], b32[:, lo:hi], y, got[3], c_ce, c_kl, params,
        torch.empty_like(z32[:, lo:hi])) for lo, hi in shards], dim=1)
    floor = 4 * torch.finfo(torch.float32).eps
    for i, name in enumerate(("loss", "ce", "kl")):
        err = (got[i].double() - exact[i]).abs().max()
        base = (plain[i].double() - exact[i]).abs().max()
        assert err <= 4 * base + floor * (1 + exact[i].abs().max()), (name, float(err), float(base))
    err = (grad.double() - exact_grad).abs().max()
    base = (plain_grad.double() - exact_grad).abs().max()
    assert err <= 4 * base + floor * (1 + exact_grad.abs().max()), ("grad", float(err), float(base))
