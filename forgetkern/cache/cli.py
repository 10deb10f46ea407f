"""``forgetkern cache-base``: build a base cache from a model and a text or JSON-lines file.

    forgetkern cache-base --model path/to/hf_model --data train.jsonl --mode exact --out cache/
    forgetkern cache-base --model smollm2 --data notes.txt --mode topk --k 64 --out cache_topk/

``--model``: an HF model folder (``transformers.AutoModelForCausalLM`` + its tokenizer), or a
name that ``forgetkern.models.load(name)`` knows (e.g. ``smollm2``) when that module exists.
``--data``: ``.jsonl`` (one example per line: ``{"text": ...}`` or ``{"input_ids": [...]}``, with
an optional unique ``"id"``, an int or a string, else the line number counted from 0) or plain
text (tokenized whole and cut into windows of ``--seq-len`` tokens, ids ``0, 1, ...``). Every
token but the first of an example is a target.

Every input is checked before anything is written: sizes (``--k``, ``--seq-len``,
``--batch-size`` positive, ``--k`` at most the vocabulary), ``--temperature`` finite and > 0,
``--dtype``, the paths, each JSON line (its line number named) and every token id against the
model's vocabulary. An error prints one line and exits with status 2. An interrupted build is
resumed when run again with the same arguments.
"""
from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import torch

from .. import models
from .._args import (DTYPES, UsageError, dtype_name, finite_positive_float, int_range,
                     positive_int, read_jsonl, readable_file, writable_dir)
from .build import build_cache
from .store import OWNED


def _optional(module: str, why: str):
    """Import an optional dependency when the command runs (``forgetkern`` itself never needs it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"{why} needs {module} ({exc})") from exc


def model_name_or_dir(text: str) -> str:
    """``--model``: a name :data:`forgetkern.models.MODELS` knows, or an existing folder."""
    if text not in models.MODELS and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a model folder nor one of "
                                         f"{sorted(models.MODELS)}")
    return text


def load_model(name: str, dtype: str = "auto", gguf_file: str | None = None, quiet: bool = False):
    """``(model, tokenizer)`` of a name :data:`forgetkern.models.MODELS` knows, or of an HF folder
    (``quiet``: without transformers' progress bars)."""
    if name in models.MODELS:
        ok, why = models.available(name)
        if not ok:
            raise UsageError(f"--model {name}: {why}")
        return models.load(name, **({} if dtype == "auto" else {"dtype": getattr(torch, dtype)}))
    if gguf_file is not None and not os.path.isfile(os.path.join(name, gguf_file)):
        raise UsageError(f"--gguf-file {gguf_file}: no such file in {name}")
    transformers = _optional("transformers", "an HF model folder")
    kw = {} if gguf_file is None else {"gguf_file": gguf_file}
    kw_tok = dict(kw)
    if dtype != "auto":
        kw["dtype"] = getattr(torch, dtype)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if quiet:
        transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, **kw)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {name}: cannot be loaded as a causal LM "
                         f"({str(exc).splitlines()[0]})") from exc
    finally:
        if quiet and bars:
            transformers.utils.logging.enable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kw_tok)
    except (OSError, ValueError):  # a folder without a tokenizer: the data must be token ids
        tokenizer = None
    return model, tokenizer


def _token_ids(ids, where: str, vocab: int) -> list[int]:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in ids):
        raise UsageError(f"{where}: 'input_ids' must be a list of integers")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise UsageError(f"{where}: token id {bad[0]} is outside the model's vocabulary "
                         f"[0, {vocab})")
    return ids


