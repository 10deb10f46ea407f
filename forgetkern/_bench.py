"""``forgetkern bench``: runs the benchmark suite of a source checkout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ._args import writable_dir

OPS = ("tmkl", "linear_tmkl", "generalized_eigh", "folora_step")


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite (GPU), or CPU micro-benchmarks")
    p.add_argument("--op", choices=OPS, default=None, help="one op (default: all)")
    p.add_argument("--quick", action="store_true", help="one representative shape per op")
    p.add_argument("--out", type=writable_dir, default=None,
                   help="output folder, existing and writable or creatable "
                        "(default benchmarks/results)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    bench = benchmarks_dir()
    if not bench.is_dir():
        print(f"the benchmark suite ships with the source checkout; {bench} does not exist",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        return run_cpu(bench, args)
    status = 0
    for op in [args.op] if args.op else OPS:
        script = bench / f"bench_{op}.py"
        if not script.exists():
            print(f"skipping {op}: {script.name} not found")
            continue
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        cmd += ["--out", args.out] if args.out else []
        print(f"$ {' '.join(cmd)}", flush=True)
        status = subprocess.call(cmd) or status
    return status


# pytest -k expressions of the CPU micro-benchmarks of each op ("tmkl" alone would also match
# "linear_tmkl")
CPU_SELECT = {"tmkl": "tmkl and not linear", "linear_tmkl": "linear_tmkl",
              "generalized_eigh": "generalized_eigh", "folora_step": "folora"}


def run_cpu(bench: Path, args) -> int:
    """Without a GPU: the CPU ratios the reference path promises (speed against plain torch for
    ``tmkl``, peak memory against the materialized paths for ``linear_tmkl``), then the CPU
    micro-benchmarks (pytest-benchmark)."""
    print("No CUDA GPU: GPU results need a GPU. Running the CPU benchmarks of the reference paths.")
    quick = ["--quick"] if args.quick else []
    status = 0
    steps = []
    if args.op in (None, "tmkl"):
        steps.append([sys.executable, str(bench / "cpu_tmkl_speed.py"), *quick])
    if args.op in (None, "linear_tmkl"):
        steps.append([sys.executable, str(bench / "cpu_linear_tmkl_memory.py"),
                      "--repeats", "1" if args.quick else "3"])
    cmd = [sys.executable, "-m", "pytest", str(bench / "cpu_micro.py"), "--benchmark-only", "-q",
           "-p", "no:cacheprovider"]
    if args.op:
        cmd += ["-k", CPU_SELECT[args.op]]
    steps.append(cmd)
    for step in steps:
        print(f"$ {' '.join(step)}", flush=True)
        status = subprocess.call(step) or status
    return status
