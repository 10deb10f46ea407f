"""Injecting :class:`LoRALinear` layers and switching adapters off."""
from __future__ import annotations

import contextlib
import re
from typing import Iterable

from torch import nn

from .discovery import lora_layers, lora_modules
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
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    wrapped = {f"{n}.base" if n else "base" for n, m in model.named_modules()
               if isinstance(m, LoRALinear)}
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name not in wrapped and _matches(name, target_modules)]
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


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is an HF PEFT model (has ``disable_adapter`` and ``peft_config``)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` has adapters to switch off (forgetkern LoRA layers, or a PEFT model)."""
    return bool(lora_layers(model)) or hasattr(model, "disable_adapter")


@contextlib.contextmanager
def disable_adapters(model: nn.Module, *, require: bool = True):
    """Run ``model`` as its base model inside the block.

    Works for forgetkern LoRA models and for HF PEFT models (through their ``disable_adapter()``).
    For forgetkern layers the base output is bit-identical to the model before injection, merged
    or not (a merged layer computes with its saved pre-merge weight).

    Args:
        model: a forgetkern-LoRA or PEFT model.
        require: raise when ``model`` has no adapters (the default: a "base model" that is the
            trained model itself makes every KL to it 0). ``False`` runs a plain model as it is,
            for callers to whom a plain model already is the base (proxy sampling, calibration).

    Example::

        with torch.no_grad(), disable_adapters(model):
            base_logits = model(input_ids)
    """
    if hasattr(model, "disable_adapter") and not lora_layers(model):
        with model.disable_adapter():
            yield model
        return
    layers = list(lora_layers(model).values())
    if not layers and require:
        raise ValueError(
            "disable_adapters: the model has no adapters, so its base model is the model itself "
            "(a KL to it is 0 and every weight would train); add adapters first with "
            "forgetkern.lora.inject_lora(model, target_modules, rank, alpha) or "
            "peft.get_peft_model(model, LoraConfig(...))")
    previous = [layer.adapters_enabled for layer in layers]
    try:
        for layer in layers:
            layer.adapters_enabled = False
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.adapters_enabled = state


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (PEFT models: ``merge_adapter()``).

    Merged layers keep a copy of their pre-merge weight, so :func:`unmerge_adapters` and
    :func:`disable_adapters` stay exact.
    """
    if is_peft_model(model) and not lora_layers(model):
        model.merge_adapter()
        return model
    for layer in _require_layers(model, "merge_adapters").values():
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters`, restoring the exact base weights."""
    if is_peft_model(model) and not lora_layers(model):
        model.unmerge_adapter()
        return model
    for layer in _require_layers(model, "unmerge_adapters").values():
        layer.unmerge()
    return model


def merged_layers(model: nn.Module) -> list[str]:
    """Names of the adapted layers whose adapters are merged into their base weight (forgetkern or
    PEFT layers): they train nothing until :func:`unmerge_adapters`."""
    return [m.name for m in lora_modules(model).values() if getattr(m.module, "merged", False)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (``lora_A``/``lora_B``) of a forgetkern or PEFT model."""
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def _require_layers(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no LoRA layers (call inject_lora first)")
    return layers
