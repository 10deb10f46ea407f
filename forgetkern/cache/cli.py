"""``forgetkern cache-base``: build a base cache from a model and a text or JSON-lines file.

    forgetkern cache-base --model path/to/hf_model --data train.jsonl --mode exact --out cache/
    forgetkern cache-base --model smollm2 --data notes.txt --mode topk --k 64 --out cache_topk/

``--model``: an HF model folder (``transformers.AutoModelForCausalLM`` + its tokenizer), or a
name that ``forgetkern.models.load(name)`` knows (e.g. ``smollm2``) when that module exists.
``--data``: ``.jsonl`` (one example per line: ``{"text": ...}`` or ``{"input_ids": [...]}``, with
an optional ``"id"``, else the line number) or plain text (tokenized whole and cut into windows
of ``--seq-len`` tokens, ids ``0, 1, ...``). Every token but the first of an example is a target.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

import torch

from .. import models
from .build import build_cache


def _optional(module: str, why: str):
    """Import an optional dependency when the command runs (``forgetkern`` itself never needs it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(f"forgetkern cache-base: {why} needs {module} ({exc})") from exc


def load_model(name: str, dtype: str = "auto", gguf_file: str | None = None):
    """``(model, tokenizer)`` of a name :data:`forgetkern.models.MODELS` knows, or of an HF folder."""
    if name in models.MODELS:
        ok, why = models.available(name)
        if not ok:
            raise SystemExit(f"forgetkern cache-base: --model {name}: {why}")
        return models.load(name, **({} if dtype == "auto" else {"dtype": getattr(torch, dtype)}))
    if not os.path.isdir(name):
        raise SystemExit(f"forgetkern cache-base: --model {name!r} is neither a model folder nor "
                         f"one of {sorted(models.MODELS)}")
    transformers = _optional("transformers", "an HF model folder")
    kw = {} if gguf_file is None else {"gguf_file": gguf_file}
    kw_tok = dict(kw)
    if dtype != "auto":
        kw["dtype"] = getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, **kw)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kw_tok)
    except (OSError, ValueError):  # a folder without a tokenizer: the data must be token ids
        tokenizer = None
    return model, tokenizer


def load_examples(path, tokenizer, seq_len: int) -> list[tuple]:
    """``[(example_id, token ids)]`` of a ``.jsonl`` or text file (module docstring), each at most
    ``seq_len`` tokens (at least 2: one target)."""
    path = Path(path)
    out = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "input_ids" not in rec and tokenizer is None:
                raise SystemExit(f"forgetkern cache-base: {path} has text but the model has no tokenizer")
            ids = rec["input_ids"] if "input_ids" in rec else tokenizer(rec["text"])["input_ids"]
            out.append((rec.get("id", i), list(ids)[:seq_len]))
    else:
        ids = tokenizer(path.read_text())["input_ids"]
        out = [(j, ids[s:s + seq_len]) for j, s in enumerate(range(0, len(ids), seq_len))]
    return [(i, ids) for i, ids in out if len(ids) >= 2]


def make_batches(examples, batch_size: int, pad_id: int = 0) -> list[dict]:
    """Right-padded batches ``{"input_ids", "attention_mask", "labels", "example_id"}`` (labels:
    the ids, padding at -100, unshifted as in HF)."""
    batches = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        width = max(len(ids) for _, ids in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (_, toks) in enumerate(chunk):
            ids[r, :len(toks)] = torch.tensor(toks)
            mask[r, :len(toks)] = 1
        ex = [i for i, _ in chunk]
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "labels": ids.masked_fill(mask == 0, -100),
                        "example_id": torch.tensor(ex) if all(isinstance(i, int) for i in ex)
                        else ex})
    return batches


def run(args) -> int:
    """The ``cache-base`` command."""
    model, tokenizer = load_model(args.model, args.dtype, args.gguf_file)
    examples = load_examples(args.data, tokenizer, args.seq_len)
    if not examples:
        raise SystemExit(f"forgetkern cache-base: no example of 2 or more tokens in {args.data}")
    pad = getattr(tokenizer, "pad_token_id", None)
    batches = make_batches(examples, args.batch_size, 0 if pad is None else pad)
    cache = build_cache(model, batches, args.out, mode=args.mode, k=args.k,
                        temperature=args.temperature, tokenizer=tokenizer,
                        model_name=args.model, show_progress=not args.quiet)
    m = cache.manifest
    print(f"wrote {args.out}: {m['mode']} cache of {m['rows']} tokens from {len(cache)} examples, "
          f"{m['bytes_per_token']} B/token")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``cache-base`` on the ``forgetkern`` command line's subparsers."""
    p = sub.add_parser("cache-base", help="cache the base model's outputs on a data set",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder or a forgetkern.models name")
    p.add_argument("--data", required=True, help=".jsonl or text file")
    p.add_argument("--out", required=True, help="cache directory (resumed if interrupted)")
    p.add_argument("--mode", choices=("exact", "topk"), default="exact")
    p.add_argument("--k", type=int, default=64, help="top-k mode: tokens kept per position")
    p.add_argument("--temperature", type=float, default=1.0, help="top-k mode: T of the record")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example at most")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, ...")
    p.add_argument("--gguf-file", default=None, help="load the folder's GGUF file of this name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
