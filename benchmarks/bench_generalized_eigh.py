"""Benchmark: batched generalized symmetric eigenproblems ``A v = λ (B + εI) v`` (FoLoRA's per-layer
``r x r`` problems), n in {16, 32, 64}, batch 224 (one per LoRA layer of a 7B model).

Providers: forgetkern's on-chip solvers (``forgetkern-triton``, ``forgetkern-cuda`` when the
extension is built) and torch (Cholesky + triangular solves + ``torch.linalg.eigh``, the
reference): eager, and ``torch.compile`` in the late phase. Each solution passes the gate
(``gate.check_eigh``: eigenvalues, residual and B-orthonormality against fp64) before it is
timed. The floor is the bandwidth one (read A and B, write eigenvectors and eigenvalues): these
problems are latency-bound, so the ratio to it is large by nature; each forgetkern record's note
carries its speedup over torch-eager.

    python benchmarks/bench_generalized_eigh.py [--quick]
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
from forgetkern import _backend, reference  # noqa: E402

NAME = "generalized_eigh"
SIZES = [(batch, n) for batch in (32, 224) for n in (8, 16, 32, 64, 128)]
QUICK = [(224, 16), (224, 32), (224, 64)]
DRY = [(4, 8)]
EPS = 1e-6
COMPILE_SETUP_S = 60.0


def problem(batch: int, n: int, device, dtype=torch.float32):
    """Random symmetric A and SPD B shaped like LoRA-space statistics (A S Aᵀ of a random S)."""
    gen = torch.Generator(device=device).manual_seed(batch * 1000 + n)
    x = torch.randn(batch, n, 4 * n, device=device, dtype=dtype, generator=gen)
    y = torch.randn(batch, n, 4 * n, device=device, dtype=dtype, generator=gen)
    return x @ x.mT / (4 * n), y @ y.mT / (4 * n)


def providers(device, probe_extension: bool = True) -> list[common.Provider]:
    """Every provider, available or not (with the reason); without ``probe_extension`` the CUDA
    extension is neither looked at (it may be being built) nor listed."""
    P = common.Provider
    torch_ref = lambda a, b: reference.generalized_eigh(a, b, eps=EPS)  # noqa: E731
    out = [P("torch-eager", torch_ref, work="eigh")]
    for backend in ("triton", "cuda") if probe_extension else ("triton",):
        why = _backend.why_unavailable(backend, "generalized_eigh", torch.device(device))
        out.append(P(f"forgetkern-{backend}",
                     lambda a, b, _b=backend: forgetkern.generalized_eigh(a, b, eps=EPS, backend=_b),
                     work="eigh", unavailable=why, needs_extension=backend == "cuda"))
    out.append(P("torch-compile", common.lazy_compile(torch_ref), work="eigh", late=True,
                 setup_s=COMPILE_SETUP_S, skip_dry="torch.compile is not run in the dry mode (compile time)"))
    return out


def run(ctx: common.Context) -> list[common.Record]:
    provs = [pv for pv in providers(ctx.device, ctx.extension != "skip") if ctx.selects(pv)]
    records = []
    for batch, n in DRY if ctx.dry else (QUICK if ctx.options.quick else SIZES):
        if not provs:
            break
        a, b = problem(batch, n, ctx.device)
        base_ms = None
        for pv in provs:
            case = common.Case(
                bench=NAME, work="eigh", passes="forward", provider=pv.name, inputs="synthetic",
                shape={"batch": batch, "n": n}, dtype=torch.float32,
                floor=floors.eigh_floor(batch, n, ctx.rates), unavailable=pv.unavailable,
                skip=pv.skip_dry if ctx.dry else None, setup_s=pv.setup_s)
            if not (case.unavailable or case.skip):
                case.gate = lambda fn=pv.fn: gate.check_eigh(lambda: fn(a, b), a, b, EPS)
                case.make = lambda fn=pv.fn: (lambda: fn(a, b))
                if base_ms and pv.name.startswith("forgetkern"):
                    case.timed_note = lambda ms, base=base_ms: f"{base / ms:.1f}x torch-eager"
            rec = common.run_case(ctx, case)
            if pv.name == "torch-eager":
                base_ms = rec.median_ms
            records.append(rec)
    return records


def main(argv=None):
    import suite

    return suite.main(["--only", NAME] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
