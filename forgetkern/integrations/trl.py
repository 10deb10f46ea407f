"""TRL integration (extra ``forgetkern[trl]``): ``SFTTrainer`` training with the TMKL loss.

:class:`TMKLSFTTrainer` is ``trl.SFTTrainer`` with :class:`forgetkern.integrations.hf.TMKLMixin`
first among its bases (``tmkl_trainer_class(SFTTrainer)``); ``apply_tmkl(sft_trainer, ...)`` does
the same to a trainer already built. SFT's data handling (chat templates, completion-only and
assistant-only labels, packing, padding-free batches) is kept as is; only the loss changes. SFT's
own metrics (``entropy``, ``mean_token_accuracy``, ``num_tokens``) are logged as SFT logs them,
computed from the adapted model of the same forward (on the fused path: the hidden states times
the head once more, in chunks, without gradient).

Example::

    from peft import LoraConfig
    from trl import SFTConfig
    from forgetkern.integrations.trl import TMKLSFTTrainer

    trainer = TMKLSFTTrainer(model=model, args=SFTConfig("out"), train_dataset=ds,
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                             tmkl_options={"kl_weight": 1.0})
    trainer.train()
"""
from __future__ import annotations

import torch

try:
    from trl import SFTTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("forgetkern.integrations.trl needs trl: pip install 'forgetkern[trl]'") from exc

from .hf import tmkl_trainer_class

__all__ = ["TMKLSFTTrainer", "check_trainer", "record_metrics"]


def check_trainer(trainer, name: str, base_cache) -> bool:
    """Raise unless the TMKL loss can stand in for this TRL trainer's loss; ``True`` for an
    ``SFTTrainer`` (whose metrics :func:`record_metrics` keeps)."""
    if not isinstance(trainer, SFTTrainer):
        raise ValueError(f"{name} trains another objective than next-token cross-entropy; the TMKL "
                         "loss (CE + KL to the base model) replaces only SFTTrainer's loss")
    args = trainer.args
    if getattr(args, "loss_type", "nll") != "nll":
        raise ValueError(f"{name}: SFTConfig(loss_type={args.loss_type!r}) is another objective "
                         "than the cross-entropy TMKL extends; use loss_type='nll'")
    if getattr(trainer, "label_smoother", None) is not None:
        raise ValueError(f"{name}: label_smoothing_factor={args.label_smoothing_factor} changes the "
                         "cross-entropy; the TMKL loss has no label smoothing")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError(f"{name}: the model's router auxiliary loss (router_aux_loss_coef) would be "
                         "dropped by the TMKL loss; set router_aux_loss_coef=0.0")
    if base_cache is not None:
        raise ValueError(f"{name}: a base cache leaves no adapted-model statistics for SFT's "
                         "entropy and token accuracy; train SFTTrainer with the live base forward")
    return True


def record_metrics(trainer, inputs, statistics) -> None:
    """SFT's ``entropy``, ``mean_token_accuracy`` and ``num_tokens``, from ``statistics`` =
    ``(tokens, entropy sum, top-1 hits)`` of this micro-batch, gathered over the processes."""
    mode = "train" if trainer.model.training else "eval"
    device = trainer.args.device
    n, entropy, hits = (trainer.accelerator.gather_for_metrics(
        torch.tensor(statistics, dtype=torch.float64, device=device).view(1, 3)).sum(0).tolist())
    trainer._metrics[mode]["entropy"].append(entropy / n if n else 0.0)
    trainer._metrics[mode]["mean_token_accuracy"].append(hits / n if n else 0.0)
    if mode == "train":
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:  # padding-free: one packed row
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        else:
            raise ValueError("SFT batches carry 'attention_mask' or 'position_ids'")
        tokens = int(trainer.accelerator.gather_for_metrics(local.reshape(1)).sum())
        trainer._total_train_tokens += tokens // getattr(trainer, "_tp_size", 1)
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


TMKLSFTTrainer = tmkl_trainer_class(SFTTrainer)
TMKLSFTTrainer.__doc__ = """``trl.SFTTrainer`` training with CE + (target-masked) KL to the base
model; takes the ``tmkl_*`` keyword arguments of :class:`forgetkern.integrations.hf.TMKLMixin`."""
