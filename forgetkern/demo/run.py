"""``forgetkern demo``: learning vs forgetting of LoRA fine-tuning, one run per method.

A small byte-level causal LM is pretrained on the Python standard library's own source files
(part held out as the retention set), then LoRA-adapted to a far-away task (zero-padded
two-digit additions) with the same budget (steps, batches, learning rate, rank, initial adapters)
for each method:

* ``ce``           cross-entropy, AdamW;
* ``kl``           CE + kl_weight * plain KL(base || adapted) (``mask_target=False``), AdamW;
* ``tmkl``         CE + kl_weight * target-masked KL, AdamW;
* ``folora``       CE with the FoLoRA gated optimizer (statistics from proxy text sampled from
                   the base model itself and from the task data);
* ``tmkl+folora``  both.

Each run records the target loss / accuracy on held-out problems and the retention loss on the
held-out stdlib files at a few checkpoints (the learning/forgetting frontier), prints a table,
writes a PNG plot and, with ``--json``, the numbers. ``--model DIR --data FILE`` runs the same
comparison for a local HF causal LM on a text file (target: the file; retention: held-out stdlib
source tokenized by the model's tokenizer).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from ..lora import inject_lora, lora_layers
from ..train import ForgetAwareStep
from . import data as D
from .model import TinyConfig, TinyLM

METHODS = ("ce", "kl", "tmkl", "folora", "tmkl+folora")
TINY_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DemoConfig:
    """Every setting of a demo run (written to the JSON output)."""

    mode: str = "quick"
    seed: int = 0
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
    checkpoints: int = 10
    retention_windows: int = 64
    target_eval_batches: int = 4
    accuracy_problems: int = 200
    folora: dict = field(default_factory=lambda: {"gate": "soft", "tau": 1.0, "damping": 1e-3,
                                                  "proxy_samples": 64, "proxy_len": 128})
    methods: list = field(default_factory=lambda: list(METHODS))
    device: str = "cpu"


PRESETS = {
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


# ------------------------------------------------------------------------------- helpers
def _tqdm(progress: bool):
    from tqdm.auto import tqdm

    return lambda *a, **k: tqdm(*a, disable=not progress, leave=False, **k)


def cache_dir() -> str:
    """``$XDG_CACHE_HOME/forgetkern`` (default ``~/.cache/forgetkern``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "forgetkern")


def runs_of(cfg: DemoConfig) -> list[tuple[str, float | None]]:
    """The (method, kl_weight) pairs of a run: one per method, KL methods once per weight."""
    runs = []
    for method in cfg.methods:
        if method in ("ce", "folora"):
            runs.append((method, None))
        else:
            runs.extend((method, float(w)) for w in cfg.kl_weights)
    return runs


def _loss_name(method: str) -> str:
    return {"ce": "ce", "folora": "ce", "kl": "kl", "tmkl": "tmkl", "tmkl+folora": "tmkl"}[method]


def _folora_module():
    try:
        from .. import optim
    except ImportError as exc:
        return None, f"forgetkern.optim is not available ({exc})"
    missing = [n for n in ("FoLoRA", "calibrate", "sample_proxy_data") if not hasattr(optim, n)]
    if missing:
        return None, f"forgetkern.optim lacks {missing}"
    return optim, None


@torch.no_grad()
def mean_ce(model, batches, device, *, accuracy: bool = False) -> tuple[float, float | None]:
    """Token-mean cross-entropy (and top-1 next-token accuracy) of ``model`` on ``batches``."""
    from ..lora.discovery import logits_of as _logits_of
    from ..train import batch_labels

    was = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    try:
        for b in batches:
            inputs = {k: v.to(device) for k, v in b.items() if k != "labels"}
            y = batch_labels(b).to(device)
            logits = _logits_of(model(**inputs)).float()
            keep = y != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == y[keep]).sum())
            count += int(keep.sum())
    finally:
        model.train(was)
    return total / max(count, 1), (correct / max(count, 1) if accuracy else None)


@torch.no_grad()
def arithmetic_accuracy(model, prompts: torch.Tensor, answers: list[bytes], device) -> float:
    """Exact-match accuracy of greedy answers to held-out addition problems."""
    was = model.training
    model.eval()
    try:
        ids = prompts.to(device)
        n = len(answers[0])
        for _ in range(n):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        got = ids[:, -n:].cpu().tolist()
    finally:
        model.train(was)
    return sum(bytes(g) == a for g, a in zip(got, answers)) / len(answers)


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """``n`` evaluation steps, geometrically spaced (dense early, where the curves bend), ending
    at ``steps``."""
    if n <= 1:
        return [steps]
    first = max(1.0, steps / (3 * n))
    marks = {min(steps, max(1, round(first * (steps / first) ** (i / (n - 1))))) for i in range(n)}
    return sorted(marks | {steps})


