"""Triton import shim.

Kernel modules import ``triton``/``tl``/``jit`` from here so that they can be imported (and their
autograd Functions used with other backends) on machines where Triton is not installed. Kernels
defined with the fallback ``jit`` raise a clear error when launched.

Whether Triton interprets kernels on the CPU (``TRITON_INTERPRET=1``) is fixed when a kernel is
decorated, i.e. when its module is first imported; forgetkern imports kernel modules lazily, on
the first call that needs them.
"""
from __future__ import annotations

import os

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
            raise RuntimeError("Triton is not installed; install it or use backend='reference'")

    tl = _TLStub()

    def jit(fn=None, **_kwargs):
        def wrap(f):
            class _Missing:
                __name__ = f.__name__

                def __getitem__(self, grid):
                    raise RuntimeError(
                        f"Triton kernel {f.__name__} cannot run: Triton is not installed"
                    )

            return _Missing()

        return wrap(fn) if fn is not None else wrap


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
