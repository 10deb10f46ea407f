"""The real-model experiments, on Hugging Face causal LMs: a real pretrained LM
(``--model smollm2``) on synthetic target tasks, or any local causal LM on a text file
(``--model DIR --data FILE``). The built-in tiny experiment is :mod:`forgetkern.demo.tiny`."""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from .. import models
from ..lora import inject_lora
from . import adapters as A
from . import chat
from . import data as D
from . import instructions as I
from . import tasks as T
from .config import DemoConfig
from .experiment import Experiment
from .metrics import drift, instruction_following, mean_ce, task_exact_match

EVAL_SEED = 0  # the held-out problems are the same for every seed


def load_model(spec: str, device: str, log=print):
    """``(model, tokenizer)`` frozen: a name of :data:`forgetkern.models.MODELS` or a folder."""
    if spec in models.MODELS:
        ok, why = models.available(spec)
        if not ok:
            raise SystemExit(f"--model {spec}: {why}")
        model, tok = models.load(spec, device=device, log=log)
    else:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise SystemExit("--model needs transformers: pip install 'forgetkern[hf]'") from exc
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True,
                                                     dtype=dtype).to(device)
    model.requires_grad_(False)
    return model, tok


def retention_texts(max_bytes: int = 400_000) -> dict[str, str]:
    """The held-out retention sources: English prose (pydoc topics) and stdlib source."""
    _, source, _ = D.load_corpus(max_bytes=max_bytes)
    return {"prose": T.prose_corpus()[:max_bytes],
            "stdlib": bytes(source.tolist()).decode("utf-8", errors="replace")}


def real_setup(cfg: DemoConfig, *, progress: bool, log=print):
    """``(experiment_of(seed), info)`` of the real-model experiment: one base model, adapted to
    the synthetic tasks through PEFT adapters (:mod:`adapters`, a fresh copy per adapter kind);
    every seed draws its own training problems, order and adapters."""
    model, tok = load_model(cfg.model["name"], cfg.device, log=log)
    held = {t: T.problems(t, cfg.eval_per_task, split="eval", seed=EVAL_SEED) for t in cfg.tasks}
    target_eval = [chat.chat_batch(tok, pairs[i:i + 16]) for pairs in held.values()
                   for i in range(0, len(pairs), 16)]
    retention = {name: chat.text_batches(tok, text, n=cfg.retention_windows,
                                         length=cfg.retention_len, batch=8)
                 for name, text in retention_texts().items()}
    probe = list(T.PROBE_PROMPTS[: cfg.probe_prompts])
    follow = I.prompts(cfg.instructions, cfg.if_topics) if cfg.if_topics else []
    reference = {}

    def evaluate(m, full: bool = True) -> dict:
        target_loss, _ = mean_ce(m, target_eval, cfg.device)
        by_task = task_exact_match(m, tok, held)
        by_source = {k: mean_ce(m, b, cfg.device)[0] for k, b in retention.items()}
        answers = chat.greedy(m, tok, probe, max_new_tokens=cfg.probe_tokens)
        if "probe" not in reference:  # the first evaluation is the base model's (B = 0)
            reference["probe"] = answers
        accuracy = sum(by_task.values()) / len(by_task)
        out = {"target_loss": target_loss, "target_accuracy": accuracy,
               "target_error": 1.0 - accuracy, "exact_match": by_task,
               "retention_loss": sum(by_source.values()) / len(by_source),
               "retention_by_source": by_source, **{f"probe_{k}": v for k, v in
                                                    drift(reference["probe"], answers).items()}}
        if follow and full:  # the end of a run, every checkpoint of a reference run
            rates = instruction_following(m, tok, follow, max_new_tokens=cfg.if_tokens)
            out.update(instruction_following=rates["rate"],
                       instruction_following_by=rates["by_instruction"])
        return out

    def adapt(kind: str, seed: int, knowledge):
        return A.adapted(model, kind, targets=cfg.targets, rank=cfg.rank, alpha=cfg.alpha,
                         seed=seed, options=cfg.peft, knowledge=knowledge)

    n_train = cfg.adapt_steps * cfg.adapt_batch

    def experiment_of(seed: int) -> Experiment:
        per_task = -(-n_train // len(cfg.tasks))
        rows = T.mixture(cfg.tasks, per_task, split="train", seed=seed + 1)[:n_train]
        train = [chat.chat_batch(tok, [(p, a) for _, p, a in rows[i:i + cfg.adapt_batch]])
                 for i in range(0, len(rows), cfg.adapt_batch)]
        proxy = {"prompts": ["<|im_start|>user\n", "The"], "tokenizer": tok}
        return Experiment(replace(cfg), model, train, evaluate, seed=seed, proxy=proxy,
                          adapt=adapt, progress=progress, log=log)

    info = {"model_name": cfg.model["name"], "tasks": list(cfg.tasks),
            "eval_problems": {t: len(p) for t, p in held.items()},
            "instruction_prompts": len(follow),
            "retention_tokens": {k: sum(int(b["input_ids"].numel()) for b in v)
                                 for k, v in retention.items()},
            "probe": probe, "train_problems_per_seed": n_train,
            "parameters": sum(p.numel() for p in model.parameters()), "shared_base": True}
    return experiment_of, info


def text_setup(cfg: DemoConfig, model_spec: str, data_file: str, *, seq_len: int,
               progress: bool, log=print):
    """``(experiment_of(seed), info)``: target = ``data_file``, retention = stdlib source."""
    model, tok = load_model(model_spec, cfg.device, log=log)
    with open(data_file, encoding="utf-8", errors="replace") as f:
        text = f.read()

    def chunks(s: str) -> torch.Tensor:
        ids = torch.tensor(tok(s, add_special_tokens=False)["input_ids"], dtype=torch.long)
        n = ids.numel() // seq_len
        if n == 0:
            raise SystemExit(f"not enough text for one {seq_len}-token sequence")
        return ids[: n * seq_len].view(n, seq_len)

    target = chunks(text)
    n_eval = max(1, len(target) // 10)
    train_rows, eval_rows = target[:-n_eval], target[-n_eval:]
    if len(train_rows) == 0:
        raise SystemExit(f"{data_file}: too little text to hold out an evaluation split")
    ret_rows = chunks(retention_texts()["stdlib"])[: cfg.retention_windows]
    b = cfg.adapt_batch
    target_eval = [D.lm_batch(eval_rows[i:i + b]) for i in range(0, len(eval_rows), b)]
    retention_eval = [D.lm_batch(ret_rows[i:i + b]) for i in range(0, len(ret_rows), b)]
    inject_lora(model, cfg.targets, rank=cfg.rank, alpha=cfg.alpha)

    def evaluate(m, full: bool = True) -> dict:
        target_loss, token_acc = mean_ce(m, target_eval, cfg.device, accuracy=True)
        return {"target_loss": target_loss, "target_accuracy": token_acc,
                "retention_loss": mean_ce(m, retention_eval, cfg.device)[0]}

    def experiment_of(seed: int) -> Experiment:
        g = torch.Generator().manual_seed(seed)
        order = torch.randint(0, len(train_rows), (cfg.adapt_steps, b), generator=g)
        train = [D.lm_batch(train_rows[o]) for o in order]
        return Experiment(replace(cfg), model, train, evaluate, seed=seed, progress=progress,
                          log=log)

    info = {"model_dir": model_spec, "data_file": os.path.abspath(data_file), "seq_len": seq_len,
            "train_sequences": len(train_rows), "eval_sequences": len(eval_rows),
            "shared_base": True}
    return experiment_of, info