def forgetting_at(curve: list[dict], target_loss: float) -> float | None:
    """Retention-loss increase interpolated along ``curve`` at ``target_loss`` (None outside)."""
    pts = sorted((c["target_loss"], c["forgetting"]) for c in curve)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= target_loss <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (target_loss - x0) / (x1 - x0)
    return None


# ------------------------------------------------------------------------- the experiment
class Experiment:
    """One base model with adapters, its data, and the per-method adaptation runs."""

    def __init__(self, cfg: DemoConfig, model, train_batches, target_eval, retention_eval, *,
                 accuracy_fn=None, proxy_prompts=None, progress=True, log=print):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = model
        self.train_batches = train_batches
        self.target_eval = target_eval
        self.retention_eval = retention_eval
        self.accuracy_fn = accuracy_fn
        self.proxy_prompts = proxy_prompts
        self.progress = progress
        self.bar = _tqdm(progress)
        self.log = log
        self.backend = "reference" if self.device.type == "cpu" else None
        self._stats = None
        self._stats_error = None
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        self._init = {n: torch.empty_like(l.lora_A).uniform_(-1, 1, generator=gen)
                      for n, l in lora_layers(model).items()}

    def reset_adapters(self) -> None:
        """Identical starting adapters for every run: fixed random ``A`` (Kaiming scale), ``B = 0``."""
        with torch.no_grad():
            for name, layer in lora_layers(self.model).items():
                bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) bound
                layer.lora_A.copy_(self._init[name] * bound)
                layer.lora_B.zero_()

    def evaluate(self) -> dict:
        target_loss, token_acc = mean_ce(self.model, self.target_eval, self.device,
                                         accuracy=self.accuracy_fn is None)
        retention_loss, _ = mean_ce(self.model, self.retention_eval, self.device)
        acc = self.accuracy_fn(self.model) if self.accuracy_fn is not None else token_acc
        return {"target_loss": target_loss, "target_accuracy": acc,
                "retention_loss": retention_loss}

    def folora_stats(self):
        if self._stats is None and self._stats_error is None:
            optim, err = _folora_module()
            if optim is None:
                self._stats_error = err
                return None
            self.reset_adapters()
            f = self.cfg.folora
            proxy = optim.sample_proxy_data(self.model, n_samples=f["proxy_samples"],
                                            length=f["proxy_len"], prompts=self.proxy_prompts,
                                            seed=self.cfg.seed, progress=self.progress)
            task = self.train_batches[: max(1, min(len(self.train_batches), 8))]
            self._stats = optim.calibrate(self.model, proxy, task, progress=self.progress)
        return self._stats

    def run(self, method: str, kl_weight: float | None, base: dict) -> dict:
        cfg = self.cfg
        record = {"method": method, "kl_weight": kl_weight,
                  "base_retention_loss": base["retention_loss"],
                  "base_target_loss": base["target_loss"],
                  "base_target_accuracy": base["target_accuracy"]}
        self.reset_adapters()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if "folora" in method:
            stats = self.folora_stats()
            if stats is None:
                return {**record, "status": "skipped", "note": self._stats_error}
            optim, _ = _folora_module()
            f = {k: v for k, v in cfg.folora.items() if k in ("gate", "tau", "damping")}
            opt = optim.FoLoRA.from_model(self.model, stats, lr=cfg.adapt_lr, **f)
            self.reset_adapters()
        else:
            opt = torch.optim.AdamW(params, lr=cfg.adapt_lr, weight_decay=0.0)
        opts = {"backend": self.backend}
        if kl_weight is not None:
            opts["kl_weight"] = kl_weight
        step = ForgetAwareStep(self.model, loss=_loss_name(method), optimizer=opt,
                               max_grad_norm=1.0, **opts)
        marks = checkpoint_steps(cfg.adapt_steps, cfg.checkpoints)
        curve = [{"step": 0, **base, "forgetting": 0.0}]
        train_time, tokens = 0.0, 0
        label = method if kl_weight is None else f"{method} λ={kl_weight:g}"
        for i in self.bar(range(1, cfg.adapt_steps + 1), desc=f"adapt {label}", unit="step"):
            batch = self.train_batches[(i - 1) % len(self.train_batches)]
            m = step(batch)
            train_time += m["time_s"]
            tokens += m["tokens"]
            if i in marks:
                ev = self.evaluate()
                ev["forgetting"] = ev["retention_loss"] - base["retention_loss"]
                curve.append({"step": i, **ev})
        final = curve[-1]
        return {**record, "status": "ok", "target_loss": final["target_loss"],
                "target_accuracy": final["target_accuracy"],
                "retention_loss": final["retention_loss"], "forgetting": final["forgetting"],
                "train_time_s": train_time, "tokens_per_s": tokens / max(train_time, 1e-9),
                "curve": curve}

    def run_all(self) -> tuple[dict, list[dict]]:
        self.reset_adapters()
        base = self.evaluate()
        self.log(f"base model: target loss {base['target_loss']:.3f}, accuracy "
                 f"{base['target_accuracy']:.3f}, retention loss {base['retention_loss']:.4f}")
        results = []
        for method, w in runs_of(self.cfg):
            results.append(self.run(method, w, base))
        return base, results


