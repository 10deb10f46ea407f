"""Compile forgetkern's TMKL and fused-linear TMKL Triton kernels for an H100/H200 (sm_90) on any
machine, GPU or not, and report each kernel's registers, spills and shared memory.

    python benchmarks/sm90_kernels.py            # every configuration the launchers use
    python benchmarks/sm90_kernels.py --quick    # one per kernel family (what the tests run)

The Triton interpreter accepts programs that the GPU compiler rejects (``tl.dot`` operand shapes and
dtypes, layouts, register allocation); this lowers every kernel to PTX and SASS with the launchers'
own tile sizes, warps and stages. Resource usage comes from ``cuobjdump --dump-resource-usage``
(shipped with Triton's NVIDIA backend): ``STACK``/``LOCAL`` above 0 means registers spill to local
memory. Exits non-zero if any kernel fails to compile. Needs Triton with its NVIDIA backend, no GPU.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from forgetkern.ops import linear_tmkl, tmkl  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
SHORT = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
FLOAT_ARGS = {"inv_t", "ce_weight", "kl_scale"}
INPUT_PTRS = {"z_ptr", "b_ptr", "h_ptr", "w_ptr", "bias_ptr", "hb_ptr", "wb_ptr", "bb_ptr"}


def signature(kernel, dtype: torch.dtype, out_dtype: torch.dtype | None, constexprs: dict) -> dict:
    """Triton signature of ``kernel`` for inputs of ``dtype``: labels int64, the gradient output
    (``g_ptr``/``dh_ptr``) in ``out_dtype``, other outputs in the accumulation dtype, ints i32;
    ``*_desc`` arguments are TMA descriptors of the kernels' tiles under ``USE_TMA``, else None
    (added to ``constexprs``)."""
    acc = PTR[torch.float64 if dtype == torch.float64 else torch.float32]
    sig = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_desc"):
            if constexprs.get("USE_TMA"):
                rows = constexprs["BLOCK_N"] if name in ("h_desc", "hb_desc") else constexprs["BLOCK_V"]
                sig[name] = f"tensordesc<{PTR[dtype][1:]}[{rows},{constexprs['BLOCK_D']}]>"
            else:
                sig[name] = "constexpr"
                constexprs[name] = None
        elif name == "y_ptr":
            sig[name] = "*i64"
        elif name in INPUT_PTRS:
            sig[name] = PTR[dtype]
        elif name in ("g_ptr", "dh_ptr"):
            sig[name] = PTR[out_dtype or dtype]
        elif name.endswith("_ptr"):
            sig[name] = acc
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(kernel, dtype, constexprs: dict, options: dict, out_dtype=None) -> bytes:
    missing = [n for n, p in zip(kernel.arg_names, kernel.params)
               if p.is_constexpr and n not in constexprs]  # (descriptors are added below)
    if missing:
        raise ValueError(f"{kernel.fn.__name__}: constexprs not given: {missing}")
    constexprs = dict(constexprs)
    sig = signature(kernel, dtype, out_dtype, constexprs)
    src = ASTSource(kernel, sig, constexprs=constexprs)
    cubin = triton.compile(src, target=TARGET, options=options).asm["cubin"]
    if not cubin:
        raise RuntimeError(f"{kernel.fn.__name__}: no cubin")
    return cubin


def cases(quick: bool):
    """``(label, kernel, dtype, constexprs, options, out_dtype)`` for every configuration."""
    tmkl_shapes = [(torch.bfloat16, 128256), (torch.float16, 32000), (torch.float32, 50257),
                   (torch.float64, 1000)]
    for i, (dtype, v) in enumerate(tmkl_shapes[:1] if quick else tmkl_shapes):
        cfg = tmkl.launch_config(v, dtype, None)
        options = {"num_warps": cfg.pop("num_warps")}
        combos = list(itertools.product((True, False), repeat=3))
        for fwd, mask, sep in (combos[:1] + combos[-1:] if quick or i else combos):
            flags = dict(FORWARD_KL=fwd, MASK_TARGET=mask, SEPARATE_CE=sep,
                         ACC_FP64=dtype == torch.float64, **cfg)
            what = (f"V={v} {'fwd' if fwd else 'rev'}KL{'' if mask else ' plain'}"
                    f"{' T!=1' if sep else ''} BLOCK_V={cfg['BLOCK_V']} warps={options['num_warps']}")
            yield f"tmkl fwd  {SHORT[dtype]} {what}", tmkl._tmkl_fwd_kernel, dtype, flags, options, None
            yield f"tmkl bwd  {SHORT[dtype]} {what}", tmkl._tmkl_bwd_kernel, dtype, flags, options, dtype
    linear_shapes = [
        (torch.bfloat16, (8192, 128256, 4096), True, False),
        (torch.bfloat16, (8192, 128256, 4096), False, True),
        (torch.bfloat16, (100, 32000, 2048), True, False),
        (torch.float16, (4096, 32000, 4096), True, True),
        (torch.float32, (2048, 50257, 1024), True, False),
        (torch.float64, (17, 1000, 64), False, True),
    ]
    for dtype, (n, v, d), shared, bias in (linear_shapes[:2] if quick else linear_shapes):
        cfg = linear_tmkl.launch_config(n, v, d, dtype, None, shared_weight=shared)
        cfg.pop("splits")
        cfg.pop("bwd_rows")
        cfg.pop("tma")
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        for tma in (False, True) if dtype in (torch.bfloat16, torch.float16) else (False,):
            flags = dict(FORWARD_KL=True, MASK_TARGET=True, SEPARATE_CE=False, HAS_BIAS=bias,
                         HAS_BASE_BIAS=bias, SHARED_WEIGHT=shared, ACC_FP64=dtype == torch.float64,
                         DOT_IEEE=dtype in (torch.float32, torch.float64), DOT_UPCAST=False,
                         USE_TMA=tma, **cfg)
            what = (f"N={n} V={v} D={d}{'' if shared else ' base head'}{' bias' if bias else ''} "
                    f"tile={cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_D']} "
                    f"warps={options['num_warps']} stages={options['num_stages']}"
                    f"{' TMA' if tma else ''}")
            out = torch.float64 if dtype == torch.float64 else torch.float32  # grad_hidden scratch
            yield (f"linear fwd {SHORT[dtype]} {what}", linear_tmkl._linear_tmkl_fwd_kernel, dtype,
                   flags, options, None)
            for grad_w in (False, True):
                bwd = dict(flags, GRAD_H=True, GRAD_W=grad_w, GRAD_BIAS=grad_w and bias)
                yield (f"linear bwd {SHORT[dtype]} {what}{' +dW' if grad_w else ''}",
                       linear_tmkl._linear_tmkl_bwd_kernel, dtype, bwd, options, out)


def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return found or (str(bundled) if bundled.exists() else None)


def resources(cubin: bytes, tool: str | None) -> str:
    """``REG:.. STACK:.. SHARED:.. LOCAL:..`` of the cubin's kernel, or ``?`` without cuobjdump."""
    if tool is None:
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return " ".join(f"{k}:{fields.get(k, '?')}" for k in ("REG", "STACK", "LOCAL", "SHARED"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one configuration per kernel family")
    args = p.parse_args(argv)
    tool = cuobjdump()
    failed = 0
    total = 0
    for label, kernel, dtype, constexprs, options, out_dtype in cases(args.quick):
        total += 1
        try:
            usage = resources(compile_kernel(kernel, dtype, constexprs, options, out_dtype), tool)
        except Exception as exc:  # report every failure, then exit non-zero
            failed += 1
            usage = f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        print(f"{label:<100} {usage}", flush=True)
    print(f"compiled {total - failed}/{total} kernels for sm_90 (Triton {triton.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
