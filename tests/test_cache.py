"""forgetkern.cache on a tiny random Llama with LoRA (PEFT): exact mode reproduces the live base
forward's losses and gradients, top-k mode feeds the sparse loss, builds resume after an
interruption, and every disagreement between cache and batch is an error."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import forgetkern  # noqa: E402
from forgetkern import ForgetAwareStep  # noqa: E402
from forgetkern.cache import BaseCache, build_cache, bytes_per_token  # noqa: E402
from forgetkern.cache.cli import make_batches  # noqa: E402
from forgetkern.train import batch_labels, config_loss, loss_config  # noqa: E402
from .helpers import tiny_llama  # noqa: E402

V = 67


def _base(seed=0, dtype=torch.float32):
    return tiny_llama(V, seed).to(dtype)


def _model(seed=0, dtype=torch.float32):
    base = _base(seed, dtype)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, lcfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


def _batches(n_batches=3, B=2, L=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        ids = torch.randint(0, V, (B, L), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, 7:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                    "example_id": torch.arange(B * i, B * i + B)})
    return out


def _grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("loss", ["tmkl", "kl"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_exact_cache_equals_live_base_forward(tmp_path, loss, direction):
    model = _model()
    batches = _batches()
    logs = []
    cache = build_cache(model, batches, tmp_path / "c", mode="exact", log=logs.append,
                        show_progress=False)
    assert "to write" in logs[0] and cache.manifest["dtype"] == "float32"
    config = loss_config(loss, direction=direction, temperature=1.5, backend="reference")
    n_items = 40  # as under gradient accumulation
    for batch in batches:
        live = config_loss(model, batch, config, num_items_in_batch=n_items, statistics=True)
        cached = config_loss(model, batch, config, num_items_in_batch=n_items, base_cache=cache,
                             statistics=True)
        assert cached.path == live.path == "fused" and cached.tokens == live.tokens
        # the same assembly: the adapted model's statistics come with the cached loss too
        assert cached.statistics[::2] == live.statistics[::2]  # tokens, top-1 hits
        assert cached.statistics[1] == pytest.approx(live.statistics[1], rel=1e-6)  # entropy sum
        torch.testing.assert_close(cached.loss, live.loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(cached.kl, live.kl, rtol=1e-5, atol=1e-7)
        for a, b in zip(_grads(model, cached.loss), _grads(model, live.loss)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the cached rows are the live base hidden states bit for bit
    batch = batches[1]
    labels = batch_labels(batch)
    with torch.no_grad(), model.disable_adapter():
        model.eval()
        h = model.base_model.model.model(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.equal(cache.lookup(batch, labels), h[labels != -100])


def test_forget_aware_steps_with_and_without_cache(tmp_path):
    batches = _batches()
    runs = []
    for use_cache in (False, True):
        model = _model()
        cache = build_cache(model, batches, tmp_path / "c", log=lambda *_: None,
                            show_progress=False) if use_cache else None
        step = ForgetAwareStep(model, loss="tmkl", lr=1e-2, backend="reference", base_cache=cache)
        metrics = [step(b) for b in batches[:2]] + [step(batches[2:])]
        runs.append((metrics, [p.detach().clone() for p in model.parameters() if p.requires_grad]))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-8)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", ["fused", "logits"])
def test_topk_cache_feeds_the_sparse_loss(tmp_path, path):
    model = _model()
    batches = _batches()
    cache = build_cache(model, batches, tmp_path / "t", mode="topk", k=8, temperature=2.0,
                        log=lambda *_: None, show_progress=False)
    assert cache.manifest["bytes_per_token"] == bytes_per_token("topk", k=8) == 84
    config = loss_config("tmkl", temperature=2.0, path=path, backend="reference")
    batch = batches[2]
    labels = batch_labels(batch)
    keep = labels != -100
    out = config_loss(model, batch, config, base_cache=cache)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), model.disable_adapter():
        model.eval()
        base = model(**inputs).logits[keep]
    model.train()
    logits = model(**inputs).logits[keep]
    rec = forgetkern.topk_base(base, labels[keep], 8, temperature=2.0)
    want = forgetkern.tmkl_loss(logits, rec, labels[keep], temperature=2.0,
                                return_components=True)
    exact = forgetkern.tmkl_loss(logits, base, labels[keep], temperature=2.0,
                                 return_components=True)
    torch.testing.assert_close(out.loss, want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(model, out.loss), _grads(model, want[0])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert 0 < out.kl <= exact[2] + 1e-6  # a lower bound on the exact masked KL


def test_a_sharded_fsdp2_head_is_read_whole_by_the_build_and_the_cached_loss(tmp_path):
    """The cache path reads the LM head as the live path does (one assembly,
    ``LMParts.weights``: FSDP2's full weight): with the head an FSDP2 module of a 1-rank gloo group
    (its weight a sharded DTensor), the build and the cached losses equal the unsharded model's."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is unavailable")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from forgetkern.cache.store import TOPK_FILES

    model, batches = _model(), _batches()
    config = loss_config("tmkl", temperature=2.0, backend="reference")
    quiet = dict(log=lambda *_: None, show_progress=False)
    want = [config_loss(model, b, config) for b in batches]  # unsharded head, live base forward
    want_grads = [_grads(model, w.loss) for w in want]
    topk = build_cache(model, batches, tmp_path / "t0", mode="topk", k=8, temperature=2.0, **quiet)
    want_topk = [config_loss(model, b, config, base_cache=topk).loss.detach() for b in batches]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        head = model.base_model.model.lm_head
        fully_shard(head)
        assert isinstance(head.weight, DTensor)
        exact = build_cache(model, batches, tmp_path / "e", mode="exact", **quiet)
        sharded_topk = build_cache(model, batches, tmp_path / "t1", mode="topk", k=8,
                                   temperature=2.0, **quiet)
        for name in TOPK_FILES:
            assert np.array_equal(sharded_topk.arrays[name], topk.arrays[name]), name
        for batch, w, w_grads, w_topk in zip(batches, want, want_grads, want_topk):
            for cache in (None, exact):
                out = config_loss(model, batch, config, base_cache=cache)
                assert out.path == "fused"
                torch.testing.assert_close(out.loss, w.loss, rtol=1e-6, atol=1e-7)
                for a, b in zip(_grads(model, out.loss), w_grads):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
            out = config_loss(model, batch, config, base_cache=sharded_topk)
            torch.testing.assert_close(out.loss.detach(), w_topk, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def _gemma2_head_lora():
    """A tiny Gemma-2 (its logits soft-capped after the head) with LoRA on q_proj and lm_head."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                    final_logit_softcapping=3.0)
    model = peft.get_peft_model(transformers.Gemma2ForCausalLM(cfg), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


def test_caches_serve_adapted_and_transformed_heads(tmp_path):
    """The cache path reads the head as the live path does: with LoRA on a soft-capped head, an
    exact cache equals the live base forward (the base logits from the cached hidden states and
    the base head weight, capped), and a top-k cache gives the same loss on the fused path as on
    the model's own logits."""
    model, batches = _gemma2_head_lora(), _batches(2)
    quiet = dict(log=lambda *_: None, show_progress=False)
    exact = build_cache(model, batches, tmp_path / "e", mode="exact", **quiet)
    topk = build_cache(model, batches, tmp_path / "t", mode="topk", k=8, temperature=2.0, **quiet)
    config = loss_config("tmkl", temperature=2.0, backend="reference")
    for batch in batches:
        live = config_loss(model, batch, config)
        cached = config_loss(model, batch, config, base_cache=exact)
        assert cached.path == live.path == "fused"
        torch.testing.assert_close(cached.loss, live.loss, rtol=1e-6, atol=1e-7)
        for a, b in zip(_grads(model, cached.loss), _grads(model, live.loss)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        fused = config_loss(model, batch, config, base_cache=topk)
        logits = config_loss(model, batch, loss_config("tmkl", temperature=2.0, path="logits",
                                                       backend="reference"), base_cache=topk)
        assert (fused.path, logits.path) == ("fused", "logits")
        torch.testing.assert_close(fused.loss, logits.loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(_grads(model, fused.loss), _grads(model, logits.loss)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _Interrupted(Exception):
    pass


class _Flaky:
    """The batches, but the second pass stops with an error after ``stop`` batches."""

    def __init__(self, batches, stop):
        self.batches, self.stop, self.passes = batches, stop, 0

    def __iter__(self):
        self.passes += 1
        for i, b in enumerate(self.batches):
            if self.passes == 2 and i == self.stop:
                raise _Interrupted
            yield b


@pytest.mark.parametrize("mode", ["exact", "topk"])
def test_interrupted_build_resumes(tmp_path, mode):
    model = _model()
    batches = _batches(n_batches=4)
    with pytest.raises(_Interrupted):
        build_cache(model, _Flaky(batches, stop=2), tmp_path / "c", mode=mode, k=5,
                    log=lambda *_: None, show_progress=False)
    assert len(list((tmp_path / "c" / "done").iterdir())) == 2
    with pytest.raises(ValueError, match="incomplete"):
        BaseCache(tmp_path / "c")
    logs = []
    resumed = build_cache(model, batches, tmp_path / "c", mode=mode, k=5, log=logs.append,
                          show_progress=False)
    assert logs[0].startswith("resuming") and "2/4" in logs[0]
    whole = build_cache(model, batches, tmp_path / "w", mode=mode, k=5, log=lambda *_: None,
                        show_progress=False)
    for name, arr in whole.arrays.items():
        assert (resumed.arrays[name] == arr).all(), name
    again = []
    build_cache(model, batches, tmp_path / "c", mode=mode, k=5, log=again.append,
                show_progress=False)
    assert "nothing to do" in again[0]


def test_mismatches_are_errors(tmp_path):
    model = _model()
    batches = _batches()
    cache = build_cache(model, batches, tmp_path / "c", log=lambda *_: None, show_progress=False)
    batch = dict(batches[0])
    labels = batch_labels(batch)
    with pytest.raises(KeyError, match="example id 99 is not in the base cache"):
        cache.lookup({**batch, "example_id": torch.tensor([0, 99])}, labels)
    with pytest.raises(KeyError, match="needs an 'example_id'"):
        cache.lookup({k: v for k, v in batch.items() if k != "example_id"}, labels)
    fewer = labels.clone()
    fewer[0, 5] = -100
    with pytest.raises(ValueError, match="3 target tokens|target tokens, the base cache has"):
        cache.lookup(batch, fewer)
    other = labels.clone()
    other[0, 5] = (other[0, 5] + 1) % V
    with pytest.raises(ValueError, match="positions or tokens differ"):
        cache.lookup(batch, other)
    with pytest.raises(ValueError, match="holds a different base cache.*mode"):
        build_cache(model, batches, tmp_path / "c", mode="topk", k=4, log=lambda *_: None)
    with pytest.raises(ValueError, match="holds a different base cache.*data"):
        build_cache(model, batches[:2], tmp_path / "c", log=lambda *_: None)
    with pytest.raises(ValueError, match="does not match: mode"):
        BaseCache(tmp_path / "c", expect={"mode": "topk"})
    with pytest.raises(ValueError, match="another base model"):
        ForgetAwareStep(_model(seed=5), loss="tmkl", base_cache=cache)
    topk = build_cache(model, batches, tmp_path / "t", mode="topk", k=4, log=lambda *_: None,
                       show_progress=False)
    with pytest.raises(ValueError, match="recorded at temperature 1.0"):
        ForgetAwareStep(model, loss="tmkl", temperature=2.0, base_cache=topk)
    with pytest.raises(ValueError, match="exact base cache holds hidden states"):
        ForgetAwareStep(model, loss="tmkl", path="logits", base_cache=cache)
    # the adapters are not part of the base model's identity
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    cache.check_model(model)


def test_bf16_storage_and_padding_independent_keys(tmp_path):
    model = _model(dtype=torch.bfloat16)
    ex = [(f"doc{i}", torch.randint(0, V, (n,)).tolist()) for i, n in enumerate((9, 5, 7))]
    cache = build_cache(model, make_batches(ex, 3), tmp_path / "c", log=lambda *_: None,
                        show_progress=False)
    assert cache.manifest["dtype"] == "bfloat16" and cache.manifest["rows"] == 8 + 4 + 6
    # the same examples batched differently (other padding width) find their rows
    batch = make_batches(ex[1:], 2)[0]
    rows = cache.lookup(batch, batch_labels(batch))
    assert rows.dtype == torch.bfloat16 and rows.shape == (4 + 6, 32)
    full = make_batches(ex, 3)[0]
    labels = batch_labels(full)
    want = cache.lookup(full, labels)[8:]
    assert torch.equal(rows, want)


def test_cli_cache_base(tmp_path):
    from forgetkern.cli import main

    _base().save_pretrained(tmp_path / "m")
    model = _model()  # the same base model, with adapters
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "input_ids": list(range(i + 3, i + 12))})
                              for i in range(5)))
    assert main(["cache-base", "--model", str(tmp_path / "m"), "--data", str(data), "--out",
                 str(tmp_path / "c"), "--mode", "topk", "--k", "6", "--batch-size", "2",
                 "--quiet"]) == 0
    cache = BaseCache(tmp_path / "c", expect={"mode": "topk", "k": 6})
    assert len(cache) == 5 and cache.manifest["rows"] == 5 * 8
    assert cache.manifest["model"]["param_hash"] == forgetkern.cache.model_identity(model)["param_hash"]


def test_tmkl_trainer_with_cache(tmp_path):
    from forgetkern.integrations.hf import TMKLTrainer

    model = _model()
    batches = _batches()
    cache = build_cache(model, batches, tmp_path / "c", log=lambda *_: None, show_progress=False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[],
                                          use_cpu=True, remove_unused_columns=False,
                                          disable_tqdm=True)
    trainer = TMKLTrainer(model=model, args=args, tmkl_options={"backend": "reference"},
                          base_cache=cache)
    live = TMKLTrainer(model=model, args=args, tmkl_options={"backend": "reference"})
    for batch in batches:
        a = trainer.compute_loss(model, batch, num_items_in_batch=30)
        b = live.compute_loss(model, batch, num_items_in_batch=30)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="another base model"):
        TMKLTrainer(model=_model(seed=3), args=args, base_cache=cache)


