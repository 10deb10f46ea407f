"""``forgetkern demo``: does forgetting-aware LoRA forget less? A small, download-free experiment."""
