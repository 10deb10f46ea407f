"""The one loss assembly of a micro-batch, with the base side from a pluggable source.

:func:`assemble_loss` reads the batch (targets, model inputs), splits the model into final hidden
states and its effective head (:func:`~forgetkern.modeling.head.find_parts`), asks a *base source*
for the base side and calls :func:`forgetkern.linear_tmkl_loss` (fused path) or
:func:`forgetkern.tmkl_loss` (logits path). The sources:

* :data:`LIVE_BASE` -- the model itself with its adapters disabled (eval mode, no gradient);
* a base cache (:class:`forgetkern.cache.reader.CachedBase`): cached base hidden states (exact
  mode, combined with the model's own base head) or :class:`forgetkern.TopKBase` records.

A source has ``targets_only`` (its rows are the batch's target tokens only, in row-major order of
``labels != ignore_index``, instead of every position), ``fused_only`` (why it needs the fused path,
or ``""``) and ``side(model, parts, inputs, labels)``: the base hidden states (``parts`` given)
or logits (``parts=None``), or a ``TopKBase`` record. Everything else -- which head weight is read
(the FSDP2 full weight, the adapted weight against the base weight), the logit transformation, the
mean's denominator -- is decided here once for every source.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._params import LossConfig, TopKBase
from ..functional import linear_tmkl_loss, tmkl_loss
from ..lora import disable_adapters
from ..lora.discovery import logits_of
from .batch import as_batch, batch_labels, model_inputs
from .head import HeadTransform, HeadWeights, LMParts, eval_mode, find_parts

__all__ = ["LossOutput", "LiveBase", "LIVE_BASE", "assemble_loss", "fused_logit_options",
           "token_statistics"]


@dataclass
class LossOutput:
    """One micro-batch's loss and its components (means over ``num_items_in_batch``)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor | None
    tokens: int
    path: str
    #: ``(tokens, entropy sum, top-1 hits)`` of the adapted model when asked for
    statistics: tuple | None = None


def fused_logit_options(transform: HeadTransform) -> dict:
    """The keyword arguments that make :func:`forgetkern.linear_tmkl_loss` apply ``transform``
    (``c * tanh(s * z / c)``, docs/linear_tmkl.md) to the adapted and base logits: ``{}`` for the
    identity, else ``logit_scale`` and ``logit_softcap``. The one place where the fused-linear
    paths learn how to pass a head transformation."""
    if transform.identity:
        return {}
    return {"logit_scale": transform.logit_scale, "logit_softcap": transform.logit_softcap}


class LiveBase:
    """The base side from the model itself: adapters disabled, eval mode, no gradient, every
    position of the batch."""

    targets_only = False
    fused_only = ""

    def side(self, model: nn.Module, parts, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), eval_mode(model), disable_adapters(model):
            return parts.hidden(**inputs) if parts is not None else logits_of(model(**inputs))


#: The live base forward (the default source of :func:`assemble_loss`).
LIVE_BASE = LiveBase()


def _denominator(tokens: int, num_items_in_batch):
    # no target token here: the loss is 0 whatever the denominator (never a division by 0)
    return (tokens or None) if num_items_in_batch is None or tokens == 0 else num_items_in_batch