def _small_cache(tmp_path, mode="topk", name="c"):
    return build_cache(_model(), _batches(), tmp_path / name, mode=mode, k=5, temperature=1.5,
                       log=lambda *_: None, show_progress=False)


def _rewrite_manifest(path, **fields):
    """The manifest with ``fields`` changed and its checksum recomputed (a well-formed edit)."""
    from forgetkern.cache.store import json_digest

    m = json.loads((path / "manifest.json").read_text())
    m.update(fields)
    m.pop("checksum")
    m["checksum"] = json_digest(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("mode", ["exact", "topk"])
def test_flipped_bytes_in_any_array_are_found_and_named(tmp_path, mode):
    """Every byte of every array's data is covered by a chunk checksum: a flip anywhere is an
    error naming the file and rows, at load (default) or at the lookup that reads it."""
    import random
    import shutil

    from forgetkern.cache import CacheError

    cache = _small_cache(tmp_path, mode)
    rng = random.Random(0)
    batch, labels = _batches()[1], batch_labels(_batches()[1])
    for trial in range(6):
        name = rng.choice(sorted(cache.arrays))
        arr = cache.arrays[name]
        copy = tmp_path / f"copy{trial}"
        shutil.copytree(cache.path, copy)
        file = copy / f"{name}.npy"
        raw = bytearray(file.read_bytes())
        at = arr.offset + rng.randrange(arr.nbytes)
        raw[at] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(raw))
        with pytest.raises(CacheError, match=rf"{name}\.npy: rows \[\d+, \d+\) do not match"):
            BaseCache(copy)
        lazy = BaseCache(copy, verify="read")  # opens; the lookup reading the chunk fails
        row = (at - arr.offset) // (arr.nbytes // arr.shape[0])
        first = [r for r in range(3) if lazy._chunks[r]["start"] <= row < lazy._chunks[r]["stop"]]
        lookup_batch = _batches()[first[0]]
        with pytest.raises(CacheError, match=rf"{name}\.npy"):
            lazy.lookup(lookup_batch, batch_labels(lookup_batch))
    BaseCache(cache.path, verify="read").lookup(batch, labels)  # the original is intact


