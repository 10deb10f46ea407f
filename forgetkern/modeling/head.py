"""A causal LM's final hidden states and its effective LM head, as the fused-linear loss needs them.

:func:`lm_parts` splits a model into ``hidden(**inputs) -> (B, L, D)`` and its head: a plain
``nn.Linear``, a LoRA-adapted head (forgetkern ``LoRALinear`` or PEFT LoRA on ``lm_head``, also
with tied embeddings: the effective weight is ``W0 + scaling * B @ A``, the base weight ``W0``), or
a head PEFT trains as a whole (``modules_to_save``: the trained copy against the original).
:func:`head_transform` reads what the model applies to ``head(hidden)`` (a logit scale and a
soft cap, from its config). The first call of ``hidden`` on a model checks, once, that the model's
own logits equal the transformed effective head applied to those hidden states (a few positions of
the first example): any other transformation raises instead of training another objective.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import full_weight, is_linear, routed, unwrap
from ..lora import is_peft_model
from ..lora.discovery import logits_of
from ..lora.layer import LoRALinear

# config attribute -> how it acts on head(hidden); Granite-style models divide by logits_scaling,
# HyperCLOVA X multiplies by it
_SCALE_ATTRIBUTES = {"logit_scale": "mul", "logits_scaling": "div", "lm_head_multiplier": "mul",
                     "output_multiplier": "mul"}
_SOFTCAP_ATTRIBUTE = "final_logit_softcapping"
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)
#: positions of the first example compared by the one-time check, and its tolerance per dtype
#: (relative to ``1 + max |logit|``)
CHECK_POSITIONS = 16
CHECK_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


class HeadTransform(NamedTuple):
    """What a model applies to ``head(hidden)``: ``c * tanh(s * z / c)`` with ``s =
    logit_scale`` and ``c = logit_softcap`` (no cap when ``None``): the scale first, then the cap."""

    logit_scale: float = 1.0
    logit_softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.logit_scale == 1.0 and self.logit_softcap is None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def _inner(model: nn.Module) -> nn.Module:
    model = unwrap(model)
    return model.get_base_model() if is_peft_model(model) else model


def _text_config(model: nn.Module):
    cfg = getattr(_inner(model), "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def transform_attributes(model: nn.Module) -> list[str]:
    """The config attributes behind :func:`head_transform`, as ``"config.NAME=VALUE"``."""
    text = _text_config(model)
    names = (*_SCALE_ATTRIBUTES, _SOFTCAP_ATTRIBUTE)
    return [f"config.{a}={getattr(text, a)!r}" for a in names
            if text is not None and getattr(text, a, None) is not None]


def head_transform(model: nn.Module) -> HeadTransform:
    """``(logit_scale, logit_softcap)`` the model applies after its LM head, from its (text)
    config: ``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere), ``logits_scaling``
    (Granite divides, HyperCLOVA X multiplies), ``lm_head_multiplier`` (Falcon-H1),
    ``output_multiplier``. A value forgetkern cannot reproduce (not a finite number, a cap or a
    divisor that is not positive, a zero scale) raises a ``ValueError`` naming the model class and
    the attribute. Transformations that no config attribute announces are caught by the one-time
    check of :func:`lm_parts`'s hidden-state function."""
    text = _text_config(model)
    if text is None:
        return HeadTransform()
    name = type(_inner(model)).__name__
    scale, cap = 1.0, None

    def number(attr, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: config.{attr}={value!r} is not a finite number; forgetkern "
                             "cannot reproduce this head transformation")
        return float(value)

    for attr, op in _SCALE_ATTRIBUTES.items():
        value = getattr(text, attr, None)
        if value is None:
            continue
        value = number(attr, value)
        if op == "div" and getattr(text, "model_type", None) in _MULTIPLYING_LOGITS_SCALING:
            op = "mul"
        if value == 0 or (op == "div" and value < 0):
            raise ValueError(f"{name}: config.{attr}={value!r} ({'divides' if op == 'div' else 'multiplies'}"
                             " the logits): forgetkern cannot reproduce this head transformation")
        scale *= value if op == "mul" else 1.0 / value
    value = getattr(text, _SOFTCAP_ATTRIBUTE, None)
    if value is not None:
        cap = number(_SOFTCAP_ATTRIBUTE, value)
        if cap <= 0:
            raise ValueError(f"{name}: config.{_SOFTCAP_ATTRIBUTE}={value!r}: a soft cap must be > 0; "
                             "forgetkern cannot reproduce this head transformation")
    return HeadTransform(scale, cap)


