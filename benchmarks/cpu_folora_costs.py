"""What FoLoRA's setup and steps cost on the CPU, on SmolLM2-135M-Instruct (offline).

Times, on the FoLoRA lines of docs/usage.md (LoRA r=16 on q_proj, v_proj, up_proj, down_proj):
proxy sampling (``sample_proxy_data``), calibration (``calibrate``: proxy and task passes), the
eigen solves of ``FoLoRA.from_model`` (every layer's dense basis and the r x r problems) and one
optimizer step against AdamW's (forward + backward excluded). Proxy sampling and calibration scale
with the number of tokens, so the output also gives them per 1000 tokens. The unit is one plain
training step (forward + backward + AdamW on a 4 x 128 batch, median of 3) timed in the same run:
on a machine shared with other jobs the seconds swell, the ratios much less. The load average is
recorded.

    python benchmarks/cpu_folora_costs.py [--threads 2] [--samples 8] [--length 64] [--task 8]
                                          [--phases unit,proxy,calibrate,eigen,step]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8, help="proxy sequences")
    ap.add_argument("--length", type=int, default=64, help="tokens per proxy sequence")
    ap.add_argument("--task", type=int, default=8, help="task batches of 4 x 128 tokens")
    ap.add_argument("--phases", default="unit,proxy,calibrate,eigen,step")
    args = ap.parse_args(argv)
    phases = set(args.phases.split(","))
    torch.set_num_threads(args.threads)

    from forgetkern.lora import inject_lora
    from forgetkern.models import load
    from forgetkern.optim import FoLoRA, calibrate, sample_proxy_data

    model, tok = load("smollm2", log=None)
    model.requires_grad_(False)
    model = inject_lora(model, ["q_proj", "v_proj", "up_proj", "down_proj"], rank=16, alpha=32)
    g = torch.Generator().manual_seed(0)
    task = [{"input_ids": torch.randint(0, len(tok), (4, 128), generator=g)} for _ in range(args.task)]
    out = {"model": "SmolLM2-135M-Instruct (fp32)", "threads": args.threads,
           "load_average_start": os.getloadavg()}

    if "unit" in phases:
        params = [p for p in model.parameters() if p.requires_grad]
        adamw, times = torch.optim.AdamW(params, lr=1e-5), []
        for _ in range(4):
            t = time.perf_counter()
            model(**task[0], labels=task[0]["input_ids"]).loss.backward()
            adamw.step()
            adamw.zero_grad()
            times.append(time.perf_counter() - t)
        out["train_step_s"] = statistics.median(times[1:])
        print("training step (unit)", out["train_step_s"], "s", flush=True)
    if not phases - {"unit"}:
        print(json.dumps(out, indent=1))
        return out

    t = time.perf_counter()
    proxy = sample_proxy_data(model, n_samples=args.samples, length=args.length, top_p=0.95,
                              progress=False)
    out["proxy_s"] = time.perf_counter() - t
    out["proxy_tokens"] = args.samples * args.length
    print("proxy sampling", out["proxy_s"], "s", flush=True)

    t = time.perf_counter()
    stats = calibrate(model, proxy, task, progress=False)
    out["calibrate_s"] = time.perf_counter() - t
    out["calibrate_tokens"] = out["proxy_tokens"] + args.task * 4 * 128
    print("calibration", out["calibrate_s"], "s", flush=True)

    t = time.perf_counter()
    opt = FoLoRA.from_model(model, stats, lr=2e-4, gate="soft", tau=1.0)
    out["from_model_s"] = time.perf_counter() - t
    out["layers"] = len(stats)
    print("FoLoRA.from_model", out["from_model_s"], "s", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    adamw = torch.optim.AdamW(params, lr=2e-4)
    for name, o in (("folora_step_s", opt), ("adamw_step_s", adamw)):
        o.step()  # warm-up (state allocation)
        t = time.perf_counter()
        for _ in range(3):
            o.step()
        out[name] = (time.perf_counter() - t) / 3
    out["proxy_s_per_1k_tokens"] = out["proxy_s"] / out["proxy_tokens"] * 1000
    out["calibrate_s_per_1k_tokens"] = out["calibrate_s"] / out["calibrate_tokens"] * 1000
    out["load_average_end"] = os.getloadavg()
    if "train_step_s" in out:
        for key in ("proxy_s", "calibrate_s", "from_model_s", "folora_step_s"):
            out[key.replace("_s", "_in_train_steps")] = out[key] / out["train_step_s"]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
