"""Verifiable instructions: the instruction-following part of retention on a chat model.

Each prompt is an everyday request (a *topic*, e.g. "Describe a rainy day.") followed by one
formatting instruction whose outcome code can decide ("Answer in at most 20 words.", "Answer in
JSON: an object with the keys ..."). The score is the share of prompts whose greedy answer passes
its instruction's check. A base chat model follows some of these instructions some of the time;
fine-tuning on a narrow task can erase that, which next-token loss on prose does not show.

The checks read the answer as decoded within a token budget: a check that fails on any prefix
(commas, a word limit) fails when the answer breaks it within the budget, and an answer still
unfinished when the budget runs out is judged on what was written.

``INSTRUCTIONS`` holds every instruction with its check; ``FOLLOWED`` names those that
SmolLM2-135M-Instruct follows at a measurable rate (the others it never followed in
``python -m forgetkern.demo.instructions``, which prints the base model's rate per instruction).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

TOPICS = (
    "Describe a rainy day.", "Explain why people keep pets.", "Give advice to a new student.",
    "Describe your favourite season.", "Explain how a bicycle works.",
    "Write about a visit to the beach.", "Describe a busy market.", "Explain why sleep matters.",
    "Tell me about the moon.", "Describe a good breakfast.", "Explain what a library is for.",
    "Describe a walk in the forest.", "Explain how plants grow.", "Describe a city at night.",
    "Give tips for saving money.", "Describe a friendly dog.",
)

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def words(text: str) -> list[str]:
    """The words of ``text``: runs of letters and digits (an apostrophe suffix kept)."""
    return _WORD.findall(text)


def bullet_lines(text: str) -> int:
    """Lines that are markdown bullet points (``-``, ``*`` or ``•`` then text)."""
    return sum(1 for line in text.splitlines() if re.match(r"\s*[-*•]\s+\S", line))


def json_object(text: str) -> dict | None:
    """``text`` parsed as one JSON object, optionally inside a markdown code fence (anything
    after the closing fence is ignored); ``None`` when it is not one."""
    text = text.strip()
    fenced = re.match(r"```[A-Za-z]*\n(.*?)(?:```|$)", text, re.S)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def sentences(text: str) -> list[str]:
    """``text`` cut after each ``.``, ``!`` or ``?`` that ends a sentence (followed by a space,
    a line break or the end); empty pieces dropped."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _letters(text: str) -> str:
    return "".join(c for c in text if c.isalpha())


@dataclass(frozen=True)
class Instruction:
    """A formatting instruction appended to a topic, and the check of an answer."""

    name: str
    text: str
    check: Callable[[str], bool]


def _instructions() -> dict[str, Instruction]:
    rows = [
        ("three_bullets", "Answer with exactly three short bullet points, each on its own line "
         "starting with '- '.", lambda a: bullet_lines(a) == 3),
        ("json_keys", 'Answer in JSON: an object with the keys "title" and "text", each a few '
         "words long.", lambda a: set(json_object(a) or ()) == {"title", "text"}),
        ("max_20_words", "Answer in at most 20 words.", lambda a: 0 < len(words(a)) <= 20),
        ("no_commas", "Do not use any commas in your answer.",
         lambda a: bool(words(a)) and "," not in a),
        ("start_sure", "Begin your answer with the word 'Sure'.",
         lambda a: bool(words(a)) and words(a)[0].lower() == "sure"),
        ("title", "Start with a title wrapped in double angle brackets, like <<A Good Day>>.",
         lambda a: re.match(r"\s*<<[^<>\n]+>>", a) is not None),
        ("one_sentence", "Answer in a single sentence.",
         lambda a: len(sentences(a)) == 1 and a.strip()[-1:] in (".", "!", "?")),
        # never followed by SmolLM2-135M-Instruct (kept to measure other models)
        ("lowercase", "Answer in lowercase letters only.",
         lambda a: bool(_letters(a)) and _letters(a) == _letters(a).lower()),
        ("uppercase", "Write your whole answer in capital letters only.",
         lambda a: bool(_letters(a)) and _letters(a) == _letters(a).upper()),
        ("end_done", "Finish your answer with the word 'done'.",
         lambda a: bool(words(a)) and words(a)[-1].lower() == "done"),
        ("quoted", "Wrap your entire answer in double quotation marks.",
         lambda a: len(a.strip()) > 2 and a.strip()[0] == a.strip()[-1] == '"'),
    ]
    return {name: Instruction(name, text, check) for name, text, check in rows}


INSTRUCTIONS = _instructions()
FOLLOWED = ("three_bullets", "json_keys", "max_20_words", "no_commas", "start_sure", "title",
            "one_sentence")


def prompts(names, n_topics: int) -> list[tuple[str, str]]:
    """``(instruction, prompt)`` pairs: each named instruction after each of the first
    ``n_topics`` topics, instruction by instruction."""
    unknown = [n for n in names if n not in INSTRUCTIONS]
    if unknown:
        raise ValueError(f"unknown instructions {unknown}; choose from {', '.join(INSTRUCTIONS)}")
    if not 1 <= n_topics <= len(TOPICS):
        raise ValueError(f"n_topics must be in 1..{len(TOPICS)}, got {n_topics}")
    return [(n, f"{topic} {INSTRUCTIONS[n].text}") for n in names for topic in TOPICS[:n_topics]]


def follows(name: str, answer: str) -> bool:
    """Whether ``answer`` follows the instruction ``name``."""
    return bool(INSTRUCTIONS[name].check(answer))


def main() -> None:  # pragma: no cover - loads the real model
    """Print SmolLM2-135M-Instruct's rate per instruction over every topic."""
    import torch

    from .. import models
    from . import metrics

    torch.set_num_threads(1)
    model, tok = models.load("smollm2")
    pairs = prompts(list(INSTRUCTIONS), len(TOPICS))
    rates = metrics.instruction_following(model, tok, pairs, max_new_tokens=64)
    for name, rate in rates["by_instruction"].items():
        print(f"{name:<14} {rate:.3f}  {INSTRUCTIONS[name].text}")


if __name__ == "__main__":  # pragma: no cover
    main()