def test_damaged_or_edited_files_name_the_file_and_field(tmp_path):
    import shutil

    from forgetkern.cache import CacheError

    cache = _small_cache(tmp_path)

    def damaged(tag, edit):
        copy = tmp_path / tag
        shutil.copytree(cache.path, copy)
        edit(copy)
        return copy

    cut = damaged("cut", lambda p: (p / "values.npy").write_bytes((p / "values.npy").read_bytes()[:-7]))
    with pytest.raises(CacheError, match=r"values\.npy: cannot be read|values\.npy: \d+ bytes"):
        BaseCache(cut)
    half = damaged("half", lambda p: (p / "manifest.json").write_text(
        (p / "manifest.json").read_text()[:40]))
    with pytest.raises(CacheError, match=r"manifest\.json: not valid JSON"):
        BaseCache(half)
    edited = damaged("edit", lambda p: (p / "manifest.json").write_text(
        (p / "manifest.json").read_text().replace('"temperature": 1.5', '"temperature": 2.5')))
    with pytest.raises(CacheError, match=r"manifest\.json: the manifest's checksum"):
        BaseCache(edited)
    for field, value, message in (("temperature", float("nan"), "a finite number > 0"),
                                  ("temperature", 0.0, "a finite number > 0"),
                                  ("k", 0, r"an int in \[1, vocab_size"),
                                  ("mode", "dense", "one of"), ("rows", -1, "an int >= 0")):
        bad = damaged(f"{field}{value}", lambda p: _rewrite_manifest(p, **{field: value}))
        with pytest.raises(CacheError, match=rf"manifest\.json: field '{field}' must be {message}"):
            BaseCache(bad)
    old = damaged("v1", lambda p: _rewrite_manifest(p, format_version=1))
    with pytest.raises(CacheError, match=r"field 'format_version' is 1; this forgetkern reads"):
        BaseCache(old)
    ex = damaged("ex", lambda p: (p / "examples.json").write_text(
        (p / "examples.json").read_text().replace('"count": [', '"count": [1, ')))
    with pytest.raises(CacheError, match=r"examples\.json: does not match the manifest"):
        BaseCache(ex)