def assemble_loss(model: nn.Module, batch, config: LossConfig, base=None, *,
                  num_items_in_batch=None, shift_labels: bool = True,
                  statistics: bool = False) -> LossOutput:
    """The loss of one micro-batch under ``config``, with the base side from ``base``
    (:data:`LIVE_BASE` when ``None``; see the module docstring).

    In plain torch (fused path, live base, ``loss="tmkl"``)::

        y = shift(labels)                                               # (B, L)
        with torch.no_grad(), disable_adapters(model): h_b = backbone(**inputs)  # (B, L, D)
        h = backbone(**inputs)                                          # (B, L, D)
        loss = linear_tmkl_loss(h, head.weight, h_b, y, num_items_in_batch=n, **options)

    A source with ``targets_only`` gives ``(n, D)`` rows (or a top-k record) of the target tokens,
    and ``h``, ``y`` are taken at the same rows. ``loss="ce"`` reads no base side.
    """
    base = LIVE_BASE if base is None else base
    batch = as_batch(batch)
    ignore_index = config.ignore_index
    labels = batch_labels(batch, shift_labels=shift_labels, ignore_index=ignore_index)
    inputs = model_inputs(batch)
    keep = labels != ignore_index
    tokens = int(keep.sum())
    num_items_in_batch = _denominator(tokens, num_items_in_batch)
    parts = None
    if config.path != "logits":
        parts, why = find_parts(model)
        if parts is None and config.path == "fused":
            raise ValueError(f"path='fused' impossible: {why}")
        if parts is None and config.uses_base and base.fused_only:
            raise ValueError(f"{base.fused_only}, and the model has no fused-linear form: {why}")
    stats = None

    if not config.uses_base:
        if parts is not None:
            hidden = parts.hidden(**inputs)
            weights = parts.weights()
            logits = parts.logits(hidden, weights)
        else:
            logits = logits_of(model(**inputs))
        ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                 ignore_index=ignore_index, reduction="sum")
        ce = ce_sum / (1.0 if num_items_in_batch is None else max(float(num_items_in_batch), 1.0))
        if statistics:
            stats = token_statistics(labels, logits=logits.detach(), ignore_index=ignore_index)
        return LossOutput(config.ce_weight * ce, ce.detach(), None, tokens,
                          "logits" if parts is None else "fused", stats)

    kwargs = config.loss_kwargs()
    kwargs.update(reduction="mean", num_items_in_batch=num_items_in_batch, return_components=True)
    base_side = base.side(model, parts, inputs, labels)  # before the adapted forward
    rows = (lambda t: t[keep]) if base.targets_only else (lambda t: t)  # noqa: E731
    y = rows(labels)
    if parts is not None:
        hidden = rows(parts.hidden(**inputs))
        # the effective head (adapted weight against the base weight when LoRA is on the head),
        # FSDP2's full weight gathered once (not per chunk): the same for every base source
        weights = parts.weights()
        cast = lambda t: None if t is None else t.to(hidden.dtype)  # noqa: E731
        head = {k: cast(v) for k, v in weights.linear_kwargs().items()}
        if isinstance(base_side, TopKBase):  # the record holds the base logits themselves
            head.pop("base_weight"), head.pop("base_bias")
        else:
            base_side = base_side.to(hidden.dtype)
        head.update(fused_logit_options(parts.transform))
        total, ce, kl = linear_tmkl_loss(hidden, cast(weights.weight), base_side, y,
                                         chunk_size=config.chunk_size, **head, **kwargs)
        if statistics:
            stats = token_statistics(y, hidden=hidden.detach(), parts=parts, weights=weights,
                                     ignore_index=ignore_index)
        return LossOutput(total, ce.detach(), kl.detach(), tokens, "fused", stats)
    logits = rows(logits_of(model(**inputs)))
    if isinstance(base_side, torch.Tensor):
        base_side = base_side.to(logits.dtype)
    total, ce, kl = tmkl_loss(logits, base_side, y, **kwargs)
    if statistics:
        stats = token_statistics(y, logits=logits.detach(), ignore_index=ignore_index)
    return LossOutput(total, ce.detach(), kl.detach(), tokens, "logits", stats)


@torch.no_grad()
def token_statistics(labels: torch.Tensor, *, logits: torch.Tensor | None = None,
                     hidden: torch.Tensor | None = None, parts: LMParts | None = None,
                     weights: HeadWeights | None = None, ignore_index: int = -100,
                     chunk_rows: int = 1024) -> tuple[int, float, int]:
    """``(tokens, entropy sum, top-1 hits)`` of the model's next-token distributions over the
    non-ignored positions of ``labels``, from ``logits`` or from ``hidden`` and the head
    (``parts``, ``weights``) in chunks of ``chunk_rows`` rows (no gradient)."""
    keep = labels != ignore_index
    y = labels[keep]
    rows = (logits if logits is not None else hidden)[keep]
    entropy, hits = 0.0, 0
    for i in range(0, y.numel(), chunk_rows):
        z = rows[i:i + chunk_rows]
        z = (z if logits is not None else parts.logits(z, weights)).float()
        logp = z.log_softmax(-1)
        entropy += float(-(logp.exp() * logp).nan_to_num().sum())
        hits += int((z.argmax(-1) == y[i:i + chunk_rows]).sum())
    return int(y.numel()), entropy, hits
