"""The benchmarks' machinery: the one timing helper, peak memory, the results writer, the summary
table, and :func:`run_case`, which turns one provider on one problem into one record.

A case runs in this order: the correctness gate (``gate.py``: loss and gradient against an fp32
reference at the benchmark shape; a provider that fails it is recorded as ``wrong``, not timed),
peak memory of one call, the timing (:func:`measure`), one profiled iteration (``--profile``),
then its record is appended to ``results.jsonl`` and ``results.csv`` in the output folder, one
``os.write`` per line followed by ``fsync``: a run that is killed keeps every record it finished.

Timing: at least 3 warm-up and 10 timed iterations; only when one iteration takes more than a
second, 1 warm-up and 3 timed, and the record says so. On a GPU each timed iteration is bracketed
by CUDA events, with a 256 MiB buffer zeroed before it to flush the L2 cache (the scheme of
``triton.testing.do_bench``); the median, p20 and p80 are reported. A dry run (``--dry``: CPU
tensors, tiny shapes) goes through the same steps with the host clock; its records carry
``dry: true`` and its times are no GPU timings.

Record statuses: ``ok`` (gated, timed), ``wrong`` (failed the gate), ``failed`` (raised),
``oom``, ``unavailable`` (not installed, or this torch lacks it), ``skipped`` (the time budget,
or not run in the dry mode).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch

import floors
from gate import torch_tmkl  # noqa: F401  (the plain-torch baseline, used by the CPU scripts)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: what a slow iteration is: above it, 1 warm-up and 3 timed iterations
SLOW_ITERATION_S = 1.0
MIN_WARMUP, MIN_REPS = 3, 10
SLOW_WARMUP, SLOW_REPS = 1, 3
L2_FLUSH_BYTES = 256 * 2**20
#: seconds a case needs at least before the deadline to be started
MIN_CASE_S = 5.0
STATUSES = ("ok", "wrong", "failed", "oom", "unavailable", "skipped")


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def gpu_slug(name: str) -> str:
    """``name`` as a folder name: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "device"


