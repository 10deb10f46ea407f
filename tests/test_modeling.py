"""forgetkern.modeling: the effective LM head (LoRA on the head, tied embeddings, modules_to_save),
head transformations (Gemma-2's soft cap, Cohere's logit scale) and the refusal of unknown ones,
on tiny random HF models (no download)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import forgetkern  # noqa: E402
from forgetkern.demo.tiny_model import TinyConfig, TinyLM  # noqa: E402
from forgetkern.lora import disable_adapters, inject_lora, lora_layers  # noqa: E402
from forgetkern.modeling import (HeadTransform, fused_logit_options, head_transform,  # noqa: E402
                                 hidden_states_and_head, lm_parts)
from forgetkern.train import forget_aware_loss  # noqa: E402

V = 53
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _ids(seed=1, B=2, L=9):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def _randomize_lora(model, std=0.3):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)


def _llama(tied=True, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied))


def _oracle(model, ids, kl_weight=1.0):
    """CE + KL on the model's own materialized logits (adapters on / off)."""
    logits = model(input_ids=ids).logits[:, :-1]
    with torch.no_grad(), disable_adapters(model):
        base = model(input_ids=ids).logits[:, :-1]
    return forgetkern.tmkl_loss(logits, base, ids[:, 1:], kl_weight=kl_weight)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.autograd.grad(loss, params)


def _peft_head_model(tied=True, dropout=0.0, **extra):
    model = peft.get_peft_model(_llama(tied), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=dropout, **extra))
    _randomize_lora(model)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_peft_lora_on_the_head_is_the_effective_head(tied):
    """With LoRA on lm_head, the wrapped head's .weight is the base weight: the helper returns the
    adapted weight and the base weight, and the fused loss equals the loss on the model's logits."""
    model = _peft_head_model(tied)
    ids = _ids()
    x = hidden_states_and_head(model, {"input_ids": ids})
    naive = model.get_output_embeddings().weight
    assert not torch.allclose(x.weight, naive)  # the pitfall: the module's weight is W0
    loss = forgetkern.linear_tmkl_loss(x.hidden[:, :-1], x.weight, x.base_hidden[:, :-1],
                                       ids[:, 1:], **x.head_kwargs(), kl_weight=1.0)
    params, got = _grads(model, loss)
    ref = _oracle(model, ids)
    _, want = _grads(model, ref)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    head_lora = [i for i, n in enumerate(trained) if "lm_head" in n]
    assert head_lora and all(got[i].abs().sum() > 0 for i in head_lora)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_training_paths_take_the_fused_form_with_an_adapted_head():
    model = _peft_head_model()
    ids = _ids(2)
    out = forget_aware_loss(model, {"input_ids": ids}, loss="tmkl", kl_weight=0.5)
    assert out.path == "fused"
    ref = _oracle(model, ids, kl_weight=0.5)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)


def test_modules_to_save_head_and_forgetkern_lora_head():
    model = peft.get_peft_model(_llama(False), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    _randomize_lora(model)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    ids = _ids(3)
    out = forget_aware_loss(model, {"input_ids": ids}, loss="tmkl")
    assert out.path == "fused" and lm_parts(model).kind == "modules_to_save"
    torch.testing.assert_close(out.loss, _oracle(model, ids), rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    tiny = TinyLM(TinyConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, d_ff=48, max_len=16))
    inject_lora(tiny, ["q_proj", "lm_head"], rank=4, alpha=8)
    for layer in lora_layers(tiny).values():
        torch.nn.init.normal_(layer.lora_B, 0, 0.3)
    out = forget_aware_loss(tiny, {"input_ids": ids}, loss="tmkl")
    assert out.path == "fused" and lm_parts(tiny).kind == "lora"
    logits = tiny(ids)[:, :-1]
    with torch.no_grad(), disable_adapters(tiny):
        base = tiny(ids)[:, :-1]
    torch.testing.assert_close(out.loss, forgetkern.tmkl_loss(logits, base, ids[:, 1:]),
                               rtol=1e-5, atol=1e-6)


def test_a_head_without_a_fused_form_is_refused_or_takes_the_logits_path():
    model = _peft_head_model(dropout=0.1)
    ids = _ids(4)
    with pytest.raises(ValueError, match="LlamaForCausalLM.*lora_dropout=0.1"):
        hidden_states_and_head(model, {"input_ids": ids})
    with pytest.raises(ValueError, match="path='fused' impossible.*lora_dropout"):
        forget_aware_loss(model, {"input_ids": ids}, path="fused")
    assert forget_aware_loss(model, {"input_ids": ids}).path == "logits"


def _gemma2():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0)
    return transformers.Gemma2ForCausalLM(cfg)


