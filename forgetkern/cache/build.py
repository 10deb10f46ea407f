"""Writing a base cache: one pass of the base model over a tokenized data set.

:func:`build_cache` runs the model as its base model (adapters off, eval mode, no grad) over the
batches and stores, per target token, the final hidden state (``mode="exact"``) or a top-k record
of the base logits (``mode="topk"``, :func:`forgetkern.topk_base`). Two passes over the batches:
the first reads only the labels (row count, per-example rows, data hash: the size is printed
before anything is written), the second runs the model and streams each batch's rows into the
memory-mapped arrays, marking the batch done. An interrupted build resumes where it stopped when
run again with the same model and data; a finished one returns at once.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import torch

from ..functional import topk_base
from ..lora import disable_adapters
from ..lora.discovery import logits_of
from ..modeling import batch_labels, fused_parts, model_inputs
from ..optim._progress import progress
from .reader import BaseCache
from .store import (FORMAT_VERSION, MODES, bytes_per_token, dtype_name,
                    example_ids, identity_mismatch, model_identity, open_arrays, read_json,
                    token_positions, write_json)


@contextlib.contextmanager
def base_model(model):
    """``model`` as its base model: eval mode, adapters disabled (a plain model runs as is)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), disable_adapters(model, require=False):
            yield model
    finally:
        model.train(was_training)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _plan(batches, shift_labels: bool, ignore_index: int):
    """Pass 1 (labels only): ``(ids, starts, counts, rows, data_hash, num_batches)``."""
    h = hashlib.blake2b(digest_size=16)
    ids, counts, seen = [], [], set()
    num_batches = 0
    for batch in batches:
        num_batches += 1
        labels = batch_labels(batch, shift_labels=shift_labels, ignore_index=ignore_index)
        valid, _ = token_positions(batch, labels, ignore_index)
        for key, n in zip(example_ids(batch), valid.sum(dim=-1).tolist()):
            if key in seen:
                raise ValueError(f"example id {key!r} occurs twice in the data set")
            seen.add(key)
            ids.append(key)
            counts.append(int(n))
        h.update(repr(example_ids(batch)).encode())
        for name in ("input_ids", "attention_mask"):
            if batch.get(name) is not None:
                h.update(batch[name].cpu().to(torch.int64).numpy().tobytes())
        h.update(labels.cpu().to(torch.int64).numpy().tobytes())
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist() if counts else []
    return ids, starts, counts, int(sum(counts)), h.hexdigest(), num_batches


def _probe(model, batches, parts):
    """``(hidden size, vocab size, dtype)`` of the base model's last hidden state (the head's) or
    logits (one forward when the model has no fused split)."""
    if parts is not None:
        w = parts[1].weight
        return w.shape[1], w.shape[0], w.dtype
    with base_model(model):
        logits = logits_of(model(**model_inputs(next(iter(batches)))))
        return 0, logits.shape[-1], logits.dtype


def _base_rows(model, batch, parts, labels, valid, mode, k, temperature, ignore_index):
    """The batch's rows: exact ``{"hidden": (n, D)}``, top-k the record's fields."""
    with base_model(model):
        if parts is not None:
            hidden_fn, head = parts
            hidden = hidden_fn(**model_inputs(batch))[valid]
            if mode == "exact":
                return {"hidden": hidden}
            logits = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                                None if head.bias is None else head.bias.float())
        else:
            logits = logits_of(model(**model_inputs(batch)))[valid].float()
    rec = topk_base(logits, labels[valid], k, temperature=temperature, ignore_index=ignore_index)
    return {name: getattr(rec, name) for name in ("values", "indices", "lse", "tail_lse", "target")}


