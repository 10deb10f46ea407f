"""Finding the LoRA-adapted linear layers of a model: forgetkern ``LoRALinear`` and PEFT LoRA."""
from __future__ import annotations

from typing import NamedTuple

from torch import nn

from ..lora import LoRALinear


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


def lora_modules(model: nn.Module, adapter_name: str | None = None) -> dict[str, LoRAModule]:
    """All LoRA-adapted linear layers of ``model`` by qualified name.

    Finds forgetkern :class:`~forgetkern.lora.LoRALinear` layers and PEFT LoRA layers
    (``peft.tuners.lora.LoraLayer`` whose ``lora_A[adapter]`` is an ``nn.Linear``; the first active
    adapter, or ``adapter_name``). PEFT embedding and convolution LoRA layers are skipped.
    """
    peft_type = _peft_lora_layer_type()
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