def load_examples(path, tokenizer, seq_len: int, vocab: int | None = None) -> list[tuple]:
    """``[(example_id, token ids)]`` of a ``.jsonl`` or text file (module docstring), each at most
    ``seq_len`` tokens (at least 2: one target). Every record is checked (JSON, fields, unique
    ids, token ids in ``[0, vocab)``), each error naming the file and the line."""
    path = Path(path)
    vocab = vocab if vocab is not None else (len(tokenizer) if tokenizer is not None else 2**62)
    out, seen = [], {}
    if path.suffix == ".jsonl":
        for number, rec in read_jsonl(path, "--data"):
            where = f"--data {path}:{number}"
            if "input_ids" in rec:
                ids = _token_ids(rec["input_ids"], where, vocab)
            elif isinstance(rec.get("text"), str):
                if tokenizer is None:
                    raise UsageError(f"{where}: has 'text' but the model has no tokenizer "
                                     "(give 'input_ids')")
                ids = _token_ids(list(tokenizer(rec["text"])["input_ids"]), where, vocab)
            else:
                raise UsageError(f"{where}: expected 'text' (a string) or 'input_ids'")
            key = rec.get("id", number - 1)
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise UsageError(f"{where}: 'id' must be an integer or a string, got {key!r}")
            if key in seen:
                raise UsageError(f"{where}: id {key!r} was used at line {seen[key]}")
            seen[key] = number
            out.append((key, ids[:seq_len]))
    else:
        if tokenizer is None:
            raise UsageError(f"--data {path}: a text file needs a tokenizer, and the model has "
                             "none (give a .jsonl file of 'input_ids')")
        try:
            ids = tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--data {path}: cannot be read as UTF-8 text ({exc})") from None
        ids = _token_ids(list(ids), f"--data {path}", vocab)
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


def check_out(out: str) -> None:
    """``--out``: new, empty, or a base cache's folder (resumed, or refused by the build when it
    holds another cache); never a folder of other files."""
    path = Path(out)
    if path.is_dir():
        other = [p.name for p in path.iterdir() if p.name not in OWNED
                 and not p.name.startswith(".tmp-")]
        if other:
            raise UsageError(f"--out {out}: the folder holds files that are not a base cache's "
                             f"({other[:3]}); choose a new or empty folder")


def run(args) -> int:
    """The ``cache-base`` command: every input checked (the model loaded, the data read and
    checked against its vocabulary) before anything is written."""
    check_out(args.out)
    model, tokenizer = load_model(args.model, args.dtype, args.gguf_file, quiet=args.quiet)
    vocab = model.get_input_embeddings().num_embeddings
    if args.mode == "topk" and args.k > vocab:
        raise UsageError(f"--k {args.k}: exceeds the model's vocabulary size {vocab}")
    examples = load_examples(args.data, tokenizer, args.seq_len, vocab)
    if not examples:
        raise UsageError(f"--data {args.data}: no example of 2 or more tokens")
    pad = getattr(tokenizer, "pad_token_id", None)
    batches = make_batches(examples, args.batch_size, 0 if pad is None else pad)
    try:
        cache = build_cache(model, batches, args.out, mode=args.mode, k=args.k,
                            temperature=args.temperature, tokenizer=tokenizer,
                            model_name=args.model, show_progress=not args.quiet)
    except ValueError as exc:  # the build's own checks: another cache in --out, ...
        raise UsageError(str(exc)) from exc
    m = cache.manifest
    print(f"wrote {args.out}: {m['mode']} cache of {m['rows']} tokens from {len(cache)} examples, "
          f"{m['bytes_per_token']} B/token")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``cache-base`` on the ``forgetkern`` command line's subparsers."""
    p = sub.add_parser("cache-base", help="cache the base model's outputs on a data set",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=model_name_or_dir,
                   help="HF model folder or a forgetkern.models name")
    p.add_argument("--data", required=True, type=readable_file,
                   help=".jsonl (one JSON object per line) or text file")
    p.add_argument("--out", required=True, type=writable_dir,
                   help="cache folder: new, empty, or an interrupted build's (resumed)")
    p.add_argument("--mode", choices=("exact", "topk"), default="exact")
    p.add_argument("--k", type=positive_int, default=64,
                   help="top-k mode: tokens kept per position, 1 to the vocabulary size")
    p.add_argument("--temperature", type=finite_positive_float, default=1.0,
                   help="top-k mode: T of the record, a finite number > 0")
    p.add_argument("--seq-len", type=int_range(2), default=128,
                   help="tokens per example at most (>= 2)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per batch (>= 1)")
    p.add_argument("--dtype", type=dtype_name, default="auto",
                   help=f"model dtype: auto, {', '.join(DTYPES)}")
    p.add_argument("--gguf-file", default=None, help="load the folder's GGUF file of this name")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p
