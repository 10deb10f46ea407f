"""Triton import shim.

Kernel modules import ``triton``/``tl``/``jit`` from here so that they can be imported (and their
autograd Functions used with other backends) on machines where Triton is not installed. Kernels
defined with the fallback ``jit`` raise a clear error when launched.

Whether Triton interprets kernels on the CPU (``TRITON_INTERPRET=1``) is fixed when a kernel is
decorated, i.e. when its module is first imported; forgetkern imports kernel modules lazily, on
the first call that needs them.
"""
from __future__ import annotations

from . import TRITON_MISSING

try:  # pragma: no cover - exercised implicitly by the import
    import triton
    import triton.language as tl

    HAS_TRITON = True
    jit = triton.jit
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    HAS_TRITON = False

    class _TLStub:
        """Just enough of ``triton.language`` for kernel signatures to be defined."""

        constexpr = object
        float32 = float64 = int64 = None

        def __getattr__(self, name):
            raise RuntimeError(TRITON_MISSING)

    tl = _TLStub()

    def jit(fn=None, **_kwargs):
        def wrap(f):
            class _Missing:
                __name__ = f.__name__

                def __getitem__(self, grid):
                    raise RuntimeError(f"Triton kernel {f.__name__} cannot run: {TRITON_MISSING}")

            return _Missing()

        return wrap(fn) if fn is not None else wrap


def constant(value):
    """A module-level constant that kernels may read (Triton only reads ``tl.constexpr`` globals)."""
    return tl.constexpr(value) if HAS_TRITON else value


def check_triton() -> None:
    """Raise the one "Triton is missing" error when a launcher is called without Triton."""
    if not HAS_TRITON:
        raise RuntimeError(TRITON_MISSING)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def multiprocessor_count(device=None) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (1 anywhere else: the CPU interpreter), the
    unit the launchers size their grids in."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
