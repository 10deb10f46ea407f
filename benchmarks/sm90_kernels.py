"""Compile forgetkern's Triton kernels for an H100/H200 (sm_90) on any machine, GPU or not, exactly
as the JIT would specialize them for a launch at a given shape, and report what the GPU would run:
registers, spills, the streaming loop's SASS, load widths, fences and atomics.

    python benchmarks/sm90_kernels.py            # every configuration the launchers use
    python benchmarks/sm90_kernels.py --quick    # one per kernel family (what the tests run)
    python benchmarks/sm90_kernels.py --only tmkl --sass DIR   # also write each kernel's SASS/PTX

How: each launcher (``tmkl_forward``, ``linear_tmkl_fused_backward``, ...) is called on ``meta`` tensors
of the case's shape (no memory, no GPU) with its kernels replaced by recorders; every recorded
launch is specialized by Triton's own JIT binder (integer arguments equal to 1 become constants,
integers and pointers divisible by 16 carry ``tt.divisibility = 16``, as they would for aligned
tensors on a GPU) and compiled with Triton's ahead-of-time compiler for sm_90 with the launch's
warps and stages. The machine is taken to be an H200 (:data:`SMS` streaming multiprocessors), which
decides the launchers' vocabulary splits.

Columns (``cuobjdump``/``nvdisasm`` from Triton's NVIDIA backend):
  * ``reg``, ``spill``: registers and local-memory (spilled) bytes per thread.
  * ``loop``: SASS instructions in the main loop (the loop with the most global loads), and for the
    streaming TMKL kernels ``/col``: those instructions per vocabulary column handled by one thread
    (``loop / (BLOCK_V / threads)``). Reading 2 bytes of each of two bf16 inputs per column at an
    H200's 4.3 TB/s leaves about 29-31 instructions per column (132 SMs x 4 issues/clock x
    1.83-1.98 GHz x 32 lanes / (4.3e12 / 4) columns/s) before the kernel stops being bound by
    memory; the tests hold the bf16 forward to 29.
  * ``ldg``: widths in bits of the main loop's global loads (``LDG``, and ``LDGSTS`` of
    ``cp.async``) with their counts, ``128`` = 16-byte vector loads (the whole kernel's loads when
    it has no loop).
  * ``fence``: GPU-wide memory fences: ``MEMBAR.*.GPU``/``.SYS`` in the SASS, and in the PTX the
    ``fence``/``membar`` instructions and atomics with acquire/release ordering at GPU scope (CTA
    fences of shared memory and ``wgmma`` are not counted).
  * ``atom``: global atomics (``REDG``/``ATOMG``) in the SASS with their widths in bits.

Exits non-zero if any kernel fails to compile. Needs Triton with its NVIDIA backend, no GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from forgetkern import _params  # noqa: E402
from forgetkern.ops import _triton as ops_triton  # noqa: E402
from forgetkern.ops import folora_step, generalized_eigh, sparse_tmkl, tmkl  # noqa: E402
from forgetkern.ops import linear_tmkl_fused as linear_tmkl  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMS = 132  # an H200's streaming multiprocessors (H100 SXM: 132 as well)
META = torch.device("meta")
SHORT = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
         torch.float16: "fp16"}

# the kernels each launcher may launch: (module, kernel attribute)
KERNELS = {
    "tmkl": [(tmkl, "_tmkl_fwd_kernel"), (tmkl, "_tmkl_bwd_kernel")],
    "sparse": [(sparse_tmkl, "_sparse_tmkl_fwd_kernel"), (sparse_tmkl, "_sparse_tmkl_bwd_kernel")],
    "linear": [(linear_tmkl, "_linear_tmkl_fused_fwd_kernel"),
               (linear_tmkl, "_linear_tmkl_fused_bwd_kernel")],
    "eigh": [(generalized_eigh, "_generalized_eigh_kernel")],
    "folora": [(folora_step, "_folora_step_kernel")],
}
STREAMING = {"_tmkl_fwd_kernel", "_tmkl_bwd_kernel", "_sparse_tmkl_fwd_kernel",
             "_sparse_tmkl_bwd_kernel"}


# --------------------------------------------------------------------------------------------
# recording the launchers' launches and specializing them as the JIT does
# --------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, sink: list):
        self.kernel = kernel
        self.sink = sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.kernel, tuple(grid), args, kwargs))
        return launch


@contextlib.contextmanager
def recording(family: str):
    """Replace the family's kernels by recorders for the block, with an H200's SM count and meta
    tensors taken for tensors on an sm_90 GPU by the fused-linear launcher's TMA check."""
    sink: list[Launch] = []
    saved = [(mod, name, getattr(mod, name)) for mod, name in KERNELS[family]]
    patched = []
    for mod, name, kernel in saved:
        setattr(mod, name, _Recorder(kernel, sink))
    for mod in (ops_triton, tmkl, linear_tmkl, sparse_tmkl):
        if hasattr(mod, "multiprocessor_count"):
            patched.append((mod, "multiprocessor_count", mod.multiprocessor_count))
            mod.multiprocessor_count = lambda device=None: SMS
    tma_ok = linear_tmkl._tma_ok

    def tma_ok_on_meta(t):
        """The launcher's own TMA check, with a meta tensor standing for one on an sm_90 GPU."""
        if t.device.type != "meta":
            return tma_ok(t)
        interpret = linear_tmkl.triton_interpret
        linear_tmkl.triton_interpret = lambda: True  # (the check's answer off a CUDA device)
        try:
            return tma_ok(t)
        finally:
            linear_tmkl.triton_interpret = interpret

    patched.append((linear_tmkl, "_tma_ok", tma_ok))
    linear_tmkl._tma_ok = tma_ok_on_meta
    try:
        yield sink
    finally:
        for mod, name, kernel in saved:
            setattr(mod, name, kernel)
        for mod, name, fn in patched:
            setattr(mod, name, fn)


