"""forgetkern.lora: injection, exact adapter switching, merge/unmerge, adapter files."""
import json

import pytest
import torch
from torch import nn

from forgetkern.lora import (LoRALinear, adapter_parameters, disable_adapters, inject_lora,
                             load_adapters, lora_layers, merge_adapters, read_adapters,
                             save_adapters, unmerge_adapters)


class Block(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return self.mlp(self.q_proj(x) * torch.tanh(self.v_proj(x)))


class Net(nn.Module):
    def __init__(self, d=24, n=2):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _randomize_adapters(model):
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.5)


def test_inject_freezes_base_and_starts_at_base():
    torch.manual_seed(1)
    model = Net()
    x = torch.randn(3, 5, 24)
    ref = model(x)
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    layers = lora_layers(model)
    assert sorted(layers) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj",
                              "layers.1.v_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B")}
    assert len(adapter_parameters(model)) == 8
    for layer in layers.values():
        assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (24, 4)
        assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
        assert layer.scaling == 2.0
    # B = 0: the adapted model is the base model
    assert torch.equal(model(x), ref)


def test_inject_regex_and_errors():
    model = Net()
    inject_lora(model, r"layers\.\d+\.mlp\.0", rank=2, alpha=2)
    assert sorted(lora_layers(model)) == ["layers.0.mlp.0", "layers.1.mlp.0"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_lora(Net(), ["k_proj"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="rank"):
        inject_lora(Net(), ["q_proj"], rank=0, alpha=2)
    # injecting twice must not wrap the wrapped base layer
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_lora(model, r".*mlp\.0.*", rank=2, alpha=2)
    assert sorted(lora_layers(model)) == ["layers.0.mlp.0", "layers.1.mlp.0"]


def test_adapter_forward_matches_formula():
    torch.manual_seed(2)
    lin = nn.Linear(7, 5)
    layer = LoRALinear(lin, rank=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 7, dtype=torch.float64)
    layer = layer.double()
    W, b = lin.weight, lin.bias
    expected = x @ W.T + b + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("merged", [False, True])
def test_disabled_adapters_reproduce_base_exactly(merged):
    torch.manual_seed(3)
    model = Net()
    x = torch.randn(2, 6, 24)
    ref = model(x)
    inject_lora(model, ["q_proj", "v_proj", "mlp.0", "mlp.2"], rank=4, alpha=16)
    _randomize_adapters(model)
    adapted = model(x)
    assert not torch.allclose(adapted, ref)
    if merged:
        merge_adapters(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-3)
    with disable_adapters(model):
        assert torch.equal(model(x), ref)  # bit-identical, merged or not
    # the switch is restored after the block, even after an exception
    with pytest.raises(RuntimeError):
        with disable_adapters(model):
            raise RuntimeError("boom")
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-3)


def test_merge_unmerge_round_trip_is_exact():
    torch.manual_seed(4)
    model = Net()
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    _randomize_adapters(model)
    before = {n: l.base.weight.clone() for n, l in lora_layers(model).items()}
    x = torch.randn(3, 24)
    adapted = model(x)
    merge_adapters(model)
    for n, layer in lora_layers(model).items():
        assert layer.merged and not torch.equal(layer.base.weight, before[n])
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-3)
    merge_adapters(model)  # idempotent
    unmerge_adapters(model)
    for n, layer in lora_layers(model).items():
        assert not layer.merged and torch.equal(layer.base.weight, before[n])
    assert torch.equal(model(x), adapted)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_adapters(Net())


def test_merged_buffer_follows_dtype_and_is_not_saved():
    model = Net()
    inject_lora(model, ["q_proj"], rank=2, alpha=2)
    merge_adapters(model)
    assert not any("_unmerged_weight" in k for k in model.state_dict())
    model.double()
    layer = lora_layers(model)["layers.0.q_proj"]
    assert layer._unmerged_weight.dtype == torch.float64
    with disable_adapters(model):
        model(torch.randn(2, 24, dtype=torch.float64))


