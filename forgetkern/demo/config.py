"""Every setting of a demo run, the presets, and the runs a configuration makes."""
from __future__ import annotations

from dataclasses import dataclass, field

from .instructions import FOLLOWED
from .tiny_model import TinyConfig

# forgetkern's methods, on LoRA (the built-in tiny model: forgetkern's own LoRA; Hugging Face
# models: PEFT's)
LORA_METHODS = ("ce", "kl", "tmkl", "folora", "tmkl+folora")
# PEFT's other adapters (Hugging Face models only): DoRA and RandLoRA with CE and with TMKL, and
# two adapters made to forget less, trained with CE: CorDA (knowledge-preserving mode) and OSF
VARIANT_METHODS = ("dora", "dora+tmkl", "randlora", "randlora+tmkl", "corda", "osf")
METHODS = LORA_METHODS + VARIANT_METHODS
ADAPTERS = ("lora", "dora", "randlora", "corda", "osf")
TINY_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REAL_TARGETS = ["q_proj", "v_proj"]
MODES = ("smoke", "quick", "full")
#: measured wall times on 2 CPU cores (docs/demo.md, docs/real_model.md); ``--help``, the README
#: and the docs quote these words
TIMES = {"quick": "about 1.5 minutes", "smollm2 quick": "about 10 minutes",
         "full": "about 45 minutes per seed"}


@dataclass
class DemoConfig:
    """Every setting of a demo run (written to the JSON output)."""

    mode: str = "quick"
    seeds: list = field(default_factory=lambda: [0])
    model: dict = field(default_factory=lambda: TinyConfig().to_dict())
    pretrain_steps: int = 700
    pretrain_batch: int = 16
    pretrain_len: int = 128
    pretrain_lr: float = 3e-3
    adapt_steps: int = 150
    adapt_batch: int = 16
    task_len: int = 64
    adapt_lr: float = 2e-3
    rank: int = 8
    alpha: float = 16.0
    targets: list = field(default_factory=lambda: list(TINY_TARGETS))
    kl_weights: list = field(default_factory=lambda: [1.0])
    # extra kl_weight values run on the first seed only (the sweep), for the KL methods
    sweep_kl_weights: list = field(default_factory=list)
    checkpoints: int = 10
    retention_windows: int = 64
    target_eval_batches: int = 4
    accuracy_problems: int = 200
    # the real-model experiment (--model smollm2)
    tasks: list = field(default_factory=list)
    eval_per_task: int = 0
    retention_len: int = 128
    probe_tokens: int = 24
    probe_prompts: int = 16
    folora: dict = field(default_factory=lambda: {"gate": "soft", "tau": 1.0, "damping": 1e-3,
                                                  "proxy_samples": 64, "proxy_len": 128})
    # instruction following (real model): prompts per instruction of INSTRUCTIONS, and tokens
    instructions: list = field(default_factory=list)
    if_topics: int = 0
    if_tokens: int = 64
    # PEFT adapter settings beyond rank/alpha/targets (RandLoRA's basis rank and alpha)
    peft: dict = field(default_factory=dict)
    methods: list = field(default_factory=lambda: list(LORA_METHODS))
    device: str = "cpu"


TINY_PRESETS = {
    "smoke": dict(model=TinyConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64).to_dict(),
                  pretrain_steps=30, pretrain_batch=8, pretrain_len=64, adapt_steps=8,
                  adapt_batch=8, task_len=40, checkpoints=2, retention_windows=8,
                  target_eval_batches=1, accuracy_problems=16,
                  folora={"gate": "soft", "tau": 1.0, "damping": 1e-3, "proxy_samples": 8,
                          "proxy_len": 32}),
    "quick": dict(model=TinyConfig(d_model=96, n_layers=3, n_heads=4, d_ff=288).to_dict(),
                  pretrain_steps=500, adapt_steps=120, checkpoints=8, retention_windows=48,
                  folora={"gate": "soft", "tau": 1.0, "damping": 1e-3, "proxy_samples": 32,
                          "proxy_len": 128}),
    "full": dict(model=TinyConfig(d_model=192, n_layers=4, n_heads=6, d_ff=576).to_dict(),
                 pretrain_steps=3000, adapt_steps=400, kl_weights=[0.1, 0.3, 1.0, 3.0, 10.0],
                 checkpoints=14, retention_windows=128, target_eval_batches=8,
                 accuracy_problems=500,
                 folora={"gate": "soft", "tau": 1.0, "damping": 1e-3, "proxy_samples": 128,
                         "proxy_len": 128}),
}

