"""``forgetkern.info()``: what this installation can run."""
from __future__ import annotations

import platform
import sys

import torch

from . import _backend, _cuda
from ._params import env_backend, triton_interpret
from ._version import __version__


def info() -> dict:
    """Versions and capabilities of this installation.

    Returns:
        A dict with at least ``version``, ``torch``, ``triton`` (version or ``None``),
        ``cuda_extension`` (bool: ``forgetkern._C`` loaded), ``cuda_extension_error`` (why not),
        ``gpu`` (device name or ``None``), ``backends`` (usable for GPU tensors if a GPU is
        present, else for CPU tensors), ``triton_interpret``, ``backend_env``, ``python``.
    """
    triton_version = None
    if _backend.triton_installed():
        try:
            import triton

            triton_version = triton.__version__
        except Exception as exc:  # pragma: no cover - broken install
            triton_version = f"broken: {exc}"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "version": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_extension": _cuda.available(),
        "cuda_extension_error": _cuda.load_error(),
        "gpu": gpu,
        "torch_cuda": torch.version.cuda,
        "backends": _backend.available_backends(),
        "triton_interpret": triton_interpret(),
        "backend_env": env_backend(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
