"""How forgetkern reads a causal LM and its batches, defined once for every entry point.

* batches: any mapping of tensors (:func:`as_batch`), the entries that are not model inputs
  (:data:`NON_MODEL_KEYS`, :func:`model_inputs`), next-token targets (:func:`batch_labels`,
  :func:`shift_labels_for_causal_lm`, :func:`count_items`);
* the fused-linear split: final hidden states and the effective LM head (:func:`lm_parts`,
  :class:`LMParts`, :class:`HeadWeights`), the logit transformation after the head
  (:func:`head_transform`), checked once against the model's own logits;
* :func:`hidden_states_and_head`: what :func:`forgetkern.linear_tmkl_loss` needs from a model;
* :func:`assemble_loss` (:mod:`.loss`): the one loss assembly of a micro-batch, its base side from
  the live base model (:data:`LIVE_BASE`) or a base cache, and :func:`fused_logit_options`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .batch import (NON_MODEL_KEYS, as_batch, batch_labels, count_items, model_inputs,
                    shift_labels_for_causal_lm)
from .head import (HeadTransform, HeadWeights, LMParts, eval_mode, find_parts, head_transform,
                   lm_parts, require_lm_parts, transform_attributes)
from .loss import (LIVE_BASE, LiveBase, LossOutput, assemble_loss, fused_logit_options,
                   token_statistics)

__all__ = ["NON_MODEL_KEYS", "as_batch", "model_inputs", "batch_labels", "count_items",
           "shift_labels_for_causal_lm", "HeadTransform", "HeadWeights", "LMParts", "lm_parts",
           "require_lm_parts", "find_parts", "head_transform", "fused_logit_options",
           "fused_parts", "eval_mode", "transform_attributes", "hidden_states_and_head",
           "HiddenStatesAndHead", "token_statistics", "LossOutput", "LiveBase", "LIVE_BASE",
           "assemble_loss"]


def fused_parts(model: nn.Module):
    """``(hidden_fn, head)`` when the model's logits are ``head(hidden_fn(**inputs))`` with a
    plain shared ``nn.Linear`` head and no logit transformation, else ``None``.

    A thin alias of :func:`lm_parts` kept for existing callers (``forgetkern.train.fused_parts``);
    forgetkern itself reads models through :func:`lm_parts`, which also serves LoRA-adapted heads
    and transformed logits and gives the head's weights (:meth:`LMParts.weights`: FSDP2's full
    weight)."""
    parts = lm_parts(model)
    return (parts.hidden, parts.head) if parts is not None and parts.plain else None


class HiddenStatesAndHead(NamedTuple):
    """What :func:`forgetkern.linear_tmkl_loss` needs from a model: ``hidden`` ``(B, L, D)`` of
    the adapted model, ``base_hidden`` of the base model (``None`` when not asked for), ``weight``
    the effective head weight (LoRA on the head included) and :meth:`head_kwargs` the rest."""

    hidden: torch.Tensor
    base_hidden: torch.Tensor | None
    weights: HeadWeights
    transform: HeadTransform

    @property
    def weight(self) -> torch.Tensor:
        return self.weights.weight

    def head_kwargs(self) -> dict:
        """``base_weight``, ``bias``, ``base_bias`` (and the logit transformation's options)."""
        return {**self.weights.linear_kwargs(), **fused_logit_options(self.transform)}


def hidden_states_and_head(model: nn.Module, inputs, *, base: bool = True) -> HiddenStatesAndHead:
    """Final hidden states of the adapted and the base model and the effective LM head.

    In plain torch, for an HF causal LM with LoRA (a head without adapters)::

        hidden = model.model(**inputs).last_hidden_state             # (B, L, D), adapters on
        with torch.no_grad(), disable_adapters(model):
            base_hidden = model.model(**inputs).last_hidden_state    # (B, L, D), base model
        weight = model.lm_head.weight                                # (V, D)

    With LoRA on the head (PEFT or forgetkern, tied embeddings included) ``weight`` is
    ``W0 + scaling * B @ A`` (differentiable w.r.t. ``A`` and ``B``) and the head kwargs carry the
    base weight ``W0``; a head PEFT trains whole (``modules_to_save``) gives its trained copy and
    the original. Raises a ``ValueError`` saying why when the model has no such form (a head that
    is not linear, LoRA dropout on the head, logits transformed in a way no config attribute
    announces). The first call on a model checks once that its own logits equal the head applied to
    these hidden states.

    Args:
        model: an HF causal LM (plain or PEFT), a forgetkern-LoRA model, or a model with
            ``forward_hidden(**inputs)`` and ``get_output_embeddings()``.
        inputs: the model's keyword inputs (any mapping; ``labels`` and the other
            :data:`NON_MODEL_KEYS` are dropped).
        base: also run the base model (adapters off, eval mode, no gradient).
    """
    parts = require_lm_parts(model)
    inputs = model_inputs(inputs)
    base_hidden = None
    if base:  # the live base forward, as the training loss runs it
        base_hidden = LIVE_BASE.side(model, parts, inputs, None)
    hidden = parts.hidden(**inputs)
    w = parts.weights()
    cast = lambda t: None if t is None else t.to(hidden.dtype)  # noqa: E731
    weights = HeadWeights(*(cast(t) for t in w))
    return HiddenStatesAndHead(hidden, None if base_hidden is None else base_hidden.to(hidden.dtype),
                               weights, parts.transform)
