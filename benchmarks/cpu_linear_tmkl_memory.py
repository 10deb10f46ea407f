"""CPU memory benchmark: peak memory growth of fused-linear TMKL loss + backward, chunked vs
materialized.

Shape: N=2048 tokens, D=256, V=50000, float32 (the head shared by both models, as in LoRA).
Variants, each run in its own fresh subprocess:

* ``chunked``: ``forgetkern.linear_tmkl_loss(..., backend="reference")`` (rows in chunks, logits
  never materialized);
* ``materialized``: what a user writes in plain torch: ``logits = hidden @ W.T`` and the base
  logits, then cross-entropy plus the target-masked KL with autograd;
* ``materialized-forgetkern``: the same two logits tensors, then ``forgetkern.tmkl_loss`` (which
  streams the vocabulary but still needs the logits, their gradient and the base logits).

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
reported, and the ratio uses the chunked maximum against the materialized median.

    python benchmarks/cpu_linear_tmkl_memory.py [--train-weight] [--threads 2]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys

N, D, V = 2048, 256, 50000
VARIANTS = ("chunked", "materialized", "materialized-forgetkern")


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


def _step(variant, h, w, hb, y):
    import common  # benchmarks/common.py: this script runs from its own folder
    import forgetkern

    if variant == "chunked":
        loss = forgetkern.linear_tmkl_loss(h, w, hb, y, backend="reference")
    else:
        z = h @ w.T
        b = (hb @ w.T).detach()
        if variant == "materialized":
            loss = common.torch_tmkl(z, b, y)
        else:
            loss = forgetkern.tmkl_loss(z, b, y, backend="reference")
    loss.backward()
    return loss.item()


def child(variant: str, train_weight: bool, threads: int) -> dict:
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

    _step(variant, *inputs(64, D, 1000))  # warm-up on a tiny shape
    h, w, hb, y = inputs(N, D, V)
    gc.collect()
    exact = _reset_hwm()
    before = _rss_bytes()
    loss = _step(variant, h, w, hb, y)
    peak = _hwm_bytes() if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "growth_bytes": peak - before, "loss": loss,
            "method": "VmHWM after clear_refs" if exact else "ru_maxrss (fallback)"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-weight", action="store_true", help="the head also gets a gradient")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per variant")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.train_weight, args.threads)))
        return {}
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant,
               "--threads", str(args.threads)] + (["--train-weight"] if args.train_weight else [])
        runs = []
        for _ in range(max(1, args.repeats)):
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        growth = sorted(r["growth_bytes"] for r in runs)
        results[variant] = {**runs[0], "median": growth[len(growth) // 2], "max": growth[-1]}
    head = "trained" if args.train_weight else "frozen"
    print(f"fused-linear TMKL loss+backward, CPU, N={N} D={D} V={V} float32, head {head}; "
          f"peak memory growth over {args.repeats} fresh processes ({results['chunked']['method']}):")
    for variant in VARIANTS:
        r = results[variant]
        print(f"  {variant:<24} median {r['median'] / 2**20:8.1f} MiB   max {r['max'] / 2**20:8.1f} MiB"
              f"   (loss {r['loss']:.6f})")
    chunked = results["chunked"]["max"]
    for variant in VARIANTS[1:]:
        ratio = chunked / results[variant]["median"]
        print(f"  chunked (max) / {variant:<24} (median) {100 * ratio:6.1f}%  (target <= 10%)")
    return results


if __name__ == "__main__":
    main()
