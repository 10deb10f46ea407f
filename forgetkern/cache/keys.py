"""What identifies a base cache's rows: the base model (a hash of its parameters), each example
(its id) and, per example, what the base model's outputs depend on (its input key: a digest of its
attended tokens) and where its target tokens are (positions among the attended tokens)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..distributed import full_weight
from ..modeling.batch import NON_MODEL_KEYS

#: Per-token model inputs that do not enter an example's input key (``position_ids`` follow from
#: the attention mask, so a different padding still finds the rows).
UNKEYED_INPUTS = ("attention_mask", "position_ids")


def digest(data: bytes | np.ndarray | str) -> str:
    """BLAKE2b (128 bits, hex) of bytes, an array's bytes in C order, or a string."""
    if isinstance(data, str):
        data = data.encode()
    elif isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1).data
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def parameter_hash(params) -> str:
    """BLAKE2b of the parameters' shapes, dtypes and bytes, in order (the base model identity).
    A sharded (FSDP2, DTensor) parameter is hashed whole, as the unsharded model's: a collective
    per such parameter, in the same order on every rank."""
    h = hashlib.blake2b(digest_size=16)
    for p in params:
        t = full_weight(p.detach()).cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_parameters(model) -> list:
    """The base model's parameters: every parameter but the LoRA ones (named ``lora_*``), in
    registration order, so that injecting or training adapters does not change the hash."""
    return [p for n, p in model.named_parameters() if "lora_" not in n]


def model_identity(model) -> dict:
    """``{"class", "name_or_path", "num_parameters", "param_hash"}`` of the base model in ``model``
    (adapters excluded; a PEFT wrapper reports the model it wraps)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(inner, "config", None)
    params = base_parameters(model)
    return {"class": type(inner).__name__,
            "name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "num_parameters": int(sum(p.numel() for p in params)),
            "param_hash": parameter_hash(params)}


def example_key(value):
    """An example id as the cache keys it: an ``int`` (from ints or integer tensors) or a ``str``."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, (bool, float)) or not isinstance(value, (int, str, np.integer)):
        raise TypeError(f"example ids must be ints or strings, got {type(value).__name__} {value!r}")
    return int(value) if isinstance(value, (int, np.integer)) else value


def example_ids(batch: dict) -> list:
    """The batch's example ids, one per row (``batch["example_id"]``: a tensor or a list)."""
    if "example_id" not in batch:
        raise KeyError("a batch used with a base cache needs an 'example_id' entry (one id per "
                       "row, the ids the cache was built with)")
    ids = batch["example_id"]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return [example_key(i) for i in ids]


def token_positions(batch: dict, labels: torch.Tensor, ignore_index: int):
    """``(valid (B, L), positions (B, L))``: which positions are target tokens, and each
    position's index within its example counting only attended tokens (so a different padding
    side or length finds the same rows)."""
    valid = labels != ignore_index
    mask = batch.get("attention_mask")
    if mask is None:
        pos = torch.arange(labels.shape[-1], device=labels.device).expand_as(labels)
    else:
        pos = mask.long().cumsum(dim=-1) - 1
    return valid, pos


def input_key(input_ids, **inputs) -> str:
    """One example's input key: the digest of its attended tokens ``input_ids`` (a sequence of
    ints or a 1-D tensor, padding removed) and of any other per-token model input given, in name
    order (``position_ids`` and the attention mask excepted: :data:`UNKEYED_INPUTS`)."""
    parts = {"input_ids": input_ids, **{k: v for k, v in inputs.items() if k not in UNKEYED_INPUTS}}

    def raw(x):  # integer tokens as int64 whatever their dtype; other values as they are
        t = torch.as_tensor(x).detach().cpu()
        return (t if t.is_floating_point() else t.to(torch.int64)).contiguous().numpy().tobytes()

    return digest(b"".join(name.encode() + raw(parts[name])
                           for name in ["input_ids", *sorted(set(parts) - {"input_ids"})]))


def input_keys(batch: dict) -> list[str]:
    """:func:`input_key` of every row of ``batch``: its attended ``input_ids`` and other
    per-token model inputs (tensors shaped like ``input_ids``), whatever the padding."""
    if "input_ids" not in batch:
        raise KeyError("a base cache keys examples on their tokens: the batch needs 'input_ids'")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    keep = (torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()).cpu()
    cols = {k: v.detach().cpu() for k, v in batch.items() if k not in NON_MODEL_KEYS
            and isinstance(v, torch.Tensor) and v.shape == ids.shape}
    return [input_key(**{k: c[b][keep[b]] for k, c in cols.items()}) for b in range(ids.shape[0])]