def test_a_changed_prompt_token_is_not_served_stale_base_outputs(tmp_path):
    """The input tokens are part of an example's key: a prompt token changed (its label ignored,
    so positions and targets are unchanged) is an error, not stale base states."""
    cache = _small_cache(tmp_path, "exact")
    batch = dict(_batches()[0])
    labels = batch_labels(batch)
    assert labels[0, 0] == -100  # a prompt token: its label is ignored
    ids = batch["input_ids"].clone()
    ids[0, 1] = (ids[0, 1] + 1) % V
    with pytest.raises(ValueError, match="example id 0: its input tokens differ"):
        cache.lookup({**batch, "input_ids": ids}, labels)
    config = loss_config("tmkl", backend="reference")
    with pytest.raises(ValueError, match="input tokens differ"):
        config_loss(_model(), {**batch, "input_ids": ids}, config, base_cache=cache)
    cache.lookup(batch, labels)


def test_batches_read_twice_or_refused(tmp_path):
    """The build reads the batches twice: a one-shot iterator is refused, and a second pass that
    differs (shuffled, shorter) is an error that leaves the cache incomplete."""
    model, batches = _model(), _batches()
    with pytest.raises(TypeError, match="re-iterable"):
        build_cache(model, (b for b in batches), tmp_path / "g", log=lambda *_: None)
    assert not (tmp_path / "g").exists()

    class Passes:
        def __init__(self, second):
            self.second, self.n = second, 0

        def __iter__(self):
            self.n += 1
            return iter(batches if self.n == 1 else self.second)

    for tag, second in (("shuffled", batches[::-1]), ("short", batches[:2]), ("none", [])):
        with pytest.raises(ValueError, match="second pass"):
            build_cache(model, Passes(second), tmp_path / tag, log=lambda *_: None,
                        show_progress=False)
        with pytest.raises(ValueError, match="incomplete"):
            BaseCache(tmp_path / tag)
    # a directory holding other files is never written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a base cache's"):
        build_cache(model, batches, tmp_path / "mine", log=lambda *_: None)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_cache_writer_is_the_public_writer_for_importers(tmp_path):
    """Another tool's top-k base outputs written through CacheWriter (the writer computes the
    checksums, hashes and format version) are read back by BaseCache and feed the loss."""
    from forgetkern.cache import CacheWriter, input_key

    g = torch.Generator().manual_seed(0)
    docs = {"a": torch.randint(0, V, (6,), generator=g), "b": torch.randint(0, V, (4,), generator=g)}
    logits = {d: torch.randn(len(t) - 1, V, generator=g) for d, t in docs.items()}
    w = CacheWriter(tmp_path / "imp", mode="topk", vocab_size=V, k=4, temperature=1.0,
                    ids=list(docs), counts=[len(t) - 1 for t in docs.values()],
                    keys=[input_key(t) for t in docs.values()])
    start = 0
    for i, (d, t) in enumerate(docs.items()):
        rec = forgetkern.topk_base(logits[d], t[1:], 4)
        with pytest.raises(ValueError, match="rows must name exactly"):
            w.write(i, start, positions=torch.arange(len(t) - 1))
        w.write(i, start, positions=torch.arange(len(t) - 1), targets=t[1:], values=rec.values,
                indices=rec.indices, lse=rec.lse, tail_lse=rec.tail_lse, target=rec.target)
        assert w.done(i)
        start += len(t) - 1
    w.finish()
    cache = BaseCache(tmp_path / "imp", expect={"mode": "topk", "k": 4})
    batch = make_batches([(d, t.tolist()) for d, t in docs.items()], 2)[0]
    labels = batch_labels(batch)
    got = cache.lookup(batch, labels)
    want = forgetkern.topk_base(torch.cat(list(logits.values())), labels[labels != -100], 4)
    for name in ("values", "indices", "lse", "tail_lse", "target"):
        assert torch.equal(getattr(got, name).to(getattr(want, name).dtype), getattr(want, name))
    unfinished = CacheWriter(tmp_path / "part", mode="topk", vocab_size=V, k=4, temperature=1.0,
                             ids=["a"], counts=[5], keys=["x"])
    with pytest.raises(ValueError, match=r"rows \[0, \.\.\.\) of 5 were never written"):
        unfinished.finish()
