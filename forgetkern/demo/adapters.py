"""PEFT adapters on a Hugging Face causal LM, one kind per demo method family.

``adapted(base, kind, ...)`` returns a fresh copy of the frozen ``base`` with one PEFT adapter
on the target modules (``base`` itself is never changed):

* ``lora``      LoRA (rank ``r``, scale ``alpha / r``; ``A`` Kaiming-uniform from the seed, ``B = 0``);
* ``dora``      DoRA: the same LoRA with a trained magnitude per output row (``use_dora=True``);
* ``randlora``  RandLoRA: fixed random full-rank bases (drawn from the seed) with trained
                diagonal scalings (``peft["randlora_r"]``, ``peft["randlora_alpha"]``);
* ``corda``     CorDA in its knowledge-preserving mode (``corda_method="kpm"``): the SVD of each
                weight times the input covariance of *knowledge* data; the adapter starts as the
                ``r`` components that data uses least, the rest stays frozen in the base weight;
* ``osf``       OSF: each weight's SVD, the top singular directions frozen and the last ``r``
                trained, their gradients projected orthogonal to the frozen ones.

Every kind starts as the base model's function (CorDA and OSF up to float rounding). CorDA
rewrites the base weights it wraps (the frozen residual), so turning its adapter off does not
give the base model back: only CE trains it here.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

KINDS = ("lora", "dora", "randlora", "corda", "osf")
PEFT_MIN = "0.21"  # the version these adapters were run with (RandLoRA, CorDA, OSF)


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise SystemExit("the PEFT adapter methods need peft: pip install 'forgetkern[real]'") from exc
    if not hasattr(peft, "OSFConfig") or not hasattr(peft, "RandLoraConfig"):
        raise SystemExit(f"the PEFT adapter methods need peft >= {PEFT_MIN} (RandLoRA, CorDA, "
                         f"OSF); installed: {peft.__version__}")
    return peft


def _min_dims(model: nn.Module, targets) -> dict[str, int]:
    """``min(out, in)`` of the first linear layer matching each target name."""
    dims = {}
    for target in targets:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (name == target or name.endswith("." + target)):
                dims[target] = min(module.weight.shape)
                break
        else:
            raise ValueError(f"no linear layer named {target!r} in the model")
    return dims


def _corda_covariance(model: nn.Module, config, knowledge) -> None:
    """CorDA's preprocessing: input covariances of the target layers on ``knowledge`` (token-id
    tensors, one sequence per forward as PEFT's hook expects), then the SVDs."""
    from peft.tuners.lora.corda import preprocess_corda

    rows = [row for batch in knowledge for row in batch]
    if not rows:
        raise ValueError("CorDA needs knowledge data (at least one sequence)")

    def run_model():
        for row in rows:
            model(input_ids=row[None].to(next(model.parameters()).device))

    was = model.training
    model.eval()
    try:
        preprocess_corda(model, config, run_model=run_model)
    finally:
        model.train(was)


def adapted(base: nn.Module, kind: str, *, targets, rank: int, alpha: float, seed: int,
            options: dict | None = None, knowledge=None) -> nn.Module:
    """A copy of ``base`` with one PEFT adapter of ``kind`` on ``targets`` (module-name
    suffixes); only the adapter trains. ``knowledge()`` returns CorDA's data (token-id batches,
    e.g. text sampled from the base model); ``options`` holds RandLoRA's ``randlora_r`` and
    ``randlora_alpha``."""
    if kind not in KINDS:
        raise ValueError(f"adapter kind must be one of {', '.join(KINDS)}, got {kind!r}")
    peft = _peft()
    options = options or {}
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    targets = list(targets)
    if kind in ("lora", "dora", "corda"):
        extra = {}
        if kind == "dora":
            extra["use_dora"] = True
        if kind == "corda":
            from peft.tuners.lora.config import CordaConfig

            extra.update(init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                 target_modules=targets, **extra)
        if kind == "corda":
            if knowledge is None:
                raise ValueError("the corda adapter needs knowledge data")
            _corda_covariance(model, config, knowledge())
    elif kind == "randlora":
        missing = [k for k in ("randlora_r", "randlora_alpha") if k not in options]
        if missing:
            raise ValueError(f"the randlora adapter needs the options {missing}")
        config = peft.RandLoraConfig(r=int(options["randlora_r"]),
                                     randlora_alpha=options["randlora_alpha"],
                                     target_modules=targets, projection_prng_key=seed)
    else:  # osf: freeze all but the last `rank` singular directions of each weight
        dims = _min_dims(model, targets)
        small = [t for t, d in dims.items() if d <= rank]
        if small:
            raise ValueError(f"osf: rank {rank} leaves nothing frozen in {small}")
        config = peft.OSFConfig(target_modules=targets,
                                rank_pattern={re.escape(t): d - rank for t, d in dims.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return peft.get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (elements) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
