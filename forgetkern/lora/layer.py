"""A minimal LoRA linear layer: ``y = W0 x + b0 + (alpha / r) B A dropout(x)``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` with a low-rank update.

    Attributes:
        base: the wrapped ``nn.Linear`` (weights frozen).
        lora_A: ``(r, in_features)`` parameter, Kaiming-uniform initialized.
        lora_B: ``(out_features, r)`` parameter, zero initialized (the layer starts equal to base).
        r, alpha, scaling: rank, LoRA alpha and ``alpha / r``.
        adapters_enabled: when ``False`` the layer computes exactly ``base(x)``.
        merged: whether ``scaling * B A`` is currently folded into ``base.weight``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters_enabled = True
        self.merged = False
        # The exact pre-merge base weight while merged: unmerging restores it bit for bit, and a
        # disabled merged layer computes with it (subtracting the delta again would round).
        self.register_buffer("_unmerged_weight", None, persistent=False)
        # a state dict holds the unmerged base weight whatever the merge state, so loading it
        # anywhere (merged or not) applies the adapters exactly once
        self._register_state_dict_hook(LoRALinear._canonical_state)
        self.register_load_state_dict_post_hook(LoRALinear._remerge_after_load)

    @staticmethod
    def _canonical_state(module, state_dict, prefix, local_metadata):
        if module.merged:
            state_dict[prefix + "base.weight"] = module._unmerged_weight
        return state_dict

    @staticmethod
    @torch.no_grad()
    def _remerge_after_load(module, incompatible_keys):
        if module.merged:  # the loaded base weight is unmerged: fold the loaded adapters in again
            module._unmerged_weight = module.base.weight.detach().clone()
            module.base.weight += module.delta_weight().to(module.base.weight.dtype)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (so code that reads ``layer.weight`` keeps working)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, shaped like ``base.weight``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and not self.adapters_enabled:
            # exactly the base model: the saved pre-merge weight, not merged weight minus delta
            return F.linear(x, self._unmerged_weight, self.base.bias)
        out = self.base(x)
        if self.adapters_enabled and not self.merged:
            a = self.lora_A.to(x.dtype)
            b = self.lora_B.to(x.dtype)
            out = out + (self.dropout(x) @ a.t()) @ b.t() * self.scaling
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base.weight`` (inference without the extra matmuls).

        Keeps a copy of the pre-merge weight (one extra weight-sized buffer per merged layer) so
        that :meth:`unmerge` and disabled adapters reproduce the base model bit for bit.
        """
        if not self.merged:
            self._unmerged_weight = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`, restoring the exact pre-merge ``base.weight``."""
        if self.merged:
            self.base.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, alpha={self.alpha}")
