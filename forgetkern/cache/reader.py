"""An opened base cache (:class:`BaseCache`): lookups of a batch's base side, and the training
loss with the base side read from the cache instead of a base forward."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .._params import LossConfig, TopKBase
from ..modeling import LossOutput, as_batch, assemble_loss
from .keys import example_ids, example_key, input_keys, model_identity, token_positions
from .store import (TORCH_DTYPES, TOPK_FILES, CacheError, check_manifest, identity_mismatch,
                    json_digest, open_arrays, read_json, verify_chunks)

#: When a cache's arrays are checked against their checksums (:class:`BaseCache`'s ``verify``).
VERIFY = ("load", "read", "none")


class BaseCache:
    """A base cache on disk, opened for lookups (:func:`forgetkern.cache.build_cache` writes one).

    ``BaseCache(path)`` reads and checks the manifest (format version, its checksum, every
    field), the hashes of ``examples.json`` and ``chunks.json``, and memory-maps the arrays; it
    fails when the build has not completed. ``verify``: ``"load"`` (default) checks every chunk
    of every array against its checksum here (one read of the cache); ``"read"`` checks, at each
    lookup, the chunks it reads instead; ``"none"`` trusts the files. A damaged or truncated file
    is a :class:`~forgetkern.cache.store.CacheError` naming it. ``expect`` (a dict of manifest
    fields, e.g. ``{"mode": "topk", "k": 64}``) raises on any identity field that differs.
    :meth:`check_model` compares the base model's parameter hash; :meth:`lookup` returns the base
    record of a batch.
    """

    def __init__(self, path, *, expect: dict | None = None, verify: str = "load"):
        self.path = Path(path)
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        file = self.path / "manifest.json"
        if not file.exists():
            raise FileNotFoundError(f"{self.path} is not a base cache (no manifest.json)")
        self.manifest = read_json(file)
        check_manifest(self.manifest, file)
        if not self.manifest["complete"]:
            raise ValueError(f"the base cache at {self.path} is incomplete (interrupted build): "
                             "run the same build again to resume it")
        if expect:
            why = identity_mismatch(self.manifest, expect)
            if why:
                raise ValueError(f"base cache {self.path} does not match: {why}")
        ex = self._table("examples.json", "examples_hash")
        self._chunks = self._table("chunks.json", "chunks_hash")["chunks"]
        self._starts = [c["start"] for c in self._chunks]
        self.arrays = open_arrays(self.path, self.manifest, "r")
        self.verify = verify
        if verify == "load":
            verify_chunks(self.path, self.arrays, self._chunks)
        self._rows = {example_key(i): (s, c, k) for i, s, c, k in
                      zip(ex["ids"], ex["start"], ex["count"], ex["keys"])}

    def _table(self, name: str, field: str) -> dict:
        """A JSON file of the cache, checked against its hash in the manifest."""
        data = read_json(self.path / name)
        if json_digest(data) != self.manifest[field]:
            raise CacheError(f"{self.path / name}: does not match the manifest's {field!r} "
                             "(modified or damaged)")
        return data

    mode = property(lambda self: self.manifest["mode"])
    temperature = property(lambda self: self.manifest["temperature"])  # top-k only, else None
    ignore_index = property(lambda self: int(self.manifest["ignore_index"]))

    def __len__(self) -> int:
        return len(self._rows)

    def check_model(self, model) -> None:
        """Raise unless ``model``'s base parameters (adapters excluded) hash as the cached ones."""
        have = self.manifest["model"]
        if not isinstance(have, dict) or not {"num_parameters", "param_hash"} <= set(have):
            raise ValueError(f"the base cache at {self.path} records no base model identity "
                             f"(model: {have!r}): write it with model=forgetkern.cache."
                             "model_identity(base_model) to check it against the model trained")
        now = model_identity(model)
        for key in ("num_parameters", "param_hash"):
            if have[key] != now[key]:
                raise ValueError(f"the base cache at {self.path} was built from another base model "
                                 f"({key}: cache {have[key]!r}, this model {now[key]!r})")

    def rows_of(self, batch: dict, labels: torch.Tensor) -> np.ndarray:
        """The cache rows of the batch's target tokens, in row-major order of ``labels != ignore``
        (``labels``: ``(B, L)`` shifted targets), after checking that every example is cached with
        the same input tokens (its input key) and target positions and tokens."""
        ids = example_ids(batch)
        if len(ids) != labels.shape[0]:
            raise ValueError(f"batch has {len(ids)} example ids for {labels.shape[0]} rows")
        valid, pos = token_positions(batch, labels, self.ignore_index)
        valid, pos, tgt, keys = valid.cpu(), pos.cpu(), labels.cpu(), input_keys(batch)
        found = []
        for b, key in enumerate(ids):
            if key not in self._rows:
                raise KeyError(f"example id {key!r} is not in the base cache at {self.path} "
                               f"({len(self._rows)} examples)")
            start, count, input_key = self._rows[key]
            if keys[b] != input_key:
                raise ValueError(f"example id {key!r}: its input tokens differ from those the base "
                                 f"cache at {self.path} was built on (its cached base outputs "
                                 "would be stale): rebuild the cache for this data")
            if int(valid[b].sum()) != count:
                raise ValueError(f"example id {key!r}: the batch has {int(valid[b].sum())} target "
                                 f"tokens, the base cache has {count} (different labels or "
                                 "truncation?)")
            found.append(np.arange(start, start + count))
        rows = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        if self.verify == "read" and rows.size:  # the chunks read, before any of their rows is used
            touched = np.unique(np.searchsorted(self._starts, rows, side="right") - 1)
            verify_chunks(self.path, self.arrays, [self._chunks[i] for i in touched.tolist()])
        for b, (key, r) in enumerate(zip(ids, found)):
            if not (np.array_equal(self.arrays["positions"][r], pos[b][valid[b]].numpy())
                    and np.array_equal(self.arrays["targets"][r], tgt[b][valid[b]].numpy())):
                raise ValueError(f"example id {key!r}: the target positions or tokens differ from "
                                 "the base cache's (another tokenization or data set?)")
        return rows

    def lookup(self, batch: dict, labels: torch.Tensor, device=None):
        """The base side of the batch's target tokens (row-major order of ``labels != ignore``):
        exact mode an ``(N, D)`` tensor of base hidden states in the model dtype, top-k mode a
        :class:`forgetkern.TopKBase` of ``(N, k)`` / ``(N,)`` tensors."""
        rows = self.rows_of(batch, labels)
        device = labels.device if device is None else device
        take = lambda name: torch.from_numpy(np.ascontiguousarray(self.arrays[name][rows]))  # noqa: E731
        if self.mode == "exact":
            dtype = TORCH_DTYPES[self.manifest["dtype"]]
            h = take("hidden")
            return (h.view(torch.bfloat16) if dtype == torch.bfloat16 else h).to(device)
        return TopKBase(*(take(n).to(device) for n in TOPK_FILES), temperature=self.temperature,
                        labels=take("targets").to(device=device, dtype=torch.int64))

    def check(self, model, config: LossConfig, *, verify_model: bool = True) -> None:
        """Raise unless this cache can stand in for ``model``'s base forward under ``config``
        (:func:`check_compatible`, and :meth:`check_model` when ``verify_model``)."""
        check_compatible(self, config)
        if verify_model:
            self.check_model(model)

    def base_source(self, batch: dict) -> "CachedBase":
        """This cache as the base source of ``batch`` (:func:`forgetkern.modeling.assemble_loss`;
        what ``config_loss(..., base_cache=cache)`` uses)."""
        return CachedBase(self, batch)


