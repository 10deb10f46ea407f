"""The data-parallel side of a training step (DDP and FSDP2 ``fully_shard``): the wrapper's
forward routing for the fused-linear path, the frozen LM head as the loss reads it, and the
per-step gradient-sync and token-count plumbing (docs/distributed.md, "Data parallel").

Nothing here is loss math: the vocab-parallel losses are :mod:`forgetkern.distributed`, which
re-exports these names. Layer 1: imports nothing of forgetkern.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a torch without torch.distributed: isinstance(x, ()) is always False
    FSDPModule = ()

__all__ = ["DataParallel", "data_parallel", "full_weight", "is_dtensor", "is_linear", "routed",
           "unwrap"]


def is_dtensor(x) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (without importing it otherwise)."""
    cls = type(x)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def unwrap(model):
    """The module a ``DistributedDataParallel`` wraps; ``model`` itself otherwise (FSDP2 too)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def routed(model, fn):
    """``fn`` (the fused path's final hidden states) run *through* ``model``'s forward when
    ``model`` is DDP or an FSDP2 root, else ``fn``: their work (DDP arms its reducer, FSDP2's root
    gathers its parameters and hooks its backward) runs in their forward only, so the call is
    ``model(**inputs)`` with the wrapped module's forward set to ``fn`` for that call (an instance
    ``forward`` already there, e.g. accelerate's, is put back)."""
    if not isinstance(model, (DistributedDataParallel, FSDPModule)):
        return fn
    target = unwrap(model)

    def through_forward(**inputs):
        saved = target.__dict__.get("forward")
        target.forward = fn
        try:
            return model(**inputs)
        finally:
            if saved is None:
                del target.forward
            else:
                target.forward = saved

    return through_forward


def is_linear(module) -> bool:
    """A plain ``nn.Linear``, also as FSDP2 wraps it (class ``FSDPLinear(FSDPModule, Linear)``)."""
    cls = type(module)
    return cls is torch.nn.Linear or (isinstance(module, FSDPModule)
                                      and cls.__bases__[-1] is torch.nn.Linear)


def full_weight(weight):
    """A head's weight (or bias) whole: as it is, or a DTensor's full tensor (an all-gather)."""
    return weight.full_tensor() if is_dtensor(weight) else weight


def _mesh_group(model):  # the data-parallel group of an FSDP2 model
    for p in model.parameters():
        if is_dtensor(p):
            if p.device_mesh.ndim != 1:
                raise ValueError("model: FSDP2 over a 1-D device mesh is supported (HSDP is not)")
            return p.device_mesh.get_group()
    raise ValueError("model: an FSDP2 model without sharded (DTensor) parameters")


class DataParallel:
    """The data-parallel side of one training step of a DDP or FSDP2 ``model``.

    * :meth:`global_count`: the mean's denominator summed over the ranks (one ``all_reduce`` of an
      int64); both wrappers average the gradients, so each rank's loss is scaled by ``world``.
    * :meth:`micro_batch`: one gradient reduction per step: DDP's ``no_sync`` but on the last
      micro-batch; FSDP2's ``set_requires_gradient_sync`` / ``set_is_last_backward`` false but on
      the last (gradients accumulate unsharded, one reduce-scatter at the end).
    * ``head``: the frozen LM head of the fused-linear path, used outside its module's forward.
      An FSDP2 module of its own is gathered once (``unshard`` at the first micro-batch), kept
      (``set_reshard_after_backward(False)``) and resharded after the last backward. A head in
      another group (e.g. the root's) is gathered by that group's forward (:func:`routed`).
    """

    def __init__(self, model, kind: str, group, head=None):
        self.model, self.kind, self.group = model, kind, group
        self.world = dist.get_world_size(group)
        own = isinstance(head, FSDPModule) and head is not model and not any(
            p.requires_grad for p in head.parameters())
        self.head = head if kind == "fsdp" and own else None

    def global_count(self, n: int, device) -> int:
        count = torch.tensor(n, dtype=torch.int64, device=device)
        dist.all_reduce(count, group=self.group)
        return int(count)

    @contextlib.contextmanager
    def micro_batch(self, index: int, count: int):
        """Around one micro-batch's forward and backward (``index`` of ``count``)."""
        last = index == count - 1
        if self.kind == "ddp":
            with contextlib.nullcontext() if last else self.model.no_sync():
                yield
            return
        if index == 0 and self.head is not None:
            self.head.set_reshard_after_backward(False, recurse=False)
            self.head.unshard()  # the one gather of the head in this step
        self.model.set_requires_gradient_sync(last)
        self.model.set_is_last_backward(last)
        try:
            yield
        except BaseException:
            last = True
            raise
        finally:
            if last:  # the step's last backward ran (or failed): the wrapper's defaults again
                self.model.set_requires_gradient_sync(True)
                self.model.set_is_last_backward(True)
                if self.head is not None:
                    self.head.set_reshard_after_backward(True, recurse=False)
                    self.head.reshard()


def data_parallel(model, head=None) -> DataParallel | None:
    """The :class:`DataParallel` of a DDP model or an FSDP2 root, else ``None``."""
    if isinstance(model, DistributedDataParallel):
        return DataParallel(model, "ddp", model.process_group)
    if isinstance(model, FSDPModule):
        return DataParallel(model, "fsdp", _mesh_group(model), head)
    return None
