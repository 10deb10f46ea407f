"""The real-model experiment's PEFT adapters (LoRA, DoRA, RandLoRA, CorDA, OSF) and the demo's
run plumbing across adapters, on a tiny random Llama (no download)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from forgetkern.demo import adapters as A  # noqa: E402
from forgetkern.demo.config import (METHODS, REAL_PRESETS, DemoConfig, adapter_of,  # noqa: E402
                                    loss_name, reference_of, runs_of, uses_folora)
from forgetkern.demo.experiment import Experiment  # noqa: E402
from forgetkern.demo.metrics import mean_ce  # noqa: E402
from forgetkern.lora import disable_adapters  # noqa: E402
from forgetkern.train import ForgetAwareStep  # noqa: E402
from .helpers import tiny_llama  # noqa: E402

V = 61
TARGETS = ["q_proj", "v_proj"]
OPTIONS = {"randlora_r": 4, "randlora_alpha": 16.0}


def _llama(seed=0):
    model = tiny_llama(V, seed, bos_token_id=1, eos_token_id=2, pad_token_id=0).eval()
    model.requires_grad_(False)
    return model


def _batch(seed, B=4, L=12):
    ids = torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _knowledge():
    return [torch.randint(3, V, (4, 16), generator=torch.Generator().manual_seed(9))]


def _adapted(base, kind, seed=0):
    return A.adapted(base, kind, targets=TARGETS, rank=4, alpha=8.0, seed=seed, options=OPTIONS,
                     knowledge=_knowledge)


@pytest.mark.parametrize("kind", A.KINDS)
def test_each_adapter_starts_as_the_base_model_and_only_it_trains(kind):
    base = _llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ids = _batch(0)["input_ids"]
    with torch.no_grad():
        want = base(ids).logits
    model = _adapted(base, kind)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, want, atol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and A.trainable_parameters(model) > 0
    key = {"lora": "lora_", "dora": "lora_", "randlora": "randlora_", "corda": "lora_",
           "osf": "osf_svd_params"}[kind]
    assert all(key in n for n in trainable), trainable
    assert any("magnitude" in n for n in trainable) == (kind == "dora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = ForgetAwareStep(model, loss="ce", optimizer=opt, max_grad_norm=1.0, backend="reference")
    for i in range(3):
        step(_batch(i))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, want, atol=1e-4)
        if kind != "corda":  # CorDA keeps its frozen residual in the base weights
            with disable_adapters(model):
                assert torch.allclose(model(ids).logits, want, atol=1e-5)
    for k, v in base.state_dict().items():  # the base model itself is never changed
        assert torch.equal(v, before[k]), k


def test_osf_trains_the_last_singular_directions_and_corda_the_least_used_ones():
    base = _llama()
    osf = _adapted(base, "osf")
    q = osf.get_base_model().model.layers[0].self_attn.q_proj
    params = q.osf_svd_params["default"]
    assert params["U_low"].shape == (32, 4) and params["V_low"].shape == (4, 32)
    s = torch.linalg.svdvals(base.model.layers[0].self_attn.q_proj.weight)
    assert torch.allclose(params["S_low"], s[-4:], atol=1e-5)
    v = osf.get_base_model().model.layers[0].self_attn.v_proj.osf_svd_params["default"]
    assert v["U_low"].shape == (16, 4)  # rank 4 of min(16, 32)

    corda = _adapted(base, "corda")
    layer = corda.get_base_model().model.layers[0].self_attn.q_proj
    w = base.model.layers[0].self_attn.q_proj.weight
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(layer.base_layer.weight + delta, w, atol=1e-5)
    assert not torch.allclose(layer.base_layer.weight, w)
    with pytest.raises(ValueError, match="knowledge"):
        A.adapted(base, "corda", targets=TARGETS, rank=4, alpha=8.0, seed=0)
    with pytest.raises(ValueError, match="nothing frozen"):
        A.adapted(base, "osf", targets=TARGETS, rank=16, alpha=8.0, seed=0)
    with pytest.raises(ValueError, match="adapter kind"):
        A.adapted(base, "vera", targets=TARGETS, rank=4, alpha=8.0, seed=0)


def test_methods_name_their_adapter_loss_optimizer_and_reference():
    assert [adapter_of(m) for m in METHODS] == ["lora"] * 5 + ["dora", "dora", "randlora",
                                                               "randlora", "corda", "osf"]
    assert [loss_name(m) for m in ("ce", "kl", "tmkl+folora", "dora+tmkl", "osf")] == [
        "ce", "kl", "tmkl", "tmkl", "ce"]
    assert [uses_folora(m) for m in ("folora", "tmkl+folora", "tmkl", "dora")] == [True, True,
                                                                                   False, False]
    assert [reference_of(m) for m in ("ce", "tmkl", "dora", "dora+tmkl", "randlora+tmkl",
                                      "corda", "osf")] == [None, "ce", "ce", "dora", "randlora",
                                                           "ce", "ce"]
    with pytest.raises(ValueError, match="method must be one of"):
        loss_name("sgd")
    cfg = DemoConfig(**REAL_PRESETS["full"])
    runs = runs_of(cfg, cfg.seeds[0])
    assert ("dora", None) in runs and ("dora+tmkl", 1.0) in runs and ("osf", None) in runs
    assert len(runs) == len(set(runs)) == len(METHODS) + len(cfg.sweep_kl_weights) * 2


def test_experiment_runs_every_method_on_its_own_adapter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # FoLoRA's eigensolver: the reference on CPU
    base = _llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = DemoConfig(**{**REAL_PRESETS["smoke"], "adapt_steps": 2, "checkpoints": 2,
                        "peft": OPTIONS, "rank": 4, "alpha": 8.0})
    train = [_batch(i) for i in range(2)]
    held = [_batch(10)]
    made, fulls = [], []

    def evaluate(m, full=True):
        fulls.append(full)
        loss = mean_ce(m, held, "cpu")[0]
        return {"target_loss": loss, "target_accuracy": 0.0, "target_error": 1.0,
                "retention_loss": loss, "instruction_following": 0.5}

    def adapt(kind, seed, knowledge):
        made.append(kind)
        return A.adapted(base, kind, targets=TARGETS, rank=cfg.rank, alpha=cfg.alpha, seed=seed,
                         options=cfg.peft, knowledge=knowledge)

    exp = Experiment(cfg, base, train, evaluate, seed=0, adapt=adapt, progress=False,
                     log=lambda *a: None)
    base_eval, results = exp.run_all()
    assert made == ["lora", "dora", "randlora", "corda", "osf"]  # one copy per adapter kind
    # checkpoints at steps 1 and 2; step 1 skips the costly extras unless a reference run
    references = {"ce", "dora", "randlora"}
    assert fulls == [True] + [x for m in METHODS for x in (m in references, True)]
    assert [r["method"] for r in results] == list(METHODS)
    assert exp.model is base and exp.kind is None  # the last copy is released
    for r in results:
        assert r["status"] == "ok" and r["trainable_parameters"] > 0
        assert r["wall_s"] > 0 and r["cpu_s"] > 0
        assert r["curve"][0]["retention_loss"] == base_eval["retention_loss"]
        assert r["forgetting"] != 0.0
    by = {r["method"]: r for r in results}
    assert by["ce"]["trainable_parameters"] == by["tmkl"]["trainable_parameters"]
    assert by["dora"]["trainable_parameters"] > by["ce"]["trainable_parameters"]
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    # every run of an adapter kind starts from the same adapter
    exp.adapter("dora")
    start = {n: p.clone() for n, p in exp.model.named_parameters() if p.requires_grad}
    ForgetAwareStep(exp.model, loss="ce", lr=1e-2, backend="reference")(train[0])
    assert any(not torch.equal(p, start[n]) for n, p in exp.model.named_parameters() if n in start)
    exp.reset_adapters()
    assert all(torch.equal(p, start[n]) for n, p in exp.model.named_parameters() if n in start)
    with pytest.raises(ValueError, match="needs a Hugging Face model"):
        Experiment(cfg, base, train, evaluate, seed=0, progress=False).adapter("dora")