# ------------------------------------------------------------------------- tiny-LM setup
def pretrain_tiny(cfg: DemoConfig, pretrain: torch.Tensor, *, use_cache: bool, progress: bool,
                  log=print) -> tuple[TinyLM, dict]:
    """The pretrained byte-level base model (cached under :func:`cache_dir` unless disabled)."""
    tcfg = TinyConfig(**cfg.model)
    key_src = json.dumps({"model": cfg.model, "steps": cfg.pretrain_steps,
                          "batch": cfg.pretrain_batch, "len": cfg.pretrain_len,
                          "lr": cfg.pretrain_lr, "seed": cfg.seed, "bytes": int(pretrain.numel()),
                          "crc": int(hashlib.sha1(pretrain.numpy().tobytes()).hexdigest()[:8], 16),
                          "torch": torch.__version__.split("+")[0], "v": 1}, sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"demo-base-{key}.pt")
    torch.manual_seed(cfg.seed)
    model = TinyLM(tcfg).to(cfg.device)
    if use_cache and os.path.exists(path):
        blob = torch.load(path, map_location=cfg.device, weights_only=True)
        model.load_state_dict(blob["state_dict"])
        log(f"loaded the pretrained base model from {path}")
        return model, {"pretrain_loss": float(blob["loss"]), "cached": True, "path": path}
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    warm = max(1, cfg.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.pretrain_steps))))
    ema = None
    bar = _tqdm(progress)(range(cfg.pretrain_steps), desc="pretrain on stdlib source", unit="step")
    start = time.perf_counter()
    for _ in bar:
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
        if bar.n % 10 == 0:
            bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    log(f"pretrained the base model: {cfg.pretrain_steps} steps in "
        f"{time.perf_counter() - start:.0f} s, train loss {ema:.3f} nats/byte")
    if use_cache:
        os.makedirs(cache_dir(), exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "loss": ema}, path)
    return model, {"pretrain_loss": ema, "cached": False, "path": path if use_cache else None}


def tiny_experiment(cfg: DemoConfig, *, use_cache: bool, progress: bool, log=print):
    pretrain, retention, names = D.load_corpus()
    log(f"corpus: {len(names)} stdlib files ({pretrain.numel() / 1e6:.2f} MB pretraining, "
        f"{retention.numel() / 1e6:.2f} MB held out for retention)")
    model, info = pretrain_tiny(cfg, pretrain, use_cache=use_cache, progress=progress, log=log)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    ret = D.windows(retention, cfg.retention_windows, cfg.pretrain_len, gen)
    retention_eval = [D.lm_batch(ret[i:i + 16]) for i in range(0, len(ret), 16)]
    train = D.arithmetic_batches(cfg.adapt_steps, cfg.adapt_batch, cfg.task_len, seed=cfg.seed)
    target_eval = D.arithmetic_batches(cfg.target_eval_batches, 16, cfg.task_len, seed=cfg.seed,
                                       split="eval")
    prompts, answers = D.arithmetic_eval_problems(cfg.accuracy_problems, seed=cfg.seed)
    inject_lora(model, cfg.targets, rank=cfg.rank, alpha=cfg.alpha)
    exp = Experiment(cfg, model, train, target_eval, retention_eval,
                     accuracy_fn=lambda m: arithmetic_accuracy(m, prompts, answers, cfg.device),
                     proxy_prompts=[[D.NEWLINE]], progress=progress, log=log)
    return exp, {"corpus_files": len(names), "pretrain_bytes": int(pretrain.numel()),
                 "retention_bytes": int(retention.numel()), **info}


