"""The benchmark suite: the benchmarks ``--only`` names (default: all), in one process that
measures the two rates once and appends every record to one results folder.

    python benchmarks/suite.py --quick --out DIR        # GPU: the headline shape of each benchmark
    python benchmarks/suite.py --dry --out DIR          # CPU: tiny shapes, host-clock times (marked)
    python benchmarks/suite.py --summary DIR            # the table of DIR's results

Benchmarks: ``linear_tmkl`` (bench_linear_tmkl.py), ``tmkl`` (bench_tmkl.py), ``generalized_eigh``,
``train_step``, ``folora_step``. Results: ``DIR/results.jsonl`` and ``DIR/results.csv``, a record
appended after each case; ``--profile`` appends one profiled iteration per case to
``DIR/profile.txt``; the rates go to ``DIR/rates.json`` (``--reuse-rates`` reads them back, for a
run split over several processes). The time budget (``--deadline`` or ``--budget-s``) stops the
suite before it: a case that would not finish is recorded as skipped. ``--phase main`` runs the
providers of the main phase, ``--phase late`` those left for the end (``torch.compile``, extra
variants), ``--extension skip|only`` leaves out, or runs only, the providers that need the CUDA
extension (built in the background by ``gpu_suite.sh`` meanwhile).

The dry mode (``--dry``) runs every step on CPU tensors at tiny shapes: the gate, the floors
(from the H200 figures in ``floors.py``), the timing loop (host clock, 1 warm-up and 3 timed
iterations) and the writer; each record carries ``dry: true``. It checks the plumbing and says
nothing about speed. Exit status 1 when a forgetkern provider failed or computed a wrong result.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import floors  # noqa: E402

BENCHES = {"linear_tmkl": "bench_linear_tmkl", "tmkl": "bench_tmkl",
           "generalized_eigh": "bench_generalized_eigh", "train_step": "bench_train_step",
           "folora_step": "bench_folora_step"}
PHASES = ("main", "late", "all")
EXTENSION = ("all", "skip", "only")
DRY_WARMUP, DRY_REPS = 1, 3


def _list(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, bad))}; expected some of {', '.join(choices)}")
        return items
    return parse


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    import bench_linear_tmkl as lin

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", type=_list(tuple(BENCHES)), default=list(BENCHES),
                   help=f"benchmarks to run (default all: {','.join(BENCHES)})")
    p.add_argument("--dry", action="store_true", help="CPU dry run: tiny shapes, fake (host-clock) timings")
    p.add_argument("--quick", action="store_true", help="the headline shape of each benchmark only")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--summary", metavar="DIR", default=None, help="print the table of DIR's results and exit")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--deadline", type=_positive(float), default=None,
                      help="Unix time after which no case starts")
    when.add_argument("--budget-s", type=_positive(float), default=None, help="seconds from now to that point")
    p.add_argument("--phase", choices=PHASES, default="all", help="main, late (compile, extras) or all")
    p.add_argument("--extension", choices=EXTENSION, default="all",
                   help="providers needing the CUDA extension: all (default), skip them, or only them")
    p.add_argument("--providers", type=_list(None), default=None, help="only these providers (names)")
    p.add_argument("--profile", action="store_true", help="one profiled iteration per case (profile.txt)")
    p.add_argument("--reuse-rates", action="store_true", help="use OUT/rates.json when present")
    p.add_argument("--no-table", action="store_true", help="no summary table at the end (--summary prints it)")
    p.add_argument("--warmup", type=_positive(int), default=None, help=f"warm-up calls (>= {common.MIN_WARMUP})")
    p.add_argument("--reps", type=_positive(int), default=None, help=f"timed calls (>= {common.MIN_REPS})")
    g = p.add_argument_group("linear_tmkl")
    g.add_argument("--works", type=_list(lin.WORKS), default=list(lin.WORKS), help="fused-linear works")
    g.add_argument("--inputs", type=_list(lin.INPUTS), default=["synthetic"],
                   help="synthetic and/or smollm2 (real hidden states and head, smollm2_inputs.py)")
    g.add_argument("--inputs-file", default=str(lin.smollm2_inputs.DEFAULT_PATH),
                   help="the smollm2 inputs file")
    g.add_argument("--train-weight", action="store_true", help="the head gets a gradient too")
    g.add_argument("--passes", choices=floors.PASSES, default="full",
                   help="full (forward + backward, default) or forward")
    return p


def _rates(args, device, out: Path) -> floors.Rates:
    if args.dry:
        return floors.H200_RATES
    path = out / "rates.json"
    if args.reuse_rates and path.exists():
        d = json.loads(path.read_text())
        return floors.Rates(d["gemm_flops_per_s"], d["copy_bytes_per_s"], d["source"])
    rates = floors.measure_rates(lambda fn, device: common.measure(fn, device=device), device)
    path.write_text(json.dumps({"gemm_flops_per_s": rates.gemm_flops_per_s,
                                "copy_bytes_per_s": rates.copy_bytes_per_s, "source": rates.source}) + "\n")
    return rates


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summary:
        records = common.load_records(args.summary)
        if not records:
            print(f"no results in {args.summary}")
            return 1
        print(common.summary_table(records))
        return 0
    if args.dry:
        device = torch.device("cpu")
        warmup, reps = args.warmup or DRY_WARMUP, args.reps or DRY_REPS
    else:
        if not torch.cuda.is_available():
            parser.error("the benchmarks time GPU kernels and need a CUDA GPU; --dry runs the suite "
                         "on the CPU at tiny shapes (no timings), `forgetkern bench` the CPU benchmarks")
        device = torch.device("cuda")
        warmup, reps = args.warmup or common.MIN_WARMUP, args.reps or common.MIN_REPS
        if warmup < common.MIN_WARMUP or reps < common.MIN_REPS:
            parser.error(f"--warmup must be >= {common.MIN_WARMUP} and --reps >= {common.MIN_REPS} "
                         "(fewer only in --dry)")
    meta = common.meta(device)
    meta["command"] = "python benchmarks/suite.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out) if args.out else common.RESULTS_DIR / (
        "dry" if args.dry else common.gpu_slug(meta["gpu"]))
    out.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline or (time.time() + args.budget_s if args.budget_s else None)
    rates = _rates(args, device, out)
    ctx = common.Context(device=device, dry=args.dry, rates=rates, results=common.Results(out), meta=meta,
                         deadline=deadline, warmup=warmup, reps=reps,
                         profile=out / "profile.txt" if args.profile else None, phase=args.phase,
                         providers=tuple(args.providers) if args.providers else None,
                         extension=args.extension, options=args)
    print(f"{meta['gpu']}: {rates.describe()}; results in {out}", flush=True)
    records = []
    for name in args.only:
        if ctx.remaining_s() < common.MIN_CASE_S:
            print(f"{name}: not started, the time budget is spent")
            continue
        module = importlib.import_module(BENCHES[name])
        print(f"::: {name}", flush=True)
        records += module.run(ctx)
    if records and not args.no_table:
        print()
        print(common.summary_table([r.as_dict() for r in records]))
    bad = [r for r in records if r.provider.startswith("forgetkern") and r.status in ("wrong", "failed")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
