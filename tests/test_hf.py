"""forgetkern.integrations.hf on a tiny random LlamaForCausalLM wrapped by PEFT (no download)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import forgetkern  # noqa: E402
import forgetkern.train as ftrain  # noqa: E402
from forgetkern.lora import disable_adapters, load_adapters, save_adapters  # noqa: E402
from .helpers import tiny_llama  # noqa: E402

V = 67


def _peft_model(seed=0):
    base = tiny_llama(V, seed)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                           lora_dropout=0.0)
    model = peft.get_peft_model(base, lcfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


def _batch(seed=1, B=3, L=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _hand_loss(model, batch, kl_weight, n_items):
    """CE + kl_weight * TMKL on materialized logits, plain torch (fp64), HF label shift."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), model.disable_adapter():
        b = model(**inputs).logits[:, :-1].reshape(-1, V).double()
    z = model(**inputs).logits[:, :-1].reshape(-1, V).double()
    y = batch["labels"][:, 1:].reshape(-1)
    keep = y != -100
    z, b, y = z[keep], b[keep], y[keep]
    ce = torch.nn.functional.cross_entropy(z, y, reduction="sum")
    mask = torch.nn.functional.one_hot(y, V).bool()
    lp = b.masked_fill(mask, float("-inf")).log_softmax(-1)
    lq = z.masked_fill(mask, float("-inf")).log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).nan_to_num().sum()
    return (ce + kl_weight * kl) / n_items


def _fused_available(monkeypatch):
    if getattr(forgetkern, "linear_tmkl_loss", None) is not None:
        return
    from tests.test_train import _materialized_linear_tmkl

    monkeypatch.setattr(ftrain, "_linear_tmkl", lambda: _materialized_linear_tmkl)


@pytest.mark.parametrize("path", ["fused", "logits"])
def test_compute_loss_matches_materialized_tmkl(path, monkeypatch):
    from forgetkern.integrations.hf import compute_tmkl_loss

    _fused_available(monkeypatch)
    model = _peft_model()
    batch = _batch()
    assert ftrain.fused_parts(model) is not None
    n_items = 40  # as if accumulated with another micro-batch
    loss, out = compute_tmkl_loss(model, batch, loss="tmkl", num_items_in_batch=n_items,
                                  path=path, kl_weight=0.6, backend="reference")
    assert out.path == path
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    ref = _hand_loss(model, batch, 0.6, n_items)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)


def test_disable_and_adapter_files_with_peft(tmp_path):
    model = _peft_model()
    ids = _batch()["input_ids"]
    with model.disable_adapter():
        ref = model(input_ids=ids).logits
    with disable_adapters(model):
        assert torch.equal(model(input_ids=ids).logits, ref)
    adapted = model(input_ids=ids).logits
    save_adapters(model, tmp_path / "a.safetensors")
    other = _peft_model(seed=0)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "lora_B" in n:
                p.zero_()
    load_adapters(other, tmp_path / "a.safetensors")
    torch.testing.assert_close(other(input_ids=ids).logits, adapted)


