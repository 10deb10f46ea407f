"""FSDP2 (``fully_shard``) on CPU with gloo, 2 ranks, against one process on the global batch:
``ForgetAwareStep`` on a tiny Llama with LoRA through the fused-linear path (the frozen head in the
root's group, or an FSDP2 module of its own gathered once per step), and FoLoRA on the sharded
(DTensor) parameters: its steps, and its state dict saved on each rank and loaded back."""
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from tests.test_distributed import (_assert_same_params, _calibration_batches, _global_batch,
                                    _llama, _spawn)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
pytest.importorskip("transformers")

V = 64
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
def fsdp_ranks(tmp_path_factory):
    results = _spawn(_all_checks_body, 2, tmp_path_factory.mktemp("fsdp"), "check")

    def result(name: str) -> list:
        for rank in range(2):
            if os.path.exists(f"{results}.{name}.{rank}.error"):
                pytest.fail(f"rank {rank}:\n" + open(f"{results}.{name}.{rank}.error").read())
        return [torch.load(f"{results}.{name}.{rank}", weights_only=False) for rank in range(2)]

    return result


def _sharded(own_head: bool = False):
    """The tiny Llama, each decoder layer an FSDP2 module, the root last (and the head its own)."""
    from torch.distributed.fsdp import fully_shard

    model = _llama(V)
    for layer in model.model.layers:
        fully_shard(layer)
    if own_head:
        fully_shard(model.lm_head)
    fully_shard(model)
    return model


def _full_params(model) -> dict:
    """Every trainable parameter whole (``full_tensor``: a collective, the same order everywhere)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _micro(rank: int) -> list:
    ids, labels = _global_batch(V)
    return [{"input_ids": ids[r:r + 1], "labels": labels[r:r + 1]} for r in (2 * rank, 2 * rank + 1)]


STEP = dict(loss="tmkl", kl_weight=0.5, chunk_size=8, backend="reference", max_grad_norm=1.0)


def _one_process(steps: int, optimizer=None) -> dict:
    from forgetkern import ForgetAwareStep

    ids, labels = _global_batch(V)
    model = _llama(V)
    step = ForgetAwareStep(model, lr=1e-2, optimizer=optimizer(model) if optimizer else None, **STEP)
    for _ in range(steps):
        step({"input_ids": ids, "labels": labels})
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _count_gathers(module) -> list:
    """Counts the real all-gathers of ``module``'s FSDP2 group (an ``unshard`` of a sharded group)."""
    gathers = [0]
    for group in module._get_fsdp_state()._fsdp_param_groups:
        unshard = group.unshard

        def counted(*args, _unshard=unshard, _group=group, **kwargs):
            gathers[0] += not _group.is_unsharded
            return _unshard(*args, **kwargs)

        group.unshard = counted
    return gathers


def _fsdp_steps(rank: int, own_head: bool) -> dict:
    from forgetkern import ForgetAwareStep

    model = _sharded(own_head)
    gathers = _count_gathers(model.lm_head) if own_head else None
    step = ForgetAwareStep(model, lr=1e-2, **STEP)
    paths = [step(_micro(rank))["path"] for _ in range(2)]
    return {"params": _full_params(model), "paths": paths,
            "head_gathers": None if gathers is None else gathers[0],
            "head_sharded_after": type(model.lm_head.weight).__name__}


@_check
def _rank_root_head(rank: int, world: int):
    return _fsdp_steps(rank, own_head=False)


@_check
def _rank_own_head(rank: int, world: int):
    return _fsdp_steps(rank, own_head=True)


def test_fsdp2_steps_equal_one_process(fsdp_ranks):
    """2 ranks x 2 micro-batches, 2 AdamW steps with clipping, fused path: the parameters of one
    process on the global batch (the head gathered with the root's group)."""
    want = _one_process(2)
    for got in fsdp_ranks("root_head"):
        assert got["paths"] == ["fused", "fused"]
        _assert_same_params(got["params"], want)


def test_fsdp2_own_head_gathered_once_per_step(fsdp_ranks):
    """A head sharded on its own is all-gathered once per step (2 steps: 2 gathers, not one per
    micro-batch or per chunk) and resharded after the step; the result is the same."""
    want = _one_process(2)
    for got in fsdp_ranks("own_head"):
        assert got["paths"] == ["fused", "fused"]
        assert got["head_gathers"] == 2
        assert got["head_sharded_after"] == "DTensor"
        _assert_same_params(got["params"], want)


def _stats(model):
    from forgetkern.optim import calibrate

    proxy, task = _calibration_batches()
    return calibrate(model, proxy, task, progress=False)  # before sharding: plain tensors


def _folora(model, stats, group=None):
    from forgetkern.optim import FoLoRA

    return FoLoRA.from_model(model, stats, lr=1e-2, refresh_every=2, backend="reference",
                             eigh_backend="reference", process_group=group)


@_check
def _rank_folora_state(rank: int, world: int):
    """FoLoRA on the sharded parameters: 1 step, state dict and shards saved, 2 more steps; then a
    fresh sharded model and optimizer load both and take the same 2 steps."""
    from forgetkern import ForgetAwareStep

    def run(model, opt, steps):
        step = ForgetAwareStep(model, optimizer=opt, **STEP)
        for _ in range(steps):
            step(_micro(rank))

    model = _llama(V)
    stats = _stats(model)
    model = _sharded()
    opt = _folora(model, stats, dist.group.WORLD)
    run(model, opt, 1)
    saved_opt = opt.state_dict()
    saved_shards = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    run(model, opt, 2)
    continued = _full_params(model)

    fresh = _sharded()
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.to_local().copy_(saved_shards[n])
    opt2 = _folora(fresh, stats, dist.group.WORLD)
    opt2.load_state_dict(saved_opt)
    run(fresh, opt2, 2)
    return {"continued": continued, "resumed": _full_params(fresh),
            "moment_shape": tuple(saved_opt["state"][0]["exp_avg"].shape)}


def test_folora_on_fsdp2_params_resumes_identically_and_equals_one_process(fsdp_ranks):
    """Each rank's state dict holds its shard's moments; loaded back it continues bit for bit, and
    3 FoLoRA steps on 2 ranks reach the parameters of one process on the global batch."""
    model = _llama(V)
    stats = _stats(model)
    want = _one_process(3, optimizer=lambda m: _folora(m, stats))
    for got in fsdp_ranks("folora_state"):
        _assert_same_params(got["resumed"], got["continued"], rtol=0, atol=0)
        _assert_same_params(got["continued"], want, rtol=1e-4, atol=1e-5)
        assert got["moment_shape"][0] < 4  # a LoRA A's rows, sharded: this rank's share only
