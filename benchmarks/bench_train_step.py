"""Benchmark: one LoRA training step end to end (forward, loss, backward, AdamW), tokens/s and peak
memory.

Models, with random weights (a step's time depends on the shapes and the work, not on the weight
values, so no checkpoint is needed; the real SmolLM2 inputs of ``bench_linear_tmkl`` cover the
loss itself):

* ``smollm2-135m``: SmolLM2-135M's config (Llama, 30 layers, D=576, 9 heads, 3 KV heads of 64,
  FFN 1536, V=49152, head tied to the embeddings, RMSNorm eps 1e-5, rope theta 1e5);
* ``llama-1b``: a Llama shaped like a 1B model (Llama-3.2-1B: 16 layers, D=2048, 32 heads, 8 KV
  heads of 64, FFN 8192, V=128256, tied head).

bf16 base weights, LoRA r=16 (alpha 32) on q/k/v/o/gate/up/down with fp32 adapters, bf16 autocast
(``ForgetAwareStep``'s default on a GPU), batches of 8 x 1024 random tokens (8192 per step), two
batches alternating. Variants (the record's work):

* ``forgetkern-ce``: ``ForgetAwareStep(loss="ce")`` (work ``ce``);
* ``forgetkern-tmkl-live``: ``ForgetAwareStep(loss="tmkl")``, the base forward each step
  (``tmkl-live``);
* ``forgetkern-tmkl-cache``: the same with the exact base cache of those batches
  (``forgetkern.cache.build_cache(mode="exact")``; built before timing): no base forward
  (``tmkl-cache``);
* ``liger-ce``: the same step with Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` on the final
  hidden states and the head, when importable (``ce``).

3 warm-up and 10 timed steps (``common.measure``, whatever a step takes); peak memory is above
what the model and optimizer hold before a step. Floor: the step's matmuls (``floors.train_step_floor``). The
dry mode runs a 2-layer, D=32, V=256 Llama on the CPU (fp32, no autocast), batches of 2 x 16.

    python benchmarks/bench_train_step.py [--quick]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import floors  # noqa: E402

NAME = "train_step"
IGNORE = -100
#: the configs (transformers' LlamaConfig fields); rope theta changes no work
MODELS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         hidden_act="silu", rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                     max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     hidden_act="silu", rope_theta=500000.0),
}
DRY_MODEL = ("tiny-llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=256,
                                max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                hidden_act="silu"))
BATCH, SEQ = 8, 1024
DRY_BATCH, DRY_SEQ = 2, 16
LORA = {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "rank": 16, "alpha": 32}
BUILD_S = 20.0  # seconds a model and its cache may take to build
VARIANTS = ("forgetkern-ce", "forgetkern-tmkl-live", "forgetkern-tmkl-cache", "liger-ce")
WORK = {"forgetkern-ce": "ce", "forgetkern-tmkl-live": "tmkl-live", "forgetkern-tmkl-cache": "tmkl-cache",
        "liger-ce": "ce"}


def matmul_params(cfg: dict) -> tuple[int, int]:
    """``(decoder matmul parameters with the LM head, the head's)`` of a Llama config."""
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    head = cfg["vocab_size"] * d
    return cfg["num_hidden_layers"] * per_layer + head, head


def build_model(cfg: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgetkern.lora import inject_lora

    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    inject_lora(model, LORA["targets"], rank=LORA["rank"], alpha=LORA["alpha"])
    for name, p in model.named_parameters():
        if p.requires_grad:  # the adapters: fp32 master weights
            p.data = p.data.float()
    return model


def batches(vocab: int, batch: int, seq: int, count: int = 2):
    from forgetkern.cache.cli import make_batches

    gen = torch.Generator().manual_seed(vocab + seq)
    examples = [(i, torch.randint(0, vocab, (seq,), generator=gen).tolist()) for i in range(batch * count)]
    return make_batches(examples, batch, pad_id=0)


def _liger_step(model, lr: float):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from forgetkern.lora import adapter_parameters
    from forgetkern.train import batch_labels, fused_parts

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    hidden_fn, head = fused_parts(model)
    opt = torch.optim.AdamW(adapter_parameters(model), lr=lr)
    device = next(model.parameters()).device

    def step(batch):
        model.train()
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        y = batch_labels(batch).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            h = hidden_fn(**inputs)
            loss = loss_fn(head.weight, h.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return step


def run(ctx: common.Context) -> list[common.Record]:
    from forgetkern.cache import build_cache

    if ctx.dry:
        models, (b, s), dtype = [DRY_MODEL], (DRY_BATCH, DRY_SEQ), torch.float32
    else:
        models, (b, s), dtype = list(MODELS.items()), (BATCH, SEQ), torch.bfloat16  # both are headline
    try:
        import liger_kernel.transformers  # noqa: F401

        no_liger = None
    except ImportError as exc:
        no_liger = f"liger-kernel not importable ({exc})"
    provs = [common.Provider(v, None, work=WORK[v], unavailable=no_liger if v == "liger-ce" else None,
                             skip_dry="a GPU-only peer (Triton kernels): not run in the dry mode"
                             if v == "liger-ce" else None) for v in VARIANTS]
    provs = [pv for pv in provs if ctx.selects(pv)]
    records = []
    for model_name, cfg in models:
        if not provs:
            break
        left = ctx.remaining_s()
        model = build_model(cfg, ctx.device, dtype) if left > common.MIN_CASE_S + BUILD_S else None
        data = batches(cfg["vocab_size"], b, s) if model is not None else None
        tokens = b * s
        total, head = matmul_params(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            cache = None
            for pv in provs:
                case = common.Case(
                    bench=NAME, work=pv.work, passes="step", provider=pv.name,
                    inputs=f"random: random weights and tokens, {model_name} config",
                    shape={"model": model_name, "B": b, "L": s}, dtype=dtype,
                    floor=floors.train_step_floor(pv.work, total, head, tokens, ctx.rates),
                    no_gate="n/a: a training step (the losses are gated in linear_tmkl)",
                    unavailable=pv.unavailable, skip=pv.skip_dry if ctx.dry else None, tokens=tokens,
                    slow_policy=False,  # at least 10 timed steps, however long one takes
                    note=f"LoRA r={LORA['rank']} on {len(LORA['targets'])} projections, AdamW")
                if model is None and not (case.unavailable or case.skip):
                    case.skip = f"time budget: {max(left, 0):.0f} s left, the model was not built"
                if not (case.unavailable or case.skip):
                    if pv.name == "forgetkern-tmkl-cache" and cache is None:
                        cache = build_cache(model, data, Path(tmp) / "exact", mode="exact",
                                            show_progress=False, log=lambda *a: None)
                    case.make = _maker(pv.name, model, data, cache)
                records.append(common.run_case(ctx, case))
        del model
    return records


def _maker(name, model, data, cache):
    def make():
        from forgetkern import ForgetAwareStep

        if name == "liger-ce":
            step = _liger_step(model, lr=1e-4)
        elif name == "forgetkern-ce":
            step = ForgetAwareStep(model, loss="ce", lr=1e-4)
        else:
            step = ForgetAwareStep(model, loss="tmkl", lr=1e-4,
                                   base_cache=cache if name == "forgetkern-tmkl-cache" else None)
        calls = [0]

        def one():
            step(data[calls[0] % len(data)])
            calls[0] += 1
        return one
    return make


def main(argv=None):
    import suite

    return suite.main(["--only", NAME] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
