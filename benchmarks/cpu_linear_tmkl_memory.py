"""CPU memory benchmark: peak memory growth of fused-linear loss + backward, chunked vs
materialized, for TMKL (exact base) and for CE alone.

Shape: N=2048 tokens, D=256, V=50000, float32 (the head shared by both models, as in LoRA).
Variants, each run in its own fresh subprocess:

* ``chunked``: ``forgetkern.linear_tmkl_loss(..., backend="reference")`` (the chunked driver:
  logits never materialized), with the default budget;
* ``chunked-budget``: the same with ``memory_budget=--budget`` (64 MiB by default);
* ``materialized``: what a user writes in plain torch: ``logits = hidden @ W.T`` and the base
  logits, then cross-entropy plus the target-masked KL with autograd;
* ``materialized-forgetkern``: the same two logits tensors, then ``forgetkern.tmkl_loss`` (which
  streams the vocabulary but still needs the logits, their gradient and the base logits);
* CE alone: ``ce-chunked`` (``kl_weight=0``, default budget), ``ce-chunked-budget``,
  ``ce-materialized`` (``F.cross_entropy`` on ``hidden @ W.T``) and ``ce-torch-linear-ce``
  (torch's own ``F.linear_cross_entropy`` with its chunked ``LinearCrossEntropyOptions()``).

How peak memory is measured, and why: torch's CPU tensors are allocated with the C allocator, so
``tracemalloc`` (which sees only Python's allocator) misses them, and torch has no peak-memory
counter for the default CPU allocator. The operating system does see every page: each variant
runs in a fresh subprocess, which builds its inputs, does one small warm-up call (thread pools,
lazily loaded code), then resets the kernel's resident-set high-water mark (``VmHWM``, by writing
``5`` to ``/proc/self/clear_refs``), reads the current resident set, runs loss + backward once and
reads the high-water mark again. The difference is the peak memory growth of that step, gradients
included. Where ``clear_refs`` is not writable the script falls back to ``ru_maxrss`` (peak since
process start) minus the resident set before the step, and says so; that can only under-report
growth if an earlier transient peak exceeded the step's, which the warm-up on a tiny shape avoids.
Freed large blocks go back to the OS (glibc serves blocks above its mmap threshold with ``mmap``),
so resident memory tracks live tensors closely; freed blocks below that threshold may stay
resident in glibc's per-thread arenas, which over-states the growth by a varying amount. Each
variant therefore runs ``--repeats`` times (fresh processes); the median and the maximum are
reported.

The budget covers the chunk's working set (logits and gradient buffers, the per-chunk kernels'
temporaries); the outputs are on top of it: the ``N x D`` hidden-state gradient (2 MiB here) and
per-row results. ``within budget`` compares the maximum growth with budget + outputs.

    python benchmarks/cpu_linear_tmkl_memory.py [--train-weight] [--threads 2] [--budget MiB]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys

N, D, V = 2048, 256, 50000
VARIANTS = ("chunked", "chunked-budget", "materialized", "materialized-forgetkern",
            "ce-chunked", "ce-chunked-budget", "ce-materialized", "ce-torch-linear-ce")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _step(variant, h, w, hb, y, budget):
    import common  # benchmarks/common.py: this script runs from its own folder
    import torch
    import forgetkern

    F = torch.nn.functional
    opts = {"memory_budget": budget} if variant.endswith("-budget") else {}
    if variant in ("chunked", "chunked-budget"):
        loss = forgetkern.linear_tmkl_loss(h, w, hb, y, backend="reference", **opts)
    elif variant in ("ce-chunked", "ce-chunked-budget"):
        loss = forgetkern.linear_tmkl_loss(h, w, hb, y, backend="reference", kl_weight=0.0, **opts)
    elif variant == "ce-materialized":
        loss = F.cross_entropy(h @ w.T, y)
    elif variant == "ce-torch-linear-ce":
        loss = F.linear_cross_entropy(h, w, y, options=torch.nn.LinearCrossEntropyOptions())
    else:
        z = h @ w.T
        b = (hb @ w.T).detach()
        if variant == "materialized":
            loss = common.torch_tmkl(z, b, y)
        else:
            loss = forgetkern.tmkl_loss(z, b, y, backend="reference")
    loss.backward()
    return loss.item()


def child(variant: str, train_weight: bool, threads: int, budget: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)

    def inputs(n, d, v):
        h = torch.randn(n, d, generator=gen).requires_grad_()
        hb = torch.randn(n, d, generator=gen)
        w = (torch.randn(v, d, generator=gen) / d**0.5).requires_grad_(train_weight)
        y = torch.randint(0, v, (n,), generator=gen)
        y[::17] = -100
        return h, w, hb, y

    _step(variant, *inputs(64, D, 1000), budget)  # warm-up on a tiny shape
    h, w, hb, y = inputs(N, D, V)
    gc.collect()
    exact = _reset_hwm()
    before = _rss_bytes()
    loss = _step(variant, h, w, hb, y, budget)
    peak = _hwm_bytes() if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "growth_bytes": peak - before, "loss": loss,
            "method": "VmHWM after clear_refs" if exact else "ru_maxrss (fallback)"}


def environment(threads: int) -> str:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    return (f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs "
            f"({platform.processor() or platform.machine()}), {threads} torch threads, "
            f"commit {commit or '?'}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-weight", action="store_true", help="the head also gets a gradient")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per variant")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant")
    p.add_argument("--budget", type=float, default=64.0, help="memory_budget of the -budget "
                   "variants, MiB")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    budget = int(args.budget * 2**20)
    if args.child:
        print(json.dumps(child(args.child, args.train_weight, args.threads, budget)))
        return {}
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    variants = [v for v in args.variants.split(",") if v]
    print("$ python " + " ".join([os.path.relpath(__file__, root)] + (argv or sys.argv[1:])))
    print(environment(args.threads))
    results = {}
    for variant in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant,
               "--threads", str(args.threads), "--budget", str(args.budget)]
        cmd += ["--train-weight"] if args.train_weight else []
        runs = []
        for _ in range(max(1, args.repeats)):
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        growth = sorted(r["growth_bytes"] for r in runs)
        results[variant] = {**runs[0], "median": growth[len(growth) // 2], "max": growth[-1]}
    head = "trained" if args.train_weight else "frozen"
    method = next(iter(results.values()))["method"]
    print(f"fused-linear loss+backward, CPU, N={N} D={D} V={V} float32, head {head}; peak memory "
          f"growth over {args.repeats} fresh processes ({method}):")
    for variant in variants:
        r = results[variant]
        print(f"  {variant:<24} median {r['median'] / 2**20:8.1f} MiB   max {r['max'] / 2**20:8.1f} MiB"
              f"   (loss {r['loss']:.6f})")
    outputs = N * D * 4 + (V * D * 4 if args.train_weight else 0)
    for variant in variants:
        if variant.endswith("-budget"):
            limit = budget + outputs
            ok = results[variant]["max"] <= limit
            print(f"  {variant}: max {results[variant]['max'] / 2**20:.1f} MiB vs budget "
                  f"{args.budget:g} MiB + outputs {outputs / 2**20:.1f} MiB: "
                  f"{'within budget' if ok else 'OVER BUDGET'}")
    for ours, theirs in (("chunked", "materialized"), ("chunked", "materialized-forgetkern"),
                         ("ce-chunked", "ce-materialized"), ("ce-chunked", "ce-torch-linear-ce")):
        if ours in results and theirs in results:
            ratio = results[ours]["max"] / max(1, results[theirs]["median"])
            print(f"  {ours} (max) / {theirs} (median): {100 * ratio:6.1f}%")
    return results


if __name__ == "__main__":
    main()
