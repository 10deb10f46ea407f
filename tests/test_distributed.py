"""forgetkern on torch.distributed, CPU with gloo, against one process.

* Vocab-parallel ``tmkl_loss`` / ``linear_tmkl_loss(process_group=...)``, 2 and 4 processes, against
  the single-process loss on the whole vocabulary: every option, a vocabulary not divisible by the
  world size, ignored and all-ignored rows, ``num_items_in_batch``, components, large offsets
  (on the automatic backend: Triton in the CPU interpreter here); and that a process group runs
  the selected backend's kernels, never the reference's (tests/test_vocab_parallel.py: the
  pieces in one process).
* Data parallel on 2 ranks (one spawn runs every check, each test reads its own result):
  ``ForgetAwareStep`` under DDP (a protocol model and a tiny Llama, fused-linear path),
  ``TMKLTrainer`` under DDP through HF Trainer's own distributed handling, ``calibrate``,
  ``sample_proxy_data`` split over the ranks, FoLoRA's eigen solves spread over the ranks.
FSDP2 is in tests/test_fsdp.py."""
import datetime
import itertools
import os
import traceback

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
                             backend="cuda")
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
        if i % 6 == 3:  # the logit transforms, applied per chunk by the chunked driver
            opts = dict(opts, logit_scale=0.8, logit_softcap=4.0)
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
    """One spawned rank: a gloo group around ``body(rank, world, results)`` (a rank left waiting
    in a collective by a failed peer gives up after ten minutes: on two loaded cores a healthy peer
    can lag a minute behind, and gloo aborts the process when a collective times out)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
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
# data parallel on 2 ranks: one spawn runs every check below; each test reads its check's result
# ------------------------------------------------------------------------------------------------
CHECKS = {}


def _check(body):
    CHECKS[body.__name__.removeprefix("_rank_")] = body
    return body


def _all_checks_body(rank: int, world: int, results: str) -> None:
    for name, body in CHECKS.items():
        try:
            torch.save(body(rank, world), f"{results}.{name}.{rank}")
        except Exception:
            with open(f"{results}.{name}.{rank}.error", "w") as f:
                f.write(traceback.format_exc())
        dist.barrier()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """``result(name)``: each rank's return value of check ``name`` (its traceback fails the test)."""
    results = _spawn(_all_checks_body, 2, tmp_path_factory.mktemp("ranks"), "check")

    def result(name: str) -> list:
        for rank in range(2):
            if os.path.exists(f"{results}.{name}.{rank}.error"):
                pytest.fail(f"rank {rank}:\n" + open(f"{results}.{name}.{rank}.error").read())
        return [torch.load(f"{results}.{name}.{rank}", weights_only=False) for rank in range(2)]

    return result


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_params(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **(tol or dict(rtol=1e-5, atol=1e-6)),
                                   msg=name)


def _lora_model():
    from forgetkern.demo.tiny_model import TinyConfig, TinyLM
    from forgetkern.lora import inject_lora, lora_layers

    torch.manual_seed(0)
    model = TinyLM(TinyConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_len=16))
    inject_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
    return model


def _llama(vocab: int = 64, lora: bool = True):
    """A tiny random ``LlamaForCausalLM`` (hidden 32, 2 layers) with forgetkern LoRA on q/v."""
    import transformers

    from forgetkern.lora import inject_lora, lora_layers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    if not lora:
        return model
    inject_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
    return model


def _global_batch(vocab: int = 41):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (4, 12), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # rows with different token counts: the denominator must be global
    labels[3, :2] = -100
    return ids, labels


def _ddp_steps(make, vocab: int, rank: int, steps: int) -> dict:
    from forgetkern import ForgetAwareStep

    ids, labels = _global_batch(vocab)
    model = torch.nn.parallel.DistributedDataParallel(make())
    step = ForgetAwareStep(model, loss="tmkl", lr=1e-2, kl_weight=0.5, chunk_size=8,
                           backend="reference")
    micro = [{"input_ids": ids[r:r + 1], "labels": labels[r:r + 1]}
             for r in range(2 * rank, 2 * rank + 2)]  # two micro-batches: one sync
    metrics = [step(micro) for _ in range(steps)]
    return {"params": _trainable(model.module), "paths": [m["path"] for m in metrics],
            "metrics": [{k: m[k] for k in ("loss", "ce", "kl", "tokens")} for m in metrics]}