def specialize(launch: Launch):
    """``(ASTSource, options)`` of the launch, from Triton's own binder for an sm_90 target."""
    backend = make_backend(TARGET)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def compile_launch(launch: Launch):
    src, options = specialize(launch)
    compiled = triton.compile(src, target=TARGET, options=options)
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{launch.kernel.fn.__name__}: no cubin")
    return compiled


# --------------------------------------------------------------------------------------------
# the cases: each calls launchers on meta tensors of one shape
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    label: str
    family: str
    run: object  # () -> None, calls the launchers
    quick: bool = False
    extra: dict = field(default_factory=dict)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


def _tmkl_case(n, v, dtype, params, *, offset=0):
    def run():
        width = v + offset
        z = _meta(n, width, dtype=dtype)[:, offset:]
        b = _meta(n, width, dtype=dtype)[:, offset:]
        y = _meta(n, dtype=torch.int64)
        loss, ce, kl, stats = tmkl.tmkl_forward(z, b, y, params)
        coef = _meta(n, dtype=loss.dtype)
        tmkl.tmkl_backward(z, b, y, stats, coef, coef, params, _meta(n, v, dtype=dtype))
    return run


def _sparse_case(n, v, k, dtype, params):
    def run():
        z = _meta(n, v, dtype=dtype)
        y = _meta(n, dtype=torch.int64)
        acc = _params.accumulation_dtype(dtype)
        base = (_meta(n, k, dtype=dtype), _meta(n, k, dtype=torch.int64), _meta(n, dtype=acc),
                _meta(n, dtype=acc), _meta(n, dtype=acc))
        loss, ce, kl, stats = sparse_tmkl.sparse_tmkl_forward(z, base, y, params)
        coef = _meta(n, dtype=loss.dtype)
        sparse_tmkl.sparse_tmkl_backward(z, base, y, stats, coef, coef, params,
                                         _meta(n, v, dtype=dtype))
    return run


def _linear_case(n, v, d, dtype, params, *, shared=True, bias=False, grad_w=False, tma=False):
    def run():
        h, hb = _meta(n, d, dtype=dtype), _meta(n, d, dtype=dtype)
        w = _meta(v, d, dtype=dtype)
        wb = None if shared else _meta(v, d, dtype=dtype)
        bb = _meta(v, dtype=dtype) if bias else None
        y = _meta(n, dtype=torch.int64)
        over = {"tma": tma}
        loss, ce, kl, stats, _ = linear_tmkl.linear_tmkl_fused_forward(
            h, w, hb, wb, bb, None if shared else bb, y, params, **over)
        coef = _meta(n, dtype=loss.dtype)
        linear_tmkl.linear_tmkl_fused_backward(h, w, hb, wb, bb, None if shared else bb, y, stats, coef,
                                         coef, params, (True, grad_w, grad_w and bias), **over)
    return run