def test_adapter_files_of_a_named_peft_adapter_and_partial_files(tmp_path):
    """A PEFT adapter not named "default" saves and loads; a file that lacks some of the model's
    adapter tensors (or holds others) is refused before any weight changes."""
    from safetensors.torch import save_file

    from forgetkern.lora import read_adapters

    def named(seed):
        torch.manual_seed(0)  # the same base model, adapters random (seed) or zero
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1)
        lcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lcfg, adapter_name="task")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
                            * 0.2 * bool(seed))
        return model

    model, other = named(1), named(0)
    ids = _batch()["input_ids"]
    path = tmp_path / "task.safetensors"
    save_adapters(model, path)
    tensors, meta = read_adapters(path)
    assert meta["adapter"] == "task" and len(tensors) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["task.safetensors"]  # no temporary left
    load_adapters(other, path)
    torch.testing.assert_close(other(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="adapter_name='nope'"):
        save_adapters(model, tmp_path / "x.safetensors", adapter_name="nope")

    fresh = named(0)
    before = {n: p.clone() for n, p in fresh.named_parameters() if "lora_" in n}
    for name, keep in (("partial", lambda k: "layers.1." not in k), ("extra", None)):
        part = dict(tensors) if keep is None else {k: v for k, v in tensors.items() if keep(k)}
        if keep is None:
            part["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 16)
        save_file(part, str(tmp_path / f"{name}.safetensors"),
                  metadata={"forgetkern": __import__("json").dumps(meta)})
        with pytest.raises(ValueError, match="does not hold the model's adapters"):
            load_adapters(fresh, tmp_path / f"{name}.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters() if "lora_" in n)


def test_trainer_runs_with_gradient_accumulation(tmp_path, monkeypatch):
    from forgetkern.integrations.hf import TMKLTrainer

    _fused_available(monkeypatch)
    model = _peft_model()
    rows = []
    for i in range(4):
        b = _batch(seed=10 + i, B=1)
        rows.append({k: v[0] for k, v in b.items()})

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="no", disable_tqdm=True)
    seen = []
    trainer = TMKLTrainer(model=model, args=args, train_dataset=DS(),
                          tmkl_loss="tmkl", tmkl_options={"kl_weight": 0.5, "backend": "reference"})
    orig = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append(int(num_items_in_batch))
        return orig(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = spy
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    total = sum(int((r["labels"][1:] != -100).sum()) for r in rows)
    assert seen == [total, total]  # both micro-batches normalized by the accumulated count
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved
    logs = [h for h in trainer.state.log_history if "tmkl_ce" in h]
    assert logs and logs[0]["tmkl_kl"] >= 0
    # the components are on the loss's scale: summed over the step's micro-batches
    assert logs[0]["loss"] == pytest.approx(logs[0]["tmkl_ce"] + 0.5 * logs[0]["tmkl_kl"], rel=1e-3)


def test_import_forgetkern_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, forgetkern, forgetkern.train, forgetkern.lora; "
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_on_a_local_hf_model(tmp_path):
    """``forgetkern demo --model DIR --data FILE`` on a tiny random Llama + byte-level tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    import json

    from forgetkern.cli import main

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    text = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(300))
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    model_dir = tmp_path / "model"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                   intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    data = tmp_path / "target.txt"
    data.write_text(text)
    out = tmp_path / "hf.json"
    assert main(["demo", "--smoke", "--model", str(model_dir), "--data", str(data),
                 "--seq-len", "32", "--methods", "ce,tmkl", "--no-plot", "--no-progress",
                 "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["config"]["model_dir"] == str(model_dir)
    results = payload["results"]
    assert [r["method"] for r in results] == ["ce", "tmkl"]
    for r in results:
        assert r["status"] == "ok"
        assert r["target_loss"] < r["base_target_loss"]  # 8 steps on the file it evaluates near
        assert r["forgetting"] == pytest.approx(r["retention_loss"] - r["base_retention_loss"])


# ---- any mapping of tensors: HF's own collators return BatchEncoding --------------------------
def _token_rows(n=4, seed=0):
    from tests.helpers import tiny_texts, tiny_tokenizer

    tok = tiny_tokenizer(V)
    return tok, [tok(t) for t in tiny_texts(n, V, seed=seed)]


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
        remove_unused_columns=False, **kw)


def test_trainer_with_data_collator_for_language_modeling(tmp_path):
    from forgetkern.integrations.hf import TMKLTrainer

    tok, rows = _token_rows()
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    assert not isinstance(collator(rows[:2]), dict)  # a BatchEncoding, a Mapping
    trainer = TMKLTrainer(model=_peft_model(), args=_args(tmp_path), train_dataset=rows,
                          data_collator=collator, tmkl_options={"kl_weight": 0.5})
    trainer.train()
    assert [h for h in trainer.state.log_history if "tmkl_kl" in h]


def test_batch_encoding_from_data_collator_with_padding_everywhere():
    from forgetkern import ForgetAwareStep
    from forgetkern.integrations.hf import compute_tmkl_loss

    tok, rows = _token_rows(seed=3)
    batch = transformers.DataCollatorWithPadding(tok)(rows[:3])
    assert isinstance(batch, transformers.BatchEncoding)
    model = _peft_model()
    loss, out = compute_tmkl_loss(model, batch, kl_weight=0.5)
    as_dict = compute_tmkl_loss(model, dict(batch), kl_weight=0.5)[0]
    assert out.path == "fused" and torch.equal(loss, as_dict)
    assert forgetkern.train.forget_aware_loss(model, batch).tokens == out.tokens
    metrics = ForgetAwareStep(model, kl_weight=0.5)(batch)
    assert metrics["tokens"] == out.tokens and metrics["ce"] > 0
    with pytest.raises(TypeError, match="mapping of tensors.*got list"):
        compute_tmkl_loss(model, [batch])


# ---- one line on any Trainer subclass ------------------------------------------------------------
class _UserTrainer(transformers.Trainer):
    """A user's own Trainer subclass: its other overrides must keep running."""

    def log(self, logs, *args, **kwargs):
        self.seen_logs = getattr(self, "seen_logs", []) + [dict(logs)]
        return super().log(logs, *args, **kwargs)


def test_tmkl_trainer_class_and_apply_tmkl_keep_the_users_trainer(tmp_path):
    from forgetkern.integrations.hf import TMKLMixin, apply_tmkl, tmkl_trainer_class

    tok, rows = _token_rows()
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    cls = tmkl_trainer_class(_UserTrainer)
    assert tmkl_trainer_class(_UserTrainer) is cls and issubclass(cls, _UserTrainer)
    trainer = cls(model=_peft_model(), args=_args(tmp_path), train_dataset=rows,
                  data_collator=collator, tmkl_options={"kl_weight": 0.5})
    trainer.train()
    assert any("tmkl_kl" in h for h in trainer.seen_logs)  # the user's log saw the TMKL terms

    built = _UserTrainer(model=_peft_model(), args=_args(tmp_path), train_dataset=rows,
                         data_collator=collator)
    seen = []
    orig = TMKLMixin.compute_loss

    def spy(self, *args, **kwargs):
        seen.append(1)
        return orig(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TMKLMixin, "compute_loss", spy)
        assert apply_tmkl(built, "kl", kl_weight=0.5) is built
        assert isinstance(built, _UserTrainer) and built.tmkl_config.loss == "kl"
        built.train()
    assert seen and any("tmkl_kl" in h for h in built.seen_logs)
    with pytest.raises(ValueError, match="no adapters"):
        apply_tmkl(transformers.Trainer(model=_peft_model().get_base_model(), args=_args(tmp_path)))
    with pytest.raises(TypeError, match="unexpected loss options"):
        apply_tmkl(built, klweight=1.0)
