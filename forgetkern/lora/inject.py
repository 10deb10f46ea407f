"""Injecting :class:`LoRALinear` layers and switching adapters off."""
from __future__ import annotations

import contextlib
import re
from typing import Iterable

from torch import nn

from .layer import LoRALinear


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, target_modules: str | Iterable[str], rank: int, alpha: float,
                dropout: float = 0.0) -> nn.Module:
    """Replace matching ``nn.Linear`` submodules of ``model`` by :class:`LoRALinear` in place.

    Args:
        model: any module.
        target_modules: a list of module-name suffixes (``["q_proj", "v_proj"]`` matches
            ``layers.0.attn.q_proj``) or one regular expression matched against full names.
        rank, alpha, dropout: LoRA rank ``r``, scale ``alpha`` (update scaled by ``alpha / r``)
            and input dropout.

    Returns:
        ``model``, with every parameter frozen except the new ``lora_A``/``lora_B``.

    Raises:
        ValueError: no ``nn.Linear`` matched ``target_modules``.
    """
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and _matches(name, target_modules)]
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:10]
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear; linear layers include {linears}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(mod, rank, alpha, dropout))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All :class:`LoRALinear` layers of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run ``model`` as its base model inside the block.

    Works for forgetkern LoRA models and for HF PEFT models (through their ``disable_adapter()``).
    """
    if hasattr(model, "disable_adapter") and not lora_layers(model):
        with model.disable_adapter():
            yield model
        return
    layers = list(lora_layers(model).values())
    previous = [layer.adapters_enabled for layer in layers]
    try:
        for layer in layers:
            layer.adapters_enabled = False
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.adapters_enabled = state