def _eigh_case(batch, n, dtype):
    def run():
        a = _meta(batch, n, n, dtype=dtype)
        generalized_eigh.generalized_eigh(a, a, 0.0)
    return run


def _folora_case(numel, cols=4096):
    def run():
        table = _params.SegmentTable([0], [numel], [cols], [0], META)  # one gated segment
        buf = _meta(numel)
        folora_step.folora_step(buf, buf, buf, buf, table, (0,), _meta(1, _params.NUM_FOLORA_SCALARS),
                           _meta(cols))
    return run


def _with_kl_off(params):
    """``params`` with the fused-linear KL switched off (``compute_kl=False``): CE alone."""
    cls = type(params)
    if not any(f.name == "compute_kl" for f in dataclasses.fields(cls)):
        @dataclasses.dataclass(frozen=True)
        class WithComputeKL(cls):
            compute_kl: bool = True
        cls = WithComputeKL
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(type(params))}
    return cls(**{**fields, "kl_weight": 0.0, "compute_kl": False})


def cases():
    T = _params.TMKLParams
    out = []
    variants = ((T(), "fwdKL"), (T(direction="reverse", temperature=2.0), "revKL T=2"),
                (T(mask_target=False), "fwdKL plain"))
    for dtype, v, quick in ((torch.bfloat16, 128256, True), (torch.float16, 32000, False),
                            (torch.float32, 50257, False), (torch.float64, 1000, False)):
        for n in (8192, 1):
            for p, what in variants if dtype == torch.bfloat16 else variants[:1]:
                out.append(Case(f"tmkl {SHORT[dtype]} N={n} V={v} {what}", "tmkl",
                                _tmkl_case(n, v, dtype, p),
                                quick=quick and n == 8192 and what == "fwdKL"))
    out.append(Case("tmkl bf16 N=8192 V=128256 fwdKL rows misaligned by 3", "tmkl",
                    _tmkl_case(8192, 128256, torch.bfloat16, T(), offset=3)))
    for n in (8192, 1):
        out.append(Case(f"sparse bf16 N={n} V=128256 k=64 fwdKL", "sparse",
                        _sparse_case(n, 128256, 64, torch.bfloat16, T()), quick=n == 8192))
    lp = _params.LinearTMKLParams()
    bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    linear = [  # (label, N, V, D, dtype, options, in the quick set)
        ("", 8192, 128256, 4096, bf16, {}, True),
        ("CE alone", 8192, 128256, 4096, bf16, {"params": _with_kl_off(lp)}, True),
        ("base head, bias", 8192, 128256, 4096, bf16, {"shared": False, "bias": True}, False),
        ("", 100, 32000, 2048, bf16, {}, False),
        ("bias", 4096, 32000, 4096, fp16, {"bias": True}, False),
        ("", 2048, 50257, 1024, fp32, {}, False),
        ("base head, bias", 17, 1000, 64, fp64, {"shared": False, "bias": True}, False),
    ]
    for what, n, v, d, dtype, kw, quick in linear:
        kw = dict(kw)
        params = kw.pop("params", lp)
        for grad_w in (False, True):
            for tma in (False, True) if dtype in (bf16, fp16) else (False,):
                label = (f"linear {SHORT[dtype]} N={n} V={v} D={d}{' ' + what if what else ''}"
                         f"{' +dW' if grad_w else ''}{' TMA' if tma else ''}")
                # quick: the head trained at the target shape (dh and dW reductions), CE alone
                # with the head frozen
                out.append(Case(label, "linear", _linear_case(n, v, d, dtype, params,
                                                              grad_w=grad_w, tma=tma, **kw),
                                quick=quick and not tma and grad_w == (what != "CE alone")))
    for n in (16, 32, 64):
        out.append(Case(f"eigh fp32 n={n}", "eigh", _eigh_case(4096, n, torch.float32),
                        quick=n == 64))
    out.append(Case("eigh fp64 n=64", "eigh", _eigh_case(512, 64, torch.float64)))
    out.append(Case("folora step 1M", "folora", _folora_case(1 << 20), quick=True))
    return out


