"""Vocab-parallel ``tmkl_loss`` / ``linear_tmkl_loss(process_group=...)`` on CPU with gloo, 2 and 4 processes, against the
single-process loss on the whole vocabulary: every option, a vocabulary not divisible by the world
size, ignored and all-ignored rows, ``num_items_in_batch``, components, large logit offsets."""
import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import forgetkern

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")

V = 37  # not divisible by 2 or 4


def _shards(world: int) -> list[int]:
    base, extra = divmod(V, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def _cases():
    for direction, mask_target, temperature, reduction, dtype in itertools.product(
            ["forward", "reverse"], [True, False], [1.0, 2.0], ["mean", "sum", "none"],
            [torch.float64, torch.float32]):
        yield dict(direction=direction, mask_target=mask_target, temperature=temperature,
                   reduction=reduction, kl_weight=0.7, ce_weight=1.1), dtype, "some", 0.0
    yield dict(direction="forward", mask_target=True, temperature=1.0, reduction="mean"), \
        torch.float64, "all", 0.0
    yield dict(direction="reverse", mask_target=True, temperature=0.5, reduction="mean",
               num_items_in_batch=11, return_components=True), torch.float64, "some", 0.0
    yield dict(direction="forward", mask_target=True, temperature=1.0, reduction="none"), \
        torch.float32, "none", 1000.0


def _check_rank(rank: int, world: int) -> int:
    sizes = _shards(world)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    count = 0
    for i, (opts, dtype, ignore, offset) in enumerate(_cases()):
        gen = torch.Generator().manual_seed(100 + i)  # the same full tensors on every rank
        n = 7
        z = (torch.randn(n, V, generator=gen, dtype=torch.float64) * 3 + offset).to(dtype)
        b = (torch.randn(n, V, generator=gen, dtype=torch.float64) * 3 + offset).to(dtype)
        y = torch.randint(0, V, (n,), generator=gen)
        y[0] = V - 1  # a target in the last shard
        if ignore == "some":
            y[2] = -100
        elif ignore == "all":
            y[:] = -100
        comps = opts.get("return_components", False)
        # the whole vocabulary in one process
        full = z.clone().requires_grad_()
        want = forgetkern.tmkl_loss(full, b, y, backend="reference", **opts)
        want = list(want) if comps else [want]
        ups = [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in want]
        torch.autograd.backward(want, ups)
        # this rank's shard
        shard = z[:, lo:hi].clone().requires_grad_()
        got = forgetkern.tmkl_loss(shard, b[:, lo:hi], y, process_group=dist.group.WORLD, **opts)
        got = list(got) if comps else [got]
        torch.autograd.backward(got, ups)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w.detach(), **tol, msg=lambda m: f"case {i} {opts}: {m}")
        torch.testing.assert_close(shard.grad, full.grad[:, lo:hi], **tol,
                                   msg=lambda m: f"case {i} {opts} grad: {m}")
        # every rank holds the same loss
        gathered = [torch.zeros_like(got[0].detach()) for _ in range(world)]
        dist.all_gather(gathered, got[0].detach().contiguous())
        for other in gathered:
            torch.testing.assert_close(other, got[0].detach(), rtol=0, atol=0)
        count += 1
    count += _check_linear(rank, world, lo, hi)
    _check_dtensor(rank, world)
    # the labels are global ids: an id past the whole vocabulary is refused on every rank
    with pytest.raises(ValueError, match=f"labels must be in \\[0, {V}\\)"):
        forgetkern.tmkl_loss(z[:, lo:hi], b[:, lo:hi], torch.full((7,), V),
                             process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="vocab-parallel"):
        forgetkern.tmkl_loss(z[:, lo:hi], b[:, lo:hi], y, process_group=dist.group.WORLD,
                             backend="triton")
    return count


def _check_linear(rank: int, world: int, lo: int, hi: int) -> int:
    """``linear_tmkl_loss`` with the head (and biases, and a separate base head) sharded by rows."""
    count = 0
    d = 6
    for i, (opts, dtype, ignore, offset) in enumerate(_cases()):
        if i % 3:  # a third of the grid keeps the run short; every option still appears
            continue
        gen = torch.Generator().manual_seed(500 + i)
        n = 7
        h = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
        hb = h + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
        w = torch.randn(V, d, generator=gen, dtype=torch.float64).to(dtype)
        bias = (torch.randn(V, generator=gen, dtype=torch.float64) + offset).to(dtype)
        wb = w + 0.1 * torch.randn(V, d, generator=gen, dtype=torch.float64).to(dtype) if i % 2 else None
        y = torch.randint(0, V, (n,), generator=gen)
        y[1] = -100 if ignore != "none" else y[1]
        comps = opts.get("return_components", False)
        kw = dict(opts, base_weight=wb, base_bias=None if wb is None else bias)
        hf, wf, bf = (t.clone().requires_grad_() for t in (h, w, bias))
        want = forgetkern.linear_tmkl_loss(hf, wf, hb, y, bias=bf, backend="reference", **kw)
        want = list(want) if comps else [want]
        ups = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in want]
        torch.autograd.backward(want, ups)
        hs, ws, bs = h.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(), \
            bias[lo:hi].clone().requires_grad_()
        kw_s = dict(opts, base_weight=None if wb is None else wb[lo:hi],
                    base_bias=None if wb is None else bias[lo:hi])
        got = forgetkern.linear_tmkl_loss(hs, ws, hb, y, bias=bs, process_group=dist.group.WORLD,
                                          **kw_s)
        got = list(got) if comps else [got]
        torch.autograd.backward(got, ups)
        tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=5e-5, atol=5e-5)
        for g, x in zip(got, want):
            torch.testing.assert_close(g, x.detach(), **tol, msg=lambda m: f"linear {i}: {m}")
        torch.testing.assert_close(hs.grad, hf.grad, **tol, msg=lambda m: f"linear {i} dh: {m}")
        torch.testing.assert_close(ws.grad, wf.grad[lo:hi], **tol, msg=lambda m: f"linear {i} dW: {m}")
        torch.testing.assert_close(bs.grad, bf.grad[lo:hi], **tol, msg=lambda m: f"linear {i} db: {m}")
        count += 1
    return count


