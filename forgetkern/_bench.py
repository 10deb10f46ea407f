"""``forgetkern bench``: runs the benchmark suite of a source checkout.

On a GPU, ``benchmarks/suite.py`` (every benchmark, or ``--op``'s), its results under ``--out``.
Without one, the CPU benchmarks of the reference paths (``tmkl_loss`` speed against plain torch,
``linear_tmkl_loss`` peak memory against the materialized paths, pytest-benchmark
micro-benchmarks), each one's output under ``--out`` when given; ``--dry`` runs the GPU suite's
dry mode on the CPU instead (tiny shapes: it checks the suite, it times nothing).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ._args import writable_dir

#: the benchmarks of ``benchmarks/suite.py`` (its ``BENCHES``)
OPS = ("linear_tmkl", "tmkl", "generalized_eigh", "train_step", "folora_step")
# pytest -k expressions of the CPU micro-benchmarks of each op ("tmkl" alone would also match
# "linear_tmkl"); train_step has no CPU benchmark here (benchmarks/cpu_base_cache.py times the
# real model's step, with the real extra)
CPU_SELECT = {"tmkl": "tmkl and not linear", "linear_tmkl": "linear_tmkl",
              "generalized_eigh": "generalized_eigh", "folora_step": "folora"}


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite (GPU), or CPU benchmarks")
    p.add_argument("--op", choices=OPS, default=None, help="one benchmark (default: all)")
    p.add_argument("--quick", action="store_true", help="one representative shape per benchmark")
    p.add_argument("--out", type=writable_dir, default=None,
                   help="output folder, existing and writable or creatable "
                        "(default benchmarks/results/<device>)")
    p.add_argument("--dry", action="store_true",
                   help="the GPU suite's dry mode on the CPU: tiny shapes, no meaningful timings")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    bench = benchmarks_dir()
    if not bench.is_dir():
        print(f"the benchmark suite ships with the source checkout; {bench} does not exist",
              file=sys.stderr)
        return 2
    if not (args.dry or torch.cuda.is_available()):
        return run_cpu(bench, args)
    cmd = [sys.executable, str(bench / "suite.py")] + (["--dry"] if args.dry else [])
    cmd += ["--only", args.op] if args.op else []
    cmd += ["--quick"] if args.quick else []
    cmd += ["--out", args.out] if args.out else []
    return call(cmd)


def call(cmd: list[str], log: Path | None = None) -> int:
    """Run ``cmd``, its output to the console and, with ``log``, to that file too."""
    print(f"$ {' '.join(cmd)}", flush=True)
    if log is None:
        return subprocess.call(cmd)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            fh.write(line)
        return proc.wait()


def run_cpu(bench: Path, args) -> int:
    """Without a GPU: the CPU ratios the reference path promises (speed against plain torch for
    ``tmkl``, peak memory against the materialized paths for ``linear_tmkl``), then the CPU
    micro-benchmarks (pytest-benchmark); with ``--out``, each one's output (and JSON where the
    script writes one) in that folder."""
    if args.op is not None and args.op not in CPU_SELECT:
        print(f"forgetkern bench: {args.op} has no CPU benchmark; `forgetkern bench --dry --op {args.op}` "
              "runs its GPU benchmark's dry mode", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    print("No CUDA GPU: GPU results need a GPU. Running the CPU benchmarks of the reference paths.")
    quick = ["--quick"] if args.quick else []
    steps = []
    if args.op in (None, "tmkl"):
        steps.append(("cpu_tmkl_speed", [sys.executable, str(bench / "cpu_tmkl_speed.py"), *quick]
                      + (["--json", str(out / "cpu_tmkl_speed.json")] if out else [])))
    if args.op in (None, "linear_tmkl"):
        steps.append(("cpu_linear_tmkl_memory", [sys.executable, str(bench / "cpu_linear_tmkl_memory.py"),
                                                 "--repeats", "1" if args.quick else "3"]))
    cmd = [sys.executable, "-m", "pytest", str(bench / "cpu_micro.py"), "--benchmark-only", "-q",
           "-p", "no:cacheprovider"]
    if args.op:
        cmd += ["-k", CPU_SELECT[args.op]]
    if out:
        cmd += ["--benchmark-json", str(out / "cpu_micro.json")]
    steps.append(("cpu_micro", cmd))
    status = 0
    for name, step in steps:
        status = call(step, out / f"{name}.log" if out else None) or status
    if out:
        print(f"outputs in {out}")
    return status
