"""A forgetting-aware training step that any loop can call.

:func:`forget_aware_loss` computes one micro-batch's loss (``ce``, plain ``kl`` or ``tmkl``) with
the frozen base model's outputs taken from the same model with its adapters switched off;
:class:`ForgetAwareStep` wraps it into a full optimizer step with gradient accumulation.

The loss goes through the fused-linear path (:func:`forgetkern.linear_tmkl_loss`: logits never
materialized) when the model exposes its final hidden states and its output head:

* HF ``transformers`` causal LMs (and PEFT models wrapping them): the backbone
  (``model.base_model``, e.g. ``LlamaModel``) gives the last hidden state and
  ``get_output_embeddings()`` the head: a plain ``nn.Linear`` or a LoRA-adapted one (PEFT LoRA on
  ``lm_head``, ``modules_to_save``, forgetkern ``LoRALinear``: the effective weight against the
  base weight, :mod:`forgetkern.modeling`);
* your own models, through a two-method protocol::

      class MyLM(nn.Module):
          def forward_hidden(self, input_ids, **kwargs) -> Tensor:  # (B, L, D) final hidden states
              ...
          def get_output_embeddings(self) -> nn.Linear:           # logits = head(hidden)
              ...

Models whose config transforms the logits after the head (Gemma-2's soft cap, Cohere's logit
scale) take the fused path too: the loss applies the same transformation to both models' logits
(:func:`forgetkern.modeling.fused_logit_options`). Anything else (a head that is not linear, LoRA
dropout on the head, a model returning only logits) takes the logits path
(:func:`forgetkern.tmkl_loss` on ``model(**inputs)`` logits). Any transformation that no config
attribute announces raises on the first batch: the model's own logits are checked once against
the head applied to its hidden states.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ._params import LOSSES, PATHS, LossConfig
from .distributed import data_parallel
from .lora import adapter_parameters, has_adapters, merged_layers
from .modeling import (LIVE_BASE, LossOutput, as_batch, assemble_loss, batch_labels, count_items,
                       fused_parts, lm_parts, shift_labels_for_causal_lm)

__all__ = ["LOSSES", "PATHS", "LossConfig", "LossOutput", "loss_config", "forget_aware_loss",
           "ForgetAwareStep", "fused_parts", "batch_labels", "count_items",
           "shift_labels_for_causal_lm"]

_KL_OPTIONS = ("kl_weight", "ce_weight", "temperature", "direction", "backend", "chunk_size")


def loss_config(loss: str = "tmkl", *, path: str = "auto", ignore_index: int = -100,
                **options) -> LossConfig:
    """The validated :class:`~forgetkern._params.LossConfig` of a training loss: ``loss`` is
    ``"ce"``, ``"kl"`` or ``"tmkl"``, ``path`` ``"auto"``, ``"fused"`` or ``"logits"``, and
    ``options`` some of ``kl_weight``, ``ce_weight``, ``temperature``, ``direction``,
    ``backend``, ``chunk_size``. Every invalid name or value raises here, once."""
    unknown = set(options) - set(_KL_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected loss options {sorted(unknown)}; expected some of {_KL_OPTIONS}")
    return LossConfig(loss=loss, path=path, ignore_index=ignore_index, **options)


def forget_aware_loss(model: nn.Module, batch, *, loss: str = "tmkl", num_items_in_batch=None,
                      shift_labels: bool = True, ignore_index: int = -100, path: str = "auto",
                      **options) -> LossOutput:
    """The loss of one micro-batch, with base-model outputs from ``model`` with adapters disabled.

    In plain torch (logits path, ``loss="tmkl"``)::

        with torch.no_grad(), disable_adapters(model): base = model(**inputs).logits  # (B, L, V)
        logits = model(**inputs).logits                                              # (B, L, V)
        loss = tmkl_loss(logits, base, shift(labels), num_items_in_batch=n, **options)

    ``loss="kl"`` is the same with ``mask_target=False`` (plain KL), ``loss="ce"`` is
    cross-entropy alone (no base forward). The fused path replaces the two logits by the final
    hidden states and the head weight (:func:`forgetkern.linear_tmkl_loss`).

    Args:
        model: a forgetkern-LoRA model, an HF PEFT model, or any model mapping ``batch``'s
            inputs to logits (then the KL is against itself: inject adapters first).
        batch: a mapping (``dict``, HF ``BatchEncoding``, ...) with ``input_ids`` (and optionally
            ``attention_mask``, ``labels``, ``shift_labels``, other model keyword inputs).
        loss: ``"ce"``, ``"kl"`` or ``"tmkl"``.
        num_items_in_batch: the mean's denominator (valid target tokens across the accumulated
            micro-batches); defaults to this batch's count.
        shift_labels: ``labels`` are the inputs' tokens (HF causal-LM convention) and are shifted
            here; ``False`` when ``labels[t]`` already is the target of position ``t``.
        ignore_index: label value that contributes nothing.
        path: ``"auto"`` (fused when possible), ``"fused"`` (error when impossible) or ``"logits"``.
        **options: ``kl_weight``, ``ce_weight``, ``temperature``, ``direction``, ``backend``
            (and ``chunk_size`` for the fused path), as in :func:`forgetkern.tmkl_loss`.

    Returns:
        :class:`LossOutput` with the differentiable ``loss`` and detached ``ce``/``kl`` means.
    """
    config = loss_config(loss, path=path, ignore_index=ignore_index, **options)
    return config_loss(model, batch, config, num_items_in_batch=num_items_in_batch,
                       shift_labels=shift_labels)


def config_loss(model: nn.Module, batch, config: LossConfig, *, num_items_in_batch=None,
                shift_labels: bool = True, base_cache=None, statistics: bool = False) -> LossOutput:
    """:func:`forget_aware_loss` with its options as one validated :class:`LossConfig`;
    ``base_cache`` (a :class:`forgetkern.cache.BaseCache`) replaces the base forward;
    ``statistics`` also fills :attr:`LossOutput.statistics` (entropy and top-1 hits of the
    adapted model, from the same forward). One assembly serves every base side
    (:func:`forgetkern.modeling.assemble_loss`): the live base model or the cache's records."""
    batch = as_batch(batch)
    base = LIVE_BASE if base_cache is None else base_cache.base_source(batch)
    return assemble_loss(model, batch, config, base, num_items_in_batch=num_items_in_batch,
                         shift_labels=shift_labels, statistics=statistics)