def _cohere():
    torch.manual_seed(0)
    return transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=0.25))


@pytest.mark.parametrize("make, want", [
    (_gemma2, HeadTransform(1.0, 2.0)),
    (_cohere, HeadTransform(0.25, None)),
])
def test_known_head_transformations_are_read_and_reproduced(make, want):
    """Gemma-2's soft cap and Cohere's logit scale are read from the config and applied by the
    fused-linear loss (no N x V logits): it equals the loss on the model's own materialized
    logits, forward and backward (a random upstream gradient), in fp64 and in fp32."""
    base = make()
    assert head_transform(base) == want and not want.identity
    scale, cap = head_transform(base)  # unpacks as (logit_scale, logit_softcap)
    assert fused_logit_options(want) == {"logit_scale": scale, "logit_softcap": cap}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    _randomize_lora(model)
    ids = _ids(5)
    parts = lm_parts(model)
    assert parts.transform == want
    with torch.no_grad():  # the transform reproduces the model's own logits exactly
        torch.testing.assert_close(parts.logits(parts.hidden(input_ids=ids)),
                                   model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    out = forget_aware_loss(model, {"input_ids": ids}, loss="tmkl")
    assert out.path == "fused"
    torch.testing.assert_close(out.loss, _oracle(model, ids), rtol=1e-5, atol=1e-6)
    assert forget_aware_loss(model, {"input_ids": ids}, path="fused").path == "fused"

    # fp64: the training loss and the public helper against the materialized logits' loss
    model.double()
    options = dict(kl_weight=0.7, temperature=1.5, direction="forward")
    g = torch.randn((), dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    out = forget_aware_loss(model, {"input_ids": ids}, loss="tmkl", **options)
    assert out.path == "fused" and out.loss.dtype == torch.float64
    params, got = _grads(model, out.loss * g)
    logits = model(input_ids=ids).logits[:, :-1]
    with torch.no_grad(), disable_adapters(model):
        base_logits = model(input_ids=ids).logits[:, :-1]
    want_loss = forgetkern.tmkl_loss(logits, base_logits, ids[:, 1:], backend="reference",
                                     **options)
    _, want_grads = _grads(model, want_loss * g)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)

    x = hidden_states_and_head(model, {"input_ids": ids})
    assert x.head_kwargs()["logit_scale"] == scale and x.head_kwargs()["logit_softcap"] == cap
    per_token = forgetkern.linear_tmkl_loss(x.hidden[:, :-1], x.weight, x.base_hidden[:, :-1],
                                            ids[:, 1:], **x.head_kwargs(), reduction="none",
                                            **options)
    logits = model(input_ids=ids).logits[:, :-1]  # a new graph: the first one was freed
    want_tok = forgetkern.tmkl_loss(logits, base_logits, ids[:, 1:], reduction="none",
                                    backend="reference", **options)
    up = torch.randn(want_tok.shape, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(per_token, want_tok, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(model, (per_token * up).sum())[1], _grads(model, (want_tok * up).sum())[1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


class _DoubledLlama(transformers.LlamaForCausalLM):
    """Transforms its logits in a way its config does not announce."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_an_unknown_head_transformation_is_refused_on_the_first_batch():
    torch.manual_seed(0)
    model = peft.get_peft_model(_DoubledLlama(transformers.LlamaConfig(**SMALL)),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    _randomize_lora(model)
    batch = {"input_ids": _ids(6)}
    with pytest.raises(ValueError, match="_DoubledLlama: its logits are not its LM head"):
        forget_aware_loss(model, batch)
    with pytest.raises(ValueError, match="_DoubledLlama"):
        hidden_states_and_head(model, batch)
    assert forget_aware_loss(model, batch, path="logits").path == "logits"


def test_a_head_transformation_that_cannot_be_reproduced_names_the_attribute():
    cfg = transformers.LlamaConfig(**SMALL)
    cfg.final_logit_softcapping = -3.0
    with pytest.raises(ValueError, match="LlamaForCausalLM: config.final_logit_softcapping=-3.0"):
        head_transform(transformers.LlamaForCausalLM(cfg))
    cfg = transformers.LlamaConfig(**SMALL)
    cfg.logit_scale = float("nan")
    with pytest.raises(ValueError, match="config.logit_scale=nan is not a finite number"):
        head_transform(transformers.LlamaForCausalLM(cfg))
