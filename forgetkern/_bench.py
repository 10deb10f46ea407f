"""``forgetkern bench``: runs the benchmark suite of a source checkout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OPS = ("tmkl", "linear_tmkl", "geneigh", "folora_step")


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite (GPU), or CPU micro-benchmarks")
    p.add_argument("--op", choices=OPS, default=None, help="one op (default: all)")
    p.add_argument("--quick", action="store_true", help="one representative shape per op")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    bench = benchmarks_dir()
    if not bench.is_dir():
        print(f"the benchmark suite ships with the source checkout; {bench} does not exist",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("No CUDA GPU: GPU results need a GPU. Running CPU micro-benchmarks of the reference "
              "paths instead (pytest-benchmark).")
        cmd = [sys.executable, "-m", "pytest", str(bench / "cpu_micro.py"), "--benchmark-only",
               "-q", "-p", "no:cacheprovider"]
        if args.op:
            cmd += ["-k", {"geneigh": "generalized_eigh"}.get(args.op, args.op)]
        return subprocess.call(cmd)
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
