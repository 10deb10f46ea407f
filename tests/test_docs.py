"""Every Python block of README.md and docs/*.md runs as written, on tiny random models (no
download): each block is executed by exactly one test, here or named in ``ELSEWHERE``; the blocks
get the names their prose leaves to the reader (``model``, ``input_ids``, ...), and the literal
``"path/to/model"`` is a tiny model saved in a temporary folder. The demo's times are quoted alike
by ``forgetkern demo --help``, the README and the docs."""
import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# blocks run by another test file (it holds the marker), by a marker unique to the block
ELSEWHERE = {
    ("README.md", "AutoModelForCausalLM.from_pretrained(name)"): "tests/test_readme.py",
    ("usage.md", "import torch, forgetkern"): "tests/test_readme.py",
    ("usage.md", "hidden_states_and_head"): "tests/test_readme.py",
    ("usage.md", "FoLoRA.from_model"): "tests/test_readme.py",
    ("usage.md", "metrics = step(batch)"): "tests/test_readme.py",
    ("usage.md", "TMKLTrainer(model=model"): "tests/test_readme.py",
    ("distributed.md", "each rank gets the gradient of its own shard"): "tests/test_distributed.py",
    ("distributed.md", "distribute_tensor(z, mesh"): "tests/test_distributed.py",
    ("distributed.md", "def main(model, loader"): "tests/test_distributed.py",
    ("distributed.md", "def train(model, dataset"): "tests/test_distributed.py",
    ("distributed.md", "proxy = forgetkern.optim.sample_proxy_data"): "tests/test_distributed.py",
    ("folora.md", "basis=256)"): "tests/test_folora.py",
}
# blocks run here
HERE = {
    ("training.md", "step = ForgetAwareStep(model, loss=\"tmkl\", kl_weight=1.0, lr=1e-3"): "plain",
    ("training.md", "opt = FoLoRA.from_model(model, stats"): "plain",
    ("training.md", "out = forget_aware_loss(model, batch"): "plain",
    ("training.md", "trainer = TMKLTrainer(model=model, args=args"): "hf",
    ("training.md", "class MyTrainer(Trainer)"): "hf",
    ("training.md", "TMKLSFTTrainer("): "trl",
    ("training.md", "for batch in loader:\n    step(batch)"): "hf",
    ("training.md", "x = hidden_states_and_head(model"): "hf",
    ("linear_tmkl.md", "backbone = model.get_decoder()"): "linear",
    ("linear_tmkl.md", "logits = hidden @ weight.T + bias"): "linear",
    ("base_cache.md", "build_cache(model, batches, \"cache/\""): "cache",
    ("base_cache.md", "import_vllm_prompt_logprobs(outputs"): "cache",
    ("base_cache.md", "w = CacheWriter(\"cache_k64/\""): "cache",
    ("cuda.md", "backend=\"cuda\")"): "cuda",
}


def python_blocks(path: Path) -> list:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def block(name: str, marker: str) -> str:
    found = [b for b in python_blocks(ROOT / ("README.md" if name == "README.md" else f"docs/{name}"))
             if marker in b]
    assert len(found) == 1, f"{name}: {len(found)} python blocks contain {marker!r}"
    return found[0]


def run(code: str, ns: dict, subs=()) -> dict:
    for old, new in subs:
        assert old in code, f"the block no longer contains {old!r}"
        code = code.replace(old, new)
    exec(compile(code, "<doc block>", "exec"), ns)
    return ns


def test_every_python_block_is_run_by_exactly_one_test():
    for path in DOCS:
        for code in python_blocks(path):
            keys = [k for k in (*ELSEWHERE, *HERE) if k[0] == path.name and k[1] in code]
            assert len(keys) == 1, f"{path.name}: block {code.splitlines()[0]!r} matches {keys}"
            if keys[0] in ELSEWHERE:
                assert keys[0][1] in (ROOT / ELSEWHERE[keys[0]]).read_text(), keys[0]


def test_every_forgetkern_command_line_parses(tmp_path, monkeypatch):
    """The ``forgetkern ...`` lines of the bash blocks are valid command lines (parsed by the CLI's
    own parser, not run: they take minutes to hours). The inputs they name (``--data FILE``,
    ``--model FOLDER``, ``--resume`` / ``--from-json PATH``) are created first in an empty folder,
    so the parser's own existence checks run for real."""
    import shlex

    from forgetkern.cli import build_parser

    monkeypatch.chdir(tmp_path)
    inputs = {"--data": "file", "--resume": "file", "--from-json": "file", "--model": "dir"}
    seen = 0
    for path in DOCS:
        for code in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in code.splitlines():
                words = shlex.split(line, comments=True)
                if words[:3] == ["python", "-m", "forgetkern"]:
                    words = words[2:]
                if words[:1] == ["forgetkern"]:
                    for flag, values in zip(words, words[1:]):
                        for value in values.split(",") if flag == "--from-json" else [values]:
                            if flag not in inputs or value == "smollm2":
                                continue
                            target = tmp_path / value
                            target.parent.mkdir(parents=True, exist_ok=True)
                            if inputs[flag] == "dir":
                                target.mkdir(exist_ok=True)
                            elif not target.exists():
                                target.write_text("{}\n")
                    build_parser().parse_args(words[1:])
                    seen += 1
    assert seen >= 10