def _one_process_steps(make, vocab: int, steps: int) -> dict:
    from forgetkern import ForgetAwareStep

    ids, labels = _global_batch(vocab)
    model = make()
    step = ForgetAwareStep(model, loss="tmkl", lr=1e-2, kl_weight=0.5, chunk_size=8,
                           backend="reference")
    metrics = [step({"input_ids": ids, "labels": labels}) for _ in range(steps)]
    return _trainable(model), [{k: m[k] for k in ("loss", "ce", "kl", "tokens")} for m in metrics]


def _assert_same_metrics(got: list, want: list) -> None:
    """Every rank reports the global means of one process on the global batch."""
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        for key in ("loss", "ce", "kl"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-7), key


@_check
def _rank_ddp_protocol_model(rank: int, world: int):
    return _ddp_steps(_lora_model, 41, rank, 3)


@_check
def _rank_ddp_llama(rank: int, world: int):
    return _ddp_steps(_llama, 64, rank, 2)


def test_ddp_steps_equal_one_process_on_the_global_batch(two_ranks):
    """The fused-linear path through DDP (the forward_hidden protocol): 2 ranks x 2 micro-batches,
    3 AdamW steps, equal the parameters of one process on the global batch, and every rank reports
    the global loss, CE and KL means."""
    want, metrics = _one_process_steps(_lora_model, 41, 3)
    for got in two_ranks("ddp_protocol_model"):
        assert got["paths"] == ["fused"] * 3
        _assert_same_params(got["params"], want)
        _assert_same_metrics(got["metrics"], metrics)


def test_ddp_fused_llama_equals_one_process(two_ranks):
    """A tiny HF Llama under DDP takes the fused-linear path (its backbone through DDP's forward)
    and matches one process on the global batch after 2 steps."""
    want, metrics = _one_process_steps(_llama, 64, 2)
    for got in two_ranks("ddp_llama"):
        assert got["paths"] == ["fused"] * 2
        _assert_same_params(got["params"], want)
        _assert_same_metrics(got["metrics"], metrics)


def test_routed_leaves_a_plain_model_as_it_is():
    """Only DDP and FSDP2 wrappers reroute the hidden-state function through their forward."""
    from forgetkern.distributed import routed

    def fn(**inputs):
        return inputs

    assert routed(torch.nn.Linear(2, 2), fn) is fn  # a plain model: called as it is


# ---- FoLoRA statistics across ranks ------------------------------------------------------------
def _calibration_batches():
    gen = torch.Generator().manual_seed(11)
    proxy = [torch.randint(0, 41, (2, 9), generator=gen) for _ in range(4)]
    task = [torch.randint(0, 41, (3, 7), generator=gen) for _ in range(4)]
    return proxy, task


@_check
def _rank_calibrate(rank: int, world: int):
    from forgetkern.optim import calibrate

    proxy, task = _calibration_batches()
    return calibrate(_lora_model(), proxy[rank::world], task[rank::world], progress=False,
                     process_group=dist.group.WORLD)