# ------------------------------------------------------------------------------ HF setup
def hf_experiment(cfg: DemoConfig, model_dir: str, data_file: str, *, seq_len: int,
                  progress: bool, log=print):
    """Same comparison on a local HF causal LM; target = ``data_file``, retention = stdlib."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise SystemExit("--model needs transformers: pip install 'forgetkern[hf]'") from exc
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                 dtype=dtype).to(cfg.device)
    model.requires_grad_(False)
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
    _, retention, _ = D.load_corpus(max_bytes=400_000)
    ret_rows = chunks(bytes(retention.tolist()).decode("utf-8", errors="replace"))
    ret_rows = ret_rows[: cfg.retention_windows]
    b = cfg.adapt_batch
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randint(0, len(train_rows), (cfg.adapt_steps, b), generator=g)
    train = [D.lm_batch(train_rows[o]) for o in order]
    target_eval = [D.lm_batch(eval_rows[i:i + b]) for i in range(0, len(eval_rows), b)]
    retention_eval = [D.lm_batch(ret_rows[i:i + b]) for i in range(0, len(ret_rows), b)]
    inject_lora(model, cfg.targets, rank=cfg.rank, alpha=cfg.alpha)
    exp = Experiment(cfg, model, train, target_eval, retention_eval, accuracy_fn=None,
                     progress=progress, log=log)
    return exp, {"model_dir": model_dir, "data_file": data_file, "seq_len": seq_len,
                 "train_sequences": len(train_rows), "eval_sequences": len(eval_rows)}


# ------------------------------------------------------------------------------- output
def format_table(results: list[dict], base: dict, accuracy_name: str) -> str:
    head = (f"{'method':<13} {'kl_weight':>9} {'target loss':>11} {accuracy_name:>9} "
            f"{'retention':>10} {'Δ vs base':>10} {'tok/s':>7}")
    lines = [head, "-" * len(head),
             f"{'base model':<13} {'':>9} {base['target_loss']:>11.4f} "
             f"{base['target_accuracy']:>9.3f} {base['retention_loss']:>10.4f} {0:>+10.4f} {'':>7}"]
    for r in results:
        w = "" if r["kl_weight"] is None else f"{r['kl_weight']:g}"
        if r["status"] != "ok":
            lines.append(f"{r['method']:<13} {w:>9} skipped: {r['note']}")
            continue
        lines.append(f"{r['method']:<13} {w:>9} {r['target_loss']:>11.4f} "
                     f"{r['target_accuracy']:>9.3f} {r['retention_loss']:>10.4f} "
                     f"{r['forgetting']:>+10.4f} {r['tokens_per_s']:>7.0f}")
    return "\n".join(lines)


def comparisons(results: list[dict]) -> list[str]:
    """Forgetting of each regularized run vs CE's curve at the same target loss."""
    ce = next((r for r in results if r["method"] == "ce" and r["status"] == "ok"), None)
    if ce is None:
        return []
    out = []
    for r in results:
        if r["method"] == "ce" or r["status"] != "ok":
            continue
        ref = forgetting_at(ce["curve"], r["target_loss"])
        name = _run_name(r)
        if ref is None:
            out.append(f"{name}: target loss {r['target_loss']:.3f} is outside CE's curve "
                       f"(CE reached {ce['target_loss']:.3f}); no same-target-loss comparison")
        else:
            out.append(f"{name}: forgetting {r['forgetting']:+.4f} vs CE {ref:+.4f} at the same "
                       f"target loss {r['target_loss']:.3f}")
        if r["method"] == "tmkl":  # masked vs plain KL at the same weight and target loss
            kl = next((k for k in results if k["method"] == "kl" and k["status"] == "ok"
                       and k["kl_weight"] == r["kl_weight"]), None)
            if kl is not None:
                t = max(r["target_loss"], kl["target_loss"])  # reached by both runs
                mine, ref = forgetting_at(r["curve"], t), forgetting_at(kl["curve"], t)
                if mine is not None and ref is not None:
                    out.append(f"{name}: forgetting {mine:+.4f} vs plain KL {ref:+.4f} at the "
                               f"same target loss {t:.3f}")
    return out


METHOD_COLORS = {"ce": "#444444", "kl": "#1f77b4", "tmkl": "#d62728", "folora": "#2ca02c",
                 "tmkl+folora": "#9467bd"}


