"""Shared benchmark utilities: timing, peak memory, floors, records, plots and summaries.

Every benchmark script (``bench_<op>.py``) builds fresh random inputs (never zeros), times each
provider with ``triton.testing.do_bench`` (median, p20, p80 in ms), measures peak memory with
``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``, and reports each result as a
ratio to a physical floor measured in the same run:

* bandwidth floor: bytes the op must move / copy bandwidth of a large device-to-device copy;
* compute floor: flops the op must do / rate of a large bf16 GEMM.

Results are JSON records ``{op, provider, gpu, shape, dtype, mode, median_ms, p20_ms, p80_ms,
peak_mem_bytes, floor_ms, torch, triton, commit}`` merged into ``benchmarks/results/<gpu>.json``,
plus a CSV, PNG plots and a Markdown summary.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def gpu_slug(name: str | None = None) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name or gpu_name()).strip("-").lower()


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except Exception:
        return os.environ.get("FORGETKERN_COMMIT", "unknown")


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


# ---------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100,
            grad_to_none=None) -> tuple[float, float, float]:
    """``(median, p20, p80)`` milliseconds of ``fn`` with ``triton.testing.do_bench`` (CUDA events,
    L2 flushed between runs)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                             quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


@dataclasses.dataclass
class Floors:
    """Ceilings measured on this device in this run."""

    copy_bytes_per_ms: float  # bytes read + written per ms by a large device-to-device copy
    bf16_flops_per_ms: float  # flops per ms of a large bf16 GEMM on random data

    def bandwidth_ms(self, nbytes: float) -> float:
        return nbytes / self.copy_bytes_per_ms

    def compute_ms(self, flops: float) -> float:
        return flops / self.bf16_flops_per_ms

    def describe(self) -> str:
        return (f"copy {self.copy_bytes_per_ms / 1e9:.2f} TB/s, "
                f"bf16 GEMM {self.bf16_flops_per_ms / 1e9:.0f} TFLOP/s")


def measure_floors(copy_gib: float = 4.0, gemm_n: int = 8192) -> Floors:
    """Measure copy bandwidth and the bf16 matmul rate (random data, median of do_bench)."""
    n = int(copy_gib * 2**30) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    med, _, _ = time_ms(lambda: dst.copy_(src), warmup=10, rep=50)
    copy_rate = 2 * src.numel() * src.element_size() / med
    del src, dst
    a = torch.randn(gemm_n, gemm_n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(gemm_n, gemm_n, dtype=torch.bfloat16, device="cuda")
    med, _, _ = time_ms(lambda: a @ b, warmup=10, rep=50)
    gemm_rate = 2 * gemm_n**3 / med
    del a, b
    torch.cuda.empty_cache()
    return Floors(copy_rate, gemm_rate)


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Record:
    op: str
    provider: str
    gpu: str
    shape: dict
    dtype: str
    mode: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    peak_mem_bytes: int | None
    floor_ms: float
    torch: str
    triton: str | None
    commit: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.median_ms is None or not self.floor_ms:
            return None
        return self.median_ms / self.floor_ms

    def key(self) -> tuple:
        return (self.op, self.provider, json.dumps(self.shape, sort_keys=True), self.dtype, self.mode)


def _shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def format_table(records: list[Record]) -> str:
    """A fixed-width table: one row per record, with the ratio to its floor."""
    head = f"{'op':<12} {'provider':<20} {'shape':<28} {'mode':<8} {'median ms':>10} {'x floor':>8} {'peak MiB':>9}  note"
    lines = [head, "-" * len(head)]
    for r in records:
        med = "-" if r.median_ms is None else f"{r.median_ms:.3f}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        mem = "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.0f}"
        lines.append(f"{r.op:<12} {r.provider:<20} {_shape_str(r.shape):<28} {r.mode:<8} "
                     f"{med:>10} {ratio:>8} {mem:>9}  {r.note}")
    return "\n".join(lines)


