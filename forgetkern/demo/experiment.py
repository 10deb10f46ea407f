"""One base model with adapters, its data, and the per-method adaptation runs of one seed."""
from __future__ import annotations

import math
import time

import torch

from .. import optim
from ..lora import lora_layers
from ..train import ForgetAwareStep
from .config import DemoConfig, adapter_of, loss_name, reference_of, runs_of, uses_folora
from .metrics import checkpoint_steps


def bar(progress: bool):
    """tqdm (with its ETA) when ``progress``, else a silent pass-through."""
    from tqdm.auto import tqdm

    return lambda *a, **k: tqdm(*a, disable=not progress, leave=False, **k)


class Experiment:
    """The adaptation runs of one seed: every method from the same adapters, batches and budget.

    Args:
        cfg: the demo configuration.
        model: the base model with forgetkern LoRA adapters injected (base weights frozen), or,
            with ``adapt``, the plain frozen base model.
        train_batches: the training batches, used in order, cycling.
        evaluate: ``evaluate(model, full) -> dict`` with at least ``target_loss``,
            ``target_accuracy`` and ``retention_loss`` (the base model is evaluated first, with
            ``B = 0``); ``full=False`` may skip costly extras that only the end point of a run
            and the whole curve of a reference run (:func:`config.reference_of`) need.
        seed: seeds the initial adapters and the FoLoRA proxy samples.
        proxy: ``sample_proxy_data`` keyword arguments for the proxy data of FoLoRA and CorDA
            (``prompts``, ``tokenizer``).
        adapt: ``adapt(kind, seed, knowledge) -> model``: a fresh copy of the base model with an
            adapter of ``kind`` (:func:`config.adapter_of`; ``knowledge()`` gives the proxy
            data); ``None`` when ``model`` carries the only adapter (``lora``).
    """

    def __init__(self, cfg: DemoConfig, model, train_batches, evaluate, *, seed: int,
                 proxy: dict | None = None, adapt=None, progress=True, log=print):
        self.cfg = cfg
        self.seed = seed
        self.device = torch.device(cfg.device)
        self.train_batches = train_batches
        self._evaluate = evaluate
        self.proxy = proxy or {}
        self.progress = progress
        self.bar = bar(progress)
        self.log = log
        self.backend = "reference" if self.device.type == "cpu" else None
        self._base, self._adapt, self._proxy_data = model, adapt, None
        self._use(model, None if adapt else "lora")

    def _use(self, model, kind: str | None) -> None:
        """Make ``model`` (adapter ``kind``) the one that trains; its starting adapters are
        recorded for :meth:`reset_adapters` (forgetkern LoRA: fixed random ``A`` of Kaiming
        scale from the seed, ``B = 0``; PEFT: as created)."""
        self.model, self.kind, self._stats, self._start = model, kind, None, {}
        if model is None:
            return
        gen = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) bound
                a = torch.empty_like(layer.lora_A, device="cpu").uniform_(-1, 1, generator=gen)
                layer.lora_A.copy_(a * bound)
                layer.lora_B.zero_()
        self._start = {n: p.detach().clone() for n, p in model.named_parameters()
                       if p.requires_grad}

    def adapter(self, kind: str) -> None:
        """Train adapter ``kind`` from now on (a fresh copy of the base model, unless current)."""
        if kind == self.kind:
            return
        if self._adapt is None:
            raise ValueError(f"adapter {kind!r} needs a Hugging Face model (PEFT); this "
                             "experiment has forgetkern LoRA only")
        self._use(None, None)  # free the previous copy first
        self._use(self._adapt(kind, self.seed, self.proxy_data), kind)

    def release(self) -> None:
        """Drop the adapted copy of the base model (``adapt`` experiments)."""
        if self._adapt is not None:
            self._use(self._base, None)

    def reset_adapters(self) -> None:
        """Identical starting adapters for every run of this adapter kind."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self._start:
                    p.copy_(self._start[name])

    def evaluate(self, full: bool = True) -> dict:
        return self._evaluate(self.model, full)

    def proxy_data(self) -> list[torch.Tensor]:
        """Sequences sampled from the base model itself (adapters off), once per seed."""
        if self._proxy_data is None:
            f = self.cfg.folora
            self._proxy_data = optim.sample_proxy_data(
                self._base, n_samples=f["proxy_samples"], length=f["proxy_len"], seed=self.seed,
                progress=self.progress, **self.proxy)
        return self._proxy_data

    def folora_stats(self):
        """Covariances of the proxy data and of the task data (once per adapter)."""
        if self._stats is None:
            task = self.train_batches[: max(1, min(len(self.train_batches), 8))]
            proxy = self.proxy_data()
            self.reset_adapters()
            self._stats = optim.calibrate(self.model, proxy, task, progress=self.progress)
        return self._stats

    def run(self, method: str, kl_weight: float | None, base: dict) -> dict:
        """One adaptation run; its record holds the checkpoints' evaluations (``curve``)."""
        cfg = self.cfg
        record = {"method": method, "kl_weight": kl_weight, "seed": self.seed,
                  "base_retention_loss": base["retention_loss"],
                  "base_target_loss": base["target_loss"],
                  "base_target_accuracy": base["target_accuracy"]}
        wall, cpu = time.perf_counter(), time.process_time()
        self.adapter(adapter_of(method))
        record["trainable_parameters"] = sum(p.numel() for p in self.model.parameters()
                                             if p.requires_grad)
        self.reset_adapters()
        if uses_folora(method):
            stats = self.folora_stats()
            f = {k: v for k, v in cfg.folora.items() if k in ("gate", "tau", "damping")}
            opt = optim.FoLoRA.from_model(self.model, stats, lr=cfg.adapt_lr, **f)
            self.reset_adapters()
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.adapt_lr, weight_decay=0.0)
        opts = {"backend": self.backend}
        if kl_weight is not None:
            opts["kl_weight"] = kl_weight
        step = ForgetAwareStep(self.model, loss=loss_name(method), optimizer=opt,
                               max_grad_norm=1.0, **opts)
        marks = checkpoint_steps(cfg.adapt_steps, cfg.checkpoints)
        references = {reference_of(m) for m in cfg.methods}
        curve = [{"step": 0, **base, "forgetting": 0.0}]
        train_time, tokens = 0.0, 0
        label = method if kl_weight is None else f"{method} λ={kl_weight:g}"
        for i in self.bar(range(1, cfg.adapt_steps + 1), desc=f"seed {self.seed}: {label}",
                          unit="step"):
            m = step(self.train_batches[(i - 1) % len(self.train_batches)])
            train_time += m["time_s"]
            tokens += m["tokens"]
            if i in marks:
                ev = self.evaluate(full=i == cfg.adapt_steps or method in references)
                ev["forgetting"] = ev["retention_loss"] - base["retention_loss"]
                curve.append({"step": i, **ev})
        final = curve[-1]
        return {**record, "status": "ok", **{k: v for k, v in final.items() if k != "step"},
                "train_time_s": train_time, "tokens_per_s": tokens / max(train_time, 1e-9),
                "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                "curve": curve}

    def base(self) -> dict:
        """The base model's evaluation (adapters at ``B = 0``)."""
        self.reset_adapters()
        base = self.evaluate()
        self.log(f"base model: target loss {base['target_loss']:.3f}, accuracy "
                 f"{base['target_accuracy']:.3f}, retention loss {base['retention_loss']:.4f}")
        return base

    def run_all(self, base: dict | None = None, on_result=None, part: str = "all",
                skip=()) -> tuple[dict, list[dict]]:
        """The base evaluation (unless given) and the runs of this seed (``part`` of
        :func:`runs_of`) but those in ``skip`` (``(method, kl_weight)`` pairs), in order;
        ``on_result(record)`` is called after each run (e.g. to save partial results)."""
        base = self.base() if base is None else base
        results = []
        for method, w in runs_of(self.cfg, self.seed, part):
            if (method, w) in skip:
                continue
            results.append(self.run(method, w, base))
            if on_result is not None:
                on_result(results[-1])
        self.release()
        return base, results
