"""What the demo measures: token-mean losses, task exact match, output drift, and the
learning/forgetting frontier's interpolation and seed statistics."""
from __future__ import annotations

import math
import statistics

import torch

from ..lora.discovery import logits_of
from ..train import batch_labels
from . import chat
from . import instructions as I
from .tasks import exact_match


@torch.no_grad()
def mean_ce(model, batches, device, *, accuracy: bool = False) -> tuple[float, float | None]:
    """Token-mean cross-entropy (and top-1 next-token accuracy) of ``model`` on ``batches``."""
    was = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    try:
        for b in batches:
            inputs = {k: v.to(device) for k, v in b.items() if k != "labels"}
            y = batch_labels(b).to(device)
            logits = logits_of(model(**inputs)).float()
            keep = y != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == y[keep]).sum())
            count += int(keep.sum())
    finally:
        model.train(was)
    return total / max(count, 1), (correct / max(count, 1) if accuracy else None)


@torch.no_grad()
def arithmetic_accuracy(model, prompts: torch.Tensor, answers: list[bytes], device) -> float:
    """Exact-match accuracy of greedy byte-level answers to held-out addition problems."""
    was = model.training
    model.eval()
    try:
        ids = prompts.to(device)
        n = len(answers[0])
        for _ in range(n):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        got = ids[:, -n:].cpu().tolist()
    finally:
        model.train(was)
    return sum(bytes(g) == a for g, a in zip(got, answers)) / len(answers)


def task_exact_match(model, tokenizer, problems: dict) -> dict[str, float]:
    """Per task, the share of held-out problems whose greedy answer matches exactly.

    ``problems`` maps a task name to its ``(prompt, answer)`` pairs; each task decodes up to 4
    tokens past its longest reference answer."""
    out = {}
    for task, pairs in problems.items():
        longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in pairs)
        got = chat.greedy(model, tokenizer, [p for p, _ in pairs], max_new_tokens=longest + 4)
        out[task] = sum(exact_match(g, a) for g, (_, a) in zip(got, pairs)) / len(pairs)
    return out


def instruction_following(model, tokenizer, pairs, *, max_new_tokens: int) -> dict:
    """The share of ``(instruction, prompt)`` pairs (:func:`instructions.prompts`) whose greedy
    answer (up to ``max_new_tokens`` tokens, one batch) passes its instruction's check: overall
    (``rate``) and per instruction (``by_instruction``)."""
    answers = chat.greedy(model, tokenizer, [p for _, p in pairs], max_new_tokens=max_new_tokens,
                          batch=len(pairs))
    passed: dict[str, list[bool]] = {}
    for (name, _), answer in zip(pairs, answers):
        passed.setdefault(name, []).append(I.follows(name, answer))
    return {"rate": sum(map(sum, passed.values())) / len(pairs),
            "by_instruction": {n: sum(v) / len(v) for n, v in passed.items()}}


def drift(reference: list[list[int]], answers: list[list[int]]) -> dict[str, float]:
    """How much of the base model's behaviour on the probe prompts survives.

    ``preserved``: share of prompts whose greedy answer is token-for-token the base model's;
    ``prefix``: mean share of the base answer's leading tokens reproduced before the first
    difference."""
    if len(reference) != len(answers) or not reference:
        raise ValueError("drift needs one answer per reference answer")
    same, prefix = 0, 0.0
    for ref, got in zip(reference, answers):
        same += ref == got
        k = 0
        while k < min(len(ref), len(got)) and ref[k] == got[k]:
            k += 1
        prefix += k / max(len(ref), 1) if ref else float(not got)
    return {"preserved": same / len(reference), "prefix": prefix / len(reference)}


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """``n`` evaluation steps, geometrically spaced (dense early, where the curves bend), ending
    at ``steps``."""
    if n <= 1:
        return [steps]
    first = max(1.0, steps / (3 * n))
    marks = {min(steps, max(1, round(first * (steps / first) ** (i / (n - 1))))) for i in range(n)}
    return sorted(marks | {steps})


def forgetting_at(curve: list[dict], target: float, key: str = "target_loss",
                  value: str = "forgetting") -> float | None:
    """``value`` (by default the retention-loss increase) interpolated along ``curve`` where its
    ``key`` equals ``target`` (``None`` outside the curve's range, or where a checkpoint lacks
    ``value``). Along a run, ``key`` need not be monotone: the first segment (in ``key`` order)
    that brackets ``target`` is used."""
    if any(c.get(value) is None for c in curve):
        return None
    pts = sorted((c[key], c[value]) for c in curve)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= target <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (target - x0) / (x1 - x0)
    return None


def spread(values) -> dict:
    """Mean, sample standard deviation (0 for one value) and count of the finite ``values``."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs)}