@pytest.mark.parametrize("use_safetensors", [True, False])
def test_save_load_round_trip(tmp_path, monkeypatch, use_safetensors):
    import forgetkern.lora.io as lio

    if use_safetensors:
        pytest.importorskip("safetensors")
    else:
        monkeypatch.setattr(lio, "_has_safetensors", lambda: False)
    torch.manual_seed(5)
    model = Net()
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    _randomize_adapters(model)
    x = torch.randn(2, 24)
    out = model(x)
    path = tmp_path / "adapters.bin"
    save_adapters(model, path)
    tensors, meta = read_adapters(path)
    assert meta["rank"] == 4 and meta["alpha"] == 8.0
    assert meta["targets"] == sorted(lora_layers(model))
    assert len(tensors) == 8 and not any("base" in k for k in tensors)
    json.dumps(meta)

    torch.manual_seed(6)
    fresh = Net()
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items()
                           if "lora_" not in k})
    inject_lora(fresh, ["q_proj", "v_proj"], rank=4, alpha=8)
    assert not torch.equal(fresh(x), out)
    load_adapters(fresh, path)
    assert torch.equal(fresh(x), out)
    for n, layer in lora_layers(fresh).items():
        assert torch.equal(layer.lora_B, lora_layers(model)[n].lora_B)

    # loading into a merged model keeps it merged and equal
    merge_adapters(fresh)
    load_adapters(fresh, path)
    assert all(layer.merged for layer in lora_layers(fresh).values())
    torch.testing.assert_close(fresh(x), out, rtol=1e-4, atol=1e-3)


def test_load_mismatch_errors(tmp_path):
    model = Net()
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    path = tmp_path / "a.safetensors"
    save_adapters(model, path)
    wrong_rank = inject_lora(Net(), ["q_proj", "v_proj"], rank=2, alpha=8)
    with pytest.raises(ValueError, match="rank mismatch"):
        load_adapters(wrong_rank, path)
    wrong_alpha = inject_lora(Net(), ["q_proj", "v_proj"], rank=4, alpha=4)
    with pytest.raises(ValueError, match="alpha mismatch"):
        load_adapters(wrong_alpha, path)
    wrong_targets = inject_lora(Net(), ["q_proj"], rank=4, alpha=8)
    with pytest.raises(ValueError, match="targets differ"):
        load_adapters(wrong_targets, path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        load_adapters(Net(), path)
    with pytest.raises(FileNotFoundError):
        load_adapters(model, tmp_path / "missing")
    bad = tmp_path / "bad.bin"
    torch.save({"x": torch.ones(1)}, bad)
    with pytest.raises(ValueError, match="not a forgetkern adapter file"):
        load_adapters(model, bad)


@pytest.mark.parametrize("save_merged,load_merged", [(True, False), (True, True), (False, True)])
def test_state_dict_applies_the_adapters_once_whatever_the_merge_state(save_merged, load_merged):
    """A state dict holds the unmerged base weight: taken while merged and loaded into a fresh
    adapter model (merged or not), the model computes what the saved one did."""
    torch.manual_seed(5)
    model = Net()
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    _randomize_adapters(model)
    x = torch.randn(3, 24)
    adapted = model(x)
    if save_merged:
        merge_adapters(model)
    state = model.state_dict()
    torch.manual_seed(6)
    fresh = Net()
    inject_lora(fresh, ["q_proj", "v_proj"], rank=4, alpha=8)
    if load_merged:
        merge_adapters(fresh)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-5)
    unmerge_adapters(fresh) if load_merged else None
    torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-5)
    with disable_adapters(fresh), torch.no_grad():
        base = fresh(x)
    with disable_adapters(model), torch.no_grad():
        torch.testing.assert_close(base, model(x), rtol=0, atol=0)


def test_disable_adapters_on_a_plain_model_says_what_to_do():
    with pytest.raises(ValueError, match="inject_lora"):
        with disable_adapters(Net()):
            pass


def test_save_adapters_is_atomic(tmp_path, monkeypatch):
    """A save that fails midway leaves the previous file as it was and no temporary file."""
    import forgetkern.lora.io as lio

    monkeypatch.setattr(lio, "_has_safetensors", lambda: False)
    model = inject_lora(Net(), ["q_proj"], rank=2, alpha=4)
    path = tmp_path / "a.bin"
    save_adapters(model, path)
    before = path.read_bytes()
    _randomize_adapters(model)

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(lio.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
