"""The on-disk format of a base cache and its reader.

A cache is a directory::

    manifest.json      what was cached, by what, from what (checked at load and on resume)
    examples.json      example ids and, per example, its first row and number of rows
    positions.npy      (R,) int32   each row's token position within its example (padding skipped)
    targets.npy        (R,) int32   each row's target token id
    hidden.npy         (R, D)       exact mode: the base model's final hidden states, model dtype
                                    (bfloat16 stored as uint16 bits: numpy has no bfloat16)
    values.npy         (R, k) f32   top-k mode: the k largest base logits (raw)
    indices.npy        (R, k) i32   top-k mode: their token ids
    lse.npy tail_lse.npy target.npy (R,) f32  top-k mode: forgetkern.TopKBase's fields
    done/chunk_<i>     one empty marker per written batch (resume skips those)

One row per target token (a label other than ``ignore_index`` after the causal shift), rows of an
example contiguous and in position order. Every array is a ``.npy`` file read through
``numpy.memmap``: a lookup copies only the rows of its batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch


FORMAT_VERSION = 1
MODES = ("exact", "topk")
#: Manifest fields that identify what a cache holds; a resumed build must agree on all of them.
IDENTITY = ("format_version", "mode", "k", "temperature", "dtype", "hidden_size", "vocab_size",
            "ignore_index", "shift_labels", "model", "tokenizer", "data")
ROW_FILES = {"positions": np.int32, "targets": np.int32}
TOPK_FILES = ("values", "indices", "lse", "tail_lse", "target")

TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in
                 (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def numpy_storage(dtype: torch.dtype):
    """The numpy dtype a tensor of ``dtype`` is stored as (bfloat16 as its uint16 bits)."""
    return np.uint16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


def bytes_per_token(mode: str, *, hidden_size: int = 0, dtype: torch.dtype = torch.bfloat16,
                    k: int = 0) -> int:
    """Bytes one target token takes on disk: exact ``D * itemsize``, top-k ``8 k + 12``, plus 8
    for its position and target id."""
    if mode == "exact":
        return hidden_size * torch.empty(0, dtype=dtype).element_size() + 8
    return 8 * k + 12 + 8


def file_shapes(manifest: dict) -> dict:
    """``name -> (shape, numpy dtype)`` of every row array of a cache."""
    rows = manifest["rows"]
    shapes = {name: ((rows,), dt) for name, dt in ROW_FILES.items()}
    if manifest["mode"] == "exact":
        dtype = TORCH_DTYPES[manifest["dtype"]]
        shapes["hidden"] = ((rows, manifest["hidden_size"]), numpy_storage(dtype))
    else:
        k = manifest["k"]
        shapes.update(values=((rows, k), np.float32), indices=((rows, k), np.int32),
                      lse=((rows,), np.float32), tail_lse=((rows,), np.float32),
                      target=((rows,), np.float32))
    return shapes


def open_arrays(path: Path, manifest: dict, mode: str) -> dict:
    """The row arrays as ``numpy.memmap`` (``mode``: ``"w+"`` creates them, ``"r+"``, ``"r"``)."""
    out = {}
    for name, (shape, dt) in file_shapes(manifest).items():
        file = path / f"{name}.npy"
        if mode == "w+":
            out[name] = np.lib.format.open_memmap(file, mode="w+", dtype=dt, shape=shape)
        else:
            arr = np.load(file, mmap_mode=mode)
            if arr.shape != shape or arr.dtype != np.dtype(dt):
                raise ValueError(f"{file}: shape {arr.shape} {arr.dtype}, the manifest says "
                                 f"{shape} {np.dtype(dt)}")
            out[name] = arr
    return out


def read_json(file: Path) -> dict:
    with open(file) as f:
        return json.load(f)


def write_json(file: Path, data: dict) -> None:
    """Write ``data`` atomically (a temporary file renamed over ``file``)."""
    tmp = file.with_suffix(file.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, file)


def identity_mismatch(have: dict, want: dict) -> str | None:
    """The first identity field (:data:`IDENTITY`) on which two manifests differ, described."""
    for key in IDENTITY:
        if key in want and have.get(key) != want.get(key):
            return f"{key}: the cache has {have.get(key)!r}, expected {want.get(key)!r}"
    return None


def parameter_hash(params) -> str:
    """BLAKE2b of the parameters' shapes, dtypes and bytes, in order (the base model identity)."""
    h = hashlib.blake2b(digest_size=16)
    for p in params:
        t = p.detach().cpu().contiguous()
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
