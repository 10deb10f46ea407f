"""Writing a base cache: one pass of the base model over a tokenized data set.

:func:`build_cache` runs the model as its base model (adapters off, eval mode, no grad) over the
batches and stores, per target token, the final hidden state (``mode="exact"``) or a top-k record
of the base logits (``mode="topk"``, :func:`forgetkern.topk_base`). Two passes over the batches:
the first reads only the labels and tokens (row count, per-example rows and input keys, data
hash: the size is printed before anything is written), the second checks that each batch is the
one the first pass saw, runs the model and streams the batch's rows through the cache's writer
(:class:`forgetkern.cache.store.CacheWriter`: memory-mapped arrays, a checksummed record per
batch). An interrupted build resumes where it stopped when run again with the same model and
data; a finished one returns at once.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm as progress

from ..functional import topk_base
from ..lora import disable_adapters
from ..lora.discovery import logits_of
from ..modeling import batch_labels, lm_parts, model_inputs
from .keys import example_ids, input_keys, model_identity, token_positions
from .reader import BaseCache
from .store import MODES, CacheWriter, file_shapes


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


def _batch_keys(batch, shift_labels: bool, ignore_index: int):
    """``(labels, valid, positions, ids, input keys, counts)`` of one batch."""
    labels = batch_labels(batch, shift_labels=shift_labels, ignore_index=ignore_index)
    valid, pos = token_positions(batch, labels, ignore_index)
    return labels, valid, pos, example_ids(batch), input_keys(batch), valid.sum(dim=-1).tolist()


def _plan(batches, shift_labels: bool, ignore_index: int):
    """Pass 1 (labels and tokens only): ``(ids, counts, input keys, data_hash, batch sizes)``."""
    h = hashlib.blake2b(digest_size=16)
    ids, counts, keys, sizes, seen = [], [], [], [], set()
    for batch in batches:
        labels, _, _, bids, bkeys, bcounts = _batch_keys(batch, shift_labels, ignore_index)
        for key in bids:
            if key in seen:
                raise ValueError(f"example id {key!r} occurs twice in the data set")
            seen.add(key)
        ids += bids
        keys += bkeys
        counts += [int(n) for n in bcounts]
        sizes.append(len(bids))
        h.update(repr(bids).encode())
        for name in ("input_ids", "attention_mask"):
            if batch.get(name) is not None:
                h.update(batch[name].cpu().to(torch.int64).numpy().tobytes())
        h.update(labels.cpu().to(torch.int64).numpy().tobytes())
    return ids, counts, keys, h.hexdigest(), sizes


def _probe(model, batches, parts):
    """``(hidden size, vocab size, dtype)`` of the base model's last hidden state (the head's) or
    logits (one forward when the model has no fused split)."""
    if parts is not None:
        with torch.no_grad():
            w = parts.weights().weight
        return w.shape[1], w.shape[0], w.dtype
    with base_model(model):
        logits = logits_of(model(**model_inputs(next(iter(batches)))))
        return 0, logits.shape[-1], logits.dtype


def _base_rows(model, batch, parts, labels, valid, mode, k, temperature, ignore_index):
    """The batch's rows: exact ``{"hidden": (n, D)}``, top-k the record's fields."""
    with base_model(model):
        if parts is not None:
            hidden = parts.hidden(**model_inputs(batch))[valid]
            if mode == "exact":
                return {"hidden": hidden}
            # the base head (adapters off), read as the loss reads it, and its logit transformation
            logits = parts.logits(hidden.float(), parts.weights())
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
            needs the fused split (final hidden states + a linear head, LoRA-adapted or with a
            logit transformation too: :func:`forgetkern.modeling.lm_parts`).
        batches: a re-iterable of dicts with ``input_ids``, ``labels`` (unshifted, HF convention;
            or ``shift_labels``), optionally ``attention_mask``, and ``example_id`` (one int or
            str per row, unique over the data set). Iterated twice: it must yield the same
            batches both times (a list, or a ``DataLoader`` without shuffling). A one-shot
            iterator (a generator) is refused, and a second pass that yields other examples,
            other tokens or fewer batches is an error that leaves the cache incomplete.
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
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(batches, Iterator):  # iterating it once would exhaust it
        raise TypeError("batches must be re-iterable (a list, or a DataLoader without shuffling): "
                        f"the build reads them twice, and a {type(batches).__name__} yields its "
                        "batches once; pass list(batches)")
    out = Path(out)
    parts = lm_parts(model)
    if mode == "exact" and parts is None:
        raise ValueError("mode='exact' needs the model's final hidden states and a linear head "
                         "(forgetkern.modeling.lm_parts): use mode='topk' for this model")
    ids, counts, keys, data_hash, sizes = _plan(batches, shift_labels, ignore_index)
    if not sizes:
        raise ValueError("batches is empty")
    hidden_size, vocab, dtype = _probe(model, batches, parts)
    if mode == "topk" and k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    identity = model_identity(model)
    if model_name:
        identity["name_or_path"] = model_name
    writer = CacheWriter(
        out, mode=mode, vocab_size=vocab, ids=ids, counts=counts, keys=keys, k=k,
        temperature=temperature, dtype=dtype, hidden_size=hidden_size, ignore_index=ignore_index,
        shift_labels=shift_labels, model=identity,
        tokenizer=None if tokenizer is None else {"name": getattr(tokenizer, "name_or_path", None),
                                                  "vocab_size": len(tokenizer)},
        data={"hash": data_hash, "examples": len(ids), "tokens": int(sum(counts)),
              "batches": len(sizes)})
    rows, size = writer.manifest["rows"], writer.manifest["rows"] * writer.manifest["bytes_per_token"]
    if writer.complete:
        log(f"base cache {out} is complete ({rows} tokens); nothing to do")
        return BaseCache(out)
    if writer.resumed:
        log(f"resuming base cache {out}: {sum(writer.done(i) for i in range(len(sizes)))}/"
            f"{len(sizes)} batches done")
    else:
        log(f"base cache {out}: {mode} mode, {rows} target tokens x "
            f"{writer.manifest['bytes_per_token']} B = {_human(size)} to write")
    row, first, i = 0, 0, -1
    bar = progress(total=len(sizes), desc="cache-base", unit="batch", disable=not show_progress)
    with bar:
        for i, batch in enumerate(batches):
            labels, valid, pos, bids, bkeys, _ = _batch_keys(batch, shift_labels, ignore_index)
            if i >= len(sizes) or bids != ids[first:first + sizes[i]] or bkeys != keys[
                    first:first + sizes[i]]:
                raise ValueError(f"batches: batch {i} of the second pass differs from the first "
                                 "pass's (other examples or tokens): the batches must be the same "
                                 "every time they are iterated (no shuffling); the cache at "
                                 f"{out} stays incomplete")
            n = int(valid.sum())
            if not writer.done(i):
                fields = {"positions": pos[valid], "targets": labels[valid]}
                if n:
                    fields.update(_base_rows(model, batch, parts, labels, valid, mode, k,
                                             temperature, ignore_index))
                else:  # no target token: empty rows of every array
                    fields.update({name: np.zeros((0, *shape[1:])) for name, (shape, _)
                                   in file_shapes(writer.manifest).items() if name not in fields})
                writer.write(i, row, **fields)
            row, first = row + n, first + sizes[i]
            bar.update(1)
    if i + 1 != len(sizes):
        raise ValueError(f"batches: the second pass yielded {i + 1} batches, the first "
                         f"{len(sizes)}: the batches must be the same every time they are "
                         f"iterated; the cache at {out} stays incomplete")
    writer.finish()
    return BaseCache(out)
