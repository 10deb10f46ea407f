"""Batches as forgetkern reads them: any mapping of tensors, the entries that are not model
inputs, and the next-token targets (HF causal-LM label convention)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

#: Batch entries that are not keyword inputs of the model's forward.
NON_MODEL_KEYS = ("labels", "shift_labels", "num_items_in_batch", "example_id")


def as_batch(batch, name: str = "batch") -> dict:
    """``batch`` as a plain ``dict``: any ``Mapping`` (a ``dict``, HF ``BatchEncoding`` from
    ``DataCollatorForLanguageModeling`` or ``DataCollatorWithPadding``, ...); anything else raises
    a ``TypeError`` naming its type."""
    if isinstance(batch, dict):
        return batch
    if isinstance(batch, Mapping):
        return dict(batch.items())
    raise TypeError(f"{name} must be a mapping of tensors (a dict, an HF BatchEncoding, ...), "
                    f"got {type(batch).__name__}")


def model_inputs(batch) -> dict:
    """The entries of ``batch`` that the model's forward takes (all but :data:`NON_MODEL_KEYS`)."""
    return {k: v for k, v in as_batch(batch).items() if k not in NON_MODEL_KEYS}


def shift_labels_for_causal_lm(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels for next-token prediction at every position (HF convention).

    In plain torch, for ``(B, L)`` labels::

        shifted = torch.full_like(labels, ignore_index)
        shifted[:, :-1] = labels[:, 1:]            # position t predicts token t+1
    """
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def batch_labels(batch, *, shift_labels: bool = True, ignore_index: int = -100) -> torch.Tensor:
    """The per-position targets of ``batch`` (already shifted when ``shift_labels``).

    Uses ``batch["shift_labels"]`` as is when present, else ``batch["labels"]``, else
    ``input_ids`` with padding (``attention_mask == 0``) ignored.
    """
    batch = as_batch(batch)
    if "shift_labels" in batch:
        return batch["shift_labels"]
    labels = batch.get("labels")
    if labels is None:
        if "input_ids" not in batch:
            raise ValueError("batch needs 'labels', 'shift_labels' or 'input_ids'")
        labels = batch["input_ids"]
        if batch.get("attention_mask") is not None:
            labels = labels.masked_fill(batch["attention_mask"] == 0, ignore_index)
    return shift_labels_for_causal_lm(labels, ignore_index) if shift_labels else labels


def count_items(batches, *, shift_labels: bool = True, ignore_index: int = -100) -> int:
    """Number of non-ignored target tokens over micro-batches (``num_items_in_batch``)."""
    return int(sum((batch_labels(b, shift_labels=shift_labels, ignore_index=ignore_index)
                    != ignore_index).sum() for b in batches))