class HeadWeights(NamedTuple):
    """The head as tensors: ``weight``/``bias`` of the model as it is now (adapters on or off),
    ``base_weight``/``base_bias`` of the base model (``base_weight=None``: the same tensor)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    base_weight: torch.Tensor | None
    base_bias: torch.Tensor | None

    def linear_kwargs(self) -> dict:
        """``base_weight``, ``bias``, ``base_bias`` as :func:`forgetkern.linear_tmkl_loss` takes them."""
        return {"base_weight": self.base_weight, "bias": self.bias, "base_bias": self.base_bias}


def _peft_types():
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear
        from peft.utils.other import ModulesToSaveWrapper
    except Exception:  # peft missing or broken: no PEFT head to recognize
        return None, None
    return PeftLoraLinear, ModulesToSaveWrapper


def _head_kind(head) -> tuple[str | None, str]:
    """``(kind, why not)``: ``"linear"``, ``"lora"``, ``"peft_lora"``, ``"modules_to_save"``, or
    ``None`` with the reason the head has no fused form."""
    if is_linear(head):
        return "linear", ""
    what = type(head).__name__
    if isinstance(head, LoRALinear):
        if not isinstance(head.dropout, nn.Identity):
            return None, "the LoRA on the LM head has dropout (its output is not one linear map)"
        return "lora", ""
    lora_type, saved_type = _peft_types()
    if lora_type is not None and isinstance(head, lora_type):
        if not isinstance(head.base_layer, nn.Linear):
            return None, f"the PEFT LoRA head wraps a {type(head.base_layer).__name__}"
        for a in head.active_adapters:
            if a not in head.lora_A:
                continue
            if a in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(a):
                return None, f"the PEFT LoRA head's adapter {a!r} is a LoRA variant (e.g. DoRA)"
            if head.lora_B[a].bias is not None:
                return None, f"the PEFT LoRA head's adapter {a!r} has a bias (lora_bias)"
            drop = head.lora_dropout[a]
            if isinstance(drop, nn.Dropout) and drop.p > 0:
                return None, f"the PEFT LoRA head's adapter {a!r} has lora_dropout={drop.p}"
        return "peft_lora", ""
    if saved_type is not None and isinstance(head, saved_type):
        mods = [head.original_module, *head.modules_to_save.values()]
        if all(type(m) is nn.Linear for m in mods):
            return "modules_to_save", ""
        return None, "a modules_to_save head that is not an nn.Linear"
    return None, f"the LM head is a {what}, not an nn.Linear or a LoRA-adapted one"


def head_weights(head: nn.Module, kind: str) -> HeadWeights:
    """The tensors of a head of kind ``kind`` (:func:`_head_kind`) in its current adapter state;
    the adapted weight is differentiable w.r.t. the adapter parameters."""
    if kind == "linear":
        w = full_weight(head.weight)
        b = None if head.bias is None else full_weight(head.bias)
        return HeadWeights(w, b, None, None)
    if kind == "modules_to_save":
        base = head.original_module
        on = not head.disable_adapters and head.active_adapters
        cur = head.modules_to_save[head.active_adapters[0]] if on else base
        return HeadWeights(cur.weight, cur.bias, base.weight, base.bias)
    base = head.base if kind == "lora" else head.base_layer
    if head.merged:
        raise ValueError("the LM head's adapters are merged into its weight: unmerge them "
                         "(forgetkern.lora.unmerge_adapters or PEFT's unmerge_adapter) first")
    w0, b0 = base.weight, base.bias
    if kind == "lora":
        deltas = [head.delta_weight()] if head.adapters_enabled else []
    else:
        deltas = [] if head.disable_adapters else [
            head.get_delta_weight(a) for a in head.active_adapters if a in head.lora_A]
    w = w0
    if deltas:  # summed in fp32: a small update would round away in a low-precision weight
        w = (w0.float() + sum(d.float() for d in deltas)).to(w0.dtype)
    return HeadWeights(w, b0, w0, b0)


@dataclass(frozen=True)
class LMParts:
    """A model as the fused-linear loss reads it: ``hidden(**inputs)`` gives its ``(B, L, D)``
    final hidden states, ``head`` is its output-embedding module (of kind ``kind``) and
    ``transform`` what it applies to the head's output."""

    hidden: Callable[..., torch.Tensor]
    head: nn.Module
    kind: str
    transform: HeadTransform

    @property
    def plain(self) -> bool:
        """A plain shared linear head and logits ``head(hidden)`` as they are."""
        return self.kind == "linear" and self.transform.identity

    def weights(self) -> HeadWeights:
        return head_weights(self.head, self.kind)

    def logits(self, hidden: torch.Tensor, weights: HeadWeights | None = None) -> torch.Tensor:
        """The model's logits from its hidden states: ``transform(hidden @ W.T + b)``."""
        w = self.weights() if weights is None else weights
        bias = None if w.bias is None else w.bias.to(hidden.dtype)
        return self.transform.apply(F.linear(hidden, w.weight.to(hidden.dtype), bias))


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block (dropout off), its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _split(model: nn.Module):
    """``(hidden_fn, head)`` of ``model`` (unrouted) or ``(None, why)``."""
    target = unwrap(model)  # DDP / FSDP2: the hidden function runs through their forward
    if hasattr(target, "forward_hidden") and hasattr(target, "get_output_embeddings"):
        return target.forward_hidden, target.get_output_embeddings()
    inner = _inner(target)
    if not (hasattr(inner, "get_output_embeddings") and hasattr(inner, "config")):
        return None, (f"{type(inner).__name__} exposes neither forward_hidden() + "
                      "get_output_embeddings() nor an HF backbone and output embeddings")
    backbone = getattr(inner, "base_model", inner)
    if backbone is inner or backbone is None:
        return None, f"{type(inner).__name__} has no backbone (base_model) apart from its head"

    def hidden_fn(**inputs):
        out = backbone(**{**inputs, "use_cache": False})
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    return hidden_fn, inner.get_output_embeddings()


