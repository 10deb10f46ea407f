"""Real inputs for the fused-linear benchmark: final hidden states and the LM head of SmolLM2-135M.

    python benchmarks/smollm2_inputs.py                # writes .bench_inputs/smollm2.pt
    python benchmarks/smollm2_inputs.py --check        # reads it back and prints what it holds

The file (about 47 MiB, small enough to travel with a GPU run; ``.bench_inputs/`` is ignored by
git) holds, from SmolLM2-135M-Instruct as ``forgetkern.models.load("smollm2")`` gives it (fp32, on
the CPU, the ``real`` extra installed):

* ``hidden`` ``(N, 576)`` bf16: final hidden states (after the final norm) of the model with LoRA
  adapters of rank 8 on ``q_proj`` and ``v_proj`` whose ``B`` is drawn from N(0, 0.02²) with a
  fixed seed, so the adapted model is near its base, as after LoRA fine-tuning;
* ``base_hidden`` ``(N, 576)`` bf16: the same positions with the adapters off (the base model);
* ``labels`` ``(N,)``: the next tokens, all valid;
* the head (tied to the embeddings), ``(49152, 576)``, as the GGUF file stores it: int8 quants
  ``head_q8`` and one fp16 scale per 32 weights ``head_scale`` (Q8_0). ``q * scale`` is bit for bit
  the fp32 head the model has; the export checks it.

``N = 8192`` positions of real English text (this repository's ``docs/*.md`` and ``README.md``,
8 sequences of 1024 predicted tokens). The benchmark uses them at the model's own shape,
``N=8192 D=576 V=49152``, casting to its dtype, with no tiling to another shape.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = ROOT / ".bench_inputs" / "smollm2.pt"
SEQUENCES, PREDICTED = 8, 1024
LORA = {"targets": ["q_proj", "v_proj"], "rank": 8, "alpha": 16, "sigma": 0.02, "seed": 0}
Q8_BLOCK = 32


def _gguf_head(model_name: str = "smollm2"):
    """``(q (V, D) int8, scale (V, D/32) fp16)`` of the GGUF file's ``token_embd`` (Q8_0)."""
    import importlib.util

    from gguf import GGUFReader

    from forgetkern.models import MODELS

    spec = MODELS[model_name]
    origin = importlib.util.find_spec(spec.package).origin
    reader = GGUFReader(str(Path(origin).parent / spec.gguf))
    (t,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    if t.tensor_type.name != "Q8_0":
        raise SystemExit(f"token_embd.weight is {t.tensor_type.name}, this export reads Q8_0 only")
    raw = torch.from_numpy(t.data.copy())  # (V, blocks * 34) uint8
    v = raw.shape[0]
    blocks = raw.view(v, -1, 2 + Q8_BLOCK)
    scale = blocks[..., :2].contiguous().view(torch.float16).view(v, -1)
    q = blocks[..., 2:].contiguous().view(torch.int8).reshape(v, -1)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 head ``q * scale`` (one scale per 32 consecutive weights of a row)."""
    v, d = q.shape
    return (q.view(v, d // Q8_BLOCK, Q8_BLOCK).float() * scale.float()[..., None]).view(v, d)


def _text_ids(tokenizer) -> torch.Tensor:
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    text += (ROOT / "README.md").read_text()
    ids = tokenizer(text)["input_ids"]
    need = SEQUENCES * (PREDICTED + 1)
    if len(ids) < need:
        raise SystemExit(f"not enough text: {len(ids)} tokens, need {need}")
    return torch.tensor(ids[:need]).view(SEQUENCES, PREDICTED + 1)


@torch.no_grad()
def export(path: Path, threads: int | None = None) -> Path:
    from forgetkern import models
    from forgetkern.lora import disable_adapters, inject_lora, lora_layers
    from forgetkern.train import fused_parts

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model, tok = models.load("smollm2", device="cpu", dtype=torch.float32, log=None)
    q, scale = _gguf_head()
    head_w = model.get_output_embeddings().weight
    if not torch.equal(dequantize(q, scale), head_w):
        raise SystemExit("the GGUF head does not dequantize to the model's head; not written")
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, LORA["targets"], rank=LORA["rank"], alpha=LORA["alpha"])
    gen = torch.Generator().manual_seed(LORA["seed"])
    for layer in lora_layers(model).values():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * LORA["sigma"])
    model.eval()
    hidden_fn, _ = fused_parts(model)
    ids = _text_ids(tok)
    hidden, base = [], []
    for row in ids:
        inputs = {"input_ids": row[None, :-1], "attention_mask": torch.ones_like(row[None, :-1])}
        hidden.append(hidden_fn(**inputs)[0].to(torch.bfloat16))
        with disable_adapters(model):
            base.append(hidden_fn(**inputs)[0].to(torch.bfloat16))
        print(f"  {len(hidden)}/{SEQUENCES} sequences ({time.perf_counter() - start:.0f} s)", flush=True)
    data = {
        "hidden": torch.cat(hidden), "base_hidden": torch.cat(base),
        "labels": ids[:, 1:].reshape(-1).clone(), "head_q8": q, "head_scale": scale,
        "meta": {"model": "SmolLM2-135M-Instruct (forgetkern.models.load('smollm2'))",
                 "text": "docs/*.md + README.md of forgetkern", "sequences": SEQUENCES,
                 "predicted_per_sequence": PREDICTED, "lora": LORA},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    torch.save(data, tmp)
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s")
    return path


def describe(meta: dict, n: int) -> str:
    lora = meta["lora"]
    return (f"smollm2: {n} real final hidden states of {meta['model']} on {meta['text']}; adapted = "
            f"LoRA r={lora['rank']} on {'/'.join(lora['targets'])}, B ~ N(0, {lora['sigma']}^2); "
            "its real head (Q8_0 as stored); native shape, no tiling")


def load(path: Path | str, device, dtype: torch.dtype):
    """``(h, hb, w, y, description)`` on ``device`` in ``dtype`` (``h`` requires grad)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: write it with `python benchmarks/smollm2_inputs.py` "
                                "(needs the real extra: pip install 'forgetkern[real]')")
    data = torch.load(path, map_location="cpu", weights_only=True)
    h = data["hidden"].to(device=device, dtype=dtype).requires_grad_()
    hb = data["base_hidden"].to(device=device, dtype=dtype)
    w = dequantize(data["head_q8"], data["head_scale"]).to(device=device, dtype=dtype)
    y = data["labels"].to(device)
    return h, hb, w, y, describe(data["meta"], h.shape[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_PATH), help=f"file to write (default {DEFAULT_PATH})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--check", action="store_true", help="read the file back and describe it")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.check:
        h, hb, w, y, text = load(args.out, "cpu", torch.bfloat16)
        print(f"{text}\nN={h.shape[0]} D={h.shape[1]} V={w.shape[0]}; "
              f"{Path(args.out).stat().st_size / 2**20:.1f} MiB")
        return 0
    export(Path(args.out), args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