# --------------------------------------------------------------------------------------------
# reading the compiled kernel
# --------------------------------------------------------------------------------------------
def _tool(name: str) -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def resources(cubin: bytes) -> dict:
    """``{"REG": .., "STACK": .., "LOCAL": .., "SHARED": ..}`` from ``cuobjdump``."""
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def sass(cubin: bytes) -> str:
    tool = _tool("cuobjdump")
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def instructions(text: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of every SASS instruction (NOPs dropped)."""
    out = []
    for m in _INSN.finditer(text):
        if m.group(3) != "NOP":
            out.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def _width(op: str) -> int:
    """Bits moved per thread by a load/store/atomic opcode (``LDG.E.128``, ``ATOMG.E.ADD.F32x4``
    -> 128)."""
    lanes = re.search(r"F(16|32|64)x(\d)", op)
    if lanes:
        return int(lanes.group(1)) * int(lanes.group(2))
    for bits in (128, 64):
        if f".{bits}" in op:
            return bits
    if ".U16" in op or ".S16" in op:
        return 16
    if ".U8" in op or ".S8" in op:
        return 8
    return 32


def main_loop(insns) -> list[tuple[int, str, str]]:
    """The instructions of the loop (from a backward branch's target to the branch) holding the
    most global loads; ties go to the shorter loop (the innermost)."""
    best, key = [], None
    for i, (addr, op, args) in enumerate(insns):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", args)
        if not m or int(m.group(1), 16) >= addr:
            continue
        body = [x for x in insns if int(m.group(1), 16) <= x[0] <= addr]
        loads = sum(x[1].startswith("LDG") for x in body)
        k = (loads, -len(body))
        if loads and (key is None or k > key):
            best, key = body, k
    return best


def gpu_fences(insns) -> int:
    """GPU- or system-wide memory barriers in the SASS (``MEMBAR.SC.GPU``, ``MEMBAR.ALL.GPU``)."""
    return sum(op.startswith("MEMBAR") and (".GPU" in op or ".SYS" in op) for _, op, _ in insns)


_PTX_ORDERING = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:(?:fence|membar)(?!\.proxy)\S*"
                          r"|(?:atom|red)\S*\.(?:acq_rel|acquire|release|sc)\S*)", re.M)


def ptx_gpu_ordering(ptx: str) -> int:
    """PTX instructions that order memory beyond the CTA: ``fence.*``/``membar.*`` (not the
    async-proxy fences of TMA/``wgmma``) and atomics with acquire/release semantics."""
    return sum(1 for m in _PTX_ORDERING.finditer(ptx) if ".cta" not in m.group(0))


@dataclass
class Report:
    reg: int | None
    spill: int | None
    loop: int  # SASS instructions in the main loop
    per_col: float | None  # of them per column and thread (streaming kernels)
    ldg: str  # "bits x count" of the main loop's global loads
    fence: str  # "SASS GPU-wide barriers / PTX fences and ordered atomics"
    atom: str  # "bits x count" of global atomics
    loads: dict = field(default_factory=dict)  # bits -> count (what ``ldg`` prints)
    gpu_fences: int = 0
    ptx_ordering: int = 0
    atomics: dict = field(default_factory=dict)  # bits -> count (what ``atom`` prints)


def analyze(compiled, launch: Launch) -> Report:
    cubin = compiled.asm["cubin"]
    res = resources(cubin)
    insns = instructions(sass(cubin))
    loop = main_loop(insns)
    per_col = None
    name = launch.kernel.fn.__name__
    if name in STREAMING and loop:
        threads = 32 * compiled.metadata.num_warps
        cols = launch.kwargs["BLOCK_V"] / threads
        per_col = len(loop) / cols
    loads = [op for _, op, _ in (loop or insns) if op.startswith("LDG")]
    widths = Counter(_width(op) for op in loads)
    ldg = ",".join(f"{w}x{c}" for w, c in sorted(widths.items(), reverse=True)) or "-"
    fence = f"{gpu_fences(insns)}/{ptx_gpu_ordering(compiled.asm['ptx'])}"
    atoms = Counter(_width(op) for _, op, _ in insns
                    if op.startswith(("RED.", "REDG", "ATOM.", "ATOMG")))
    atom = ",".join(f"{w}x{c}" for w, c in sorted(atoms.items(), reverse=True)) or "-"
    spill = None if not res else max(res.get("STACK", 0), res.get("LOCAL", 0))
    return Report(res.get("REG"), spill, len(loop), per_col, ldg, fence, atom, dict(widths),
                  gpu_fences(insns), ptx_gpu_ordering(compiled.asm["ptx"]), dict(atoms))


def describe(launch: Launch) -> str:
    kw = launch.kwargs
    tiles = [f"{k}={kw[k]}" for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "BLOCK") if k in kw]
    flags = [k for k in ("SEPARATE_CE", "COMPUTE_KL", "GRAD_W", "USE_TMA", "SHARED_WEIGHT")
             if kw.get(k) is True]
    if "COMPUTE_KL" in kw and not kw["COMPUTE_KL"]:
        flags.append("no KL")
    warps = kw.get("num_warps", 4)
    grid = "x".join(str(g) for g in launch.grid)
    return f"{' '.join(tiles)} w={warps} grid={grid}{' ' + ','.join(flags) if flags else ''}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one configuration per kernel family")
    p.add_argument("--only", default="", help="only cases whose label contains this text")
    p.add_argument("--sass", metavar="DIR", help="write each kernel's SASS and PTX into DIR")
    p.add_argument("--json", metavar="PATH", help="also write every row as JSON records")
    args = p.parse_args(argv)
    records = []
    seen = {}  # (source hash, options) -> (compiled kernel, Report): each kernel compiled once
    failed = 0
    print(f"{'case / kernel':<78} {'reg':>4} {'spill':>6} {'loop':>5} {'/col':>5} "
          f"{'ldg(bits x n)':>14} {'fence':>6} {'atom':>8}")
    for case in cases():
        if (args.quick and not case.quick) or args.only not in case.label:
            continue
        try:
            with recording(case.family) as launches:
                case.run()
        except Exception as exc:  # report every failure, then exit non-zero
            failed += 1
            print(f"{case.label}: FAILED to launch: {type(exc).__name__}: {exc}", flush=True)
            continue
        in_case = set()
        for launch in launches:
            label = f"{case.label} | {launch.kernel.fn.__name__.strip('_')} {describe(launch)}"
            try:
                src, options = specialize(launch)
                key = (src.hash(), repr(sorted(options.items())))
                if key in in_case:  # the same kernel launched again (e.g. backward row launches)
                    continue
                in_case.add(key)
                if key not in seen:  # compiled once, reported for every case that launches it
                    compiled = compile_launch(launch)
                    seen[key] = (compiled, analyze(compiled, launch))
                compiled, r = seen[key]
                col = "-" if r.per_col is None else f"{r.per_col:.1f}"
                print(f"{label}\n{'':<78} {r.reg!s:>4} {r.spill!s:>6} {r.loop:>5} {col:>5} "
                      f"{r.ldg:>14} {r.fence:>6} {r.atom:>8}", flush=True)
                records.append({"case": case.label, "kernel": launch.kernel.fn.__name__,
                                "launch": describe(launch), **dataclasses.asdict(r)})
                if args.sass:
                    out = Path(args.sass)
                    out.mkdir(parents=True, exist_ok=True)
                    stem = re.sub(r"[^A-Za-z0-9=]+", "_", label)[:150]
                    (out / f"{stem}.sass").write_text(sass(compiled.asm["cubin"]))
                    (out / f"{stem}.ptx").write_text(compiled.asm["ptx"])
            except Exception as exc:
                failed += 1
                msg = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ""
                print(f"{label}\n    FAILED: {type(exc).__name__}: {msg}", flush=True)
    print(f"compiled {len(seen)} kernels for sm_90 (Triton {triton.__version__}), "
          f"{failed} failed")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
