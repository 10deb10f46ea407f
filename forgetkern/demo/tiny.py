"""The built-in experiment: a byte-level LM pretrained on stdlib source, adapted to additions."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import replace

import torch

from .._files import atomic_path
from .._params import cache_dir
from ..lora import inject_lora
from . import data as D
from .config import DemoConfig
from .experiment import Experiment, bar
from .metrics import arithmetic_accuracy, mean_ce
from .tiny_model import TinyConfig, TinyLM


def pretrain_tiny(cfg: DemoConfig, pretrain: torch.Tensor, seed: int, *, use_cache: bool,
                  progress: bool, log=print) -> tuple[TinyLM, dict]:
    """The pretrained byte-level base model of ``seed`` (cached under :func:`cache_dir` unless
    disabled)."""
    tcfg = TinyConfig(**cfg.model)
    key_src = json.dumps({"model": cfg.model, "steps": cfg.pretrain_steps,
                          "batch": cfg.pretrain_batch, "len": cfg.pretrain_len,
                          "lr": cfg.pretrain_lr, "seed": seed, "bytes": int(pretrain.numel()),
                          "crc": int(hashlib.sha1(pretrain.numpy().tobytes()).hexdigest()[:8], 16),
                          "torch": torch.__version__.split("+")[0], "v": 1}, sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"demo-base-{key}.pt")
    torch.manual_seed(seed)
    model = TinyLM(tcfg).to(cfg.device)
    if use_cache and os.path.exists(path):
        blob = torch.load(path, map_location=cfg.device, weights_only=True)
        model.load_state_dict(blob["state_dict"])
        log(f"loaded the pretrained base model from {path}")
        return model, {"pretrain_loss": float(blob["loss"]), "cached": True, "path": path}
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    warm = max(1, cfg.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.pretrain_steps))))
    ema = None
    steps = bar(progress)(range(cfg.pretrain_steps), desc="pretrain on stdlib source", unit="step")
    start = time.perf_counter()
    for _ in steps:
        ids = D.windows(pretrain, cfg.pretrain_batch, cfg.pretrain_len, gen).to(cfg.device)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, tcfg.vocab_size),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if steps.n % 10 == 0:
            steps.set_postfix(loss=f"{ema:.3f}", refresh=False)
    log(f"pretrained the base model: {cfg.pretrain_steps} steps in "
        f"{time.perf_counter() - start:.0f} s, train loss {ema:.3f} nats/byte")
    if use_cache:
        os.makedirs(cache_dir(), exist_ok=True)
        with atomic_path(path) as tmp:  # a crash never leaves half a cached model
            torch.save({"state_dict": model.state_dict(), "loss": ema}, tmp)
    return model, {"pretrain_loss": ema, "cached": False, "path": path if use_cache else None}


def tiny_setup(cfg: DemoConfig, *, use_cache: bool, progress: bool, log=print):
    """``(experiment_of(seed), info)``: each seed pretrains (or loads) its own base model."""
    pretrain, retention, names = D.load_corpus()
    log(f"corpus: {len(names)} stdlib files ({pretrain.numel() / 1e6:.2f} MB pretraining, "
        f"{retention.numel() / 1e6:.2f} MB held out for retention)")
    info = {"corpus_files": len(names), "pretrain_bytes": int(pretrain.numel()),
            "retention_bytes": int(retention.numel()), "pretrain": {}}

    def experiment_of(seed: int) -> Experiment:
        model, pre = pretrain_tiny(cfg, pretrain, seed, use_cache=use_cache, progress=progress,
                                   log=log)
        info["pretrain"][str(seed)] = pre
        model.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed + 2)
        ret = D.windows(retention, cfg.retention_windows, cfg.pretrain_len, gen)
        retention_eval = [D.lm_batch(ret[i:i + 16]) for i in range(0, len(ret), 16)]
        train = D.arithmetic_batches(cfg.adapt_steps, cfg.adapt_batch, cfg.task_len, seed=seed)
        target_eval = D.arithmetic_batches(cfg.target_eval_batches, 16, cfg.task_len, seed=seed,
                                           split="eval")
        prompts, answers = D.arithmetic_eval_problems(cfg.accuracy_problems, seed=seed)
        inject_lora(model, cfg.targets, rank=cfg.rank, alpha=cfg.alpha)

        def evaluate(m, full: bool = True) -> dict:
            target_loss, _ = mean_ce(m, target_eval, cfg.device)
            retention_loss, _ = mean_ce(m, retention_eval, cfg.device)
            return {"target_loss": target_loss, "retention_loss": retention_loss,
                    "target_accuracy": arithmetic_accuracy(m, prompts, answers, cfg.device)}

        return Experiment(replace(cfg), model, train, evaluate, seed=seed,
                          proxy={"prompts": [[D.NEWLINE]]}, progress=progress, log=log)

    return experiment_of, info
