"""CPU speed of the chunked fused-linear loss against plain PyTorch on materialized logits and
against torch's own ``F.linear_cross_entropy``.

Shape: N=2048 tokens, D=256, V=50000, float32, head frozen (LoRA) and shared by both models. Loss +
backward, median wall time of ``--repeats`` timed calls after one warm-up, the providers timed
alternately in one process on the same tensors:

* TMKL (exact base): ``forgetkern.linear_tmkl_loss(..., backend="reference")`` (the chunked
  driver, default budget, and with ``memory_budget=--budget``) against plain torch:
  ``hidden @ W.T`` and the base logits, then CE plus the target-masked KL with autograd
  (``common.torch_tmkl``);
* CE alone: ``linear_tmkl_loss(..., kl_weight=0)`` against plain ``F.cross_entropy(hidden @ W.T)``
  and ``F.linear_cross_entropy(hidden, W, y, options=LinearCrossEntropyOptions())`` (torch's
  chunked implementation, its automatic chunking).

The ratio printed is plain torch's time over each provider's (``>= 1``: at least as fast).

    python benchmarks/cpu_linear_tmkl_speed.py [--threads 2] [--repeats 5] [--json PATH]
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
from cpu_linear_tmkl_memory import D, N, V, environment  # noqa: E402

F = torch.nn.functional


def _inputs(n, d, v):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen).requires_grad_()
    hb = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) / d**0.5
    y = torch.randint(0, v, (n,), generator=gen)
    y[::17] = -100
    return h, w, hb, y


def providers(h, w, hb, y, budget: int) -> dict:
    """mode -> {provider: loss function}; the first provider of a mode is the baseline."""
    def chunked(**kw):
        return lambda: forgetkern.linear_tmkl_loss(h, w, hb, y, backend="reference", **kw)

    return {
        "tmkl": {
            "torch-materialized": lambda: torch_tmkl(h @ w.T, (hb @ w.T).detach(), y),
            "forgetkern-chunked": chunked(),
            "forgetkern-chunked-budget": chunked(memory_budget=budget),
        },
        "ce": {
            "torch-materialized": lambda: F.cross_entropy(h @ w.T, y),
            "torch-linear-cross-entropy": lambda: F.linear_cross_entropy(
                h, w, y, options=torch.nn.LinearCrossEntropyOptions()),
            "forgetkern-chunked": chunked(kl_weight=0.0),
            "forgetkern-chunked-budget": chunked(kl_weight=0.0, memory_budget=budget),
        },
    }


def measure(fns: dict, h, repeats: int) -> dict:
    def run(fn):
        h.grad = None
        loss = fn()
        loss.backward()
        return loss.item()

    losses = {name: run(fn) for name, fn in fns.items()}  # warm-up (thread pools, allocator)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            run(fn)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_ms": 1e3 * statistics.median(t), "loss": losses[name]}
            for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=64.0, help="memory_budget of the -budget "
                   "providers, MiB")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("$ python " + " ".join([os.path.relpath(__file__, root)] + (argv or sys.argv[1:])))
    print(environment(args.threads))
    h, w, hb, y = _inputs(N, D, V)
    results = {}
    print(f"fused-linear loss+backward, CPU, N={N} D={D} V={V} float32, head frozen; median of "
          f"{args.repeats} (ratio: baseline time / provider time):")
    for mode, fns in providers(h, w, hb, y, int(args.budget * 2**20)).items():
        res = results[mode] = measure(fns, h, args.repeats)
        base = next(iter(fns))
        for name, r in res.items():
            ratio = res[base]["median_ms"] / r["median_ms"]
            print(f"  {mode:<4} {name:<28} {r['median_ms']:9.1f} ms   {ratio:5.2f}x   "
                  f"(loss {r['loss']:.6f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "N": N, "D": D, "V": V,
                       "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