def _run_name(r: dict) -> str:
    return r["method"] + ("" if r["kl_weight"] is None else f" λ={r['kl_weight']:g}")


def write_plot(path: str, results: list[dict], title: str) -> bool:
    """PNG of the learning/forgetting frontier; ``False`` when matplotlib is missing.

    Left: every run's trajectory (target loss vs forgetting at the checkpoints), one colour per
    method, darker for larger ``kl_weight``. Right, when some method swept ``kl_weight``: each
    run's end point, joined across ``kl_weight`` per method, against CE's own trajectory (CE
    stopped early is the baseline every regularizer has to beat at equal target loss).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import to_rgb
    except ImportError:
        return False
    ok = [r for r in results if r["status"] == "ok"]
    weights = {}
    for r in ok:
        weights.setdefault(r["method"], []).append(r["kl_weight"])
    swept = any(len(w) > 1 for w in weights.values())

    def colour(r):
        rgb = to_rgb(METHOD_COLORS.get(r["method"], "#8c564b"))
        ws = sorted(w for w in weights[r["method"]] if w is not None)
        if r["kl_weight"] is None or len(ws) < 2:
            return rgb
        mix = 0.55 * (1 - ws.index(r["kl_weight"]) / (len(ws) - 1))  # small λ lighter
        return tuple(c + (1 - c) * mix for c in rgb)

    fig, axes = plt.subplots(1, 2 if swept else 1, figsize=(12.5 if swept else 7, 5),
                             squeeze=False)
    ax = axes[0, 0]
    for r in ok:
        xs = [c["forgetting"] for c in r["curve"]]
        ys = [c["target_loss"] for c in r["curve"]]
        ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.2, color=colour(r),
                label=_run_name(r))
    ax.set_title("trajectories during adaptation" if swept else title, fontsize=10)
    ax.legend(fontsize=7, ncol=2 if len(ok) > 8 else 1)
    if swept:
        ax = axes[0, 1]
        ce = next((r for r in ok if r["method"] == "ce"), None)
        if ce is not None:
            ax.plot([c["forgetting"] for c in ce["curve"]], [c["target_loss"] for c in ce["curve"]],
                    linestyle="--", color=METHOD_COLORS["ce"], linewidth=1.2,
                    label="ce (trajectory: stopped early)")
        for method, ws in weights.items():
            runs = sorted((r for r in ok if r["method"] == method),
                          key=lambda r: -1.0 if r["kl_weight"] is None else r["kl_weight"])
            xs, ys = [r["forgetting"] for r in runs], [r["target_loss"] for r in runs]
            ax.plot(xs, ys, marker="o", markersize=5, color=colour(runs[-1]),
                    label=f"{method} (end points" + (", λ swept)" if len(runs) > 1 else ")"))
            for r, x, y in zip(runs, xs, ys):
                if r["kl_weight"] is not None and len(runs) > 1:
                    ax.annotate(f"{r['kl_weight']:g}", (x, y), fontsize=7, xytext=(4, 2),
                                textcoords="offset points", color=colour(runs[-1]))
        ax.set_title("end of adaptation, per kl_weight", fontsize=10)
        ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=11)
    for ax in axes[0]:
        ax.set_xlabel("forgetting: retention loss − base model's (nats/token)")
        ax.set_ylabel("target loss (held-out, nats/token)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="does forgetting-aware LoRA forget less? (CPU, no download)",
                       description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one kl_weight, ~2 minutes on 2 CPU cores")
    size.add_argument("--smoke", action="store_true", help="tiny sizes for CI (well under a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--kl-weights", default=None, help="comma-separated kl_weight values to sweep")
    p.add_argument("--steps", type=int, default=None, help="adaptation steps per run")
    p.add_argument("--lr", type=float, default=None, help="adaptation learning rate")
    p.add_argument("--json", default=None, metavar="PATH", help="write config and results as JSON")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="no training: print the table and write the plot of a run saved with --json")
    p.add_argument("--plot", default="forgetkern-demo.png", metavar="PATH",
                   help="PNG of the learning/forgetting frontier (default %(default)s)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-cache", action="store_true",
                   help=f"neither read nor write the pretrained base in {cache_dir()}")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present "
                   "for --model, else cpu)")
    p.add_argument("--model", default=None, metavar="DIR", help="local HF causal-LM directory")
    p.add_argument("--data", default=None, metavar="FILE", help="target text file (with --model)")
    p.add_argument("--targets", default=None,
                   help="comma-separated LoRA target module names (default: attention and MLP)")
    p.add_argument("--seq-len", type=int, default=256, help="sequence length with --model")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the built-in tiny model, whose small "
                        "matmuls gain nothing from more and slow down a lot on a busy machine; "
                        "torch's default with --model)")
    p.set_defaults(func=main)


def build_config(args) -> DemoConfig:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = replace(DemoConfig(), mode=mode, seed=args.seed, **PRESETS[mode])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    cfg.methods = methods
    if args.kl_weights:
        cfg.kl_weights = [float(w) for w in args.kl_weights.split(",")]
    if args.steps:
        cfg.adapt_steps = args.steps
    if args.lr:
        cfg.adapt_lr = args.lr
    if args.targets:
        cfg.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.device:
        cfg.device = args.device
    elif args.model and torch.cuda.is_available():
        cfg.device = "cuda"
    if args.model:
        cfg.model = {"hf": args.model}
        if not args.targets:
            cfg.targets = list(HF_TARGETS)
    return cfg


def main(args) -> int:
    if (args.model is None) != (args.data is None):
        raise SystemExit("--model and --data go together")
    threads = torch.get_num_threads()
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) keep theirs


def _writable(path: str, flag: str) -> None:
    """Fail now, not after the whole run, when ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise SystemExit(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    if not existed:
        os.remove(path)


def check_inputs_and_outputs(args) -> None:
    """Every path the run reads or writes, checked before any training."""
    if args.model is not None and not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model}: no such folder (a local Hugging Face model "
                         "folder with config.json and weights)")
    if args.data is not None and not os.path.isfile(args.data):
        raise SystemExit(f"--data {args.data}: no such file")
    if args.json:
        _writable(args.json, "--json")
    if not args.no_plot:
        _writable(args.plot, "--plot")


