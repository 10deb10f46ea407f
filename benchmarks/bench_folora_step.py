"""Benchmark: one FoLoRA optimizer step for a 7B-shaped LoRA (r=16 on all 224 linear layers).

Shapes follow Mistral-7B / Llama-3-8B: 32 blocks of q, k, v, o (d_in 4096), gate, up (d_in 4096)
and down (d_in 14336); k/v have d_out 1024, gate/up 14336. Every LoRA ``A`` gets statistics (one
solved basis per ``d_in``, shared by all layers so the set-up stays fast; the step reads every
layer's basis as if it were its own), every ``B`` is paired. ``--quick`` uses 4 blocks.

Providers: ``torch-adamw-fused`` (``torch.optim.AdamW(fused=True)``, the baseline), FoLoRA with a
dense basis and with low-rank gating (``k=256``), each with the fused Triton element-wise kernel
and with the torch reference. Floors (``floors.optimizer_floor``): the bytes of an element-wise
Adam step (read parameter, gradient and both moments; write parameter and moments: 7 fp32 streams)
plus, for FoLoRA, its projections (each ``A``'s basis ``V`` read twice, dense; ``V_k`` and ``W_k``
once, low-rank). The notes carry each FoLoRA step against fused AdamW plus that projection
floor (target <= 2x) and the optimizer memory of the whole model. Runs in the late phase.

    python benchmarks/bench_folora_step.py [--quick]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import floors  # noqa: E402

from forgetkern.optim import FoLoRA  # noqa: E402

NAME = "folora_step"
HIDDEN, KV, FFN = 4096, 1024, 14336
DRY_DIMS = (64, 16, 128)
BLOCKS, QUICK_BLOCKS, DRY_BLOCKS = 32, 4, 1
RANK, K, DRY_RANK, DRY_K = 16, 256, 4, 8
ADAM_STREAMS = 7  # fp32 words per parameter: read p, g, m, v; write p, m, v


def linears(dims):
    """``(name, d_in, d_out)`` of the seven adapted linears of one block."""
    hidden, kv, ffn = dims
    return [("q", hidden, hidden), ("k", hidden, kv), ("v", hidden, kv), ("o", hidden, hidden),
            ("gate", hidden, ffn), ("up", hidden, ffn), ("down", ffn, hidden)]


def lora_params(blocks: int, rank: int, dims, device):
    """``[(A, B), ...]`` float32 LoRA parameters with random gradients."""
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(blocks):
        for _, d_in, d_out in linears(dims):
            A = torch.randn(rank, d_in, device=device, generator=gen).div_(d_in ** 0.5).requires_grad_()
            B = torch.zeros(d_out, rank, device=device).requires_grad_()
            A.grad = torch.randn(A.shape, device=device, generator=gen) * 1e-3
            B.grad = torch.randn(B.shape, device=device, generator=gen) * 1e-3
            out.append((A, B))
    return out


def statistics(d: int, device):
    """A proxy and a task statistic with an LLM-like decaying spectrum."""
    gen = torch.Generator(device=device).manual_seed(d)
    out = []
    for _ in range(2):
        q, _ = torch.linalg.qr(torch.randn(d, d, device=device, generator=gen))
        ev = torch.logspace(1, -3, d, device=device)[torch.randperm(d, device=device, generator=gen)]
        out.append((q * ev) @ q.mT)
    return out


def build_folora(pairs, stats, **options) -> FoLoRA:
    opt = FoLoRA([p for pair in pairs for p in pair], lr=1e-4, **options)
    for A, B in pairs:
        proxy, task = stats[A.shape[1]]
        opt.set_statistics(A, proxy, task)
        opt.pair(B, A)
    return opt


def model_memory(blocks: int, k: int | None, dims) -> int:
    """Optimizer bytes for the whole model beyond AdamW's moments: per distinct layer input,
    ``V`` and ``W`` plus the statistics (dense ``d x d`` each), or ``V_k``, ``W_k`` and two
    rank-``k`` sketches (low-rank); the ``r x r`` pair bases are negligible."""
    hidden, _, ffn = dims
    total = 0
    for d in (hidden, hidden, hidden, ffn):  # q/k/v share one input, gate/up one
        total += 4 * (4 * d * d if k is None else 4 * k * d + 2 * (k + 1) + 2 * k)
    return blocks * total


def run(ctx: common.Context) -> list[common.Record]:
    P = common.Provider
    dims = DRY_DIMS if ctx.dry else (HIDDEN, KV, FFN)
    blocks = DRY_BLOCKS if ctx.dry else (QUICK_BLOCKS if ctx.options.quick else BLOCKS)
    rank, k = (DRY_RANK, DRY_K) if ctx.dry else (RANK, K)
    names = ["torch-adamw-fused"] + [f"forgetkern-{basis}-{backend}" for basis in ("dense", f"lowrank{k}")
                                     for backend in ("triton", "reference")]
    provs = [P(n, None, work="optimizer-step", late=True) for n in names]
    provs = [pv for pv in provs if ctx.selects(pv)]
    if not provs:
        return []
    pairs = lora_params(blocks, rank, dims, ctx.device)
    params = [p for pair in pairs for p in pair]
    n_params = sum(p.numel() for p in params)
    shape = {"blocks": blocks, "layers": len(pairs), "r": rank, "params": n_params}
    adam_bytes = ADAM_STREAMS * 4 * n_params
    records, adamw_ms = [], None
    stats = None
    for pv in provs:
        basis = None
        if pv.name == "torch-adamw-fused":
            floor = floors.optimizer_floor(adam_bytes, ctx.rates, "7 fp32 streams per parameter")
            note = ""
        else:
            basis = "dense" if "-dense-" in pv.name else k
            proj = sum(4 * (2 * A.shape[1] ** 2 if basis == "dense" else 2 * k * A.shape[1]) for A, _ in pairs)
            floor = floors.optimizer_floor(adam_bytes + proj, ctx.rates,
                                           "7 fp32 streams per parameter + basis projections")
            note = (f"model optimizer extra {model_memory(BLOCKS, None if basis == 'dense' else k, dims) / 2**30:.2f}"
                    f" GiB at {BLOCKS} blocks")
        case = common.Case(bench=NAME, work="optimizer-step", passes="step", provider=pv.name,
                           inputs="synthetic", shape=shape, dtype=torch.float32, floor=floor,
                           no_gate="n/a: an optimizer step (FoLoRA's math is tested in tests/)",
                           note=note)
        if pv.name == "torch-adamw-fused":
            if ctx.device.type != "cuda":
                case.skip = "fused AdamW needs a GPU: not run in the dry mode"
            else:
                case.make = lambda: torch.optim.AdamW(params, lr=1e-4, fused=True).step
        else:
            if stats is None:
                stats = {d: statistics(d, ctx.device) for d in sorted({A.shape[1] for A, _ in pairs})}
            backend = pv.name.rsplit("-", 1)[1]
            case.make = lambda basis=basis, backend=backend: build_folora(
                pairs, stats, basis=basis, backend=backend).step
            if backend == "triton" and ctx.device.type != "cuda":
                case.skip = "the Triton step kernel needs a GPU: not run in the dry mode"
            if adamw_ms:
                proj_ms = floors.optimizer_floor(floor.nbytes - adam_bytes, ctx.rates, "").ms
                case.timed_note = lambda ms, ref=adamw_ms + proj_ms: f"{ms / ref:.2f}x fused AdamW + projection floor"
        rec = common.run_case(ctx, case)
        if pv.name == "torch-adamw-fused":
            adamw_ms = rec.median_ms
        records.append(rec)
    return records


def main(argv=None):
    import suite

    return suite.main(["--only", NAME] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
