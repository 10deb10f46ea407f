"""Top-k base caches from records other tools already wrote (docs/base_cache.md, "Importing").

* :func:`import_vllm_prompt_logprobs` -- vLLM's ``prompt_logprobs``: per prompt position ``t >= 1``
  a dict ``{token_id: logprob}`` (``Logprob`` objects, plain floats, or the OpenAI-compatible
  server's ``{"logprob": ...}`` dicts; ids as ints or strings) of the top-k tokens of the
  distribution that predicts token ``t``, plus token ``t`` itself. The log-probabilities are
  normalized over the whole vocabulary, so the tail bucket's mass is what they leave:
  ``P_R = 1 - sum(carried p)``.
* :func:`import_megatron_topk_logits` -- the offline-logits layout of Megatron-based distillation
  (NeMo-Aligner's ``compute_topk_logits``): per example ``tokens``, per position ``topk_logits``
  and ``topk_token_ids`` (``k`` each) and ``log_sum_exp_logits`` (over the whole vocabulary),
  optionally ``labels`` and ``loss_mask``. The tail mass is ``1 - sum(exp(topk - lse))``; the
  target's logit is not carried when it lies outside the top-k (see :func:`topk_rows`).

Both write through :mod:`forgetkern.cache.store` (the format :func:`forgetkern.cache.build_cache`
writes) and return the opened :class:`forgetkern.cache.BaseCache`, keyed by example id like a cache
built from a model: train with it as with any top-k cache. Records are at temperature 1 (the
sources' raw distributions: a tail's log-sum-exp at another temperature cannot be recovered from
its mass).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .reader import BaseCache
from .keys import example_key, input_key, model_identity
from .store import CacheWriter

__all__ = ["topk_rows", "import_vllm_prompt_logprobs", "import_megatron_topk_logits", "read_jsonl"]

#: how far the carried probabilities may sum above 1 (fp32 rounding) before the source is
#: refused as not normalized
NORMALIZED_SLACK = 1e-3


def topk_rows(ids: np.ndarray, logprobs: np.ndarray, targets: np.ndarray, k: int, *,
              tail: bool = True) -> dict:
    """The :class:`forgetkern.TopKBase` fields of rows of normalized base log-probabilities.

    ``ids``, ``logprobs``: ``(n, m)`` carried token ids and their log-probabilities (normalized
    over the whole vocabulary; ``-inf`` pads a row that carries fewer); ``targets`` ``(n,)``.
    The support is the ``k`` most probable carried tokens. In float64, per row:

    * target carried: ``P_R = 1 - sum_{support} p - [target outside the support] p_y``;
    * target not carried: ``p_y`` lies in ``[0, m_y]`` with ``m_y = min(p_(k), 1 - sum_{support}
      p)`` (it is outside the top-k); it is taken as ``m_y / 2`` (so ``p_y`` and ``P_R`` are each
      off by at most ``m_y / 2``) and ``P_R = 1 - sum_{support} p - m_y / 2``;
    * ``lse = log(sum_{support, v != y} p_v + P_R)``, ``tail_lse = log(P_R)`` (``-inf`` when 0),
      ``target = log p_y``, ``values`` the support's log-probabilities (a logit up to a per-row
      shift, which no field depends on).

    ``P_R`` is a difference of carried probabilities: its absolute error is that of their sum
    (float32 sources: about ``m * 6e-8``), clamped at 0. ``tail=False``: the rows are a truncated
    distribution that sums to 1 over the carried tokens (no tail, an uncarried target has mass 0).
    """
    n, m = ids.shape
    if m < k:
        raise ValueError(f"rows carry {m} tokens, fewer than k={k}")
    lp = logprobs.astype(np.float64)
    p = np.exp(lp)
    total = p.sum(axis=1)
    if n and float(total.max()) > 1 + NORMALIZED_SLACK:
        row = int(total.argmax())
        raise ValueError(f"row {row}: the carried probabilities sum to {total[row]:.6f} > 1: these "
                         "are not log-probabilities normalized over the vocabulary (raw logits?)")
    is_y = ids == targets[:, None]
    rows = np.repeat(np.arange(n), m)
    # per row: most probable first, the target after a non-target of the same log-probability
    order = np.lexsort((is_y.reshape(-1), -lp.reshape(-1), rows)).reshape(n, m) - (np.arange(n) * m)[:, None]
    sup = order[:, :k]
    take = lambda a: np.take_along_axis(a, sup, axis=1)  # noqa: E731
    if n and not np.isfinite(take(lp)).all():
        raise ValueError(f"a row carries fewer than k={k} tokens")
    p_sup, y_sup = take(p), take(is_y)
    y_carried = is_y.any(axis=1)
    y_in_sup = y_sup.any(axis=1)
    p_y = np.where(y_carried, (p * is_y).sum(axis=1), 0.0)
    rest = 1.0 - p_sup.sum(axis=1)  # the mass outside the support (the target's too when outside)
    bound = np.minimum(p_sup.min(axis=1), np.maximum(rest, 0.0))
    p_y = np.where(y_carried, p_y, bound / 2 if tail else 0.0)
    tail = np.maximum(np.where(y_in_sup, rest, rest - p_y), 0.0) if tail else np.zeros(n)
    kept = (p_sup * ~y_sup).sum(axis=1)
    with np.errstate(divide="ignore"):
        return {"values": take(lp).astype(np.float32), "indices": take(ids).astype(np.int32),
                "lse": np.log(kept + tail).astype(np.float32),
                "tail_lse": np.log(tail).astype(np.float32),
                "target": np.log(p_y).astype(np.float32)}


def _write(out, model, examples: list, k: int, vocab_size: int, source: dict,
           ignore_index: int, model_name) -> BaseCache:
    """Write ``examples`` = ``[(example_id, tokens, positions, targets, fields)]`` as a top-k cache
    through :class:`~forgetkern.cache.store.CacheWriter` (one chunk per example), each example
    keyed on its tokens."""
    out = Path(out)
    if (out / "manifest.json").exists():
        raise ValueError(f"{out} already holds a base cache: choose another directory")
    h = hashlib.blake2b(digest_size=16)
    for key, _, pos, tgt, _ in examples:
        h.update(repr(example_key(key)).encode()), h.update(pos.astype(np.int64).tobytes())
        h.update(tgt.astype(np.int64).tobytes())
    identity = model_identity(model)
    if model_name:
        identity["name_or_path"] = model_name
    counts = [len(pos) for _, _, pos, _, _ in examples]
    writer = CacheWriter(
        out, mode="topk", vocab_size=vocab_size, k=k, temperature=1.0,
        ids=[key for key, *_ in examples], counts=counts,
        keys=[input_key(np.asarray(tokens, dtype=np.int64)) for _, tokens, *_ in examples],
        ignore_index=ignore_index, model=identity,
        data={"hash": h.hexdigest(), "examples": len(examples), "tokens": int(sum(counts)),
              "source": source})
    start = 0
    for i, (_, _, pos, tgt, fields) in enumerate(examples):
        writer.write(i, start, positions=pos, targets=tgt, **fields)
        start += len(pos)
    writer.finish()
    return BaseCache(out)


def _vocab(model, vocab_size):
    if vocab_size is not None:
        return int(vocab_size)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError("vocab_size is needed (the model exposes no output embeddings)")
    return int(head.weight.shape[0])


def _targets(labels, length: int, ignore_index: int):
    """``(positions, targets)`` of an example's rows: position ``t`` predicts ``labels[t + 1]``."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != length:
        raise ValueError(f"labels have {labels.shape[0]} tokens, the example {length}")
    pos = np.nonzero(labels[1:] != ignore_index)[0]
    return pos.astype(np.int32), labels[1:][pos].astype(np.int32)