def commit() -> str:
    """``FORGETKERN_COMMIT`` when set (a copy of the tree without ``.git``), else ``git``'s."""
    env = os.environ.get("FORGETKERN_COMMIT")
    if env:
        return env
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def meta(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"gpu": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": commit()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------
class OutOfTime(Exception):
    """A case that would not finish before the deadline."""


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    warmup: int
    reps: int
    method: str
    note: str = ""


_FLUSH: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


def measure(fn: Callable[[], Any], *, device, warmup: int = MIN_WARMUP, reps: int = MIN_REPS,
            grad_to_none=(), budget_s: float | None = None, slow_policy: bool = True) -> Timing:
    """Median, p20 and p80 milliseconds of ``fn`` (module docstring). ``grad_to_none``: tensors
    whose ``.grad`` is cleared before each call, outside the timed region. ``budget_s``: raise
    :class:`OutOfTime` when the first call says the rest would not fit in it. ``slow_policy=False``
    keeps the counts however long a call takes."""
    device = torch.device(device)
    for name, value in (("warmup", warmup), ("reps", reps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    def clear():
        for t in grad_to_none:
            t.grad = None

    clear()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    note = ""
    if slow_policy and first > SLOW_ITERATION_S:
        warmup, reps = SLOW_WARMUP, min(reps, SLOW_REPS)
        note = f"one iteration took {first:.2f} s (> {SLOW_ITERATION_S:.0f} s): {warmup} warm-up, {reps} timed"
    if budget_s is not None and first * (warmup - 1 + reps) > budget_s:
        raise OutOfTime(f"one iteration took {first:.2f} s; {warmup - 1 + reps} more do not fit "
                        f"in the {budget_s:.0f} s left")
    for _ in range(warmup - 1):
        clear()
        fn()
    times = []
    if device.type == "cuda":
        flush = _l2_flush_buffer(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for begin, end in events:
            clear()
            flush.zero_()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [b.elapsed_time(e) for b, e in events]
        method = f"CUDA events, L2 flushed ({L2_FLUSH_BYTES >> 20} MiB zeroed) before each"
    else:
        for _ in range(reps):
            clear()
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        method = "host clock"
    clear()
    q = torch.quantile(torch.tensor(times, dtype=torch.float64),
                       torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return Timing(q[0], q[1], q[2], warmup, reps, method, note)


def peak_memory_bytes(fn: Callable[[], Any], device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it (CUDA);
    ``None`` on the CPU, where torch keeps no such counter."""
    device = torch.device(device)
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def profile_once(fn: Callable[[], Any], device, path: Path, title: str, rows: int = 12) -> None:
    """One call of ``fn`` under ``torch.profiler``; its per-kernel table (by self device time on
    a GPU, self CPU time otherwise) is appended to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    with open(path, "a") as fh:
        fh.write(f"=== {title}\n{table}\n")


# ---------------------------------------------------------------------------------------------
# records: appended one by one, read back, summarized
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Record:
    bench: str  # the benchmark: linear_tmkl, tmkl, generalized_eigh, train_step, folora_step
    work: str  # what the provider computes; its floor is this work's (floors.py)
    passes: str  # forward, full (forward + backward), step
    provider: str
    strategy: str | None  # forgetkern's fused-linear strategy, when it has one
    inputs: str  # where the inputs come from (synthetic, or a real model's)
    shape: dict
    dtype: str
    status: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    warmup: int | None
    reps: int | None
    timing: str  # how the time was taken
    peak_mem_bytes: int | None
    floor_ms: float
    floor_1pass_ms: float | None
    ratio: float | None  # median / floor
    predicted_ms: float | None
    model: str  # how the floor (and the prediction) were counted
    gate: str
    tokens_per_s: float | None
    note: str
    gpu: str
    torch: str
    triton: str | None
    commit: str
    dry: bool
    rates: str
    command: str  # the command line that reproduces the record
    time_utc: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = [f.name for f in dataclasses.fields(Record)]


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _append(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class Results:
    """``results.jsonl`` (one record per line) and ``results.csv`` in ``out_dir``, appended to
    after each record."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "results.jsonl"
        self.csv = self.dir / "results.csv"

    def append(self, rec: Record) -> None:
        if rec.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {rec.status!r}")
        _append(self.jsonl, json.dumps(rec.as_dict()) + "\n")
        buf = io.StringIO()
        w = csv.writer(buf)
        if not self.csv.exists() or self.csv.stat().st_size == 0:
            w.writerow(FIELDS)
        row = rec.as_dict()
        row["shape"] = shape_str(rec.shape)
        w.writerow(["" if row[f] is None else row[f] for f in FIELDS])
        _append(self.csv, buf.getvalue())


def load_records(out_dir) -> list[dict]:
    """The records of ``out_dir/results.jsonl``; a last line cut by a kill is left out."""
    path = Path(out_dir) / "results.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


SHORT_STATUS = {"ok": "ok", "wrong": "WRONG", "failed": "FAILED", "oom": "oom", "unavailable": "n/a",
                "skipped": "skip"}
NOTE_WIDTH = 70


def summary_table(records: list[dict]) -> str:
    """One fixed-width table, a row per record (notes cut to a line; the files hold them whole)."""
    head = (f"{'bench':<16} {'work':<14} {'provider':<32} {'shape':<26} {'status':<6} {'median ms':>9} "
            f"{'p20-p80 ms':>15} {'x floor':>7} {'floor ms':>8} {'pred ms':>8} {'MiB':>6}  note")
    lines = [head, "-" * len(head)]
    for r in records:
        spread = "-" if r["p20_ms"] is None else f"{r['p20_ms']:.3g}-{r['p80_ms']:.3g}"
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
        name = r["provider"] + (f" [{r['strategy']}]" if r.get("strategy") else "")
        tag = r["inputs"].split(":")[0]
        shape = shape_str(r["shape"]) + ("" if tag == "synthetic" else f" ({tag})")
        note = r["note"] or (r["gate"] if r["status"] == "wrong" else "")
        if r.get("tokens_per_s"):
            note = f"{r['tokens_per_s']:.0f} tok/s" + (f"; {note}" if note else "")
        if len(note) > NOTE_WIDTH:
            note = note[:NOTE_WIDTH - 3] + "..."
        lines.append(f"{r['bench']:<16} {r['work']:<14} {name:<32} {shape:<26} "
                     f"{SHORT_STATUS.get(r['status'], r['status']):<6} {_fmt(r['median_ms'], '.4g'):>9} "
                     f"{spread:>15} {_fmt(r['ratio'], '.3g'):>7} {_fmt(r['floor_ms'], '.4g'):>8} "
                     f"{_fmt(r['predicted_ms'], '.4g'):>8} {mem:>6}  {note}")
    dry = [r for r in records if r.get("dry")]
    if dry:
        lines.append(f"DRY RUN ({len(dry)} of {len(records)} records): CPU tensors at tiny shapes, "
                     "host-clock times, H200 figures for the floors: no GPU measurement.")
    if records:
        r0 = records[-1]
        lines.append(f"{r0['gpu']}, torch {r0['torch']}, triton {r0['triton']}, commit {r0['commit']}; "
                     f"rates: {r0['rates']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# one provider on one problem
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """What every case of a run shares."""

    device: torch.device
    dry: bool
    rates: floors.Rates
    results: Results
    meta: dict
    deadline: float | None = None  # time.time() after which no case starts
    warmup: int = MIN_WARMUP
    reps: int = MIN_REPS
    profile: Path | None = None
    phase: str = "all"  # main, late or all: which providers run (late: compile and extras)
    providers: tuple[str, ...] | None = None  # only these (by name), when given
    extension: str = "all"  # all, skip or only: providers that need the CUDA extension
    options: Any = None  # the parsed command line
    log: Callable[[str], None] = print

    def remaining_s(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.time()

    def selects(self, pv: "Provider") -> bool:
        """Whether this run includes ``pv``: named by ``--providers`` (when given), in this phase,
        on the right side of ``--extension``; an opt-in provider only when named or dry."""
        named = self.providers is not None and pv.name in self.providers
        if self.providers is not None and not named:
            return False
        if pv.opt_in and not (named or self.dry):
            return False
        if self.phase != "all" and (self.phase == "late") != pv.late:
            return False
        return self.extension == "all" or (self.extension == "only") == pv.needs_extension


@dataclasses.dataclass
class Provider:
    """One implementation a benchmark times. ``fn``'s arguments are the benchmark's; ``late``:
    run in the late phase (``torch.compile``, extra variants); ``setup_s``: its expected
    one-off cost (compilation); ``unavailable``: why it cannot run here; ``skip_dry``: why the
    dry mode leaves it out; ``opt_in``: only when ``--providers`` names it (or in the dry mode).
    ``work``/``works``, ``formula``, ``strategy``, ``predicts``: what the benchmark records;
    ``env``: environment variables its calls need (:func:`environment`)."""

    name: str
    fn: Callable | None
    late: bool = False
    setup_s: float = 0.0
    unavailable: str | None = None
    skip_dry: str | None = None
    needs_extension: bool = False
    opt_in: bool = False
    work: str | None = None
    works: dict | None = None
    formula: str | None = None
    strategy: str | None = None
    predicts: str | None = None
    env: dict | None = None  # environment variables set around its every call (forward and backward)


@contextlib.contextmanager
def environment(env: dict | None):
    """``os.environ`` updated with ``env`` inside the block, restored after it."""
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lazy_compile(fn: Callable, **options) -> Callable:
    """``torch.compile(fn, **options)``, built on the first call (importing the compiler costs
    seconds that a run which never calls it should not pay)."""
    compiled = []

    def call(*args, **kwargs):
        if not compiled:
            compiled.append(torch.compile(fn, **options))
        return compiled[0](*args, **kwargs)
    return call


@dataclasses.dataclass
class Case:
    """One provider on one problem. ``make()`` returns the timed callable; ``gate()`` runs the
    correctness gate (``None``: the benchmark has no reference, ``no_gate`` says why);
    ``unavailable`` / ``skip``: the reason the case is recorded without running."""

    bench: str
    work: str
    passes: str
    provider: str
    inputs: str
    shape: dict
    dtype: torch.dtype
    floor: floors.Cost
    make: Callable[[], Callable[[], Any]] | None = None
    gate: Callable[[], Any] | None = None
    no_gate: str = ""
    strategy: str | None = None
    floor_1pass: floors.Cost | None = None
    predicted: floors.Cost | None = None
    grad_to_none: tuple = ()
    unavailable: str | None = None
    skip: str | None = None
    setup_s: float = 0.0  # expected one-off cost before the first call (compilation)
    tokens: int | None = None  # tokens per call (a training step): tokens/s in the record
    note: str = ""
    timed_note: Callable[[float], str] | None = None  # a note from the median (ms), when timed
    slow_policy: bool = True  # False: the full counts even when a call takes over a second


def _record(ctx: Context, case: Case, status: str, *, timing: Timing | None = None, mem=None,
            gate: str = "", note: str = "") -> Record:
    med = timing.median_ms if timing else None
    model = case.floor.text + (f" | predicted: {case.predicted.text}" if case.predicted else "")
    derived = case.timed_note(med) if timing and case.timed_note else ""
    notes = [n for n in (case.note, note, timing.note if timing else "", derived) if n]
    return Record(
        bench=case.bench, work=case.work, passes=case.passes, provider=case.provider,
        strategy=case.strategy, inputs=case.inputs, shape=case.shape,
        dtype=str(case.dtype).replace("torch.", ""), status=status, median_ms=med,
        p20_ms=timing.p20_ms if timing else None, p80_ms=timing.p80_ms if timing else None,
        warmup=timing.warmup if timing else None, reps=timing.reps if timing else None,
        timing=("dry run, not a GPU timing: " if ctx.dry else "") + (timing.method if timing else ""),
        peak_mem_bytes=mem, floor_ms=case.floor.ms,
        floor_1pass_ms=case.floor_1pass.ms if case.floor_1pass else None,
        ratio=(med / case.floor.ms) if med is not None and case.floor.ms > 0 else None,
        predicted_ms=case.predicted.ms if case.predicted else None, model=model,
        gate=gate or case.no_gate, tokens_per_s=(1e3 * case.tokens / med) if case.tokens and med else None,
        note="; ".join(notes), gpu=ctx.meta["gpu"], torch=ctx.meta["torch"],
        triton=ctx.meta["triton"], commit=ctx.meta["commit"], dry=ctx.dry, rates=ctx.rates.describe(),
        command=ctx.meta.get("command", ""),
        time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def run_case(ctx: Context, case: Case) -> Record:
    """Gate, peak memory, timing and profile of one case (module docstring); the record is
    appended to the results before it is returned."""
    rec = None
    if case.unavailable:
        rec = _record(ctx, case, "unavailable", note=case.unavailable)
    elif case.skip:
        rec = _record(ctx, case, "skipped", note=case.skip)
    elif ctx.remaining_s() < MIN_CASE_S + case.setup_s:
        rec = _record(ctx, case, "skipped", note=f"time budget: {max(ctx.remaining_s(), 0):.0f} s left")
    if rec is None:
        fn = None
        try:
            gate_text = ""
            if case.gate is not None:
                result = case.gate()
                gate_text = result.text
                if not result.ok:
                    rec = _record(ctx, case, "wrong", gate=gate_text, note="not timed: failed the gate")
            if rec is None:
                fn = case.make()
                mem = peak_memory_bytes(fn, ctx.device)
                timing = measure(fn, device=ctx.device, warmup=ctx.warmup, reps=ctx.reps,
                                 grad_to_none=case.grad_to_none,
                                 budget_s=ctx.remaining_s() - MIN_CASE_S / 2,
                                 slow_policy=case.slow_policy)
                if ctx.profile is not None:
                    profile_once(fn, ctx.device, ctx.profile,
                                 f"{case.bench} {case.work} {case.provider} {shape_str(case.shape)}")
                rec = _record(ctx, case, "ok", timing=timing, mem=mem, gate=gate_text)
        except torch.cuda.OutOfMemoryError as exc:
            rec = _record(ctx, case, "oom", note=_one_line(exc))
        except OutOfTime as exc:
            rec = _record(ctx, case, "skipped", note=f"time budget: {exc}")
        except Exception as exc:  # recorded, never hidden
            rec = _record(ctx, case, "failed", note=_one_line(exc))
        finally:
            fn = None
            for t in case.grad_to_none:
                t.grad = None
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    ctx.results.append(rec)
    ctx.log(summary_table([rec.as_dict()]).splitlines()[2])
    return rec

