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
        ``cuda_extension_built`` (bool: ``forgetkern._C`` is compiled and loads),
        ``cuda_extension_error`` (why not), ``cuda_extension_usable`` (bool: built *and* this
        machine has a CUDA GPU to run it on), ``cuda_extension_unusable_why`` (why not, or
        ``None``), ``gpu`` (device name or ``None``), ``backends`` (usable for GPU tensors if a
        GPU is present, else for CPU tensors), ``triton_interpret``, ``backend_env``, ``python``.
    """
    triton_version = None
    if _backend.triton_installed():
        try:
            import triton

            triton_version = triton.__version__
        except Exception as exc:  # pragma: no cover - broken install
            triton_version = f"broken: {exc}"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if gpu is None:
        unusable = ("no CUDA GPU on this machine (torch.cuda.is_available() is False"
                    + (f"; torch {torch.__version__} is a CPU build)" if torch.version.cuda is None
                       else ")"))
    else:
        unusable = _backend.why_unavailable("cuda", "tmkl", torch.device("cuda"))
    return {
        "version": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_extension_built": _cuda.available(),
        "cuda_extension_error": _cuda.load_error(),
        "cuda_extension_usable": unusable is None,
        "cuda_extension_unusable_why": unusable,
        "gpu": gpu,
        "torch_cuda": torch.version.cuda,
        "backends": _backend.available_backends(),
        "triton_interpret": triton_interpret(),
        "backend_env": env_backend(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