def _logprob(value) -> float:
    if hasattr(value, "logprob"):
        return float(value.logprob)
    if isinstance(value, Mapping):
        return float(value["logprob"])
    return float(value)


def _get(obj, name):
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def import_vllm_prompt_logprobs(outputs, out, model, *, example_ids=None, labels=None,
                                k: int | None = None, vocab_size: int | None = None,
                                ignore_index: int = -100, model_name: str | None = None) -> BaseCache:
    """A top-k base cache from vLLM ``prompt_logprobs`` (``SamplingParams(prompt_logprobs=k)``,
    the default raw log-probabilities of the base model that ``model`` holds).

    Args:
        outputs: vLLM ``RequestOutput`` objects, or dicts, with ``prompt_token_ids`` and
            ``prompt_logprobs`` (``None`` first, then one dict per position).
        out: the cache directory (must not hold a cache).
        model: the base model the records come from, as it is trained here (its parameter hash is
            recorded and checked when training; adapters are excluded).
        example_ids: one id per output (int or str), the ids the training batches carry in
            ``example_id``; default ``0, 1, ...``.
        labels: per output, its labels (HF convention, unshifted, ``ignore_index`` skipped): the
            rows kept; default every prompt token after the first.
        k: the record's support size; default the smallest number of tokens a position carries
            (vLLM's ``prompt_logprobs``, the prompt token being an extra entry when outside it).
        vocab_size: the vocabulary size (default: the model's head).
    """
    vocab = _vocab(model, vocab_size)
    rows = []
    for i, o in enumerate(outputs):
        tokens = [int(t) for t in _get(o, "prompt_token_ids")]
        plp = _get(o, "prompt_logprobs")
        if len(plp) != len(tokens) or (len(plp) and plp[0] is not None):
            raise ValueError(f"output {i}: prompt_logprobs must have one entry per prompt token, "
                             f"None first ({len(plp)} entries for {len(tokens)} tokens)")
        lab = tokens if labels is None else labels[i]
        pos, tgt = _targets(lab, len(tokens), ignore_index)
        carried = [{int(t): _logprob(v) for t, v in plp[p + 1].items()} for p in pos]
        rows.append((i, tokens, pos, tgt, carried))
    if k is None:  # a position carries the top-k, and the prompt token as one more when outside
        k = max((len(c) - (len(c) > 1 and t in c and c[t] < min(v for u, v in c.items() if u != t))
                 for _, _, _, tg, cs in rows for c, t in zip(cs, tg.tolist())), default=1)
    examples = []
    for i, tokens, pos, tgt, carried in rows:
        m = max([len(c) for c in carried] + [k])
        ids = np.zeros((len(pos), m), dtype=np.int64)
        lp = np.full((len(pos), m), -np.inf)
        for r, c in enumerate(carried):
            ids[r, :len(c)], lp[r, :len(c)] = list(c), list(c.values())
        key = i if example_ids is None else example_ids[i]
        examples.append((key, tokens, pos, tgt, topk_rows(ids, lp, tgt.astype(np.int64), k)))
    source = {"format": "vllm prompt_logprobs", "tail": "1 - sum of the carried probabilities"}
    return _write(out, model, examples, k, vocab, source, ignore_index, model_name)


