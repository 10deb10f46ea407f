"""HF ``transformers`` Trainer integration (extra ``forgetkern[hf]`` = transformers + peft).

The loss of any ``transformers.Trainer`` (and of TRL's ``SFTTrainer``) becomes CE + target-masked
KL to the frozen base model (or plain KL, or CE alone), computed from the last hidden state and the
effective LM head by :func:`forgetkern.linear_tmkl_loss` (no ``N x V`` logits materialized) when
the model allows it (see :mod:`forgetkern.modeling`), else from the logits. The base model is the
same PEFT/forgetkern-LoRA model with its adapters disabled. Three ways in, one implementation
(:class:`TMKLMixin`):

* :class:`TMKLTrainer`: a drop-in ``Trainer``;
* :func:`tmkl_trainer_class`: ``tmkl_trainer_class(MyTrainer)`` is ``MyTrainer`` with the TMKL
  loss (any ``Trainer`` subclass, ``trl.SFTTrainer`` included), taking the same ``tmkl_*``
  keyword arguments as :class:`TMKLTrainer`;
* :func:`apply_tmkl`: one line on a trainer already built, ``apply_tmkl(trainer, kl_weight=1.0)``;
  its class stays a subclass of the user's.

Labels follow the causal-LM convention (shifted inside, ``-100`` ignored; a ``shift_labels``
entry in the batch is used as is), batches are any mapping of tensors (``BatchEncoding`` from HF's
collators included), and the loss is normalized by the Trainer's ``num_items_in_batch`` so
gradient accumulation gives the full-batch token mean.

Example::

    from peft import LoraConfig, get_peft_model
    from forgetkern.integrations.hf import TMKLTrainer

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainer = TMKLTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                          tmkl_loss="tmkl", tmkl_options={"kl_weight": 1.0})
    trainer.train()
"""
from __future__ import annotations

import functools

import torch

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("forgetkern.integrations.hf needs transformers: "
                      "pip install 'forgetkern[hf]'") from exc

from ..lora import has_adapters
from ..train import config_loss, loss_config

__all__ = ["TMKLMixin", "TMKLTrainer", "tmkl_trainer_class", "apply_tmkl", "compute_tmkl_loss"]