def _main(args) -> int:
    if args.from_json:
        return replay(args)
    check_inputs_and_outputs(args)
    cfg = build_config(args)
    progress = not args.no_progress
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    threads = args.threads if args.threads is not None else (None if args.model else 1)
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    if args.model:
        exp, info = hf_experiment(cfg, args.model, args.data, seq_len=args.seq_len,
                                  progress=progress, log=log)
    else:
        exp, info = tiny_experiment(cfg, use_cache=not args.no_cache, progress=progress, log=log)
    base, results = exp.run_all()
    elapsed = time.perf_counter() - start
    config = {**asdict(cfg), **info, "python": platform.python_version(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "elapsed_s": elapsed}
    report(config, base, results, args)
    if args.json:
        payload = {"config": config, "base": base, "results": results}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"json: {args.json}")
    return 0


def report(config: dict, base: dict, results: list[dict], args) -> None:
    """Print the table and the equal-target-loss comparisons; write the plot unless --no-plot."""
    hf = isinstance(config.get("model"), dict) and "hf" in config["model"]
    if hf:
        title = f"{os.path.basename(str(config['model']['hf']).rstrip('/'))}: learning vs forgetting"
    else:
        title = (f"forgetkern demo ({config.get('mode', '?')}, seed {config.get('seed', '?')}): "
                 "stdlib LM → 2-digit addition")
    print()
    print(format_table(results, base, "token acc" if hf else "accuracy"))
    for line in comparisons(results):
        print("  " + line)
    elapsed = config.get("elapsed_s")
    print(f"\ntarget: held-out {'text' if hf else 'problems'}; retention: held-out stdlib source; "
          f"same steps/lr/rank/init per run"
          + ("" if elapsed is None else f"; total {elapsed:.0f} s on {config.get('device', '?')}"))
    if not args.no_plot:
        if write_plot(args.plot, results, title):
            print(f"plot: {args.plot}")
        else:
            print("plot skipped: matplotlib is not installed (pip install 'forgetkern[demo]')")


def replay(args) -> int:
    """``--from-json PATH``: the table, comparisons and plot of a saved run, without training."""
    if args.json:
        raise SystemExit("--from-json replays a saved run; there is nothing new for --json to write")
    try:
        with open(args.from_json) as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--from-json: cannot read {args.from_json}: {e}") from None
    missing = [k for k in ("config", "base", "results") if k not in payload]
    if missing:
        raise SystemExit(f"--from-json: {args.from_json} is not a demo result "
                         f"(missing {', '.join(missing)})")
    report(payload["config"], payload["base"], payload["results"], args)
    return 0
