"""Saving and loading the adapter weights alone (not the base model).

File layout: the tensors ``<layer>.lora_A`` ``(r, d_in)`` and ``<layer>.lora_B`` ``(d_out, r)`` of
every adapted layer, plus JSON metadata ``{"format": "forgetkern-lora", "version": 1,
"targets": [...], "layers": {name: {"r", "alpha", "in_features", "out_features"}}}`` (with
top-level ``"rank"``/``"alpha"`` when every layer shares them). Written with ``safetensors`` when it
is installed (the metadata in the safetensors header), else with ``torch.save`` as
``{"metadata": ..., "tensors": ...}``. :func:`load_adapters` reads both.

For HF PEFT models the tensors are PEFT's own adapter state dict (of the active adapter, or the one
named) and the metadata records the adapter's name, ``r``, ``lora_alpha`` and ``target_modules``.
Loading checks that the file holds exactly the model's adapter tensors (names and shapes) before
any weight changes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import zipfile

import torch
from torch import nn

from .._files import atomic_path
from .discovery import lora_layers
from .inject import is_peft_model

FORMAT = "forgetkern-lora"
VERSION = 1
_META_KEY = "forgetkern"


def _has_safetensors() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def peft_adapter_name(model, adapter_name: str | None) -> str:
    """The PEFT adapter a file is written from or read into: ``adapter_name``, else the model's
    active adapter (whatever its name); an error when several are active or the name is unknown."""
    names = list(model.peft_config)
    if adapter_name is None:
        active = model.active_adapter
        if not isinstance(active, str):
            active = list(active)
            if len(active) != 1:
                raise ValueError(f"adapter_name: the PEFT model has {len(active)} active adapters "
                                 f"{active}; name the one to use")
            active = active[0]
        adapter_name = active
    if adapter_name not in names:
        raise ValueError(f"adapter_name={adapter_name!r} is not an adapter of the PEFT model "
                         f"(it has {names})")
    return adapter_name


def _peft_state(model, name: str) -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def _match(path, have: dict, want: dict) -> None:
    """Raise unless the file's tensors ``have`` are exactly the model's adapter tensors ``want``
    (``name -> shape``): none missing (a partial load), none extra, every shape equal."""
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise ValueError(f"adapter file {str(path)!r} does not hold the model's adapters: "
                         + "; ".join(f"{what} ({len(keys)}): {keys[:3]}" for what, keys in
                                     (("missing from the file", missing),
                                      ("in the file but not the model", extra)) if keys))
    for key, shape in want.items():
        if tuple(have[key].shape) != tuple(shape):
            raise ValueError(f"shape mismatch for {key!r}: file {tuple(have[key].shape)}, "
                             f"model {tuple(shape)}")


def _collect(model: nn.Module, adapter_name: str | None = None):
    layers = lora_layers(model)
    if layers:
        tensors, meta_layers = {}, {}
        for name, layer in layers.items():
            tensors[f"{name}.lora_A"] = layer.lora_A.detach()
            tensors[f"{name}.lora_B"] = layer.lora_B.detach()
            meta_layers[name] = {"r": layer.r, "alpha": layer.alpha,
                                 "in_features": layer.in_features,
                                 "out_features": layer.out_features}
        meta = {"format": FORMAT, "version": VERSION, "kind": "forgetkern",
                "targets": sorted(layers), "layers": meta_layers}
        ranks = {m["r"] for m in meta_layers.values()}
        alphas = {m["alpha"] for m in meta_layers.values()}
        if len(ranks) == 1 and len(alphas) == 1:
            meta["rank"], meta["alpha"] = ranks.pop(), alphas.pop()
        return tensors, meta
    if is_peft_model(model):
        name = peft_adapter_name(model, adapter_name)
        tensors = {k: v.detach() for k, v in _peft_state(model, name).items()}
        cfg = model.peft_config[name]
        targets = getattr(cfg, "target_modules", None)
        meta = {"format": FORMAT, "version": VERSION, "kind": "peft", "adapter": name,
                "targets": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
                "rank": getattr(cfg, "r", None), "alpha": getattr(cfg, "lora_alpha", None),
                "layers": {}}
        return tensors, meta
    raise ValueError("save_adapters: the model has no LoRA layers (forgetkern inject_lora or PEFT)")


def save_adapters(model: nn.Module, path: str | os.PathLike, *,
                  adapter_name: str | None = None) -> None:
    """Write the adapter weights of ``model`` (and their rank/alpha/targets) to ``path``.

    In plain torch, roughly::

        tensors = {f"{name}.lora_A": layer.lora_A, f"{name}.lora_B": layer.lora_B
                   for name, layer in lora_layers(model).items()}
        torch.save({"metadata": {...rank, alpha, targets...}, "tensors": tensors}, path)

    (safetensors is used instead when installed). Base weights are never written. The file
    appears whole or not at all (written to a temporary file that then replaces ``path``). For a
    PEFT model, ``adapter_name`` picks the adapter (default: the active one, whatever its name).
    """
    tensors, meta = _collect(model, adapter_name)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        if _has_safetensors():
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
        else:
            torch.save({"metadata": meta, "tensors": tensors}, str(tmp))


def read_adapters(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adapter file written by :func:`save_adapters`: ``(tensors, metadata)``."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter file {path!r} does not exist")
    if zipfile.is_zipfile(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "metadata" not in blob or "tensors" not in blob:
            raise ValueError(f"{path!r} is a torch file but not a forgetkern adapter file")
        tensors, meta = blob["tensors"], blob["metadata"]
    else:
        if not _has_safetensors():
            raise ValueError(f"{path!r} is not a torch.save file; reading safetensors files "
                             "needs the safetensors package")
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{path!r} is neither a safetensors nor a torch.save file: {exc}") from exc
        if _META_KEY not in header:
            raise ValueError(f"{path!r} has no forgetkern adapter metadata")
        meta = json.loads(header[_META_KEY])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path!r}: format version {meta['version']} is newer than this "
                         f"forgetkern reads ({VERSION})")
    return tensors, meta


def load_adapters(model: nn.Module, path: str | os.PathLike, *,
                  adapter_name: str | None = None) -> nn.Module:
    """Load adapter weights saved by :func:`save_adapters` into ``model`` (in place).

    The model must already carry adapters on the same layers with the same rank and alpha
    (``inject_lora`` with the settings of the saved run); any difference in targets, rank, alpha,
    tensor names or shapes (a file that lacks some of the model's adapters, or holds others)
    raises ``ValueError`` naming it, before any weight is changed. Merged layers are unmerged,
    loaded and merged again. For a PEFT model, ``adapter_name`` picks the adapter loaded into
    (default: the active one).
    """
    tensors, meta = read_adapters(path)
    layers = lora_layers(model)
    if not layers:
        if not is_peft_model(model):
            raise ValueError("load_adapters: the model has no LoRA layers (call inject_lora with "
                             f"rank={meta.get('rank')}, alpha={meta.get('alpha')}, "
                             f"target_modules={meta.get('targets')} first)")
        if meta.get("kind") != "peft":
            raise ValueError(f"{path!s} holds forgetkern LoRA adapters; the model is a PEFT model")
        from peft.utils import set_peft_model_state_dict

        name = peft_adapter_name(model, adapter_name)
        cfg = model.peft_config[name]
        if meta.get("rank") != cfg.r or meta.get("alpha") != cfg.lora_alpha:
            raise ValueError(f"adapter rank/alpha mismatch: file r={meta.get('rank')}, "
                             f"alpha={meta.get('alpha')}; model r={cfg.r}, alpha={cfg.lora_alpha}")
        _match(path, tensors, {k: v.shape for k, v in _peft_state(model, name).items()})
        set_peft_model_state_dict(model, tensors, adapter_name=name)
        return model
    if meta.get("kind") != "forgetkern":
        raise ValueError(f"{path!s} holds PEFT adapters; the model uses forgetkern LoRA layers")
    saved = meta["layers"]
    missing = sorted(set(layers) - set(saved))
    extra = sorted(set(saved) - set(layers))
    if missing or extra:
        raise ValueError("adapter targets differ: "
                         + (f"in the model but not the file: {missing[:5]} " if missing else "")
                         + (f"in the file but not the model: {extra[:5]}" if extra else ""))
    for name, layer in layers.items():
        info = saved[name]
        if info["r"] != layer.r:
            raise ValueError(f"rank mismatch at {name!r}: file r={info['r']}, model r={layer.r}")
        if float(info["alpha"]) != layer.alpha:
            raise ValueError(f"alpha mismatch at {name!r}: file alpha={info['alpha']}, "
                             f"model alpha={layer.alpha}")
    _match(path, tensors, {f"{name}.{part}": getattr(layer, part).shape
                           for name, layer in layers.items() for part in ("lora_A", "lora_B")})
    with torch.no_grad():
        for name, layer in layers.items():
            was_merged = layer.merged
            layer.unmerge()
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
            if was_merged:
                layer.merge()
    return model