def save(records: list[Record], out_dir: Path | str | None = None) -> Path:
    """Merge ``records`` into ``<out_dir>/<gpu>.json`` (replacing same op/provider/shape/dtype/mode),
    and rewrite the CSV, plots and Markdown summary next to it. Returns the JSON path."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        return out
    slug = gpu_slug(records[0].gpu)
    path = out / f"{slug}.json"
    merged: dict[tuple, Record] = {}
    if path.exists():
        for d in json.loads(path.read_text()):
            rec = Record(**{k: d.get(k) for k in (f.name for f in dataclasses.fields(Record))})
            merged[rec.key()] = rec
    for rec in records:
        merged[rec.key()] = rec
    allrecs = sorted(merged.values(), key=lambda r: r.key())
    path.write_text(json.dumps([dataclasses.asdict(r) for r in allrecs], indent=1) + "\n")
    with open(out / f"{slug}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        fields = [f.name for f in dataclasses.fields(Record)]
        w.writerow(fields + ["ratio_to_floor"])
        for r in allrecs:
            row = dataclasses.asdict(r)
            row["shape"] = _shape_str(r.shape)
            w.writerow([row[f] for f in fields] + [r.ratio])
    write_summary(allrecs, out / f"{slug}.md")
    plot(allrecs, out, slug)
    return path


def write_summary(records: list[Record], path: Path) -> None:
    """Markdown tables per op (fwd+bwd first), with ratios to floor and peak memory."""
    if not records:
        return
    r0 = records[0]
    lines = [f"# Benchmark results: {r0.gpu}", "",
             f"torch {r0.torch}, triton {r0.triton}, commit {r0.commit}. "
             "Median of `triton.testing.do_bench`; `x floor` = median / floor measured in the same run.",
             ""]
    for op in sorted({r.op for r in records}):
        lines += [f"## {op}", "", "| provider | shape | dtype | mode | median ms | p20–p80 ms | x floor | peak MiB | note |",
                  "|---|---|---|---|---:|---:|---:|---:|---|"]
        for r in [r for r in records if r.op == op]:
            med = "—" if r.median_ms is None else f"{r.median_ms:.3f}"
            spread = "—" if r.p20_ms is None else f"{r.p20_ms:.3f}–{r.p80_ms:.3f}"
            ratio = "—" if r.ratio is None else f"{r.ratio:.2f}"
            mem = "—" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / 2**20:.0f}"
            lines.append(f"| {r.provider} | {_shape_str(r.shape)} | {r.dtype} | {r.mode} | {med} | "
                         f"{spread} | {ratio} | {mem} | {r.note} |")
        lines.append("")
    path.write_text("\n".join(lines))


def plot(records: list[Record], out: Path, slug: str) -> None:
    """Per op and mode: time and peak memory against problem size, one line per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return
    for op in sorted({r.op for r in records}):
        recs = [r for r in records if r.op == op and r.median_ms is not None]
        if not recs:
            continue
        modes = sorted({r.mode for r in recs})
        fig, axes = plt.subplots(2, len(modes), figsize=(5 * len(modes), 7), squeeze=False)
        for j, mode in enumerate(modes):
            sub = [r for r in recs if r.mode == mode]
            for provider in sorted({r.provider for r in sub}):
                pts = sorted(((_size(r.shape), r.median_ms, r.peak_mem_bytes) for r in sub
                              if r.provider == provider), key=lambda t: t[0])
                xs = [p[0] for p in pts]
                axes[0][j].plot(xs, [p[1] for p in pts], marker="o", label=provider)
                axes[1][j].plot(xs, [(p[2] or 0) / 2**20 for p in pts], marker="o", label=provider)
            axes[0][j].set_title(f"{op} {mode}: time")
            axes[1][j].set_title(f"{op} {mode}: peak memory")
            axes[0][j].set_ylabel("median ms")
            axes[1][j].set_ylabel("MiB")
            for ax in (axes[0][j], axes[1][j]):
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("problem size (product of shape)")
                ax.grid(True, alpha=0.3)
            axes[0][j].legend(fontsize=7)
        fig.suptitle(f"{op} on {recs[0].gpu}")
        fig.tight_layout()
        fig.savefig(out / f"{slug}-{op}.png", dpi=110)
        plt.close(fig)