def _check_dtensor(rank: int, world: int) -> None:
    """DTensor logits sharded on the vocabulary: the group comes from their mesh, the gradient
    flows back into the DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(5, V, generator=gen, dtype=torch.float64)
    b = torch.randn(5, V, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (5,), generator=gen)
    full = z.clone().requires_grad_()
    want = forgetkern.tmkl_loss(full, b, y, temperature=2.0)
    want.backward()
    dz = distribute_tensor(z.clone(), mesh, [Shard(1)]).requires_grad_()
    db = distribute_tensor(b, mesh, [Shard(1)])
    dy = distribute_tensor(y, mesh, [Replicate()])
    got = forgetkern.tmkl_loss(dz, db, dy, temperature=2.0)
    got.backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dz.grad.full_tensor(), full.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="base_logits: must be sharded like logits"):
        forgetkern.tmkl_loss(dz, distribute_tensor(b, mesh, [Replicate()]), dy)


def _entry(rank: int, world: int, init_file: str, results: str, body) -> None:
    """One spawned rank: a gloo group around ``body(rank, world, results)``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, world, results)
    finally:
        dist.destroy_process_group()


def _spawn(body, world: int, tmp_path, name: str) -> str:
    """Run ``body`` on ``world`` gloo ranks; returns the results prefix each rank wrote under."""
    torch.set_num_threads(1)
    results = str(tmp_path / name)
    mp.spawn(_entry, args=(world, str(tmp_path / "init"), results, body), nprocs=world, join=True)
    return results


def _losses_body(rank: int, world: int, results: str) -> None:
    with open(f"{results}.{rank}", "w") as f:
        f.write(str(_check_rank(rank, world)))


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_tmkl_matches_one_process(tmp_path, world):
    results = _spawn(_losses_body, world, tmp_path, "done")
    counts = {int(open(f"{results}.{r}").read()) for r in range(world)}
    cases = len(list(_cases()))
    assert counts == {cases + len(range(0, cases, 3))}
    assert os.path.exists(f"{results}.{world - 1}")


# ------------------------------------------------------------------------------------------------
# data parallel: ForgetAwareStep on a DistributedDataParallel model


def _lora_model():
    from forgetkern.demo.model import TinyConfig, TinyLM
    from forgetkern.lora import inject_lora, lora_layers

    torch.manual_seed(0)
    model = TinyLM(TinyConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=2, d_ff=24, max_len=16))
    inject_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
    return model


def _global_batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 41, (4, 12), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # rows with different token counts: the denominator must be global
    labels[3, :2] = -100
    return ids, labels


def _ddp_body(rank: int, world: int, results: str) -> None:
    from forgetkern import ForgetAwareStep

    ids, labels = _global_batch()
    model = torch.nn.parallel.DistributedDataParallel(_lora_model())
    step = ForgetAwareStep(model, loss="tmkl", lr=1e-2, kl_weight=0.5)
    micro = [{"input_ids": ids[r:r + 1], "labels": labels[r:r + 1]}
             for r in range(2 * rank, 2 * rank + 2)]  # two micro-batches: one sync
    for _ in range(3):
        step(micro)
    torch.save({n: p.detach() for n, p in model.module.named_parameters() if p.requires_grad},
               f"{results}.{rank}")


def test_ddp_steps_equal_one_process_on_the_global_batch(tmp_path):
    from forgetkern import ForgetAwareStep

    results = _spawn(_ddp_body, 2, tmp_path, "params")
    ids, labels = _global_batch()
    model = _lora_model()
    step = ForgetAwareStep(model, loss="tmkl", lr=1e-2, kl_weight=0.5)
    for _ in range(3):
        step({"input_ids": ids, "labels": labels})
    want = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for rank in range(2):
        got = torch.load(f"{results}.{rank}")
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------
# FoLoRA statistics across ranks


def _calibration_batches():
    gen = torch.Generator().manual_seed(11)
    proxy = [torch.randint(0, 41, (2, 9), generator=gen) for _ in range(4)]
    task = [torch.randint(0, 41, (3, 7), generator=gen) for _ in range(4)]
    return proxy, task


def _calibrate_body(rank: int, world: int, results: str) -> None:
    from forgetkern.optim import calibrate

    proxy, task = _calibration_batches()
    stats = calibrate(_lora_model(), proxy[rank::world], task[rank::world], progress=False,
                      process_group=dist.group.WORLD)
    torch.save(stats, f"{results}.{rank}")


def test_calibrate_across_ranks_equals_one_process(tmp_path):
    from forgetkern.optim import calibrate

    results = _spawn(_calibrate_body, 2, tmp_path, "stats")
    proxy, task = _calibration_batches()
    want = calibrate(_lora_model(), proxy, task, progress=False)
    for rank in range(2):
        got = torch.load(f"{results}.{rank}")
        assert got.keys() == want.keys()
        for name, (p, t) in want.items():
            torch.testing.assert_close(got[name][0], p, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(got[name][1], t, rtol=1e-5, atol=1e-6, msg=name)
