"""Demo data that every Python install carries, plus a synthetic far-away target task.

* Pretraining / retention text: the standard library's own top-level ``*.py`` source files
  (``sysconfig.get_paths()["stdlib"]``), sorted by name; every file whose CRC32 of the name is
  ``0 mod 5`` is held out as the retention set, the rest is pretraining text. Byte-level tokens.
* Target task: zero-padded two-digit additions ``"\\n47+35=082"``, trained on the answer bytes
  only (the operands are random and not predictable). Evaluation problems are operand pairs that
  never appear in training.
"""
from __future__ import annotations

import glob
import os
import sysconfig
import zlib

import torch

NEWLINE = 10


def stdlib_files() -> list[str]:
    """Sorted paths of the standard library's top-level ``*.py`` files."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        import inspect

        root = os.path.dirname(inspect.getsourcefile(os)) or root
        files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise RuntimeError(f"no standard-library source files found under {root!r}; the demo "
                           "needs a Python install that ships its .py sources")
    return files


def is_retention_file(path: str) -> bool:
    return zlib.crc32(os.path.basename(path).encode()) % 5 == 0


def load_corpus(max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(pretrain_bytes, retention_bytes, file_names)`` as uint8 tensors of concatenated files.

    ``max_bytes`` caps each part (files are taken in name order until the cap).
    """
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    names = []
    for path in stdlib_files():
        held = is_retention_file(path)
        if max_bytes is not None and sizes[held] >= max_bytes:
            continue
        with open(path, "rb") as f:
            data = f.read()
        parts[held].append(data)
        sizes[held] += len(data)
        names.append(os.path.basename(path))
    def cat(chunks):
        blob = b"".join(chunks)
        if max_bytes is not None:
            blob = blob[:max_bytes]
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    return cat(parts[False]), cat(parts[True]), names


def windows(data: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``length`` bytes: ``(n, length)`` int64."""
    if data.numel() <= length:
        raise ValueError(f"corpus of {data.numel()} bytes is shorter than a window ({length})")
    start = torch.randint(0, data.numel() - length, (n,), generator=generator)
    idx = start[:, None] + torch.arange(length)
    return data[idx].long()


def lm_batch(ids: torch.Tensor) -> dict:
    """Language-modelling batch: every next byte is a target."""
    return {"input_ids": ids, "labels": ids.clone()}


# ---------------------------------------------------------------------------- target task
def _split_pairs(seed: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(100 * 100, generator=g)
    return perm[n_eval:], perm[:n_eval]  # train pairs, eval pairs (as a * 100 + b)


def _problem(pair: int) -> tuple[bytes, bytes]:
    a, b = divmod(int(pair), 100)
    return f"\n{a:02d}+{b:02d}=".encode(), f"{a + b:03d}".encode()


def arithmetic_batches(n_batches: int, batch_size: int, length: int, *, seed: int,
                       split: str = "train", n_eval: int = 1000) -> list[dict]:
    """Packed addition problems: ``input_ids (B, length)``, ``labels`` only on answer bytes.

    Labels follow the causal-LM convention (unshifted: ``labels[t]`` is token ``t``, predicted
    from position ``t-1``).
    """
    train_pairs, eval_pairs = _split_pairs(seed, n_eval)
    pairs = train_pairs if split == "train" else eval_pairs
    g = torch.Generator().manual_seed(seed * 7919 + (0 if split == "train" else 1))
    out = []
    for _ in range(n_batches):
        ids = torch.full((batch_size, length), NEWLINE, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)
        for row in range(batch_size):
            pos = 0
            while True:
                q, a = _problem(pairs[torch.randint(0, len(pairs), (1,), generator=g)].item())
                if pos + len(q) + len(a) > length:
                    break
                ids[row, pos:pos + len(q)] = torch.tensor(list(q))
                pos += len(q)
                ids[row, pos:pos + len(a)] = torch.tensor(list(a))
                labels[row, pos:pos + len(a)] = torch.tensor(list(a))
                pos += len(a)
        out.append({"input_ids": ids, "labels": labels})
    return out


def arithmetic_eval_problems(n: int, *, seed: int, n_eval: int = 1000) -> tuple[torch.Tensor, list[bytes]]:
    """``(prompts (n, 7) int64, answers)`` from the held-out operand pairs."""
    _, eval_pairs = _split_pairs(seed, n_eval)
    prompts, answers = [], []
    for pair in eval_pairs[:n].tolist():
        q, a = _problem(pair)
        prompts.append(list(q))
        answers.append(a)
    return torch.tensor(prompts, dtype=torch.long), answers
