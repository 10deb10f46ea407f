"""Thin LoRA: injection into any ``nn.Module``, adapter switching, and PEFT interop."""
from .layer import LoRALinear
from .inject import disable_adapters, inject_lora, lora_layers

__all__ = ["LoRALinear", "inject_lora", "disable_adapters", "lora_layers"]
