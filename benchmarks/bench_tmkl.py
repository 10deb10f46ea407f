"""Benchmark: TMKL loss on materialized logits (CE + target-masked KL).

Providers: forgetkern (triton, cuda when built, chunked reference), plain PyTorch eager,
``torch.compile`` of it, and Liger-Kernel's cross-entropy + KL-divergence losses (full-vocabulary
KL on log-softmaxes: the closest fused peer; it does not mask the target) when importable.

Floor: the bytes that must move (forward reads both logits; backward reads both and writes the
gradient) over the measured copy bandwidth.

    python benchmarks/bench_tmkl.py [--quick] [--out DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import forgetkern  # noqa: E402

SHAPES = [(n, v) for v in (32000, 128256, 256000) for n in (4096, 8192, 16384)]
QUICK = [(8192, 128256)]


def providers() -> dict:
    out = {
        "forgetkern-triton": lambda z, b, y: forgetkern.tmkl_loss(z, b, y, backend="triton"),
        "forgetkern-reference": lambda z, b, y: forgetkern.tmkl_loss(z, b, y, backend="reference"),
        "torch-eager": common.torch_tmkl,
        "torch-compile": torch.compile(common.torch_tmkl, dynamic=False),
    }
    if forgetkern.info()["cuda_extension_usable"]:
        out["forgetkern-cuda"] = lambda z, b, y: forgetkern.tmkl_loss(z, b, y, backend="cuda")
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

        ce, kld = LigerCrossEntropyLoss(), LigerKLDIVLoss(reduction="batchmean", log_target=True)
        out["liger-ce+kldiv (full KL)"] = lambda z, b, y: ce(z, y) + kld(
            z.log_softmax(-1), b.log_softmax(-1))
    except ImportError:
        print("note: liger-kernel not importable; its provider is skipped")
    return out


def main(argv=None) -> list[common.Record]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    meta, floors, provs = common.start("bench_tmkl.py", args, providers)
    modes = args.modes.split(",")
    dtype = torch.bfloat16
    records = []
    for n, v in (QUICK if args.quick else SHAPES):
        gen = torch.Generator(device="cuda").manual_seed(n + v)
        z = torch.randn(n, v, device="cuda", dtype=dtype, generator=gen).mul_(3).requires_grad_()
        b = torch.randn(n, v, device="cuda", dtype=dtype, generator=gen).mul_(3)
        y = torch.randint(0, v, (n,), device="cuda", generator=gen)
        y[::17] = -100
        elt = z.element_size()
        bytes_by_mode = {"forward": 2 * n * v * elt, "backward": 3 * n * v * elt, "full": 5 * n * v * elt}
        for name, fn in provs.items():
            for mode in modes:
                rec = common.run_case(
                    op="tmkl", provider=name, shape={"N": n, "V": v}, dtype=dtype, mode=mode,
                    make=lambda: common.mode_fn(mode, lambda: fn(z, b, y)),
                    floor_ms=floors.bandwidth_ms(bytes_by_mode[mode]), grad_to_none=[z], meta=meta)
                z.grad = None
                records.append(rec)
                print(common.format_table([rec]).splitlines()[-1], flush=True)
        del z, b, y
        torch.cuda.empty_cache()
    return common.finish(records, args.out)


if __name__ == "__main__":
    main()
