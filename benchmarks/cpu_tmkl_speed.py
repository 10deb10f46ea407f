"""CPU speed of the reference ``tmkl_loss`` (the CPU production path) against plain PyTorch.

Forward + backward, median wall time of ``--repeats`` timed calls after one warm-up, the two
timed alternately in one process on the same tensors: forgetkern (``backend="reference"``) and
what a user writes in plain torch on the same logits (``common.torch_tmkl``: CE plus the
target-masked forward KL through ``log_softmax``, in fp32). The ratio printed is plain torch's time
over forgetkern's (``>= 1``: forgetkern is at least as fast).

    python benchmarks/cpu_tmkl_speed.py [--quick] [--threads 2] [--repeats 5] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forgetkern  # noqa: E402
from common import torch_tmkl  # noqa: E402

SHAPES = [  # (N, V, dtype): the shapes the CPU target names
    (256, 32000, torch.float32),
    (2048, 32000, torch.float32),
    (256, 32000, torch.bfloat16),
    (1024, 128256, torch.float32),
]


def _inputs(n, v, dtype):
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(n, v, generator=gen) * 3).to(dtype).requires_grad_()
    b = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    y[::7] = -100
    return z, b, y


def measure(n, v, dtype, repeats):
    z, b, y = _inputs(n, v, dtype)

    def ours():
        z.grad = None
        forgetkern.tmkl_loss(z, b, y, backend="reference").backward()

    def plain():
        z.grad = None
        torch_tmkl(z, b, y).backward()

    times = {"forgetkern": [], "torch": []}
    ours(), plain()  # warm-up (thread pools, allocator)
    for _ in range(repeats):
        for name, fn in (("forgetkern", ours), ("torch", plain)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(t) for k, t in times.items()}
    return {"N": n, "V": v, "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
            "forgetkern_ms": 1e3 * med["forgetkern"], "torch_ms": 1e3 * med["torch"],
            "speed_ratio": med["torch"] / med["forgetkern"]}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the first shape only, 3 repeats")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    print(f"tmkl_loss forward+backward on the CPU, reference backend vs plain torch "
          f"({torch.get_num_threads()} threads, median of {repeats}):")
    results = []
    for n, v, dtype in shapes:
        r = measure(n, v, dtype, repeats)
        results.append(r)
        print(f"  N={n:<5} V={v:<6} {r['dtype']:<8}  forgetkern {r['forgetkern_ms']:8.1f} ms   "
              f"torch {r['torch_ms']:8.1f} ms   torch/forgetkern {r['speed_ratio']:.2f}x "
              f"(target >= 1.00x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