def find_parts(model: nn.Module) -> tuple[LMParts | None, str]:
    """``(parts, "")``, or ``(None, why the model has no fused form)``. Raises when the head
    transformation is one forgetkern cannot reproduce (:func:`head_transform`)."""
    hidden_fn, head = _split(model)
    if hidden_fn is None:
        return None, head
    kind, why = _head_kind(head)
    if kind is None:
        return None, why
    transform = head_transform(model)
    parts = LMParts(hidden_fn, head, kind, transform)
    return LMParts(_checked(model, parts, routed(model, hidden_fn)), head, kind, transform), ""


def lm_parts(model: nn.Module) -> LMParts | None:
    """The model's :class:`LMParts`, or ``None`` when it has no fused form (a head that is not
    linear, LoRA with dropout on the head, a model returning only logits)."""
    return find_parts(model)[0]


def require_lm_parts(model: nn.Module) -> LMParts:
    """:func:`lm_parts`, raising a ``ValueError`` that says why when there is none."""
    parts, why = find_parts(model)
    if parts is None:
        raise ValueError(f"no fused-linear form for {type(_inner(model)).__name__}: {why}")
    return parts


# ---- the one-time check: the model's own logits equal transform(head(hidden)) ------------------
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _first_example(inputs: dict) -> dict:
    ref = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()), None)
    rows = None if ref is None else ref.shape[0]
    return {k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v)
            for k, v in inputs.items()}


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(type(_inner(model)).forward).parameters
    except (TypeError, ValueError):
        return False


def check_head(model: nn.Module, parts: LMParts, hidden_fn, inputs: dict) -> None:
    """Raise unless ``model(**inputs)``'s logits equal ``parts.logits(hidden_fn(**inputs))`` on the
    last :data:`CHECK_POSITIONS` positions of the first example (eval mode, no gradient), within
    :data:`CHECK_RTOL` of the logits' magnitude."""
    sub = _first_example(inputs)
    extra = {"logits_to_keep": CHECK_POSITIONS} if _accepts(model, "logits_to_keep") else {}
    with torch.no_grad(), eval_mode(model):
        theirs = logits_of(model(**sub, **extra))
        keep = min(CHECK_POSITIONS, theirs.shape[-2])
        theirs = theirs[..., -keep:, :].float()
        ours = parts.logits(hidden_fn(**sub)[..., -keep:, :]).float()
    tol = CHECK_RTOL.get(parts.weights().weight.dtype, 3e-2) * (1 + float(theirs.abs().max()))
    err = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else math.inf
    if not err <= tol:  # NaN fails too
        t = parts.transform
        raise ValueError(
            f"{type(_inner(model)).__name__}: its logits are not its LM head ({type(parts.head).__name__}) "
            f"applied to its final hidden states with logit_scale={t.logit_scale}, "
            f"logit_softcap={t.logit_softcap} (max difference {err:.3g}, tolerance {tol:.3g}): the "
            "model transforms its logits in a way no known config attribute describes, so the "
            "fused-linear loss would train another objective; use path='logits' (the loss on the "
            "model's own logits)")


def _checked(model: nn.Module, parts: LMParts, hidden_fn):
    """``hidden_fn`` that runs :func:`check_head` on its first call for this model and head."""
    target = unwrap(model)
    key = (id(parts.head), parts.kind, parts.transform)

    def hidden(**inputs):
        if _CHECKED.get(target) != key:
            check_head(model, parts, hidden_fn, inputs)
            _CHECKED[target] = key
        return hidden_fn(**inputs)

    return hidden