def _move(batch, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in as_batch(batch).items()}


class ForgetAwareStep:
    """One optimizer step of forgetting-aware LoRA training, callable from any loop.

    Per call: for each micro-batch, the base forward (no grad, adapters disabled, eval mode), the
    adapted forward, the loss (fused-linear when possible, see the module docstring), backward;
    then gradient clipping (optional), ``optimizer.step()``, ``scheduler.step()``, ``zero_grad``.
    With several micro-batches, each loss is divided by the total number of valid target tokens
    (``num_items_in_batch``), so the accumulated gradient is that of the full batch's token mean.

    Example::

        model = inject_lora(model, ["q_proj", "v_proj"], rank=16, alpha=32)
        step = ForgetAwareStep(model, loss="tmkl", kl_weight=1.0, lr=1e-4)
        for batch in loader:                 # dicts with input_ids (+ attention_mask, labels)
            metrics = step(batch)            # or step([micro1, micro2, ...])

    Args:
        model: forgetkern-LoRA, PEFT or protocol model (see :func:`forget_aware_loss`).
        loss: ``"ce"``, ``"kl"`` (plain KL, ``mask_target=False``) or ``"tmkl"``.
        optimizer: any ``torch.optim.Optimizer`` (e.g. ``forgetkern.optim.FoLoRA``); by default
            AdamW over the adapter parameters with ``lr``.
        lr: learning rate of the default optimizer.
        scheduler: optional LR scheduler stepped after each optimizer step.
        max_grad_norm: clip the global gradient norm of the trainable parameters.
        autocast: bf16 autocast; ``None`` enables it when the model is on a CUDA device.
        shift_labels, ignore_index, path: as in :func:`forget_aware_loss`.
        base_cache: a :class:`forgetkern.cache.BaseCache` of this model's base outputs on the
            data (batches carry ``example_id``): no base forward (docs/base_cache.md).
        **loss_options: ``kl_weight``, ``ce_weight``, ``temperature``, ``direction``,
            ``backend``, ``chunk_size``.

    Calling it returns a dict: ``loss``, ``ce``, ``kl`` (``None`` for ``ce``), ``tokens``,
    ``tokens_per_s``, ``time_s``, ``path`` and ``grad_norm`` (when clipping).

    Data parallel: with ``model`` wrapped in ``DistributedDataParallel`` or ``fully_shard``-ed
    (FSDP2) each rank passes its share of the global batch; the mean's denominator is the token
    count summed over the ranks (one ``all_reduce`` of an integer), each rank's loss is scaled by
    the world size so that the wrapper's gradient average is the global token mean, and the
    gradients are reduced once per step (``no_sync`` / ``set_requires_gradient_sync``; see
    :class:`forgetkern.distributed.DataParallel`, also for the FSDP2 head of the fused path).
    ``loss``/``ce``/``kl`` are the global means on every rank (one more ``all_reduce`` of three
    numbers per step) and ``tokens`` the global count.
    """

    def __init__(self, model: nn.Module, loss: str = "tmkl", optimizer=None, *, lr: float = 1e-4,
                 scheduler=None, max_grad_norm: float | None = None, autocast: bool | None = None,
                 shift_labels: bool = True, ignore_index: int = -100, path: str = "auto",
                 base_cache=None, **loss_options):
        self.config = loss_config(loss, path=path, ignore_index=ignore_index, **loss_options)
        self.model = model
        self.loss = loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (inject adapters first)")
        if self.config.uses_base and not has_adapters(model):
            raise ValueError(
                f"loss={loss!r} compares the model with its base model (the model with its adapters "
                "off), but this model has no adapters: add them first with "
                "forgetkern.lora.inject_lora(model, target_modules, rank, alpha) or "
                "peft.get_peft_model, or train with loss='ce'")
        if optimizer is None:
            optimizer = torch.optim.AdamW(adapter_parameters(model) or self.params, lr=lr)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.device = self.params[0].device
        self.autocast = (self.device.type == "cuda") if autocast is None else bool(autocast)
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index
        self.steps = 0
        self.base_cache = base_cache
        if base_cache is not None:
            base_cache.check(model, self.config)

    def _autocast(self):
        if self.autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_of(self, batch, num_items_in_batch=None) -> LossOutput:
        """The loss of one micro-batch under this step's settings (no backward)."""
        with self._autocast():
            return config_loss(self.model, _move(batch, self.device), self.config,
                               num_items_in_batch=num_items_in_batch,
                               shift_labels=self.shift_labels, base_cache=self.base_cache)

    def __call__(self, batch) -> dict:
        micro = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        if not micro:
            raise ValueError("empty list of micro-batches")
        merged = merged_layers(self.model)
        if merged:
            raise RuntimeError(
                f"the adapters of {len(merged)} layer(s) (e.g. {merged[0]!r}) are merged into their "
                "base weights and get no gradient: call forgetkern.lora.unmerge_adapters(model) "
                "before training")
        start = time.perf_counter()
        self.model.train()
        n_items = count_items(micro, shift_labels=self.shift_labels, ignore_index=self.ignore_index)
        parts = lm_parts(self.model) if self.config.path != "logits" else None
        dp = data_parallel(self.model, head=parts.head if parts else None)
        scale = 1.0
        if dp is not None:
            # the mean's denominator counts every rank's tokens; DDP and FSDP2 average the
            # gradients over the ranks, so each rank's loss is scaled by the world size
            n_items, scale = dp.global_count(n_items, self.device), float(dp.world)
        total = ce = 0.0
        kl = None
        used = None
        try:
            for i, mb in enumerate(micro):
                # gradient accumulation: one gradient reduction, on the last micro-batch
                with contextlib.nullcontext() if dp is None else dp.micro_batch(i, len(micro)):
                    out = self.loss_of(mb, num_items_in_batch=n_items)
                    (out.loss * scale if scale != 1.0 else out.loss).backward()
                total += float(out.loss.detach())
                ce += float(out.ce)
                kl = None if out.kl is None else (kl or 0.0) + float(out.kl)
                used = out.path
        except BaseException:
            # a failed micro-batch must not leave the earlier ones' gradients for the next step
            self.optimizer.zero_grad(set_to_none=True)
            raise
        if dp is not None:
            # each rank holds its share of the global means: their sum is the global mean
            sums = torch.tensor([total, ce, kl or 0.0], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(sums, group=dp.group)
            total, ce, kl_sum = sums.tolist()
            kl = None if kl is None else kl_sum
        metrics = {}
        if self.max_grad_norm is not None:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params,
                                                                         self.max_grad_norm))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        metrics.update(loss=total, ce=ce, kl=kl, tokens=n_items, time_s=elapsed,
                       tokens_per_s=n_items / elapsed if elapsed > 0 else float("inf"), path=used)
        return metrics
