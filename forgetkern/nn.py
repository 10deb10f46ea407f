"""``nn.Module`` forms of the public functions."""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from ._params import LinearTMKLParams, TMKLParams, check_backend_name
from ._validate import check_reduction


class TMKLLoss(nn.Module):
    """Module form of :func:`forgetkern.tmkl_loss`; keyword options are fixed at construction.

    ``forward(logits, base_logits, labels, num_items_in_batch=None)``.
    """

    def __init__(self, *, kl_weight: float = 1.0, ce_weight: float = 1.0, temperature: float = 1.0,
                 direction: str = "forward", mask_target: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", return_components: bool = False,
                 inplace_backward: bool = False, backend: str | None = None):
        super().__init__()
        # validate the options now rather than at the first call
        TMKLParams(kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature,
                   direction=direction, mask_target=mask_target, ignore_index=ignore_index,
                   inplace_backward=inplace_backward)
        check_reduction(reduction)
        check_backend_name(backend)
        self.kl_weight = kl_weight
        self.ce_weight = ce_weight
        self.temperature = temperature
        self.direction = direction
        self.mask_target = mask_target
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.return_components = return_components
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                num_items_in_batch=None):
        return F.tmkl_loss(
            logits, base_logits, labels, kl_weight=self.kl_weight, ce_weight=self.ce_weight,
            temperature=self.temperature, direction=self.direction, mask_target=self.mask_target,
            ignore_index=self.ignore_index, reduction=self.reduction,
            num_items_in_batch=num_items_in_batch, return_components=self.return_components,
            inplace_backward=self.inplace_backward, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"kl_weight={self.kl_weight}, ce_weight={self.ce_weight}, "
                f"temperature={self.temperature}, direction={self.direction!r}, "
                f"mask_target={self.mask_target}, reduction={self.reduction!r}")


class LinearTMKLLoss(nn.Module):
    """Module form of :func:`forgetkern.linear_tmkl_loss`; keyword options (those of
    :class:`TMKLLoss` plus ``strategy``, ``chunk_size``, ``memory_budget``, ``chunk_dtype``,
    ``logit_scale`` and ``logit_softcap``) are fixed at construction.

    ``forward(hidden, weight, base_hidden, labels, base_weight=None, bias=None, base_bias=None,
    num_items_in_batch=None)``.
    """

    def __init__(self, *, kl_weight: float = 1.0, ce_weight: float = 1.0, temperature: float = 1.0,
                 direction: str = "forward", mask_target: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", return_components: bool = False,
                 inplace_backward: bool = False, strategy: str = "auto",
                 chunk_size: int | None = None, memory_budget: int | None = None,
                 chunk_dtype: str = "accumulation", logit_scale: float = 1.0,
                 logit_softcap: float | None = None, backend: str | None = None):
        super().__init__()
        self.options = dict(kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature,
                            direction=direction, mask_target=mask_target,
                            ignore_index=ignore_index, inplace_backward=inplace_backward,
                            strategy=strategy, chunk_size=chunk_size, memory_budget=memory_budget,
                            chunk_dtype=chunk_dtype, logit_scale=logit_scale,
                            logit_softcap=logit_softcap)
        # validate the options now rather than at the first call
        LinearTMKLParams(**self.options)
        check_reduction(reduction)
        check_backend_name(backend)
        self.options.update(reduction=reduction, return_components=return_components,
                            backend=backend)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, base_hidden: torch.Tensor,
                labels: torch.Tensor, base_weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, base_bias: torch.Tensor | None = None,
                num_items_in_batch=None):
        return F.linear_tmkl_loss(hidden, weight, base_hidden, labels, base_weight=base_weight,
                                  bias=bias, base_bias=base_bias,
                                  num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "backend")
