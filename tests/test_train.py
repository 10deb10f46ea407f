"""forgetkern.train: ForgetAwareStep and forget_aware_loss on forgetkern-LoRA models."""
import pytest
import torch

import forgetkern
import forgetkern.train as ftrain
from forgetkern import ForgetAwareStep
from forgetkern.demo.tiny_model import LogitsOnly, TinyConfig, TinyLM
from forgetkern.lora import disable_adapters, inject_lora, lora_layers
from forgetkern.train import forget_aware_loss, shift_labels_for_causal_lm

CFG = TinyConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=16)
TARGETS = ["q_proj", "v_proj", "up_proj"]


def _model(seed=0):
    torch.manual_seed(seed)
    model = TinyLM(CFG)
    inject_lora(model, TARGETS, rank=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)  # adapted != base, so the KL terms are non-zero
    return model


def _batch(seed=1, B=3, L=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (B, L), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    return {"input_ids": ids, "labels": labels}


def _materialized_linear_tmkl(hidden, weight, base_hidden, labels, *, bias=None, chunk_size=None,
                              **kw):
    """Stand-in with the fused signature that materializes the logits (plumbing check)."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    base = base_hidden @ weight.T + (bias if bias is not None else 0)
    return forgetkern.tmkl_loss(logits, base, labels, **kw)


def _hand_loss(model, batch, loss, kl_weight):
    """CE + kl_weight * (masked or plain) KL(base || adapted), written out in plain torch."""
    ids = batch["input_ids"]
    y = shift_labels_for_causal_lm(batch["labels"]).reshape(-1)
    with torch.no_grad(), disable_adapters(model):
        b = model(ids).reshape(-1, CFG.vocab_size).double()
    z = model(ids).reshape(-1, CFG.vocab_size).double()
    keep = y != -100
    z, b, y = z[keep], b[keep], y[keep]
    ce = torch.nn.functional.cross_entropy(z, y)
    if loss == "ce":
        return ce
    if loss == "tmkl":
        mask = torch.nn.functional.one_hot(y, CFG.vocab_size).bool()
        z = z.masked_fill(mask, float("-inf"))
        b = b.masked_fill(mask, float("-inf"))
    lp, lq = b.log_softmax(-1), z.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).nan_to_num().sum(-1).mean()
    return ce + kl_weight * kl


@pytest.mark.parametrize("loss", ["ce", "kl", "tmkl"])
@pytest.mark.parametrize("path", ["logits", "fused"])
def test_loss_matches_hand_written(loss, path, monkeypatch):
    if path == "fused" and getattr(forgetkern, "linear_tmkl_loss", None) is None:
        monkeypatch.setattr(ftrain, "_linear_tmkl", lambda: _materialized_linear_tmkl)
    model = _model()
    batch = _batch()
    m = model if path == "fused" else LogitsOnly(model)
    out = forget_aware_loss(m, batch, loss=loss, kl_weight=0.7, path=path, backend="reference")
    assert out.path == path
    assert out.tokens == int((shift_labels_for_causal_lm(batch["labels"]) != -100).sum())
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    ref = _hand_loss(model, batch, loss, 0.7)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)
    if loss != "ce":
        assert out.kl > 0


@pytest.mark.parametrize("loss", ["ce", "kl", "tmkl"])
def test_one_step_decreases_loss(loss):
    model = _model()
    batch = _batch()
    step = ForgetAwareStep(model, loss=loss, optimizer=None, lr=1e-3, kl_weight=1.0,
                           backend="reference", path="logits")
    before = float(step.loss_of(batch).loss.detach())
    metrics = step(batch)
    after = float(step.loss_of(batch).loss.detach())
    assert metrics["loss"] == pytest.approx(before, rel=1e-5)
    assert after < before
    assert metrics["tokens"] == 30 and metrics["tokens_per_s"] > 0
    assert (metrics["kl"] is None) == (loss == "ce")


def test_base_weights_untouched_and_disabled_base_exact():
    torch.manual_seed(0)
    base = TinyLM(CFG)
    ids = _batch()["input_ids"]
    ref = base(ids)
    inject_lora(base, TARGETS, rank=4, alpha=8)
    step = ForgetAwareStep(base, loss="tmkl", lr=1e-2, backend="reference")
    for _ in range(2):
        step(_batch())
    with disable_adapters(base):
        assert torch.equal(base(ids), ref)
    assert not torch.equal(base(ids), ref)


def test_gradient_accumulation_equals_full_batch():
    full = _batch(B=4)
    full["labels"][2, :9] = -100  # unequal token counts per micro-batch
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    results = []
    for batches in (full, halves):
        model = _model()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        m = ForgetAwareStep(model, loss="tmkl", optimizer=opt, kl_weight=0.5,
                            backend="reference")(batches)
        results.append((m, [p.detach().clone() for p in model.parameters() if p.requires_grad]))
    (m_full, p_full), (m_acc, p_acc) = results
    assert m_full["tokens"] == m_acc["tokens"]
    assert m_acc["loss"] == pytest.approx(m_full["loss"], rel=1e-5)
    assert m_acc["ce"] == pytest.approx(m_full["ce"], rel=1e-5)
    for a, b in zip(p_full, p_acc):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_labels_default_to_input_ids_and_mask():
    ids = torch.randint(0, CFG.vocab_size, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ftrain.batch_labels({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(labels[0, :-1], ids[0, 1:]) and labels[0, -1] == -100
    assert (labels[1, 4:] == -100).all() and torch.equal(labels[1, :4], ids[1, 1:5])
    y = torch.arange(8).view(1, 8)
    assert torch.equal(ftrain.batch_labels({"input_ids": ids, "labels": y}, shift_labels=False), y)


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="loss must be one of"):
        ForgetAwareStep(model, loss="mse")
    with pytest.raises(TypeError, match="unexpected loss options"):
        ForgetAwareStep(model, loss="tmkl", klweight=1.0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ForgetAwareStep(TinyLM(CFG).requires_grad_(False))
    with pytest.raises(ValueError, match="path='fused' impossible"):
        forget_aware_loss(LogitsOnly(model), _batch(), path="fused")


# ------------------------------------------------------------------------------------------------
# failures must not leave state behind or pass silently


def test_failed_micro_batch_leaves_no_gradient_for_the_next_step():
    model = _model()
    step = ForgetAwareStep(model, loss="tmkl", lr=1e-3)
    bad = {"input_ids": _batch()["input_ids"], "labels": torch.full((3, 12), 10**6)}
    with pytest.raises(ValueError, match="labels must be in"):
        step([_batch(seed=2), bad])
    assert all(p.grad is None for p in step.params)


def test_steps_with_every_target_ignored_give_zero_loss_and_gradient():
    for loss in ("ce", "kl", "tmkl"):
        model = _model()
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        step = ForgetAwareStep(model, loss=loss, optimizer=sgd)
        batch = _batch()
        batch["labels"] = torch.full_like(batch["labels"], -100)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out = step(batch)
        assert out["loss"] == 0.0 and out["tokens"] == 0
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert torch.equal(p, before[n]), n  # SGD with a zero gradient: no move


def test_kl_losses_refuse_a_model_without_adapters():
    torch.manual_seed(0)
    plain = TinyLM(CFG)
    with pytest.raises(ValueError, match="no adapters.*inject_lora"):
        ForgetAwareStep(plain, loss="tmkl")
    with pytest.raises(ValueError, match="no adapters"):
        forget_aware_loss(plain, _batch(), loss="kl")
    ForgetAwareStep(plain, loss="ce")  # CE needs no base model
    with disable_adapters(plain, require=False):  # a plain model is its own base when asked
        pass


def test_training_a_merged_model_says_to_unmerge():
    from forgetkern.lora import merge_adapters

    model = _model()
    step = ForgetAwareStep(model, loss="tmkl")
    merge_adapters(model)
    with pytest.raises(RuntimeError, match="unmerge_adapters"):
        step(_batch())


def test_ignore_index_must_be_an_int():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ForgetAwareStep(_model(), loss="tmkl", ignore_index=None)
