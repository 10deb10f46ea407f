"""Every Python example of README.md and docs/usage.md runs as written, on a tiny random Llama (no
download).

The README's quickstart defines everything it uses: it runs with the model name replaced by a tiny
model saved in a temporary folder. The blocks of docs/usage.md run in a namespace that provides
the names the page leaves to the reader (``model``, ``input_ids``, ``task_batches``, ...); the
blocks' own code is executed unchanged, and each test checks what the block claims (a finite loss,
gradients in the LoRA matrices, a changed model after training).
"""
import math
import re
from pathlib import Path

import pytest
import torch
from .helpers import tiny_llama  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USAGE = ROOT / "docs" / "usage.md"
V = 61


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def _block(marker: str, path: Path = USAGE) -> str:
    found = [b for b in _blocks(path) if marker in b]
    assert len(found) == 1, f"{path.name} has {len(found)} python blocks containing {marker!r}"
    return found[0]


def _llama(seed=0):
    return tiny_llama(V, seed, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _batch(seed, B=2, L=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora" in n.lower() and p.requires_grad}


def _peft(seed=0):
    model = peft.get_peft_model(_llama(seed), peft.LoraConfig(r=4, lora_alpha=8,
                                                              target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # nonzero B so the adapted and base models differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


MARKERS = {README: ("AutoModelForCausalLM.from_pretrained(name)",),
           USAGE: ("import torch, forgetkern", "hidden_states_and_head", "FoLoRA.from_model",
                   "metrics = step(batch)", "TMKLTrainer(model=model")}


def test_every_python_block_is_covered():
    for path, markers in MARKERS.items():
        blocks = _blocks(path)
        assert len(blocks) == len(markers) and all(
            sum(m in b for m in markers) == 1 for b in blocks), [b.splitlines()[0] for b in blocks]


def test_readme_quickstart(tmp_path):
    """The quickstart as written, with SmolLM2's name replaced by a tiny Llama and a tokenizer of
    its own saved in a temporary folder, and the sentence by words of that tokenizer."""
    from tests.helpers import tiny_tokenizer

    folder = tmp_path / "model"
    _llama(6).save_pretrained(folder)
    tiny_tokenizer(V).save_pretrained(folder)
    code = _block("AutoModelForCausalLM.from_pretrained(name)", README)
    for old, new in (('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(folder))),
                     ("LoRA adapts a few low-rank matrices.", "w3 w4 w5 w6 w7 w8")):
        assert old in code, old
        code = code.replace(old, new)
    ns = {}
    exec(code, ns)
    assert ns["batch"]["input_ids"].tolist() == [[3, 4, 5, 6, 7, 8]]
    assert math.isfinite(float(ns["loss"].detach())) and float(ns["loss"].detach()) > 0
    grads = _lora_grads(ns["model"])
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads.values())
    frozen = [p for n, p in ns["model"].named_parameters() if "lora" not in n.lower()]
    assert all(p.grad is None for p in frozen), "a base weight got a gradient"


def test_quickstart_swap_your_loss():
    model = _peft()
    b = _batch(1)
    ns = {"model": model, "input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    exec(_block("import torch, forgetkern"), ns)
    loss = float(ns["loss"].detach())
    assert math.isfinite(loss) and loss > 0
    grads = _lora_grads(model)
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_fused_linear_form_matches_logits_form():
    model = _peft()
    b = _batch(2)
    labels = b["labels"][:, 1:]
    import forgetkern
    from forgetkern.lora import disable_adapters

    # the block continues the quickstart: its imports and labels are in scope
    ns = {"model": model, "input_ids": b["input_ids"], "labels": labels, "torch": torch,
          "forgetkern": forgetkern, "disable_adapters": disable_adapters}
    exec(_block("hidden_states_and_head"), ns)

    with torch.no_grad():
        logits = model(b["input_ids"]).logits[:, :-1].double()
        with disable_adapters(model):
            base = model(b["input_ids"]).logits[:, :-1].double()
    expected = forgetkern.tmkl_loss(logits, base, labels, kl_weight=1.0)
    assert torch.allclose(ns["loss"].detach().double(), expected, rtol=1e-4, atol=1e-5)
    assert any(g is not None and g.abs().sum() > 0 for g in _lora_grads(model).values())


def test_folora_in_ten_lines():
    from forgetkern.optim import FoLoRA

    model = _llama(3)
    task_batches = [_batch(10 + i, B=2, L=8) for i in range(66)]
    code = _block("FoLoRA.from_model")
    # the README's sizes are for a real model; the tiny one gets tiny ones (nothing else changes)
    code = code.replace("rank=16, alpha=32", "rank=4, alpha=8")
    code = code.replace("n_samples=256, length=256", "n_samples=4, length=8")
    code = code.replace("for batch in task_batches:", "for batch in task_batches[:3]:")
    ns = {"model": model, "task_batches": task_batches}
    exec(code, ns)
    assert isinstance(ns["opt"], FoLoRA)
    assert ns["step"].optimizer is ns["opt"] and ns["step"].config.loss == "tmkl"  # with TMKL
    assert sum(t.shape[0] for t in ns["proxy"]) == 4 and all(t.shape[1] == 8 for t in ns["proxy"])
    lora_b = [p for n, p in ns["model"].named_parameters() if n.endswith("lora_B") or "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "three FoLoRA steps left every B at zero"


def test_plain_loop_with_forget_aware_step(capsys):
    model = _llama(4)
    loader = [_batch(20 + i) for i in range(2)]
    code = _block("metrics = step(batch)").replace("rank=16, alpha=32", "rank=4, alpha=8")
    ns = {"model": model, "loader": loader}
    exec(code, ns)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert all(math.isfinite(float(x)) for line in lines for x in line.split())


def test_hf_trainer_with_peft(tmp_path):
    model = _llama(5)
    ds = [_batch(30 + i, B=1) for i in range(4)]
    ds = [{k: v[0] for k, v in ex.items()} for ex in ds]

    def collator(features):
        return {k: torch.stack([f[k] for f in features]) for k in features[0]}

    training_args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
        report_to=[], logging_steps=1, save_strategy="no", use_cpu=True)
    code = _block("TMKLTrainer(model=model").replace("r=16, lora_alpha=32", "r=4, lora_alpha=8")
    ns = {"model": model, "training_args": training_args, "ds": ds, "collator": collator}
    exec(code, ns)
    logs = [h for h in ns["trainer"].state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) and "tmkl_kl" in h for h in logs)
