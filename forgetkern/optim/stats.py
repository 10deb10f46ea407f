"""Second-moment statistics ``E[x x^T]`` of the inputs of LoRA-adapted linear layers."""
from __future__ import annotations

import weakref
from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm as progress_bar

from ..lora import disable_adapters
from ..lora.discovery import lora_modules
from .proxy import _model_device


class _Accumulator:
    """``X^T X`` (float32 by default) and the number of rows, for one input tensor stream."""

    __slots__ = ("xtx", "count", "members")

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device):
        self.xtx = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.count = 0
        self.members: list[str] = []

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.xtx.dtype)
        self.xtx.addmm_(rows.mT, rows)
        self.count += rows.shape[0]


def _resolve_modules(model: nn.Module, modules) -> dict[str, nn.Module]:
    if modules is None:
        found = {name: info.module for name, info in lora_modules(model).items()}
        if not found:
            raise ValueError(
                "ActivationStats found no LoRA-adapted linear layers (forgetkern LoRALinear or "
                "PEFT LoRA) in the model; pass modules= explicitly"
            )
        return found
    if isinstance(modules, Mapping):
        out = dict(modules)
    else:
        named = dict(model.named_modules())
        by_id = {id(m): n for n, m in named.items()}
        out = {}
        for item in modules:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"modules: {item!r} is not a submodule of the model")
                out[item] = named[item]
            elif isinstance(item, nn.Module):
                out[by_id.get(id(item), f"module{len(out)}")] = item
            else:
                raise TypeError(f"modules entries must be names or nn.Modules, got {type(item).__name__}")
    if not out:
        raise ValueError("modules must not be empty")
    for name, mod in out.items():
        if not isinstance(mod, nn.Module):
            raise TypeError(f"modules[{name!r}] must be an nn.Module, got {type(mod).__name__}")
    return out


