"""Benchmark: the TMKL loss on materialized logits (CE + target-masked KL), forward + backward.

Headline: N=8192 rows, V=128256, bf16. Providers: forgetkern's backends (``forgetkern-triton``,
``forgetkern-cuda`` when the extension is built; ``forgetkern-reference`` in the dry mode or
when ``--providers`` names it), plain torch (``torch-eager``, ``gate.torch_tmkl``), its
``torch.compile`` (default mode, and ``max-autotune`` if time remains: late phase), and
Liger-Kernel's ``LigerCrossEntropyLoss`` + ``LigerKLDIVLoss`` (CE plus the full-vocabulary KL
on fp32 log-softmaxes, ``batchmean``: the closest fused peer; it does not mask the target) when
importable.

Floor (``floors.logits_floor``): two passes, ``5·N·V`` elements over the copy bandwidth, with the
one-pass floor (``3·N·V``) beside it. Inputs: ``z`` ~ 3·N(0, 1), ``b = z + N(0, 1)``, labels
uniform with every 17th ignored.

    python benchmarks/bench_tmkl.py [--quick]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import floors  # noqa: E402
import gate  # noqa: E402

import forgetkern  # noqa: E402
from forgetkern import _backend  # noqa: E402

NAME = "tmkl"
SHAPES = [(n, v) for v in (32000, 128256, 256000) for n in (4096, 8192, 16384)]
QUICK = [(8192, 128256)]
DRY = [(40, 500)]
IGNORE = -100
COMPILE_SETUP_S = 60.0
AUTOTUNE_SETUP_S = 240.0
TMKL = {"work": "tmkl-logits", "formula": "tmkl"}


def providers(device, probe_extension: bool = True) -> list[common.Provider]:
    """Every provider, available or not (with the reason); without ``probe_extension`` the CUDA
    extension is neither looked at (it may be being built) nor listed."""
    out = []
    for backend in ("triton", "cuda") if probe_extension else ("triton",):
        why = _backend.why_unavailable(backend, "tmkl", torch.device(device))
        out.append(common.Provider(f"forgetkern-{backend}",
                                   lambda z, b, y, _b=backend: forgetkern.tmkl_loss(z, b, y, backend=_b),
                                   unavailable=why, needs_extension=backend == "cuda", predicts="2-pass",
                                   **TMKL))
    out.append(common.Provider("forgetkern-reference",
                               lambda z, b, y: forgetkern.tmkl_loss(z, b, y, backend="reference"),
                               opt_in=True, **TMKL))
    out.append(common.Provider("torch-eager", gate.torch_tmkl, **TMKL))
    no_compile = "torch.compile is not run in the dry mode (compile time)"
    out.append(common.Provider("torch-compile", common.lazy_compile(gate.torch_tmkl, dynamic=False),
                               late=True, setup_s=COMPILE_SETUP_S, skip_dry=no_compile, **TMKL))
    out.append(common.Provider("torch-compile-max-autotune",
                               common.lazy_compile(gate.torch_tmkl, dynamic=False, mode="max-autotune"),
                               late=True, setup_s=AUTOTUNE_SETUP_S, skip_dry=no_compile, **TMKL))
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

        ce = LigerCrossEntropyLoss(ignore_index=IGNORE)
        kld = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        out.append(common.Provider("liger-ce+kldiv",
                                   lambda z, b, y: ce(z, y) + kld(z.float().log_softmax(-1),
                                                                  b.float().log_softmax(-1)),
                                   work="ce+kl-full", formula="ce+kl-full-batchmean",
                                   skip_dry="a GPU-only peer (Triton kernels): not run in the dry mode"))
    except ImportError as exc:
        out.append(common.Provider("liger-ce+kldiv", None, work="ce+kl-full", formula="ce+kl-full-batchmean",
                                   unavailable=f"liger-kernel not importable ({exc})"))
    return out


def problem(n: int, v: int, dtype, device):
    gen = torch.Generator(device=device).manual_seed(n + v)
    z32 = torch.randn(n, v, device=device, generator=gen) * 3
    b = (z32 + torch.randn(n, v, device=device, generator=gen)).to(dtype)
    z = z32.to(dtype).requires_grad_()
    del z32
    y = torch.randint(0, v, (n,), device=device, generator=gen)
    y[::17] = IGNORE
    return z, b, y


def run(ctx: common.Context) -> list[common.Record]:
    dtype = torch.bfloat16
    elt = torch.finfo(dtype).bits // 8
    passes = ctx.options.passes
    provs = [pv for pv in providers(ctx.device, ctx.extension != "skip") if ctx.selects(pv)]
    records = []
    shapes = DRY if ctx.dry else (QUICK if ctx.options.quick else SHAPES)
    for n, v in shapes:
        if not provs:
            break
        z, b, y = problem(n, v, dtype, ctx.device)
        floor, one = floors.logits_floor(n, v, elt, ctx.rates, passes)
        for pv in provs:
            case = common.Case(
                bench=NAME, work=pv.work, passes=passes, provider=pv.name, inputs="synthetic",
                shape={"N": n, "V": v}, dtype=dtype, floor=floor, floor_1pass=one,
                predicted=floors.logits_predicted(n, v, elt, ctx.rates, passes) if pv.predicts else None,
                unavailable=pv.unavailable, skip=pv.skip_dry if ctx.dry else None, setup_s=pv.setup_s,
                grad_to_none=(z,))
            if not (case.unavailable or case.skip):
                case.gate = lambda pv=pv: gate.check_logits(lambda: pv.fn(z, b, y), z, b, y, pv.formula,
                                                            ignore_index=IGNORE)
                case.make = lambda pv=pv: _timed(pv.fn, z, b, y, passes)
            records.append(common.run_case(ctx, case))
        del z, b, y
    return records


def _timed(fn, z, b, y, passes):
    if passes == "forward":
        def forward():
            with torch.no_grad():
                return fn(z, b, y)
        return forward
    return lambda: fn(z, b, y).backward()


def main(argv=None):
    import suite

    return suite.main(["--only", NAME] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
