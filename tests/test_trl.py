"""TRL's SFTTrainer with the TMKL loss, against the installed trl on a tiny random Llama with PEFT
LoRA (no download): SFT's own logged metrics are kept, CE alone reproduces SFT's training, and
trainers whose objective TMKL cannot stand in for are refused."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl", reason="the TRL path needs trl (pip install 'forgetkern[trl]')")
datasets = pytest.importorskip("datasets")

from forgetkern.integrations.hf import TMKLMixin, apply_tmkl  # noqa: E402
from forgetkern.integrations.trl import TMKLSFTTrainer  # noqa: E402
from tests.helpers import tiny_texts, tiny_tokenizer  # noqa: E402

V = 40
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, pad_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(cfg)


def _config(tmp_path, **kw):
    return trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                         learning_rate=5e-2, logging_steps=1, report_to=[], save_strategy="no",
                         use_cpu=True, bf16=False, disable_tqdm=True, max_length=16, seed=0, **kw)


def _sft(cls, tmp_path, **kw):
    ds = datasets.Dataset.from_dict({"text": tiny_texts(4, V)})
    return cls(model=_model(), args=_config(tmp_path, **kw.pop("config", {})), train_dataset=ds,
               processing_class=tiny_tokenizer(V), peft_config=peft.LoraConfig(**LORA), **kw)


def _logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_ce_alone_reproduces_sft_training_and_its_metrics(tmp_path):
    plain = _sft(trl.SFTTrainer, tmp_path / "sft")
    plain.train()
    ours = _sft(TMKLSFTTrainer, tmp_path / "tmkl", tmkl_loss="ce")
    ours.train()
    assert isinstance(ours, trl.SFTTrainer)
    want, got = _logs(plain), _logs(ours)
    assert len(want) == len(got) == 2
    for w, g in zip(want, got):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
            assert key in g, key
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key
        assert g["tmkl_ce"] == pytest.approx(g["loss"], rel=1e-4)
    for (n, a), (_, b) in zip(plain.model.named_parameters(), ours.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_sft_with_tmkl_logs_the_kl_and_sfts_metrics(tmp_path):
    trainer = _sft(TMKLSFTTrainer, tmp_path, tmkl_options={"kl_weight": 0.5})
    trainer.train()
    logs = _logs(trainer)
    assert len(logs) == 2
    for h in logs:
        assert {"entropy", "mean_token_accuracy", "num_tokens", "tmkl_ce", "tmkl_kl"} <= set(h)
        assert 0 < h["entropy"] <= math.log(V) + 1e-4 and 0 <= h["mean_token_accuracy"] <= 1
        assert h["loss"] == pytest.approx(h["tmkl_ce"] + 0.5 * h["tmkl_kl"], rel=1e-3)
    assert logs[0]["tmkl_kl"] == pytest.approx(0.0, abs=1e-7)  # LoRA starts at B = 0
    assert logs[1]["tmkl_kl"] > 0  # after one step the adapted model has moved


def test_apply_tmkl_on_a_built_sft_trainer(tmp_path):
    trainer = _sft(trl.SFTTrainer, tmp_path)
    assert apply_tmkl(trainer, kl_weight=1.0) is trainer
    assert isinstance(trainer, trl.SFTTrainer) and isinstance(trainer, TMKLMixin)
    assert type(trainer).__name__ == "TMKLSFTTrainer"
    trainer.train()
    assert all("tmkl_kl" in h and "mean_token_accuracy" in h for h in _logs(trainer))


def test_objectives_tmkl_cannot_stand_in_for_are_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_type='dft'"):
        apply_tmkl(_sft(trl.SFTTrainer, tmp_path, config={"loss_type": "dft"}))
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        apply_tmkl(_sft(trl.SFTTrainer, tmp_path, config={"label_smoothing_factor": 0.1}))
    other = type("PreferenceTrainer", (transformers.Trainer,), {"__module__": "trl.trainer.fake"})
    trainer = other(model=peft.get_peft_model(_model(), peft.LoraConfig(**LORA)),
                    args=transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))
    with pytest.raises(ValueError, match="PreferenceTrainer trains another objective"):
        apply_tmkl(trainer)
