"""HF ``transformers`` Trainer integration (extra ``forgetkern[hf]`` = transformers + peft).

:class:`TMKLTrainer` is a drop-in ``transformers.Trainer`` whose loss is CE + target-masked KL to
the frozen base model (or plain KL, or CE alone), computed from the last hidden state and the
LM-head weight by :func:`forgetkern.linear_tmkl_loss` (no ``N x V`` logits materialized) when the
model allows it (see :mod:`forgetkern.train`), else from the logits. The base model is the same
PEFT/forgetkern-LoRA model with its adapters disabled (``model.disable_adapter()``).

Labels follow the causal-LM convention (shifted inside, ``-100`` ignored; a ``shift_labels``
entry in the batch is used as is), and the loss is normalized by the Trainer's
``num_items_in_batch`` so gradient accumulation gives the full-batch token mean.

Example::

    from peft import LoraConfig, get_peft_model
    from forgetkern.integrations.hf import TMKLTrainer

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainer = TMKLTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                          tmkl_loss="tmkl", tmkl_options={"kl_weight": 1.0})
    trainer.train()
"""
from __future__ import annotations

import torch

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("forgetkern.integrations.hf needs transformers: "
                      "pip install 'forgetkern[hf]'") from exc

from ..train import config_loss, loss_config

__all__ = ["TMKLTrainer", "compute_tmkl_loss"]


def compute_tmkl_loss(model, inputs: dict, *, loss: str = "tmkl", num_items_in_batch=None,
                      path: str = "auto", ignore_index: int = -100, **options):
    """Forgetting-aware loss of an HF causal-LM batch (``labels`` unshifted, HF convention).

    In plain torch::

        with torch.no_grad(), model.disable_adapter():
            base = model(**inputs).logits                     # (B, L, V)
        logits = model(**inputs).logits                       # (B, L, V)
        y = F.pad(labels[:, 1:], (0, 1), value=-100)           # (B, L)
        loss = tmkl_loss(logits, base, y, num_items_in_batch=num_items_in_batch, **options)

    but from hidden states and the head weight when possible. Returns ``(loss, LossOutput)``.
    """
    config = loss_config(loss, path=path, ignore_index=ignore_index, **options)
    out = config_loss(model, inputs, config, num_items_in_batch=num_items_in_batch,
                      shift_labels=True)
    return out.loss, out


class TMKLTrainer(Trainer):
    """``transformers.Trainer`` training with CE + (target-masked) KL to the base model.

    Args:
        tmkl_loss: ``"tmkl"`` (default), ``"kl"`` (plain KL, ``mask_target=False``) or ``"ce"``.
        tmkl_options: ``kl_weight``, ``ce_weight``, ``temperature``, ``direction``, ``backend``,
            ``chunk_size`` (see :func:`forgetkern.tmkl_loss`).
        tmkl_path: ``"auto"``, ``"fused"`` or ``"logits"``.
        base_cache: a :class:`forgetkern.cache.BaseCache` of the base model's outputs on the
            training data: no base forward. The batches must carry ``example_id`` (set
            ``remove_unused_columns=False`` so that the Trainer keeps that column).
        *args, **kwargs: everything ``transformers.Trainer`` takes.

    Next to the Trainer's ``loss`` the components are logged as ``tmkl_ce`` and ``tmkl_kl``, on the
    same scale: summed over the micro-batches of each optimizer step (each is a mean over the whole
    batch's ``num_items_in_batch``) and averaged over the steps since the last log.
    """

    def __init__(self, *args, tmkl_loss: str = "tmkl", tmkl_options: dict | None = None,
                 tmkl_path: str = "auto", base_cache=None, **kwargs):
        # every option is validated here, once, before the Trainer is built
        self.tmkl_config = loss_config(tmkl_loss, path=tmkl_path, **dict(tmkl_options or {}))
        super().__init__(*args, **kwargs)
        self.base_cache = base_cache
        if base_cache is not None:
            base_cache.check(self.model, self.tmkl_config)
        # Our loss is normalized by num_items_in_batch itself: ask the Trainer to count the items
        # and not to divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True  # count num_items_in_batch over labels[..., 1:]
        self._tmkl_sums: dict = {}  # training components since the last log
        self._tmkl_logged_step = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = config_loss(model, inputs, self.tmkl_config, num_items_in_batch=num_items_in_batch,
                          shift_labels=True, base_cache=self.base_cache)
        scale = 1
        if (num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False)
                and self.accelerator.num_processes > 1):
            # num_items_in_batch counts every process's tokens; DDP averages the gradients
            scale = self.accelerator.num_processes
        loss = out.loss * scale if scale != 1 else out.loss
        if model.training:
            parts = {"tmkl_ce": out.ce} if out.kl is None else {"tmkl_ce": out.ce, "tmkl_kl": out.kl}
            for key, value in parts.items():
                self._tmkl_sums[key] = self._tmkl_sums.get(key, 0.0) + float(value) * scale
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs and self._tmkl_sums:
            steps = max(1, self.state.global_step - self._tmkl_logged_step)
            keys = sorted(self._tmkl_sums)
            values = [self._tmkl_sums[k] / steps for k in keys]
            if self.accelerator.num_processes > 1:
                # each process holds its share of the global mean times the world size: their
                # mean is the global mean (as for the Trainer's own "loss", gathered just before)
                t = torch.tensor(values, dtype=torch.float64, device=self.args.device)
                values = self.accelerator.reduce(t, reduction="mean").tolist()
            logs = {**logs, **dict(zip(keys, values))}
            self._tmkl_sums = {}
            self._tmkl_logged_step = self.state.global_step
        return super().log(logs, *args, **kwargs)