def check_compatible(cache: BaseCache, config: LossConfig) -> None:
    """Raise when ``cache`` cannot serve the loss ``config`` (top-k temperature, ignore index)."""
    if not isinstance(cache, BaseCache):
        raise TypeError(f"base_cache must be a forgetkern.cache.BaseCache, got {type(cache).__name__}")
    if not config.uses_base:
        raise ValueError(f"loss={config.loss!r} uses no base model: a base cache has nothing to do")
    if cache.ignore_index != config.ignore_index:
        raise ValueError(f"the base cache was built with ignore_index={cache.ignore_index}, the "
                         f"loss uses {config.ignore_index}")
    if cache.mode == "topk" and not math.isclose(cache.temperature, config.temperature):
        raise ValueError(f"the top-k base cache was recorded at temperature {cache.temperature}, "
                         f"the loss uses temperature={config.temperature}; they must be equal")
    if cache.mode == "exact" and config.path == "logits":
        raise ValueError("an exact base cache holds hidden states: it needs path='fused' or 'auto'")


class CachedBase:
    """The base side of one batch read from a :class:`BaseCache` (a base source of
    :func:`forgetkern.modeling.assemble_loss`): the cached base hidden states of the batch's target
    tokens (exact mode; the loss forms the base logits with the model's own base head, the same
    head weight as the live base forward) or their :class:`forgetkern.TopKBase` records."""

    targets_only = True

    def __init__(self, cache: BaseCache, batch: dict):
        self.cache, self.batch = cache, batch

    @property
    def fused_only(self) -> str:
        return "an exact base cache holds hidden states" if self.cache.mode == "exact" else ""

    def side(self, model, parts, inputs: dict, labels: torch.Tensor):
        return self.cache.lookup(self.batch, labels)


def cached_loss(model, batch: dict, config: LossConfig, cache: BaseCache, *,
                num_items_in_batch=None, shift_labels: bool = True,
                statistics: bool = False) -> LossOutput:
    """:func:`forgetkern.train.config_loss` with the base side from ``cache`` (no base forward):
    the same assembly (:func:`forgetkern.modeling.assemble_loss`) with :class:`CachedBase`.

    In plain torch (exact mode, fused path)::

        y = shift(labels); keep = y != -100                     # the cached target tokens
        h = backbone(**inputs).last_hidden_state[keep]          # (n, D) adapted
        h_b = cache.lookup(batch, y)                            # (n, D) cached base
        loss = linear_tmkl_loss(h, head.weight, h_b, y[keep], num_items_in_batch=n_items)

    Top-k mode passes the cached :class:`forgetkern.TopKBase` instead (the sparse-base loss),
    on the fused path or on the logits path. Only the batch's target tokens are computed. The
    head is read as in the live loss (:meth:`forgetkern.modeling.LMParts.weights`: FSDP2's full
    weight, a LoRA-adapted head against its base weight, the logit transformation).
    """
    batch = as_batch(batch)
    return assemble_loss(model, batch, config, CachedBase(cache, batch),
                         num_items_in_batch=num_items_in_batch, shift_labels=shift_labels,
                         statistics=statistics)
