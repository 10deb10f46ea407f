"""FoLoRA: proxy data from the model itself, activation statistics, and the gated Adam optimizer.

* :func:`sample_proxy_data` -- token sequences sampled from the pretrained model (adapters off).
* :class:`ActivationStats` / :func:`calibrate` -- ``E[x xᵀ]`` of the inputs of LoRA layers.
* :class:`FoLoRA` -- Adam gated per direction of the generalized eigenbasis of (task, proxy).

See ``docs/folora.md``.
"""
from .optimizer import FoLoRA
from .proxy import sample_proxy_data
from .stats import ActivationStats, calibrate

__all__ = ["FoLoRA", "ActivationStats", "calibrate", "sample_proxy_data"]