class ActivationStats:
    """Accumulate ``X^T X`` and token counts of the inputs of LoRA-adapted linear layers.

    In plain torch, for every hooked layer and every forward::

        x = layer_input.reshape(-1, d_in)[mask.reshape(-1)]     # (tokens, d_in), padding dropped
        xtx += x.float().T @ x.float();  count += x.shape[0]     # E[x x^T] = xtx / count

    Used as a context manager: forward pre-hooks are registered on entry and removed on exit.

    * Layers: by default every LoRA-adapted linear layer of ``model`` (forgetkern
      :class:`~forgetkern.lora.LoRALinear` and PEFT LoRA layers; the hook reads the layer's
      input ``x``), or ``modules`` (names, modules, or a ``{name: module}`` mapping).
    * Padding: the attention mask reaches the hooks in two ways. Calls of ``model`` with an
      ``attention_mask`` keyword are picked up automatically by a pre-hook on ``model``;
      :meth:`set_mask` sets a mask explicitly (it takes precedence and stays until changed).
      A ``(B, T)`` mask applies to ``(B, T', d)`` layer inputs with ``T' <= T`` (the last ``T'``
      positions, as under a KV cache) or to any input with ``B*T`` rows.
    * Shared inputs: layers reading the same input tensor in a forward (q/k/v, gate/up) share one
      accumulator, counted once; the grouping is fixed by the first forward that reaches them
      (``share_inputs=False`` gives every layer its own).

    Args:
        model: the model whose forward runs inside the context.
        modules: layers to hook (default: all LoRA-adapted linear layers).
        share_inputs: share accumulators between layers reading the same tensor.
        dtype: accumulation dtype (float32 by default, float64 for tests).
    """

    def __init__(self, model: nn.Module, modules=None, *, share_inputs: bool = True,
                 dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.model = model
        self.modules = _resolve_modules(model, modules)
        self.share_inputs = bool(share_inputs)
        self.dtype = dtype
        self._acc_of: dict[str, _Accumulator] = {}
        self._accs: list[_Accumulator] = []
        self._handles: list = []
        self._explicit_mask: torch.Tensor | None = None
        self._auto_mask: torch.Tensor | None = None
        self._new_pass()

    # ---- hooks --------------------------------------------------------------------------------
    def __enter__(self):
        if self._handles:
            raise RuntimeError("ActivationStats is already active")
        self._handles.append(self.model.register_forward_pre_hook(self._root_hook, with_kwargs=True))
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _new_pass(self):
        self._seen: dict[int, tuple] = {}
        self._filled: set[int] = set()

    def _root_hook(self, module, args, kwargs):
        self._new_pass()
        mask = kwargs.get("attention_mask") if kwargs else None
        self._auto_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Use ``mask`` (``(B, T)``, nonzero = real token) for the following forwards; ``None``
        goes back to the ``attention_mask`` keyword of each model call."""
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError(f"mask must be a (B, T) tensor or None, got {getattr(mask, 'shape', mask)!r}")
        self._explicit_mask = mask

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        mask = self._explicit_mask if self._explicit_mask is not None else self._auto_mask
        if mask is None:
            return x.reshape(-1, d)
        b, t = mask.shape
        if x.dim() == 3 and x.shape[0] == b and x.shape[1] <= t:
            keep = mask[:, t - x.shape[1]:]
        elif x.numel() // d == b * t:
            keep = mask
        else:
            raise ValueError(
                f"attention mask of shape {(b, t)} does not fit the input of {name} with shape "
                f"{tuple(x.shape)}; call set_mask() with a matching mask or set_mask(None)"
            )
        keep = keep.reshape(-1).to(device=x.device) != 0
        return x.reshape(-1, d)[keep]

    def _make_hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("x", kwargs.get("input"))
            if not isinstance(x, torch.Tensor):
                return
            self._observe(name, x)

        return hook

    def _observe(self, name: str, x: torch.Tensor) -> None:
        key = id(x)
        hit = self._seen.get(key)
        same = hit is not None and hit[0]() is x
        acc = self._acc_of.get(name)
        if same and self.share_inputs:
            shared = hit[1]
            if acc is None:
                self._acc_of[name] = shared
                shared.members.append(name)
            elif acc is not shared:
                raise RuntimeError(
                    f"{name} reads the input of {shared.members[0]} in this forward but was grouped "
                    f"with {acc.members[0]} before; inputs are shared inconsistently across forwards "
                    "(use share_inputs=False)"
                )
            return
        if acc is None:
            acc = _Accumulator(x.shape[-1], self.dtype, x.device)
            acc.members.append(name)
            self._acc_of[name] = acc
            self._accs.append(acc)
        elif id(acc) in self._filled:
            raise RuntimeError(
                f"{name} shares statistics with {acc.members[0]} but read a different input tensor "
                "in this forward (use share_inputs=False)"
            )
        if x.shape[-1] != acc.xtx.shape[0]:
            raise ValueError(f"{name}: input width changed from {acc.xtx.shape[0]} to {x.shape[-1]}")
        acc.add(self._rows(name, x.detach()))
        self._filled.add(id(acc))
        self._seen[key] = (weakref.ref(x), acc)

    # ---- results ------------------------------------------------------------------------------
    def covariances(self) -> dict[str, torch.Tensor]:
        """``E[x x^T] = X^T X / count`` per layer; layers sharing an input get the same tensor
        object. Layers never reached (or that saw no unmasked token) are missing."""
        out: dict[str, torch.Tensor] = {}
        for acc in self._accs:
            if acc.count == 0:
                continue
            cov = acc.xtx / acc.count
            for name in acc.members:
                out[name] = cov
        return out

    def sums(self) -> dict[str, tuple[torch.Tensor, int]]:
        """``(X^T X, token count)`` per layer (shared layers get the same tensor object)."""
        return {name: (acc.xtx, acc.count) for name, acc in self._acc_of.items()}

    def all_reduce(self, group=None) -> None:
        """Sum the statistics (``X^T X`` and token counts) over the ranks of ``group`` (default:
        the whole world): afterwards every rank holds those of every rank's batches. Every rank
        must have reached the same layers; two ``all_reduce`` calls in all (the matrices, packed
        into one buffer, and the counts)."""
        import torch.distributed as dist

        accs = sorted(self._accs, key=lambda a: a.members[0])
        layout = [(tuple(a.members), tuple(a.xtx.shape)) for a in accs]
        seen = [None] * dist.get_world_size(group)
        dist.all_gather_object(seen, layout, group=group)
        if any(other != layout for other in seen):
            raise ValueError("ActivationStats.all_reduce: the ranks reached different layers (or "
                             "grouped shared inputs differently); every rank must run the same "
                             "model on batches that reach every hooked layer")
        if not accs:
            return
        flat = torch.cat([a.xtx.reshape(-1) for a in accs])
        counts = torch.tensor([a.count for a in accs], dtype=torch.int64, device=flat.device)
        dist.all_reduce(flat, group=group)
        dist.all_reduce(counts, group=group)
        offset = 0
        for a, count in zip(accs, counts.tolist()):
            size = a.xtx.numel()
            a.xtx.copy_(flat[offset:offset + size].view_as(a.xtx))
            a.count = int(count)
            offset += size

    def groups(self) -> list[list[str]]:
        """Names of the layers sharing each accumulator."""
        return [list(acc.members) for acc in self._accs]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the accumulator each layer uses (shared layers report the same one)."""
        return {name: acc.xtx.numel() * acc.xtx.element_size() for name, acc in self._acc_of.items()}

    def total_memory_bytes(self) -> int:
        """Bytes of all accumulators, each counted once."""
        return sum(acc.xtx.numel() * acc.xtx.element_size() for acc in self._accs)

    def reset(self) -> None:
        """Drop all accumulated statistics (and the layer grouping)."""
        self._acc_of.clear()
        self._accs.clear()
        self._new_pass()


def _batches(batches, limit):
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            return
        yield batch


def _run(model: nn.Module, batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    if isinstance(batch, Mapping):
        kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in batch.items() if k != "labels"}
        return model(**kwargs)
    raise TypeError(f"batches must be token-id tensors or dicts of model inputs, got {type(batch).__name__}")


def _pass(model, batches, modules, share_inputs, desc, progress, max_batches, dtype):
    device = _model_device(model)
    stats = ActivationStats(model, modules, share_inputs=share_inputs, dtype=dtype)
    total = None
    try:
        total = len(batches)
        if max_batches is not None:
            total = min(total, max_batches)
    except TypeError:
        pass
    with stats:
        for batch in progress_bar(_batches(batches, max_batches), total=total, desc=desc, unit="batch",
                                  disable=not progress):
            _run(model, batch, device)
    return stats


@torch.no_grad()
def calibrate(
    model: nn.Module,
    proxy_batches: Iterable,
    task_batches: Iterable,
    *,
    modules=None,
    share_inputs: bool = True,
    max_batches: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    process_group=None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Both calibration passes: ``{layer name: (proxy_cov, task_cov)}`` with ``E[x x^T]``.

    In plain torch::

        with disable_adapters(model): proxy_cov = E[x x^T] over proxy_batches   # pretrained model
        task_cov = E[x x^T] over task_batches                                  # model as it is

    Both passes run without gradients and in eval mode (restored afterwards). Batches are
    token-id tensors (as returned by :func:`sample_proxy_data`) or dicts of model inputs (HF
    style; ``labels`` is dropped, ``attention_mask`` removes padding from the statistics).
    Layers sharing an input share their covariance tensors, which lets :class:`FoLoRA` share
    one basis between them.

    Args:
        model: a forgetkern- or PEFT-LoRA model.
        proxy_batches: iterable of proxy batches.
        task_batches: iterable of task batches.
        modules: layers to hook (default: every LoRA-adapted linear layer).
        share_inputs: share statistics between layers reading the same input tensor.
        max_batches: stop each pass after this many batches.
        dtype: accumulation dtype.
        progress: show progress bars (tqdm, on stderr).
        process_group: data parallel: each rank passes its share of the batches and the sums and
            counts are all-reduced over this ``torch.distributed`` group before the covariances
            are formed, so every rank gets the statistics of all the batches.

    Returns:
        ``{name: (proxy_cov, task_cov)}`` for the layers reached by both passes.

    Raises:
        ValueError: a hooked layer saw no token in one of the passes.
    """
    was_training = model.training
    model.eval()
    try:
        with disable_adapters(model, require=False):
            proxy = _pass(model, proxy_batches, modules, share_inputs, "proxy statistics", progress,
                          max_batches, dtype)
        task = _pass(model, task_batches, modules, share_inputs, "task statistics", progress,
                     max_batches, dtype)
    finally:
        model.train(was_training)
    if process_group is not None:
        proxy.all_reduce(process_group)
        task.all_reduce(process_group)
    proxy_cov = proxy.covariances()
    task_cov = task.covariances()
    missing = sorted(set(proxy.modules) - (set(proxy_cov) & set(task_cov)))
    if missing:
        raise ValueError(
            f"calibrate: no tokens reached {missing[:5]}{'...' if len(missing) > 5 else ''} in the "
            "proxy or task pass (empty batches, or layers outside the forward path)"
        )
    return {name: (proxy_cov[name], task_cov[name]) for name in proxy.modules}