def _size(shape: dict) -> float:
    return float(math.prod(v for v in shape.values() if isinstance(v, (int, float))))


# ---------------------------------------------------------------------------------------------
# running one case
# ---------------------------------------------------------------------------------------------
def run_case(*, op: str, provider: str, shape: dict, dtype: torch.dtype, mode: str,
             make: Callable[[], Callable[[], object]], floor_ms: float, grad_to_none=None,
             warmup=25, rep=100, meta: dict) -> Record:
    """Build the timed callable with ``make()``, then measure its peak memory and time.
    Failures (out of memory, a provider that rejects the case) become the record's note."""
    note = ""
    med = p20 = p80 = None
    mem = None
    try:
        fn = make()
        mem = peak_memory_bytes(fn)
        med, p20, p80 = time_ms(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none)
    except torch.cuda.OutOfMemoryError:
        note = "out of memory"
    except Exception as exc:  # report, never hide
        note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        fn = None
        torch.cuda.empty_cache()
    return Record(op=op, provider=provider, gpu=meta["gpu"], shape=shape, dtype=str(dtype).replace("torch.", ""),
                  mode=mode, median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_bytes=mem,
                  floor_ms=floor_ms, torch=meta["torch"], triton=meta["triton"], commit=meta["commit"],
                  note=note)


def meta() -> dict:
    return {"gpu": gpu_name(), "commit": commit(), **versions()}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="one representative shape per op")
    p.add_argument("--providers", default=None, help="comma-separated subset of providers")
    p.add_argument("--modes", default="forward,backward,full", help="comma-separated modes")
    return p


def require_gpu(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            f"{script} measures GPU kernels and needs a CUDA GPU; without one, run "
            "`forgetkern bench` for CPU micro-benchmarks of the reference paths."
        )


def start(script: str, args: argparse.Namespace, providers: Callable[[], dict] | None = None):
    """A benchmark script's set-up: GPU check, run metadata, the two floors (printed), and the
    providers (``providers()``) that ``--providers`` selects. Returns ``(meta, floors, providers)``."""
    require_gpu(script)
    info = meta()
    floors = measure_floors()
    print(f"{info['gpu']}: {floors.describe()}")
    provs = providers() if providers is not None else {}
    if args.providers:
        wanted = args.providers.split(",")
        provs = {k: v for k, v in provs.items() if k in wanted}
    return info, floors, provs


def finish(records: list[Record], out_dir: Path | str | None, after_table: list[str] = ()) -> list[Record]:
    """Prints the table of all records (then ``after_table``), saves them, prints where."""
    print()
    print(format_table(records))
    if after_table:
        print()
        print("\n".join(after_table))
    path = save(records, out_dir)
    print(f"\nwrote {path}")
    return records


def torch_tmkl(z: torch.Tensor, b: torch.Tensor, y: torch.Tensor, ignore_index: int = -100):
    """What a user writes in plain torch on materialized logits: CE + target-masked forward KL,
    in fp32, mean over the non-ignored rows (the eager and ``torch.compile`` baseline)."""
    z, b = z.float(), b.float()
    valid = y != ignore_index
    ys = torch.where(valid, y, 0)
    ce = torch.nn.functional.cross_entropy(z, ys, reduction="none")
    hit = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ys[:, None], True)
    lq = z.masked_fill(hit, float("-inf")).log_softmax(-1)
    lp = b.masked_fill(hit, float("-inf")).log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).masked_fill(hit, 0.0).sum(-1)
    return ((ce + kl) * valid).sum() / valid.sum().clamp_min(1)


MODES = ("forward", "backward", "full")


def mode_fn(mode: str, fwd: Callable[[], torch.Tensor]) -> Callable[[], object]:
    """The callable timed for ``mode``: ``forward`` (under no_grad), ``backward`` (backward of one
    forward computed here, graph retained) or ``full`` (forward + backward)."""
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return fwd()
        return forward
    if mode == "backward":
        loss = fwd()

        def backward():
            loss.backward(retain_graph=True)
        return backward
    if mode == "full":
        def full():
            fwd().backward()
        return full
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
