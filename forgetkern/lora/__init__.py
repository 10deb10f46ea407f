"""Thin LoRA: injection into any ``nn.Module``, adapter switching, merging, adapter files, the one
LoRA-layer discovery (``discovery``), and PEFT interop (the same functions accept HF PEFT models)."""
from .discovery import lora_layers
from .inject import (adapter_parameters, disable_adapters, has_adapters, inject_lora, is_peft_model,
                     merge_adapters, merged_layers, unmerge_adapters)
from .io import load_adapters, read_adapters, save_adapters
from .layer import LoRALinear

__all__ = ["LoRALinear", "inject_lora", "disable_adapters", "lora_layers", "merge_adapters",
           "unmerge_adapters", "adapter_parameters", "has_adapters", "merged_layers", "is_peft_model", "save_adapters",
           "load_adapters", "read_adapters"]
