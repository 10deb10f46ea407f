"""The Triton backend: one file per op, each holding its kernels and their host launchers
(``tmkl``, ``sparse_tmkl``, ``linear_tmkl_fused`` for the on-chip fused-linear form,
``generalized_eigh``, ``folora_step``), plus ``_tmkl_math`` (the jit math the TMKL kernels share)
and ``_triton`` (the import shim). The autograd Functions live in :mod:`forgetkern._autograd`.

Nothing here is imported with forgetkern but this package module, which imports no Triton: it
declares where the Triton backend runs (:func:`unavailable`, read by :mod:`forgetkern._backend`);
each kernel module may declare which problems it serves (``unsupported(op, size)``).
:mod:`forgetkern._backend` imports a kernel module on the first call it serves, so that importing
forgetkern neither imports Triton nor fixes its interpreter mode.
"""
from __future__ import annotations

import importlib.util

from .._params import triton_interpret

#: The one "Triton is missing" message of the Triton backend.
TRITON_MISSING = "the triton package is not installed (pip install triton, or use backend='reference')"


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def unavailable(device) -> str | None:
    """Why Triton kernels cannot run on ``device`` (``None``: they can)."""
    if not triton_installed():
        return TRITON_MISSING
    if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
        return None
    return (f"Triton kernels need CUDA tensors (got {device.type} tensors); set TRITON_INTERPRET=1 "
            "before the first call to run them on the CPU interpreter")
