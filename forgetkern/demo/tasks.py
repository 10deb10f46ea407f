"""Target tasks far from pretraining, generated offline, and the retention sources.

Each task is a deterministic generator of ``(prompt, answer)`` pairs in chat form. The
evaluation split is disjoint from the training split by construction: a problem's split is a
hash of its content, so no evaluation prompt ever appears in training. Scoring is exact match
of the greedy answer span (whitespace-stripped, up to the end-of-turn token).

* ``reverse``     reverse the order of 4-6 words;
* ``shift``       a digit cipher: every digit of a 4-6 digit string replaced by the next one
                  (9 by 0), digit by digit (not the number plus one: a chat model's reading);
* ``json``        ``key=value`` records converted to one-line JSON (strings quoted, ints bare).

Retention sources every Python ships: English prose from ``pydoc_data.topics`` and the
standard library's own source, plus a fixed set of chat prompts for the output-drift probe.
"""
from __future__ import annotations

import hashlib
import json
import random

WORDS = ("apple river stone lamp cloud garden window silver forest candle mirror ocean pencil "
         "rabbit thunder violin basket desert engine feather harbor island jacket kettle ladder "
         "meadow needle orange pepper quartz saddle tiger umbrella valley wagon yellow zebra "
         "anchor bridge cactus dragon eagle falcon glacier hammer igloo jungle kitten lemon "
         "marble nectar oyster parrot quiver rocket spider tunnel velvet walnut").split()
NAMES = ("Mia Leo Ava Noah Zoe Liam Ella Omar Ivy Hugo Nora Ezra Lily Axel Ruby Theo Maya "
         "Finn Iris Jude").split()
CITIES = ("Paris Lima Oslo Cairo Quito Dakar Hanoi Perth Sofia Tunis Riga Bern").split()
COLORS = ("red blue green amber violet teal ochre black white grey").split()

TASKS = ("reverse", "shift", "json")


def _split_of(prompt: str) -> str:
    """``"eval"`` for one problem in eight, by a hash of its text, else ``"train"``."""
    return "eval" if hashlib.sha1(prompt.encode()).digest()[0] % 8 == 0 else "train"


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(4, 6))
    return (f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)))


def _shift(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(4, 6))]
    return (f"Replace every digit by the next one (9 becomes 0): {''.join(map(str, digits))}",
            "".join(str((d + 1) % 10) for d in digits))


def _json(rng: random.Random) -> tuple[str, str]:
    record = {"name": rng.choice(NAMES), "city": rng.choice(CITIES),
              "age": rng.randint(18, 90), "color": rng.choice(COLORS)}
    keys = rng.sample(list(record), rng.randint(2, 4))
    line = "; ".join(f"{k}={record[k]}" for k in keys)
    return (f"Convert to JSON: {line}", json.dumps({k: record[k] for k in keys}))


_GENERATORS = {"reverse": _reverse, "shift": _shift, "json": _json}


def problems(task: str, n: int, *, split: str, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, answer)`` pairs of ``task`` from ``split`` ("train"/"eval")."""
    if task not in _GENERATORS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{task}-{seed}-{split}")
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        prompt, answer = _GENERATORS[task](rng)
        if _split_of(prompt) == split and prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
            if len(out) == n:
                return out
    raise RuntimeError(f"{task}: could not draw {n} distinct {split} problems")


def mixture(tasks, n_per_task: int, *, split: str, seed: int) -> list[tuple[str, str, str]]:
    """``(task, prompt, answer)`` triples, ``n_per_task`` of each task, shuffled by ``seed``."""
    rows = [(t, p, a) for t in tasks for p, a in problems(t, n_per_task, split=split, seed=seed)]
    random.Random(seed).shuffle(rows)
    return rows


def exact_match(generated: str, answer: str) -> bool:
    """The task metric: the generated answer span equals the reference, spaces stripped."""
    return generated.strip() == answer.strip()


# the fixed chat prompts of the output-drift probe (general instructions, nothing task-like)
PROBE_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
    "What does a compiler do?",
    "Name two planets in the solar system.",
    "How do I boil an egg?",
    "Explain what photosynthesis is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is the opposite of 'ancient'?",
    "Suggest a name for a pet cat.",
    "Why is the sky blue?",
    "Write one sentence about autumn.",
    "What is 12 times 11?",
    "List three fruits that are red.",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
)


def prose_corpus() -> str:
    """English prose: the Python reference manual's topics shipped in ``pydoc_data``."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