def compute_tmkl_loss(model, inputs, *, loss: str = "tmkl", num_items_in_batch=None,
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


def _trl_classes(cls) -> list:
    return [c for c in cls.__mro__ if c.__module__.split(".")[0] == "trl"]


def _setup(trainer, config, base_cache) -> None:
    """Make ``trainer`` (a :class:`TMKLMixin`) train with ``config``; every refusal is here."""
    name = next(c.__name__ for c in type(trainer).__mro__ if not issubclass(c, TMKLMixin))
    trainer._tmkl_sft = False
    if _trl_classes(type(trainer)):
        from . import trl as _trl  # only for TRL trainers: trl is installed then

        trainer._tmkl_sft = _trl.check_trainer(trainer, name, base_cache)
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError(f"{name} has a compute_loss_func; the TMKL loss replaces the trainer's loss, "
                         "so remove it (or do not apply TMKL)")
    if config.uses_base and not has_adapters(trainer.model):
        raise ValueError(f"loss={config.loss!r} compares the model with its base model (adapters "
                         "off), but the trainer's model has no adapters: wrap it with "
                         "peft.get_peft_model (or pass peft_config to SFTTrainer) or "
                         "forgetkern.lora.inject_lora first, or use loss='ce'")
    trainer.tmkl_config = config
    trainer.base_cache = base_cache
    if base_cache is not None:
        base_cache.check(trainer.model, config)
    # the loss is normalized by num_items_in_batch itself: ask the Trainer to count the items and
    # not to divide by the accumulation steps again
    trainer.model_accepts_loss_kwargs = True
    trainer._loss_shifts_labels = True  # count num_items_in_batch over labels[..., 1:]
    trainer._tmkl_sums = {}  # training components since the last log
    trainer._tmkl_logged_step = 0


class TMKLMixin:
    """The TMKL loss for a ``transformers.Trainer`` subclass (put it first among the bases).

    Args (keyword, next to the trainer's own):
        tmkl_loss: ``"tmkl"`` (default), ``"kl"`` (plain KL, ``mask_target=False``) or ``"ce"``.
        tmkl_options: ``kl_weight``, ``ce_weight``, ``temperature``, ``direction``, ``backend``,
            ``chunk_size`` (see :func:`forgetkern.tmkl_loss`).
        tmkl_path: ``"auto"``, ``"fused"`` or ``"logits"``.
        base_cache: a :class:`forgetkern.cache.BaseCache` of the base model's outputs on the
            training data: no base forward. The batches must carry ``example_id`` (set
            ``remove_unused_columns=False`` so that the Trainer keeps that column).

    Next to the Trainer's ``loss`` the components are logged as ``tmkl_ce`` and ``tmkl_kl``, on the
    same scale: summed over the micro-batches of each optimizer step (each is a mean over the whole
    batch's ``num_items_in_batch``) and averaged over the steps since the last log. On TRL's
    ``SFTTrainer`` its own metrics (``entropy``, ``mean_token_accuracy``, ``num_tokens``) are
    logged as SFT logs them, from the adapted model of the same forward.
    """

    def __init__(self, *args, tmkl_loss: str = "tmkl", tmkl_options: dict | None = None,
                 tmkl_path: str = "auto", base_cache=None, **kwargs):
        # every option is validated here, once, before the trainer is built
        config = loss_config(tmkl_loss, path=tmkl_path, **dict(tmkl_options or {}))
        super().__init__(*args, **kwargs)
        _setup(self, config, base_cache)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = config_loss(model, inputs, self.tmkl_config, num_items_in_batch=num_items_in_batch,
                          shift_labels=True, base_cache=self.base_cache, statistics=self._tmkl_sft)
        scale = 1
        if (num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False)
                and self.accelerator.num_processes > 1):
            # num_items_in_batch counts every process's tokens; DDP averages the gradients
            scale = self.accelerator.num_processes // getattr(self, "_tp_size", 1)
        loss = out.loss * scale if scale != 1 else out.loss
        if model.training:
            parts = {"tmkl_ce": out.ce} if out.kl is None else {"tmkl_ce": out.ce, "tmkl_kl": out.kl}
            for key, value in parts.items():
                self._tmkl_sums[key] = self._tmkl_sums.get(key, 0.0) + float(value) * scale
        if self._tmkl_sft:
            from . import trl as _trl

            _trl.record_metrics(self, inputs, out.statistics)
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


class TMKLTrainer(TMKLMixin, Trainer):
    """``transformers.Trainer`` training with CE + (target-masked) KL to the base model; takes
    :class:`TMKLMixin`'s ``tmkl_*`` and ``base_cache`` keyword arguments."""


@functools.cache
def tmkl_trainer_class(trainer_class: type) -> type:
    """``trainer_class`` (a ``transformers.Trainer`` subclass: your own, ``trl.SFTTrainer``, ...)
    with the TMKL loss: ``TMKLMixin`` first among its bases, so it takes the ``tmkl_*`` keyword
    arguments of :class:`TMKLMixin` and is still a ``trainer_class``.

    Example::

        from trl import SFTTrainer
        trainer = tmkl_trainer_class(SFTTrainer)(model=model, args=sft_config, train_dataset=ds,
                                                 tmkl_options={"kl_weight": 1.0})
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"trainer_class must be a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, TMKLMixin):
        return trainer_class
    return type(f"TMKL{trainer_class.__name__}", (TMKLMixin, trainer_class),
                {"__module__": __name__, "__doc__": trainer_class.__doc__})


def apply_tmkl(trainer, loss: str = "tmkl", *, path: str = "auto", base_cache=None, **options):
    """Make an already built ``trainer`` (any ``transformers.Trainer`` subclass, TRL's
    ``SFTTrainer`` included) train with ``loss`` (``"tmkl"``, ``"kl"``, ``"ce"``) and ``options``
    (``kl_weight``, ``temperature``, ...), the base model being the trainer's model with its
    adapters disabled. The trainer's class becomes ``tmkl_trainer_class(type(trainer))``, a
    subclass of its own. Returns ``trainer``.

    Example::

        trainer = SFTTrainer(model=model, args=sft_config, train_dataset=ds, peft_config=lora)
        apply_tmkl(trainer, kl_weight=1.0)
        trainer.train()
    """
    config = loss_config(loss, path=path, **options)
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
    trainer.__class__ = tmkl_trainer_class(type(trainer))
    _setup(trainer, config, base_cache)
    return trainer
