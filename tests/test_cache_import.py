"""Top-k base caches imported from vLLM prompt_logprobs and Megatron offline top-k logits equal
(or, where the source lacks the target's logit, stay within the documented bound of) the cache
forgetkern builds from the same base model."""
import numpy as np
import pytest
import torch

from forgetkern import ForgetAwareStep
from forgetkern.cache import BaseCache, build_cache
from forgetkern.cache.importers import (import_megatron_topk_logits, import_vllm_prompt_logprobs,
                                        read_jsonl)
from forgetkern.demo.tiny_model import TinyConfig, TinyLM
from forgetkern.lora import disable_adapters, inject_lora, lora_layers
from forgetkern.train import config_loss, loss_config

V, K = 41, 4


class Logprob:  # the shape of vLLM's Logprob
    def __init__(self, logprob, rank):
        self.logprob, self.rank, self.decoded_token = logprob, rank, None


def _setup():
    torch.manual_seed(0)
    model = TinyLM(TinyConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, d_ff=24, max_len=16))
    inject_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, 0, 0.3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 10), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    batch = {"input_ids": ids, "labels": labels, "example_id": torch.tensor([7, 8, 9])}
    with torch.no_grad(), disable_adapters(model):
        logits = model(ids).double()
    return model, batch, logits


def _vllm(logits, ids):
    out = []
    for row, tokens in zip(logits.log_softmax(-1), ids):
        plp = [None]
        for t in range(1, len(tokens)):
            lp = row[t - 1]
            top = lp.topk(K).indices.tolist()
            entries = {i: Logprob(float(lp[i]), int((lp > lp[i]).sum()) + 1) for i in top}
            y = int(tokens[t])
            entries.setdefault(y, Logprob(float(lp[y]), int((lp > lp[y]).sum()) + 1))
            plp.append({str(i): {"logprob": e.logprob} for i, e in entries.items()} if t % 2
                       else entries)  # both the objects and the server's JSON form
        out.append({"prompt_token_ids": tokens.tolist(), "prompt_logprobs": plp})
    return out


def _fields(cache, names=("values", "lse", "tail_lse", "target")):
    a = cache.arrays
    shift = a["lse"][:, None]  # compare log-masses: every field relative to the non-target LSE
    return {n: (a[n] - (shift if a[n].ndim == 2 else shift[:, 0])) for n in names}


def _loss(model, batch, cache):
    cfg = loss_config("tmkl", kl_weight=1.0)
    return config_loss(model, batch, cfg, base_cache=cache).loss


def test_vllm_prompt_logprobs_equal_the_built_cache(tmp_path):
    model, batch, logits = _setup()
    built = build_cache(model, [batch], tmp_path / "built", mode="topk", k=K, show_progress=False,
                        log=lambda *a: None)
    outputs = _vllm(logits, batch["input_ids"])
    cache = import_vllm_prompt_logprobs(outputs, tmp_path / "vllm", model, example_ids=[7, 8, 9],
                                        labels=batch["labels"].tolist())
    assert isinstance(cache, BaseCache) and cache.manifest["k"] == K  # k inferred
    for name in ("positions", "targets", "indices"):
        np.testing.assert_array_equal(cache.arrays[name], built.arrays[name])
    got, want = _fields(cache), _fields(built)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=2e-5, err_msg=name)
    torch.testing.assert_close(_loss(model, batch, cache), _loss(model, batch, built),
                               rtol=1e-4, atol=1e-6)
    ForgetAwareStep(model, base_cache=cache, lr=1e-3)(batch)  # trains with it (model hash checked)


def test_megatron_topk_logits_within_the_documented_bound(tmp_path):
    import json

    model, batch, logits = _setup()
    built = build_cache(model, [batch], tmp_path / "built", mode="topk", k=K, show_progress=False,
                        log=lambda *a: None)
    path = tmp_path / "topk.jsonl"
    with open(path, "w") as f:
        for i, (row, tokens, lab) in enumerate(zip(logits, batch["input_ids"], batch["labels"])):
            shifted = row - row.max(-1, keepdim=True).values  # as Megatron stores them
            top = shifted.topk(K)
            f.write(json.dumps({"index": 7 + i, "tokens": tokens.tolist(),
                                "labels": lab[1:].tolist() + [-100],
                                "loss_mask": [1] * len(tokens),
                                "topk_logits": top.values.tolist(),
                                "topk_token_ids": top.indices.tolist(),
                                "log_sum_exp_logits": shifted.logsumexp(-1).tolist()}) + "\n")
    cache = import_megatron_topk_logits(read_jsonl(path), tmp_path / "mega", model)
    for name in ("positions", "targets", "indices"):
        np.testing.assert_array_equal(cache.arrays[name], built.arrays[name])
    got, want = cache.arrays, built.arrays
    full = np.logaddexp(want["lse"], want["target"])  # the built record's LSE over the vocabulary
    # the imported fields are log-probabilities over the whole vocabulary
    np.testing.assert_allclose(got["values"], want["values"] - full[:, None], rtol=1e-4, atol=2e-5)
    inside = (want["indices"] == want["targets"][:, None]).any(1)
    assert inside.any() and (~inside).any()
    for name in ("lse", "tail_lse", "target"):  # target in the top-k: every field carried
        np.testing.assert_allclose(got[name][inside], (want[name] - full)[inside], rtol=1e-4,
                                   atol=2e-5, err_msg=name)
    # target outside the top-k: its mass is unknown, in [0, m] with m = min(p_(k), mass outside
    # the top-k); the record takes m / 2, so the tail mass and p_y are each off by at most m / 2
    p_sup = np.exp(want["values"] - full[:, None])
    m = np.minimum(p_sup.min(1), 1 - p_sup.sum(1))[~inside]
    for name in ("tail_lse", "target"):
        err = np.abs(np.exp(got[name]) - np.exp(want[name] - full))[~inside]
        assert (err <= m / 2 + 1e-6).all(), name
    assert np.isfinite(float(_loss(model, batch, cache).detach()))


def test_sources_without_a_normalizer_are_refused_or_truncated_on_request(tmp_path):
    model, batch, logits = _setup()
    rec = {"tokens": batch["input_ids"][1].tolist(),
           "topk_logits": logits[1].topk(K).values.tolist(),
           "topk_token_ids": logits[1].topk(K).indices.tolist()}
    with pytest.raises(ValueError, match="no log_sum_exp_logits: the tail mass is unknown"):
        import_megatron_topk_logits([rec], tmp_path / "a", model)
    cache = import_megatron_topk_logits([rec], tmp_path / "b", model, missing_tail="empty")
    assert np.isneginf(cache.arrays["tail_lse"]).all()
    raw = [{"prompt_token_ids": [1, 2, 3], "prompt_logprobs": [None, {1: 2.0, 2: 1.5}, {3: 0.1}]}]
    with pytest.raises(ValueError, match="not log-probabilities normalized"):
        import_vllm_prompt_logprobs(raw, tmp_path / "c", model)