# RandLoRA: basis rank 32 (about LoRA r = 8's parameter count here) and scale alpha / r = 2 as
# LoRA's; PEFT's default alpha = 20 r made CE diverge at this learning rate
_REAL = dict(model={"name": "smollm2"}, targets=list(REAL_TARGETS), tasks=["reverse", "shift",
             "json"], adapt_batch=8, adapt_lr=2e-3, rank=8, alpha=16.0, kl_weights=[1.0],
             methods=list(METHODS), peft={"randlora_r": 32, "randlora_alpha": 64.0},
             instructions=list(FOLLOWED))
REAL_PRESETS = {
    "smoke": dict(_REAL, seeds=[0], adapt_steps=2, checkpoints=1, eval_per_task=2,
                  retention_windows=1, retention_len=32, probe_tokens=6, probe_prompts=4,
                  adapt_batch=4, if_topics=1, if_tokens=8,
                  folora={"gate": "soft", "tau": 1.0, "damping": 1e-3, "proxy_samples": 2,
                          "proxy_len": 16}),
    "quick": dict(_REAL, seeds=[0], adapt_steps=24, checkpoints=2, eval_per_task=8,
                  methods=["ce", "tmkl", "corda", "osf"],
                  retention_windows=4, retention_len=128, probe_tokens=12, probe_prompts=8,
                  if_topics=2, if_tokens=64,
                  folora={"gate": "soft", "tau": 1.0, "damping": 1e-3, "proxy_samples": 12,
                          "proxy_len": 48}),
    "full": dict(_REAL, seeds=[0, 1, 2], adapt_steps=24, checkpoints=2, eval_per_task=8,
                 retention_windows=4, retention_len=128, probe_tokens=12, probe_prompts=8,
                 if_topics=2, if_tokens=64,
                 folora={"gate": "soft", "tau": 1.0, "damping": 1e-3, "proxy_samples": 12,
                         "proxy_len": 48}),
}


def is_real(cfg: DemoConfig) -> bool:
    """Whether ``cfg`` is the real-model experiment (``--model smollm2``)."""
    return "name" in cfg.model


def runs_of(cfg: DemoConfig, seed: int, part: str = "all") -> list[tuple[str, float | None]]:
    """The (method, kl_weight) pairs of one seed: one per method, the KL methods once per weight
    of ``kl_weights``; on the first seed also the sweep, ``kl`` and ``tmkl`` at each extra
    weight of ``sweep_kl_weights``. ``part``: ``"main"``, ``"sweep"`` or ``"all"`` (both)."""
    if part not in ("main", "sweep", "all"):
        raise ValueError(f"part must be 'main', 'sweep' or 'all', got {part!r}")
    runs = []
    if part != "sweep":
        for method in cfg.methods:
            if loss_name(method) == "ce":
                runs.append((method, None))
            else:
                runs.extend((method, float(w)) for w in cfg.kl_weights)
    if part != "main" and cfg.seeds and seed == cfg.seeds[0]:
        extra = [float(w) for w in cfg.sweep_kl_weights if w not in cfg.kl_weights]
        runs.extend((m, w) for m in cfg.methods if m in ("kl", "tmkl") for w in extra)
    return runs


def _parts(method: str) -> tuple[str, str, bool]:
    """``(adapter, loss, folora)`` of a demo method."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    parts = method.split("+")
    adapter = parts[0] if parts[0] in ADAPTERS else "lora"
    loss = next((p for p in parts if p in ("kl", "tmkl")), "ce")
    return adapter, loss, "folora" in parts


def loss_name(method: str) -> str:
    """The training loss of a demo method (FoLoRA changes the optimizer, not the loss)."""
    return _parts(method)[1]


def adapter_of(method: str) -> str:
    """The adapter a demo method trains: ``lora`` or one of PEFT's other adapters."""
    return _parts(method)[0]


def uses_folora(method: str) -> bool:
    """Whether a demo method trains with the FoLoRA gated optimizer."""
    return _parts(method)[2]


def reference_of(method: str) -> str | None:
    """The CE run a method is compared with at an equal task metric: its own adapter trained
    with CE (``dora`` for ``dora+tmkl``), else LoRA's (``ce``); ``None`` for ``ce`` itself."""
    if method == "ce":
        return None
    adapter = adapter_of(method)
    own = "ce" if adapter == "lora" else adapter
    return own if own != method else "ce"
