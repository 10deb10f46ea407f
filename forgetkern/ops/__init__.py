"""Kernels, launchers and autograd Functions, one file per op.

Modules here are imported lazily by :mod:`forgetkern.functional`, so that importing forgetkern
neither imports Triton nor fixes its interpreter mode. This package module imports no Triton: it
declares where the Triton backend runs (:func:`unavailable`, read by ``forgetkern._backend``
before any kernel module is imported); each kernel module may declare which problems it serves
(``unsupported(op, size)``).
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