def import_megatron_topk_logits(records, out, model, *, example_ids=None,
                                vocab_size: int | None = None, ignore_index: int = -100,
                                model_name: str | None = None,
                                missing_tail: str = "refuse") -> BaseCache:
    """A top-k base cache from Megatron-style offline top-k logits (JSONL records as
    NeMo-Aligner's ``compute_topk_logits`` writes them, or dicts with the same keys).

    Each record has ``tokens`` ``(S,)``, ``topk_logits`` and ``topk_token_ids`` ``(S, k)`` (row
    ``t`` predicts the token after position ``t``), ``log_sum_exp_logits`` ``(S,)`` of the same
    logits over the whole vocabulary, and optionally ``labels`` (``labels[t]`` the target of row
    ``t``; default ``tokens[t + 1]``) and ``loss_mask`` (rows with 0 are skipped). Example ids
    default to the record's ``index``, else its position.

    Without ``log_sum_exp_logits`` the records state no tail mass: ``missing_tail="refuse"`` (the
    default) raises, ``"empty"`` records an empty tail, i.e. trains against the base distribution
    truncated to its top-k and renormalized, which is at total-variation distance ``P_R`` (the
    unknown tail mass) from the base's (docs/base_cache.md).
    """
    if missing_tail not in ("refuse", "empty"):
        raise ValueError(f"missing_tail must be 'refuse' or 'empty', got {missing_tail!r}")
    vocab = _vocab(model, vocab_size)
    examples, k, tails = [], None, set()
    for i, rec in enumerate(records):
        tokens = np.asarray(rec["tokens"], dtype=np.int64).reshape(-1)
        logits = np.asarray(rec["topk_logits"], dtype=np.float64)
        ids = np.asarray(rec["topk_token_ids"], dtype=np.int64)
        s = logits.shape[0]
        if ids.shape != logits.shape or logits.ndim != 2:
            raise ValueError(f"record {i}: topk_logits {logits.shape} and topk_token_ids "
                             f"{ids.shape} must both be (positions, k)")
        k = logits.shape[1] if k is None else k
        if logits.shape[1] != k:
            raise ValueError(f"record {i}: k={logits.shape[1]}, earlier records k={k}")
        if "labels" in rec:
            lab = np.asarray(rec["labels"], dtype=np.int64).reshape(-1)[:s]
        else:
            lab = np.concatenate([tokens[1:s + 1], np.full(max(0, s + 1 - len(tokens)), ignore_index)])
        keep = lab != ignore_index
        if "loss_mask" in rec:
            keep &= np.asarray(rec["loss_mask"]).reshape(-1)[:s] != 0
        pos = np.nonzero(keep)[0]
        if "log_sum_exp_logits" in rec:
            lse = np.asarray(rec["log_sum_exp_logits"], dtype=np.float64).reshape(-1)[:s]
            tails.add("1 - sum of exp(topk_logits - log_sum_exp_logits)")
        elif missing_tail == "empty":
            lse = np.logaddexp.reduce(logits, axis=1)  # the top-k renormalized: no tail
            tails.add("empty (the source carries no log-sum-exp)")
        else:
            raise ValueError(f"record {i} has no log_sum_exp_logits: the tail mass is unknown; "
                             "pass missing_tail='empty' to train against the renormalized top-k")
        lp = logits[pos] - lse[pos, None]
        fields = topk_rows(ids[pos], lp, lab[pos], k, tail="log_sum_exp_logits" in rec)
        key = example_ids[i] if example_ids is not None else int(rec.get("index", i))
        examples.append((key, tokens, pos.astype(np.int32), lab[pos].astype(np.int32), fields))
    if k is None:
        raise ValueError("records is empty")
    source = {"format": "megatron topk_logits", "tail": sorted(tails)}
    return _write(out, model, examples, k, vocab, source, ignore_index, model_name)


def read_jsonl(path) -> list:
    """The records of a JSONL file (one JSON object per line), e.g. Megatron's top-k logits."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

