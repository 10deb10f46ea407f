"""What forgetkern finds in a model: its LoRA-adapted linear layers (forgetkern ``LoRALinear`` and
PEFT LoRA), and the logits in its outputs. The one place that walks a model for LoRA layers."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .layer import LoRALinear


class LoRAModule(NamedTuple):
    """One LoRA-adapted linear layer.

    Attributes:
        name: qualified module name in the model.
        module: the layer whose forward input is the adapted linear's input ``x``.
        A: the ``(r, in_features)`` LoRA ``A`` weight.
        B: the ``(out_features, r)`` LoRA ``B`` weight.
    """

    name: str
    module: nn.Module
    A: nn.Parameter
    B: nn.Parameter


def _peft_lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:  # peft missing or broken: no PEFT layers to find
        return None
    return LoraLayer


def _peft_adapter(module: nn.Module, adapter_name: str | None) -> str | None:
    names = [adapter_name] if adapter_name is not None else list(getattr(module, "active_adapters", []))
    for name in names:
        a = getattr(module, "lora_A", {})
        if name in a and isinstance(a[name], nn.Linear) and name in module.lora_B:
            return name
    return None


def lora_modules(model: nn.Module, adapter_name: str | None = None, *,
                 peft: bool = True) -> dict[str, LoRAModule]:
    """All LoRA-adapted linear layers of ``model`` by qualified name.

    Finds forgetkern :class:`~forgetkern.lora.LoRALinear` layers and (with ``peft``) PEFT LoRA
    layers (``peft.tuners.lora.LoraLayer`` whose ``lora_A[adapter]`` is an ``nn.Linear``; the first
    active adapter, or ``adapter_name``). PEFT embedding and convolution LoRA layers are skipped.
    """
    peft_type = _peft_lora_layer_type() if peft else None
    found: dict[str, LoRAModule] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            found[name] = LoRAModule(name, module, module.lora_A, module.lora_B)
        elif peft_type is not None and isinstance(module, peft_type):
            adapter = _peft_adapter(module, adapter_name)
            if adapter is not None:
                found[name] = LoRAModule(name, module, module.lora_A[adapter].weight,
                                         module.lora_B[adapter].weight)
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All forgetkern :class:`LoRALinear` layers of ``model`` by qualified name."""
    return {name: found.module for name, found in lora_modules(model, peft=False).items()}


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``output.logits`` (HF), or the first
    element of a tuple or list."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in the model output of type {type(output).__name__}")