def test_calibrate_across_ranks_equals_one_process(two_ranks):
    from forgetkern.optim import calibrate

    proxy, task = _calibration_batches()
    want = calibrate(_lora_model(), proxy, task, progress=False)
    for got in two_ranks("calibrate"):
        assert got.keys() == want.keys()
        for name, (p, t) in want.items():
            torch.testing.assert_close(got[name][0], p, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(got[name][1], t, rtol=1e-5, atol=1e-6, msg=name)


PROXY = dict(n_samples=5, length=6, prompts=[[1], [2, 3]], seed=4, batch_size=2, progress=False)


@_check
def _rank_proxy(rank: int, world: int):
    from forgetkern.optim import sample_proxy_data

    model = _lora_model()
    mine = sample_proxy_data(model, **PROXY, process_group=dist.group.WORLD)
    again = sample_proxy_data(model, **PROXY, process_group=dist.group.WORLD)
    gathered = sample_proxy_data(model, **PROXY, process_group=dist.group.WORLD, gather=True)
    return {"mine": torch.cat(mine), "again": torch.cat(again), "gathered": torch.cat(gathered)}


def test_sample_proxy_data_split_across_ranks(two_ranks):
    """Each rank samples its contiguous share (3 + 2 of 5), deterministically, with global prompt
    indices; rank 0 samples its share as one process asked for that many samples with the same
    seed, rank r draws with ``seed + r * 2**32``;
    ``gather=True`` gives every rank all the samples in rank order."""
    from forgetkern.optim import sample_proxy_data

    r0, r1 = two_ranks("proxy")
    assert r0["mine"].shape == (3, 6) and r1["mine"].shape == (2, 6)
    for r in (r0, r1):
        assert torch.equal(r["mine"], r["again"])
        assert torch.equal(r["gathered"], torch.cat([r0["mine"], r1["mine"]]))
    model = _lora_model()
    one = torch.cat(sample_proxy_data(model, **PROXY))
    assert torch.equal(r0["mine"], torch.cat(sample_proxy_data(model, **{**PROXY, "n_samples": 3})))
    assert r1["mine"][0, :2].tolist() == [2, 3] and r1["mine"][1, 0] == 1  # prompts of samples 3, 4
    other = {**PROXY, "seed": PROXY["seed"] + 2**32}
    rows = torch.cat(sample_proxy_data(model, **other))  # as rank 1 seeds, from sample 0
    assert not torch.equal(r1["mine"], one[3:])  # rank 1 draws from its own generator
    assert rows.shape == (5, 6)


def _folora(process_group=None):
    from forgetkern.optim import FoLoRA, calibrate

    model = _lora_model()
    proxy, task = _calibration_batches()
    stats = calibrate(model, proxy, task, progress=False)
    opt = FoLoRA.from_model(model, stats, lr=1e-2, backend="reference", eigh_backend="reference",
                            process_group=process_group)
    opt.refresh(force=True)
    return model, opt


def _bases(model, opt) -> dict:
    keys = ("lam", "V", "W", "gate")
    return {f"{n}.{k}": opt.state[p][k].clone() for n, p in model.named_parameters()
            if p.requires_grad for k in keys if k in opt.state[p]}


@_check
def _rank_folora_spread(rank: int, world: int):
    from forgetkern.optim import basis, optimizer

    solved = []
    layer, pairs = optimizer.solve_layer, basis.functional.generalized_eigh

    def count_layer(*args, **kwargs):
        solved.append("layer")
        return layer(*args, **kwargs)

    def count_pairs(task, proxy, **kwargs):
        solved.append(f"pairs:{task.shape[0]}" if task.dim() == 3 else "eigh")
        return pairs(task, proxy, **kwargs)

    optimizer.solve_layer, basis.functional.generalized_eigh = count_layer, count_pairs
    try:
        model, opt = _folora(dist.group.WORLD)
    finally:
        optimizer.solve_layer, basis.functional.generalized_eigh = layer, pairs
    alone = _bases(*_folora())  # one process, here: the same threads, so the same rounding
    return {"bases": _bases(model, opt), "alone": alone, "solved": solved}


def test_folora_solves_spread_over_ranks_equal_one_process(two_ranks):
    """Two layer inputs (q/v share one basis per block) and four pairs: each rank solves one layer
    basis and two of the pairs; the broadcast results equal one process's in the same process bit
    for bit (and this process's, with its own thread count, to rounding)."""
    want = _bases(*_folora())
    for got in two_ranks("folora_spread"):
        for name in want:
            torch.testing.assert_close(got["bases"][name], got["alone"][name], rtol=0, atol=0,
                                       msg=name)
        # one layer basis (its eigensolve) and 2 of the 4 pairs, in one batched call
        assert sorted(got["solved"]) == ["eigh", "layer", "pairs:2"]
        assert got["bases"].keys() == want.keys() and len(want) == 32  # 8 params x 4 entries
        for name in want:
            torch.testing.assert_close(got["bases"][name], want[name], rtol=1e-4, atol=1e-5, msg=name)


# ---- vocab-parallel: the ranks disagree or one rank's inputs are wrong: one error on every rank --
#: name -> (what each rank passes differently, the error every rank must raise)
MISMATCHES = {
    "rows": (lambda r, a: a.update(n=7 - 2 * r), ValueError, "disagree on the number of rows"),
    "dtype": (lambda r, a: a.update(dtype=torch.float32 if r else torch.float64), ValueError,
              "disagree on the input dtype: rank 0: torch.float64, rank 1: torch.float32"),
    "options": (lambda r, a: a["kw"].update(temperature=1.0 + r), ValueError,
                "disagree on the loss options: ranks .0. vs ranks .1."),
    "num_items": (lambda r, a: a["kw"].update(num_items_in_batch=10 + r), ValueError,
                  "disagree on the loss options"),
    "labels": (lambda r, a: a.update(shift=r), ValueError, "disagree on the labels"),
    "local_shape": (lambda r, a: a.update(bad_base=r == 1), ValueError,
                    r"tmkl_loss \(vocab-parallel\): rank 1: base_logits must have the same shape"),
    "local_dtype": (lambda r, a: a.update(base_dtype=torch.float32 if r == 0 else None), TypeError,
                    "rank 0: base_logits dtype torch.float32 does not match"),
    "local_backend": (lambda r, a: a["kw"].update(backend="cuda" if r == 0 else None), ValueError,
                      "rank 0: backend='cuda': the vocab-parallel form"),
    "label_range": (lambda r, a: a.update(label=V), ValueError, r"labels must be in \[0, 37\)"),
    "linear_hidden": (lambda r, a: a.update(linear=True, d=4 + r), ValueError,
                      r"linear_tmkl_loss \(vocab-parallel\): the ranks disagree on the hidden size"),
    "linear_bias": (lambda r, a: a.update(linear=True, bias=r == 0), ValueError,
                    "disagree on which of base_weight / base_bias / bias are given"),
    "linear_grad": (lambda r, a: a.update(linear=True, grad=r == 1), ValueError,
                    "whether hidden needs a gradient"),
}


def _mismatch_call(rank: int, world: int, name: str):
    args = dict(n=7, dtype=torch.float64, kw={}, shift=0, bad_base=False, base_dtype=None,
                label=None, linear=False, d=4, bias=False, grad=False)
    MISMATCHES[name][0](rank, args)
    lo = sum(_shards(world)[:rank])
    cols = slice(lo, lo + _shards(world)[rank])
    gen = torch.Generator().manual_seed(11)
    n, dt = args["n"], args["dtype"]
    y = (torch.randint(0, V, (n,), generator=gen) + args["shift"]) % V
    if args["label"] is not None:
        y[0] = args["label"]
    group = dict(process_group=dist.group.WORLD, **args["kw"])
    if args["linear"]:
        h = torch.randn(n, args["d"], generator=gen, dtype=dt).requires_grad_(args["grad"])
        w = torch.randn(V, args["d"], generator=gen, dtype=dt)[cols]
        bias = torch.zeros(V, dtype=dt)[cols] if args["bias"] else None
        return forgetkern.linear_tmkl_loss(h, w, h.detach(), y, bias=bias, **group)
    z = torch.randn(n, V, generator=gen, dtype=dt)[:, cols]
    b = torch.randn(n, V, generator=gen, dtype=args["base_dtype"] or dt)[:, cols]
    return forgetkern.tmkl_loss(z, b[:, 1:] if args["bad_base"] else b, y, **group)


@_check
def _rank_vocab_parallel_mismatches(rank: int, world: int) -> dict:
    """Each case: this rank's (error class, message); then a good call still runs."""
    out = {}
    for name in MISMATCHES:
        try:
            _mismatch_call(rank, world, name)
            out[name] = None
        except Exception as exc:  # noqa: BLE001 - compared across the ranks by the test
            out[name] = (type(exc).__name__, str(exc))
    out["after"] = float(forgetkern.tmkl_loss(torch.randn(3, V, dtype=torch.float64)[:, :5],
                                              torch.zeros(3, 5, dtype=torch.float64),
                                              torch.tensor([0, 1, 2]),
                                              process_group=dist.group.WORLD))
    return out


def test_vocab_parallel_ranks_that_disagree_raise_the_same_error_on_every_rank(two_ranks):
    """Rows, dtypes, hidden sizes, options, labels that differ between ranks, and inputs that fail
    one rank's own checks: never a hang or an abort in a collective, never different losses, but
    one clear error, the same on every rank; the group is usable afterwards."""
    import re

    got = two_ranks("vocab_parallel_mismatches")
    for name, (_, cls, pattern) in MISMATCHES.items():
        assert got[0][name] is not None, f"{name}: no error"
        assert got[0][name] == got[1][name], f"{name}: the ranks differ: {got[0][name]} / {got[1][name]}"
        assert got[0][name][0] == cls.__name__ and re.search(pattern, got[0][name][1]), (name, got[0][name])
    assert got[0]["after"] == got[1]["after"]


# ---- vocab-parallel on the selected backend's kernels (Triton in the CPU interpreter here) -------
@_check
def _rank_vocab_parallel_runs_the_selected_backend(rank: int, world: int):
    """``tmkl_loss`` (``backend="triton"``) and ``linear_tmkl_loss`` (automatic choice) with a
    process group run the Triton ``tmkl`` kernels on the shard, never the reference's (made to
    fail), and equal one process (the reference) forward and backward, random upstream gradients.
    ``None`` where Triton cannot run."""
    from dataclasses import replace

    from forgetkern import _backend

    if _backend.why_unavailable("triton", "tmkl", torch.device("cpu")) is not None:
        return None
    lo = sum(_shards(world)[:rank])
    hi = lo + _shards(world)[rank]
    gen = torch.Generator().manual_seed(21)
    n, d = 5, 4
    z, b = (torch.randn(n, V, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    h, hb = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.randn(V, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (n,), generator=gen)
    y[0], y[2] = V - 1, -100
    cases = [dict(direction="forward", temperature=1.0),
             dict(direction="reverse", temperature=2.0, mask_target=False, kl_weight=0.6)]
    wants = []
    for opts in cases:  # one process, the reference
        up = torch.randn(n, generator=gen, dtype=torch.float64)
        zf, hf, wf = (t.clone().requires_grad_() for t in (z, h, w))
        loss = forgetkern.tmkl_loss(zf, b, y, backend="reference", reduction="none", **opts)
        lin = forgetkern.linear_tmkl_loss(hf, wf, hb, y, backend="reference", reduction="none",
                                          **opts)
        torch.autograd.backward([loss, lin], [up, up])
        wants.append((up, loss.detach(), zf.grad, lin.detach(), hf.grad, wf.grad))
    calls = {"forward": 0, "backward": 0}

    def counted(fn, key):
        def run(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return run

    def refuse(*args, **kwargs):
        raise AssertionError("the reference tmkl kernels ran")

    loaded = _backend._LOADED
    saved = {key: loaded[key] for key in (("tmkl", "reference"), ("tmkl", "triton"))}
    tri = _backend.implementation("tmkl", "triton")
    loaded[("tmkl", "reference")] = replace(saved[("tmkl", "reference")], forward=refuse,
                                            backward=refuse)
    loaded[("tmkl", "triton")] = replace(tri, forward=counted(tri.forward, "forward"),
                                         backward=counted(tri.backward, "backward"))
    tol = dict(rtol=1e-10, atol=1e-12)
    try:
        for opts, (up, loss, dz, lin, dh, dw) in zip(cases, wants):
            zs, ws, hs = z[:, lo:hi].clone().requires_grad_(), w[lo:hi].clone().requires_grad_(), \
                h.clone().requires_grad_()
            got = forgetkern.tmkl_loss(zs, b[:, lo:hi], y, backend="triton", reduction="none",
                                       process_group=dist.group.WORLD, **opts)
            got_lin = forgetkern.linear_tmkl_loss(hs, ws, hb, y, reduction="none",
                                                  process_group=dist.group.WORLD, **opts)
            torch.autograd.backward([got, got_lin], [up, up])
            torch.testing.assert_close(got, loss, **tol)
            torch.testing.assert_close(zs.grad, dz[:, lo:hi], **tol)
            torch.testing.assert_close(got_lin, lin, **tol)
            torch.testing.assert_close(hs.grad, dh, **tol)
            torch.testing.assert_close(ws.grad, dw[lo:hi], **tol)
    finally:
        loaded.update(saved)
    return calls


def test_vocab_parallel_runs_the_selected_backends_kernels(two_ranks):
    got = two_ranks("vocab_parallel_runs_the_selected_backend")
    if got[0] is None:
        pytest.skip("Triton cannot run here")
    # per case and rank: the forward of each loss, the backward of each (none of the reference's)
    assert got == [{"forward": 4, "backward": 4}] * 2


@_check
def _rank_folora_nonfinite_gradient_skips_on_every_rank(rank: int, world: int) -> list:
    """A NaN gradient on rank 1 only: with the process group, both ranks skip the step."""
    from forgetkern.optim import FoLoRA

    p = torch.nn.Parameter(torch.ones(3, 4))
    opt = FoLoRA([p], lr=0.1, backend="reference", process_group=dist.group.WORLD)
    p.grad = torch.ones(3, 4)
    if rank == 1:
        p.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="another rank's parameters" if rank == 0 else "params'\\]\\[0\\]"):
        opt.step()
    return [opt.skipped_steps, bool(torch.equal(p.detach(), torch.ones(3, 4)))]


def test_folora_nonfinite_gradient_on_one_rank_skips_every_rank(two_ranks):
    assert two_ranks("folora_nonfinite_gradient_skips_on_every_rank") == [[1, True], [1, True]]


@_check
def _rank_folora_degenerate_statistics_raise_on_every_rank(rank: int, world: int) -> str:
    """A layer whose statistics cannot be solved, its basis owned by one rank: every rank
    raises (the owner naming the layer), none waits in a broadcast."""
    from forgetkern.optim import FoLoRA, calibrate

    model = _lora_model()
    stats = calibrate(model, *_calibration_batches(), progress=False)
    name = sorted(stats)[-1]
    proxy, task = stats[name]
    bad = {**stats, name: (proxy - 2 * torch.diag(proxy.diagonal().max().expand(proxy.shape[0])), task)}
    try:
        FoLoRA.from_model(model, bad, backend="reference", eigh_backend="reference",
                          process_group=dist.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_folora_degenerate_statistics_raise_on_every_rank_without_a_hang(two_ranks):
    got = two_ranks("folora_degenerate_statistics_raise_on_every_rank")
    assert all(m != "no error" for m in got), got
    assert any("lora_A: " in m for m in got), got  # the owner names the layer
    assert all("lora_A: " in m or "rank(s) [" in m for m in got), got


# ---- TMKLTrainer: HF Trainer's own distributed handling (accelerate over the gloo group) -------
class _Rows(torch.utils.data.Dataset):
    """4 rows of 10 tokens, rows with different numbers of ignored labels."""

    def __init__(self):
        self.ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return 4

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[:i] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def _trainer_run(out_dir: str, per_device: int) -> dict:
    """2 optimizer steps of TMKLTrainer, 2 accumulated micro-batches each: every step sees the
    whole 4-row data set (in the sampler's order), so one process and 2 ranks must agree."""
    import transformers

    import forgetkern.integrations.hf as hf

    model = _llama()
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
        max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = hf.TMKLTrainer(model=model, args=args, train_dataset=_Rows(),
                             tmkl_options={"kl_weight": 0.5})
    seen = []
    config_loss = hf.config_loss

    def spy(model, inputs, config, num_items_in_batch=None, **kwargs):
        out = config_loss(model, inputs, config, num_items_in_batch=num_items_in_batch, **kwargs)
        seen.append((type(model).__name__, int(num_items_in_batch), out.path))
        return out

    hf.config_loss = spy
    try:
        trainer.train()
    finally:
        hf.config_loss = config_loss
    logs = [{k: e[k] for k in ("loss", "tmkl_ce", "tmkl_kl")} for e in trainer.state.log_history
            if "tmkl_ce" in e]
    return {"params": _trainable(model), "seen": seen, "world": args.world_size, "logs": logs}


@_check
def _rank_trainer(rank: int, world: int):
    # what torchrun / accelerate launch set; the gloo group already exists, accelerate adopts it
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        return _trainer_run(out, per_device=1)


def test_tmkl_trainer_two_ranks_equal_one_process(two_ranks, tmp_path):
    """TMKLTrainer under HF Trainer's DDP (gloo): the loss denominator is the global token count,
    the fused path runs through DDP, and both ranks end with the parameters of one process."""
    want = _trainer_run(str(tmp_path), per_device=2)
    assert want["world"] == 1
    global_counts = {n for _, n, _ in want["seen"]}
    for got in two_ranks("trainer"):
        assert got["world"] == 2
        assert [(m, p) for m, _, p in got["seen"]] == [("DistributedDataParallel", "fused")] * 4
        assert {n for _, n, _ in got["seen"]} == global_counts  # all 4 rows' tokens on each rank
        _assert_same_params(got["params"], want["params"])
        # the logged components are the global means, as one process logs them
        assert len(got["logs"]) == len(want["logs"]) == 2
        for g, w in zip(got["logs"], want["logs"]):
            for key in ("loss", "tmkl_ce", "tmkl_kl"):
                assert g[key] == pytest.approx(w[key], rel=1e-4), (key, g, w)


# ---- the recipes of docs/distributed.md, run as written ----------------------------------------
def _doc_block(marker: str, namespace: dict | None = None, subs=()) -> dict:
    """The docs/distributed.md python block containing ``marker``, executed as a module (its
    ``if __name__ == "__main__"`` part does not run) in ``namespace`` (the names its prose gives);
    ``subs``: a real model's sizes replaced by a tiny one's."""
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
              if marker in b]
    assert len(blocks) == 1, f"docs/distributed.md: no single python block with {marker!r}"
    code = blocks[0]
    for old, new in subs:
        assert old in code, old
        code = code.replace(old, new)
    namespace = {"__name__": "__doc_recipe__", **(namespace or {})}
    exec(compile(code, str(doc), "exec"), namespace)
    return namespace


@_check
def _rank_doc_vocab_parallel(rank: int, world: int):
    """The vocab-parallel and DTensor blocks, on this rank's shard, against one process."""
    from torch.distributed.device_mesh import init_device_mesh

    gen = torch.Generator().manual_seed(11)
    z, b = (torch.randn(6, V, generator=gen, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, V, (6,), generator=gen)
    h, hb = (torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.randn(V, 5, generator=gen, dtype=torch.float64)
    lo = sum(_shards(world)[:rank])
    hi = lo + _shards(world)[rank]
    ns = _doc_block("each rank gets the gradient of its own shard", {
        "logits": z[:, lo:hi].clone().requires_grad_(), "base_logits": b[:, lo:hi], "labels": y,
        "hidden": h, "weight_shard": w[lo:hi], "base_hidden": hb})
    out = {"fused": float(ns["loss"]),  # the block's last loss: the fused-linear form
           "sharded": float(forgetkern.tmkl_loss(ns["logits"], ns["base_logits"], y,
                                                 process_group=dist.group.WORLD))}
    ns = _doc_block("distribute_tensor(z, mesh", {"forgetkern": forgetkern, "z": z, "b": b, "y": y,
                                                  "mesh": init_device_mesh("cpu", (world,))})
    return {**out, "dtensor": float(ns["loss"])}


def test_doc_vocab_parallel_blocks_equal_one_process(two_ranks):
    gen = torch.Generator().manual_seed(11)
    z, b = (torch.randn(6, V, generator=gen, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, V, (6,), generator=gen)
    h, hb = (torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.randn(V, 5, generator=gen, dtype=torch.float64)
    want = float(forgetkern.tmkl_loss(z, b, y))
    fused = float(forgetkern.linear_tmkl_loss(h, w, hb, y))
    for got in two_ranks("doc_vocab_parallel"):
        assert got["sharded"] == pytest.approx(want, rel=1e-12)
        assert got["dtensor"] == pytest.approx(want, rel=1e-12)
        assert got["fused"] == pytest.approx(fused, rel=1e-12)


@_check
def _rank_doc_folora(rank: int, world: int):
    """The FoLoRA-across-ranks block, with a tiny model's sizes."""
    ns = _doc_block("proxy = forgetkern.optim.sample_proxy_data", {
        "dist": dist, "forgetkern": forgetkern, "model": _llama(),
        "my_task_batches": [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(r))
                            for r in (2 * rank, 2 * rank + 1)]},
        subs=[("n_samples=512, length=128", "n_samples=4, length=6")])
    return {"proxy": sum(t.shape[0] for t in ns["proxy"]), "layers": sorted(ns["stats"]),
            "optimizer": type(ns["opt"]).__name__}


def test_doc_folora_across_ranks_block_runs(two_ranks):
    r0, r1 = two_ranks("doc_folora")
    assert r0["optimizer"] == r1["optimizer"] == "FoLoRA"
    assert r0["layers"] == r1["layers"] and r0["layers"]
    assert r0["proxy"] + r1["proxy"] == 4  # each rank samples its share


def _recipe_loader(vocab: int = 64):
    ids, labels = _global_batch(vocab)
    return [[{"input_ids": ids[r:r + 1], "labels": labels[r:r + 1]} for r in range(4)]] * 2


@_check
def _rank_torchrun_recipe(rank: int, world: int):
    main = _doc_block("def main(model, loader")["main"]
    out = {}
    for fsdp in (False, True):
        model, metrics = main(_llama(lora=False), _recipe_loader(), fsdp=fsdp, steps=2)
        inner = getattr(model, "module", model)
        out[fsdp] = {"path": metrics["path"], "tokens": metrics["tokens"],
                     "params": {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                                for n, p in inner.named_parameters() if p.requires_grad}}
    return out


def test_torchrun_recipe_runs_under_ddp_and_fsdp2(two_ranks):
    """The recipe's ``main`` on 2 ranks (2 micro-batches each): fused path, the global token count,
    the same parameters on both ranks, and DDP and FSDP2 agree."""
    ids, labels = _global_batch(64)
    tokens = int((labels[:, 1:] != -100).sum())
    r0, r1 = two_ranks("torchrun_recipe")
    for fsdp in (False, True):
        assert r0[fsdp]["path"] == r1[fsdp]["path"] == "fused"
        assert r0[fsdp]["tokens"] == r1[fsdp]["tokens"] == tokens
        _assert_same_params(r0[fsdp]["params"], r1[fsdp]["params"], rtol=0, atol=0)
    _assert_same_params(r0[True]["params"], r0[False]["params"])


@_check
def _rank_trainer_recipe(rank: int, world: int):
    import tempfile

    train = _doc_block("def train(model, dataset")["train"]
    with tempfile.TemporaryDirectory() as out:
        model = _llama()
        trainer = train(model, _Rows(), out)
        return {"world": trainer.args.world_size, "steps": trainer.state.global_step,
                "params": _trainable(model)}


def test_trainer_recipe_runs_on_two_processes(two_ranks):
    """The recipe's ``train`` (3 epochs of the 4-row set, 1 step each) on 2 ranks: the same
    parameters on both, changed from the start."""
    r0, r1 = two_ranks("trainer_recipe")
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 3
    _assert_same_params(r0["params"], r1["params"], rtol=0, atol=0)
    start = _trainable(_llama())
    assert any(not torch.equal(r0["params"][n], start[n]) for n in start)