# ---- the demo's times: one fact -----------------------------------------------------------------
def test_demo_times_agree_between_help_readme_and_docs(capsys):
    from forgetkern.cli import main
    from forgetkern.demo.config import TIMES

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    texts = {p.name: " ".join(p.read_text().split())
             for p in (ROOT / "README.md", ROOT / "docs/demo.md", ROOT / "docs/real_model.md")}
    for key, where in (("quick", ("README.md", "demo.md")), ("full", ("README.md", "demo.md")),
                       ("smollm2 quick", ("README.md", "real_model.md"))):
        assert TIMES[key] in help_text, key
        for name in where:
            assert TIMES[key] in texts[name], (key, name)


# ---- fixtures: tiny models ----------------------------------------------------------------------
V = 40


def _llama():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1))


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    from tests.helpers import tiny_tokenizer

    folder = tmp_path / "model"
    _llama().save_pretrained(folder)
    tiny_tokenizer(V).save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    return str(folder)


def _ids(seed=0, B=2, L=10):
    return torch.randint(2, V, (B, L), generator=torch.Generator().manual_seed(seed))


# ---- docs/training.md ---------------------------------------------------------------------------
def test_training_plain_loop_folora_and_loss(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns = {"__name__": "__doc__"}
    run(block("training.md", "step = ForgetAwareStep(model, loss=\"tmkl\", kl_weight=1.0, lr=1e-3"), ns)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("kl" in line for line in lines)
    assert (tmp_path / "adapters.safetensors").stat().st_size > 0
    g = torch.Generator().manual_seed(1)
    ns["task_batches"] = [{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(2)]
    run(block("training.md", "opt = FoLoRA.from_model(model, stats"), ns,
        subs=[("n_samples=64, length=128", "n_samples=4, length=16")])  # tiny model, tiny sample
    from forgetkern.optim import FoLoRA

    assert isinstance(ns["opt"], FoLoRA) and ns["step"].optimizer is ns["opt"]
    ns.update(batch={"input_ids": ns["ids"], "labels": ns["ids"]}, n_tokens=31 * 4)
    run(block("training.md", "out = forget_aware_loss(model, batch"), ns)
    assert ns["out"].path == "fused" and math.isfinite(float(ns["out"].loss))


def test_training_hf_trainer_one_line_peft_and_fused_by_hand(model_dir, capsys):
    from tests.helpers import tiny_texts

    ns = {"__name__": "__doc__", "texts": tiny_texts(8, V)}
    subs = [('"path/to/model"', repr(model_dir))]
    run(block("training.md", "trainer = TMKLTrainer(model=model, args=args"), ns, subs)
    assert any("tmkl_kl" in h for h in ns["trainer"].state.log_history)
    run(block("training.md", "class MyTrainer(Trainer)"), ns)
    printed = capsys.readouterr().out
    assert isinstance(ns["trainer"], ns["MyTrainer"]) and printed.count("tmkl_kl") >= 2
    ns["loader"] = [{"input_ids": _ids(s), "labels": _ids(s)} for s in range(2)]
    run(block("training.md", "for batch in loader:\n    step(batch)"), ns, subs)
    ns["input_ids"] = _ids(5)
    run(block("training.md", "x = hidden_states_and_head(model"), ns, subs)
    grads = [p.grad for n, p in ns["model"].named_parameters() if "lm_head" in n and "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_training_trl_sft_trainer(model_dir):
    pytest.importorskip("trl", reason="the TRL block needs trl (pip install 'forgetkern[trl]')")
    datasets = pytest.importorskip("datasets")
    from tests.helpers import tiny_texts, tiny_tokenizer

    ns = {"__name__": "__doc__", "tokenizer": tiny_tokenizer(V),
          "dataset": datasets.Dataset.from_dict({"text": tiny_texts(8, V)})}
    run(block("training.md", "TMKLSFTTrainer("), ns, [('"path/to/model"', repr(model_dir))])
    first = ns["trainer"].state.log_history[0]
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens", "tmkl_ce", "tmkl_kl"} <= set(first)


# ---- docs/linear_tmkl.md ------------------------------------------------------------------------
def test_linear_tmkl_blocks():
    import forgetkern

    peft = pytest.importorskip("peft")

    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    ids = _ids(3)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ns = run(block("linear_tmkl.md", "backbone = model.get_decoder()"), {
        "model": model, "input_ids": ids, "attention_mask": mask})
    from forgetkern.lora import disable_adapters

    logits = model(input_ids=ids).logits[:, :-1]
    with torch.no_grad(), disable_adapters(model):
        base = model(input_ids=ids).logits[:, :-1]
    want = forgetkern.tmkl_loss(logits, base, ns["labels"], kl_weight=1.0)
    torch.testing.assert_close(ns["loss"], want, rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    parts = {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in (
        ("hidden", (5, 8)), ("base_hidden", (5, 8)), ("weight", (V, 8)), ("base_weight", (V, 8)),
        ("bias", (V,)), ("base_bias", (V,)))}
    labels = torch.randint(0, V, (5,), generator=g)
    ns = run(block("linear_tmkl.md", "logits = hidden @ weight.T + bias"),
             {"forgetkern": forgetkern, "labels": labels, **parts})
    torch.testing.assert_close(ns["loss"], forgetkern.linear_tmkl_loss(
        parts["hidden"], parts["weight"], parts["base_hidden"], labels, base_weight=parts["base_weight"],
        bias=parts["bias"], base_bias=parts["base_bias"]))


# ---- docs/base_cache.md -------------------------------------------------------------------------
def test_base_cache_blocks(tmp_path, monkeypatch):
    import json

    from tests.test_cache_import import _setup, _vllm

    monkeypatch.chdir(tmp_path)
    model, batch, logits = _setup()
    ns = run(block("base_cache.md", "build_cache(model, batches, \"cache/\""),
             {"model": model, "batches": [batch], "loader": [batch, batch]})
    assert ns["cache"].mode == "exact" and ns["step"].steps == 2
    with open("topk_logits.jsonl", "w") as f:
        for i, (row, tokens) in enumerate(zip(logits, batch["input_ids"])):
            top = row.topk(4)
            f.write(json.dumps({"index": i, "tokens": tokens.tolist(), "topk_logits": top.values.tolist(),
                                "topk_token_ids": top.indices.tolist(),
                                "log_sum_exp_logits": row.logsumexp(-1).tolist()}) + "\n")
    ns = run(block("base_cache.md", "import_vllm_prompt_logprobs(outputs"), {
        "model": model, "outputs": _vllm(logits, batch["input_ids"]), "ids": [7, 8, 9],
        "labels": batch["labels"].tolist()})
    assert ns["cache"].mode == "topk" and len(ns["cache"]) == 3

    # the CacheWriter block rewrites a built top-k cache, row for row, into another directory
    import numpy as np

    from forgetkern.cache import build_cache, input_key

    built = build_cache(model, [batch], "built_k4/", mode="topk", k=4, show_progress=False)
    a, m = built.arrays, built.manifest
    counts = [int(n) for n in (batch["labels"][:, 1:] != -100).sum(1)]
    starts = np.cumsum([0, *counts[:-1]]).tolist()
    chunks = [(s, {name: a[name][s:s + n] for name in a}) for s, n in zip(starts, counts)]
    tokens = [t[t >= 0] for t in batch["input_ids"]]
    ns = run(block("base_cache.md", "w = CacheWriter(\"cache_k64/\""),
             {"V": m["vocab_size"], "ids": [7, 8, 9], "counts": counts, "tokens": tokens,
              "base_model": model, "chunks": chunks},
             subs=[("k=64", "k=4"), ("positions=..., targets=..., values=..., indices=..., lse=...,\n"
                                      "                tail_lse=..., target=...)", "**rows)")])
    assert ns["cache"].mode == "topk" and len(ns["cache"]) == 3
    for name in a:
        np.testing.assert_array_equal(ns["cache"].arrays[name], a[name])
    assert input_key(tokens[0]) == built.manifest.get("keys", [input_key(tokens[0])])[0]


# ---- docs/cuda.md -------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_block():
    import forgetkern

    if not forgetkern.info()["cuda_extension_usable"]:
        pytest.skip(forgetkern.info()["cuda_extension_unusable_why"] or "CUDA extension not usable")
    g = torch.Generator(device="cuda").manual_seed(0)
    z, b = (torch.randn(6, 50, device="cuda", generator=g) for _ in range(2))
    y = torch.randint(0, 50, (6,), device="cuda", generator=g)
    a = torch.randn(3, 8, 8, device="cuda", generator=g, dtype=torch.float64)
    A = a @ a.transpose(-1, -2)
    B = A + 8 * torch.eye(8, device="cuda", dtype=torch.float64)
    ns = run(block("cuda.md", "backend=\"cuda\")"), {
        "logits": z, "base_logits": b, "labels": y, "z": z, "b": b, "y": y, "A": A, "B": B})
    torch.testing.assert_close(ns["loss"], forgetkern.tmkl_loss(z, b, y, backend="reference"))
