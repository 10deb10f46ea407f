"""Benchmark: batched generalized symmetric eigenproblems ``A v = λ (B + εI) v`` (FoLoRA's per-layer
``r x r`` problems).

Providers: forgetkern (triton and cuda kernels for n <= 64, when available), and torch
(Cholesky + triangular solves + ``torch.linalg.eigh``: the reference), eager and compiled.
Each record's note carries the speedup over the torch reference. The floor is the bandwidth one
(read A and B, write eigenvectors and eigenvalues): these problems are latency-bound, so the ratio
to it is large by nature; the target is the speedup (>= 10x at n <= 64).

    python benchmarks/bench_generalized_eigh.py [--quick] [--out DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import forgetkern  # noqa: E402
from forgetkern import _backend, reference  # noqa: E402

SIZES = [(batch, n) for batch in (32, 224) for n in (8, 16, 32, 64, 128)]
QUICK = [(224, 16), (224, 32), (224, 64)]


def problem(batch: int, n: int, dtype=torch.float32):
    """Random symmetric A and SPD B shaped like LoRA-space statistics (A S A^T of a random S)."""
    gen = torch.Generator(device="cuda").manual_seed(batch * 1000 + n)
    x = torch.randn(batch, n, 4 * n, device="cuda", dtype=dtype, generator=gen)
    y = torch.randn(batch, n, 4 * n, device="cuda", dtype=dtype, generator=gen)
    return x @ x.mT / (4 * n), y @ y.mT / (4 * n)


def providers() -> dict:
    out = {"torch-eager": lambda a, b: reference.generalized_eigh(a, b, eps=1e-6)}
    try:
        out["torch-compile"] = torch.compile(lambda a, b: reference.generalized_eigh(a, b, eps=1e-6))
    except Exception as exc:  # pragma: no cover
        print(f"note: torch.compile unavailable: {exc}")
    for backend in ("triton", "cuda"):
        if backend in _backend.OP_BACKENDS["generalized_eigh"]:
            if _backend.why_unavailable(backend, "generalized_eigh", torch.device("cuda")) is None:
                out[f"forgetkern-{backend}"] = (
                    lambda a, b, _b=backend: forgetkern.generalized_eigh(a, b, eps=1e-6, backend=_b))
            else:
                print(f"note: forgetkern-{backend} unavailable: "
                      f"{_backend.why_unavailable(backend, 'generalized_eigh', torch.device('cuda'))}")
    return out


def main(argv=None) -> list[common.Record]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    meta, floors, provs = common.start("bench_generalized_eigh.py", args, providers)
    records = []
    for batch, n in (QUICK if args.quick else SIZES):
        a, b = problem(batch, n)
        nbytes = 4 * batch * (3 * n * n + n)
        case = []
        for name, fn in provs.items():
            rec = common.run_case(op="generalized_eigh", provider=name, shape={"batch": batch, "n": n},
                                  dtype=torch.float32, mode="forward", make=lambda: (lambda: fn(a, b)),
                                  floor_ms=floors.bandwidth_ms(nbytes), meta=meta)
            case.append(rec)
        base = next((r for r in case if r.provider == "torch-eager" and r.median_ms), None)
        for rec in case:
            if base and rec.median_ms and rec is not base:
                rec.note = (rec.note + " " if rec.note else "") + f"{base.median_ms / rec.median_ms:.1f}x vs torch-eager"
            print(common.format_table([rec]).splitlines()[-1], flush=True)
        records += case
    return common.finish(records, args.out)


if __name__ == "__main__":
    main()
