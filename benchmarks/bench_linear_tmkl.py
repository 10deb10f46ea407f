"""Benchmark: fused-linear TMKL, the loss straight from hidden states and the LM head.

Providers (inputs: hidden ``h (N, D)``, base hidden ``h_b (N, D)``, head ``W (V, D)`` shared by
both models as in LoRA, labels ``(N,)``):

* ``forgetkern-triton``: :func:`forgetkern.linear_tmkl_loss` with ``backend="triton"``; named
  ``forgetkern-triton-tma`` when run with ``FORGETKERN_TMA=1`` (operand tiles loaded by TMA, see
  ``launch_config``; ``benchmarks/gpu_suite.sh`` runs it too, for the A/B);
* ``forgetkern-reference``: the same with ``backend="reference"`` (rows in chunks, torch matmuls);
* ``torch-eager``: what a user writes in plain torch: both ``N x V`` logits, then CE plus the
  target-masked KL with autograd;
* ``torch-compile``: ``torch.compile`` of that function;
* ``liger-fused-linear-jsd``: Liger-Kernel's ``LigerFusedLinearJSD`` with ``jsd_beta=0`` (its
  forward KL, full vocabulary, no CE term) when importable;
* ``liger-fused-linear-ce``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (CE only: one
  model, no KL) when importable;
* ``cce-linear-cross-entropy``: Cut Cross-Entropy's ``linear_cross_entropy`` (CE only: one
  model, no KL) when importable.

Peers that are not importable are skipped with a note (``pip install liger-kernel
cut-cross-entropy``, or ``pip install --no-deps`` of their wheels).

Floor: GEMM-equivalents over the measured bf16 matmul rate, one GEMM-equivalent being
``2·N·D·V`` flops. Forward: 2 (adapted and base logits). Backward: 3 (both logits recomputed, then
``dh = dz W``), plus 1 when the head is trained (``dW = dzᵀ h``). Full: 5 (+1).

Targets (issue, H200, N=8192 D=4096 V=128256 bf16, head frozen, full): ``forgetkern-triton``
≤ 68 ms, peak memory ≤ 1.1x ``cce-linear-cross-entropy``'s, faster than ``liger-fused-linear-jsd``.
The script prints a check of each after the table.

Note on ``--modes backward``: the graph is retained and backward called repeatedly; the reference
backend precomputes its gradients during the forward and hands them over once, so its repeated
backward recomputes (its ``full`` mode is the meaningful number).

    python benchmarks/bench_linear_tmkl.py [--quick] [--train-weight] [--out DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import forgetkern  # noqa: E402
from forgetkern._params import ENV_TMA, env_flag  # noqa: E402

# (N, D, V): Llama-3-8B-like head first, then a 32k vocabulary and a longer batch
SHAPES = [(8192, 4096, 128256), (4096, 4096, 128256), (16384, 4096, 128256), (8192, 4096, 32000)]
QUICK = [(8192, 4096, 128256)]
TARGET_SHAPE = (8192, 4096, 128256)
TARGET_MS = 68.0
TARGET_MEM_VS_CCE = 1.1


def torch_linear_tmkl(h, w, hb, y, ignore_index=-100):
    """Plain torch, fully materialized: both logits, CE + target-masked forward KL (mean)."""
    return common.torch_tmkl(h @ w.T, hb @ w.detach().T, y, ignore_index)


TRITON_NAME = "forgetkern-triton-tma" if env_flag(ENV_TMA) else "forgetkern-triton"


def providers() -> dict:
    """name -> ``fn(h, w, hb, y) -> scalar loss``; peers only when importable (noted otherwise)."""
    out = {
        TRITON_NAME: lambda h, w, hb, y: forgetkern.linear_tmkl_loss(h, w, hb, y, backend="triton"),
        "forgetkern-reference": lambda h, w, hb, y: forgetkern.linear_tmkl_loss(
            h, w, hb, y, backend="reference"),
        "torch-eager": torch_linear_tmkl,
        "torch-compile": torch.compile(torch_linear_tmkl, dynamic=False),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0)  # forward KL over the full vocabulary, no CE
        out["liger-fused-linear-jsd"] = lambda h, w, hb, y: jsd(h, w, hb, w.detach(), y)
    except ImportError as exc:
        print(f"note: liger-kernel not importable ({exc}); liger-fused-linear-jsd is skipped")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()
        out["liger-fused-linear-ce"] = lambda h, w, hb, y: flce(w, h, y)
    except ImportError as exc:
        print(f"note: liger-kernel not importable ({exc}); liger-fused-linear-ce is skipped")
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cce-linear-cross-entropy"] = lambda h, w, hb, y: linear_cross_entropy(h, w, y)
    except ImportError as exc:
        print(f"note: cut-cross-entropy not importable ({exc}); cce-linear-cross-entropy is skipped")
    return out


def gemms(mode: str, train_weight: bool) -> int:
    """GEMM-equivalents (``2·N·D·V`` flops each) the op needs in ``mode``."""
    fwd, bwd = 2, 3 + int(train_weight)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def check_targets(records: list[common.Record]) -> list[str]:
    """Lines comparing ``forgetkern-triton`` at the target shape (full mode) with the targets."""
    n, d, v = TARGET_SHAPE
    at = {r.provider: r for r in records
          if r.op == "linear_tmkl" and r.mode == "full" and r.shape == {"N": n, "D": d, "V": v}}
    ours = at.get("forgetkern-triton")
    if ours is None or ours.median_ms is None:
        return ["targets: forgetkern-triton has no full-mode result at the target shape"]
    lines = [f"targets at N={n} D={d} V={v} {ours.dtype}, forward+backward:",
             f"  time {ours.median_ms:.2f} ms (target <= {TARGET_MS} ms): "
             f"{'met' if ours.median_ms <= TARGET_MS else 'NOT met'}"]
    cce = at.get("cce-linear-cross-entropy")
    if cce is not None and cce.peak_mem_bytes and ours.peak_mem_bytes is not None:
        ratio = ours.peak_mem_bytes / cce.peak_mem_bytes
        lines.append(f"  peak memory {ratio:.2f}x cce-linear-cross-entropy's (target <= "
                     f"{TARGET_MEM_VS_CCE}x): {'met' if ratio <= TARGET_MEM_VS_CCE else 'NOT met'}")
    else:
        lines.append("  peak memory vs cce-linear-cross-entropy: not measured (peer missing or failed)")
    liger = at.get("liger-fused-linear-jsd")
    if liger is not None and liger.median_ms is not None:
        lines.append(f"  vs liger-fused-linear-jsd {liger.median_ms:.2f} ms: "
                     f"{'faster (met)' if ours.median_ms < liger.median_ms else 'NOT faster'}")
    else:
        lines.append("  vs liger-fused-linear-jsd: not measured (peer missing or failed)")
    return lines


def main(argv=None) -> list[common.Record]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--train-weight", action="store_true", help="the head also gets a gradient")
    args = p.parse_args(argv)
    meta, floors, provs = common.start("bench_linear_tmkl.py", args, providers)
    modes = args.modes.split(",")
    dtype = torch.bfloat16
    # a trained head is a different op for the records (one more GEMM in backward)
    op = "linear_tmkl+dW" if args.train_weight else "linear_tmkl"
    records = []
    for n, d, v in (QUICK if args.quick else SHAPES):
        gen = torch.Generator(device="cuda").manual_seed(n + d + v)
        h = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        hb = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen)
        w = (torch.randn(v, d, device="cuda", generator=gen) * (3 / d**0.5)).to(dtype)
        w.requires_grad_(args.train_weight)
        y = torch.randint(0, v, (n,), device="cuda", generator=gen)
        y[::17] = -100
        leaves = [h, w] if args.train_weight else [h]
        for name, fn in provs.items():
            for mode in modes:
                flops = gemms(mode, args.train_weight) * 2.0 * n * d * v
                rec = common.run_case(
                    op=op, provider=name, shape={"N": n, "D": d, "V": v}, dtype=dtype,
                    mode=mode, make=lambda: common.mode_fn(mode, lambda: fn(h, w, hb, y)),
                    floor_ms=floors.compute_ms(flops), grad_to_none=leaves, meta=meta)
                for t in leaves:
                    t.grad = None
                records.append(rec)
                print(common.format_table([rec]).splitlines()[-1], flush=True)
        del h, hb, w, y
        torch.cuda.empty_cache()
    return common.finish(records, args.out, () if args.train_weight else check_targets(records))


if __name__ == "__main__":
    main()
