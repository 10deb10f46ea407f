"""Base-model caches (docs/base_cache.md): in LoRA the base model is frozen, so its outputs on a
fixed data set can be computed once and read back instead of running its forward every step.

* :func:`build_cache` -- one pass of the base model (adapters off, eval mode, no grad) writing,
  per target token, the exact final hidden state (``mode="exact"``) or a top-k record of the base
  logits (``mode="topk"``), memory-mapped, resumable, with a manifest checked at load.
* :class:`BaseCache` -- an opened cache: :meth:`BaseCache.lookup` gives a batch's base side.
* :func:`cached_loss` -- the training loss with the base side from a cache
  (``ForgetAwareStep(..., base_cache=cache)``, ``TMKLTrainer(..., base_cache=cache)``): the live
  loss's assembly (:func:`forgetkern.modeling.assemble_loss`) with :class:`CachedBase` as its base
  source.
* :class:`CacheWriter` -- the one writer of the on-disk format (checksums, hashes, format
  version), for ``build_cache`` and for importers of other tools' base outputs.
* ``forgetkern cache-base`` -- the command line (:mod:`forgetkern.cache.cli`).
* :func:`import_vllm_prompt_logprobs`, :func:`import_megatron_topk_logits` -- top-k caches from
  records vLLM or Megatron-based distillation already wrote (:mod:`forgetkern.cache.importers`).
"""
from .build import build_cache
from .importers import import_megatron_topk_logits, import_vllm_prompt_logprobs
from .reader import BaseCache, CachedBase, cached_loss, check_compatible
from .keys import input_key, model_identity
from .store import CacheError, CacheWriter, bytes_per_token

__all__ = ["build_cache", "BaseCache", "CachedBase", "cached_loss", "check_compatible",
           "bytes_per_token", "model_identity", "CacheWriter", "CacheError", "input_key",
           "import_vllm_prompt_logprobs", "import_megatron_topk_logits"]
