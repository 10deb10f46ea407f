"""Benchmark: one FoLoRA optimizer step for a 7B-shaped LoRA (r=16 on all 224 linear layers).

Shapes follow Mistral-7B / Llama-3-8B: 32 blocks of q, k, v, o (d_in 4096), gate, up (d_in 4096)
and down (d_in 14336); k/v have d_out 1024, gate/up 14336. Every LoRA ``A`` gets statistics (one
solved basis per ``d_in``, shared by all layers so the set-up stays fast; the step reads every
layer's basis as if it were its own), every ``B`` is paired.

Providers: ``torch-adamw-fused`` (``torch.optim.AdamW(fused=True)``, the baseline), FoLoRA with a
dense basis and with low-rank gating (``k=256``), each with the fused Triton element-wise kernel
and with the torch reference. The floor of a FoLoRA step is the fused AdamW time plus the
bandwidth floor of its projections (reading each ``A``'s basis ``V`` twice, dense; ``V_k`` and
``W_k`` once, low-rank); the target is <= 2x that floor. The notes carry the ratio and the
optimizer memory for the whole model (dense vs low-rank), computed from the per-layer state.

    python benchmarks/bench_folora_step.py [--quick] [--blocks 32] [--rank 16] [--k 256] [--out DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from forgetkern.optim import FoLoRA  # noqa: E402

HIDDEN, KV, FFN = 4096, 1024, 14336
#: (name, d_in, d_out) of the seven adapted linears of one block
LINEARS = [("q", HIDDEN, HIDDEN), ("k", HIDDEN, KV), ("v", HIDDEN, KV), ("o", HIDDEN, HIDDEN),
           ("gate", HIDDEN, FFN), ("up", HIDDEN, FFN), ("down", FFN, HIDDEN)]
#: distinct layer inputs of one block (q/k/v share one, gate/up share one)
INPUTS = [HIDDEN, HIDDEN, HIDDEN, FFN]


def lora_params(blocks: int, rank: int):
    """``[(A, B), ...]`` float32 LoRA parameters with random gradients, on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for _ in range(blocks):
        for _, d_in, d_out in LINEARS:
            A = torch.randn(rank, d_in, device="cuda", generator=gen).div_(d_in ** 0.5).requires_grad_()
            B = torch.zeros(d_out, rank, device="cuda").requires_grad_()
            A.grad = torch.randn(A.shape, device="cuda", generator=gen) * 1e-3
            B.grad = torch.randn(B.shape, device="cuda", generator=gen) * 1e-3
            out.append((A, B))
    return out


def statistics(d: int):
    """A proxy and a task statistic with an LLM-like decaying spectrum."""
    gen = torch.Generator(device="cuda").manual_seed(d)
    out = []
    for _ in range(2):
        q, _ = torch.linalg.qr(torch.randn(d, d, device="cuda", generator=gen))
        ev = torch.logspace(1, -3, d, device="cuda")[torch.randperm(d, device="cuda", generator=gen)]
        out.append((q * ev) @ q.mT)
    return out


def build_folora(pairs, stats, **options) -> FoLoRA:
    params = [p for pair in pairs for p in pair]
    opt = FoLoRA(params, lr=1e-4, **options)
    for A, B in pairs:
        proxy, task = stats[A.shape[1]]
        opt.set_statistics(A, proxy, task)
        opt.pair(B, A)
    return opt


def model_memory(blocks: int, k: int | None) -> int:
    """Optimizer bytes for the whole model beyond AdamW's moments: per distinct layer input,
    ``V`` and ``W`` plus the statistics (dense ``d x d`` each), or ``V_k``, ``W_k`` and two
    rank-``k`` sketches (low-rank); the ``r x r`` pair bases are negligible."""
    total = 0
    for d in INPUTS:
        total += 4 * (4 * d * d if k is None else 4 * k * d + 2 * (k + 1) + 2 * k)
    return blocks * total


def main(argv=None) -> list[common.Record]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=32, help="transformer blocks (7 LoRA layers each)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--k", type=int, default=256, help="directions kept by low-rank gating")
    args = p.parse_args(argv)
    meta, floors, _ = common.start("bench_folora_step.py", args)
    blocks = 4 if args.quick else args.blocks
    pairs = lora_params(blocks, args.rank)
    params = [p for pair in pairs for p in pair]
    n_params = sum(p.numel() for p in params)
    shape = {"blocks": blocks, "layers": len(pairs), "r": args.rank, "params": n_params}
    stats = {d: statistics(d) for d in sorted(set(INPUTS))}

    records = []
    adamw = torch.optim.AdamW(params, lr=1e-4, fused=True)
    adamw_bytes = 4 * 4 * n_params  # read p, g, m, v; write p, m, v (~4 fp32 streams both ways)
    base = common.run_case(op="folora_step", provider="torch-adamw-fused", shape=shape, dtype=torch.float32,
                           mode="step", make=lambda: adamw.step, floor_ms=floors.bandwidth_ms(adamw_bytes),
                           meta=meta)
    records.append(base)
    print(common.format_table([base]).splitlines()[-1], flush=True)
    adamw = None  # free its state before the FoLoRA runs

    wanted = args.providers.split(",") if args.providers else None
    for basis in ("dense", args.k):
        k = None if basis == "dense" else basis
        proj_bytes = sum(4 * (2 * A.shape[1] ** 2 if k is None else 2 * k * A.shape[1]) for A, _ in pairs)
        floor = (base.median_ms or 0.0) + floors.bandwidth_ms(proj_bytes)
        mem_note = f"model optimizer extra {model_memory(args.blocks, k) / 2**30:.2f} GiB"
        opt = None
        for backend in ("triton", "reference"):
            name = f"forgetkern-{'dense' if k is None else f'lowrank{k}'}-{backend}"
            if wanted and name not in wanted:
                continue
            try:
                if opt is None:
                    opt = build_folora(pairs, stats, basis=basis)
                opt.backend = backend
                rec = common.run_case(op="folora_step", provider=name, shape=shape, dtype=torch.float32,
                                      mode="step", make=lambda: opt.step, floor_ms=floor, meta=meta)
            except torch.cuda.OutOfMemoryError:
                rec = common.Record(op="folora_step", provider=name, gpu=meta["gpu"], shape=shape,
                                    dtype="float32", mode="step", median_ms=None, p20_ms=None, p80_ms=None,
                                    peak_mem_bytes=None, floor_ms=floor, torch=meta["torch"],
                                    triton=meta["triton"], commit=meta["commit"], note="out of memory")
            notes = [rec.note] if rec.note else []
            if rec.median_ms:
                notes.append(f"{rec.median_ms / floor:.2f}x of AdamW+projection floor")
            notes.append(mem_note)
            rec.note = "; ".join(notes)
            records.append(rec)
            print(common.format_table([rec]).splitlines()[-1], flush=True)
        if opt is not None:
            refresh_ms, _, _ = common.time_ms(lambda: opt.refresh(force=True), warmup=2, rep=10)
            print(f"  {len(pairs)} pair refreshes (one batched eigensolve): {refresh_ms:.2f} ms")
        opt = None
        torch.cuda.empty_cache()
    return common.finish(records, args.out)


if __name__ == "__main__":
    main()
