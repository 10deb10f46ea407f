"""The one place that picks ``reference | triton | cuda`` for a call.

Order (DESIGN.md): an explicit ``backend=`` argument, then the ``FORGETKERN_BACKEND`` environment
variable, then the CUDA extension if it is built and the tensors are on a GPU, then Triton on a GPU
(or on the CPU when ``TRITON_INTERPRET=1``), else the reference.

An explicit ``backend=`` that cannot serve the call is an error that says why. The environment
variable is a process-wide preference: for an op that has no such backend at all (for example
``cuda`` for an op implemented only in Triton) the automatic choice applies; for an op that has it
but cannot use it for these tensors, the call fails with the reason.

Nothing here initializes CUDA or imports Triton at import time.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "FORGETKERN_BACKEND"

# Which backends implement each op. Ops register themselves here (one line per op).
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "tmkl": ("reference", "triton", "cuda"),
    "linear_tmkl": ("reference", "triton"),
    "generalized_eigh": ("reference", "triton", "cuda"),
    "folora_step": ("reference", "triton"),
}


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def cuda_extension_available() -> bool:
    """Whether the compiled ``forgetkern._C`` extension loads in this process."""
    from . import _cuda

    return _cuda.available()


def _device_of(tensors) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def why_unavailable(backend: str, op: str, device: torch.device) -> str | None:
    """Return ``None`` if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}"
    supported = OP_BACKENDS.get(op, ("reference",))
    if backend not in supported:
        return f"op {op!r} has no {backend!r} backend (it has: {', '.join(supported)})"
    if backend == "reference":
        return None
    if backend == "triton":
        if not triton_installed():
            return "Triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return (
            f"Triton kernels need CUDA tensors (got {device.type} tensors); "
            "set TRITON_INTERPRET=1 before the first call to run them on the CPU interpreter"
        )
    # cuda
    if device.type != "cuda":
        return f"the CUDA extension needs CUDA tensors (got {device.type} tensors)"
    if not cuda_extension_available():
        from . import _cuda

        return f"the forgetkern._C extension is not available: {_cuda.load_error()}"
    return None


def resolve(op: str, *tensors, backend: str | None = None) -> str:
    """Pick the backend for one call of ``op`` on ``tensors``.

    Args:
        op: op name, a key of :data:`OP_BACKENDS`.
        tensors: the call's tensors (the first tensor's device decides).
        backend: explicit choice, or ``None`` for the environment variable / automatic choice.

    Returns:
        One of ``"reference"``, ``"triton"``, ``"cuda"``.

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: an explicitly requested backend that cannot serve this call.
    """
    device = _device_of(tensors)
    supported = OP_BACKENDS.get(op, ("reference",))
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        reason = why_unavailable(backend, op, device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run {op}: {reason}")
        return backend
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        if env in supported:
            reason = why_unavailable(env, op, device)
            if reason is not None:
                raise RuntimeError(f"{ENV_VAR}={env} cannot run {op}: {reason}")
            return env
    for candidate in ("cuda", "triton"):
        if candidate in supported and why_unavailable(candidate, op, device) is None:
            return candidate
    return "reference"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable in this process for tensors on ``device`` (default: the GPU if present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out = ["reference"]
    for b in ("triton", "cuda"):
        reasons = [why_unavailable(b, op, device) for op in OP_BACKENDS if b in OP_BACKENDS[op]]
        if reasons and any(r is None for r in reasons):
            out.append(b)
    return out