def build_cache(model, batches, out, *, mode: str = "exact", k: int = 64,
                temperature: float = 1.0, tokenizer=None, shift_labels: bool = True,
                ignore_index: int = -100, model_name: str | None = None,
                show_progress: bool = True, log=print) -> BaseCache:
    """Cache the base model's outputs on ``batches`` in the directory ``out`` (docs/base_cache.md).

    In plain torch, per batch (``mode="exact"``)::

        with torch.no_grad(), disable_adapters(model):                 # eval mode too
            h = model.model(**inputs).last_hidden_state               # (B, L, D)
        rows = h[shift(labels) != -100]                                # (n, D), stored as is

    and with ``mode="topk"`` :func:`forgetkern.topk_base` of ``rows @ head.T`` (``k``,
    ``temperature``) instead.

    Args:
        model: a causal LM (HF, PEFT, forgetkern-LoRA or the ``forward_hidden`` protocol of
            :mod:`forgetkern.train`); adapters, if any, are disabled during the pass. Exact mode
            needs the fused split (final hidden states + a plain linear head).
        batches: a re-iterable of dicts with ``input_ids``, ``labels`` (unshifted, HF convention;
            or ``shift_labels``), optionally ``attention_mask``, and ``example_id`` (one int or
            str per row, unique over the data set). Iterated twice: it must yield the same
            batches both times (a list, or a ``DataLoader`` without shuffling).
        out: the cache directory (created; an existing incomplete cache of the same model and
            data is resumed, one of anything else is an error).
        mode: ``"exact"`` or ``"topk"``; ``k``, ``temperature``: the top-k record's.
        tokenizer: recorded in the manifest (name and vocabulary size) when given.
        shift_labels, ignore_index: how targets are read from the batches (as in training).
        model_name: recorded as the model's name (default: its config's ``_name_or_path``).
        show_progress: a progress bar over the batches; ``log``: where messages go.

    Returns:
        the finished cache, opened (:class:`BaseCache`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "topk" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    out = Path(out)
    parts = fused_parts(model)
    if mode == "exact" and parts is None:
        raise ValueError("mode='exact' needs the model's final hidden states and a plain linear "
                         "head (forgetkern.train.fused_parts): use mode='topk' for this model")
    ids, starts, counts, rows, data_hash, num_batches = _plan(batches, shift_labels, ignore_index)
    if num_batches == 0:
        raise ValueError("batches is empty")
    hidden_size, vocab, dtype = _probe(model, batches, parts)
    if mode == "topk" and k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    identity = model_identity(model)
    if model_name:
        identity["name_or_path"] = model_name
    manifest = {
        "format_version": FORMAT_VERSION, "mode": mode, "k": k if mode == "topk" else None,
        "temperature": float(temperature) if mode == "topk" else None, "dtype": dtype_name(dtype),
        "hidden_size": hidden_size, "vocab_size": vocab, "ignore_index": ignore_index,
        "shift_labels": shift_labels, "model": identity,
        "tokenizer": None if tokenizer is None else {
            "name": getattr(tokenizer, "name_or_path", None), "vocab_size": len(tokenizer)},
        "data": {"hash": data_hash, "examples": len(ids), "tokens": rows, "batches": num_batches},
        "rows": rows, "complete": False,
        "bytes_per_token": bytes_per_token(mode, hidden_size=hidden_size, dtype=dtype, k=k),
    }
    done = out / "done"
    if (out / "manifest.json").exists():
        have = read_json(out / "manifest.json")
        why = identity_mismatch(have, manifest)
        if why:
            raise ValueError(f"{out} holds a different base cache ({why}); choose another "
                             "directory or delete it")
        if have.get("complete"):
            log(f"base cache {out} is complete ({rows} tokens); nothing to do")
            return BaseCache(out)
        arrays = open_arrays(out, manifest, "r+")
        log(f"resuming base cache {out}: {len(list(done.glob('chunk_*')))}/{num_batches} "
            "batches done")
    else:
        out.mkdir(parents=True, exist_ok=True)
        done.mkdir(exist_ok=True)
        write_json(out / "examples.json", {"ids": ids, "start": starts, "count": counts})
        size = rows * manifest["bytes_per_token"]
        log(f"base cache {out}: {mode} mode, {rows} target tokens x "
            f"{manifest['bytes_per_token']} B = {_human(size)} to write")
        arrays = open_arrays(out, manifest, "w+")
        write_json(out / "manifest.json", manifest)
    row = 0
    bar = progress(total=num_batches, desc="cache-base", unit="batch", disable=not show_progress)
    with bar:
        for i, batch in enumerate(batches):
            labels = batch_labels(batch, shift_labels=shift_labels, ignore_index=ignore_index)
            valid, pos = token_positions(batch, labels, ignore_index)
            n = int(valid.sum())
            marker = done / f"chunk_{i:06d}"
            if not marker.exists():
                sl = slice(row, row + n)
                arrays["positions"][sl] = pos[valid].cpu().numpy()
                arrays["targets"][sl] = labels[valid].cpu().numpy()
                if n:
                    fields = _base_rows(model, batch, parts, labels, valid, mode, k, temperature,
                                        ignore_index)
                    for name, value in fields.items():
                        t = value.detach().cpu()
                        t = t.to(dtype) if name == "hidden" else t
                        t = t.view(torch.uint16) if t.dtype == torch.bfloat16 else t
                        arrays[name][sl] = t.numpy()
                for a in arrays.values():
                    a.flush()
                marker.touch()
            row += n
            bar.update(1)
    manifest["complete"] = True
    write_json(out / "manifest.json", manifest)
    return BaseCache(out)
