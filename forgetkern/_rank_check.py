"""The vocab-parallel form's one cross-rank check: before any loss collective, every rank of the
group sends a fixed-size descriptor of its call (or of the error its own input checks raised) in
one ``all_gather``; every rank then compares all the descriptors and raises the same error when
they disagree. A rank whose inputs are wrong therefore never leaves the others waiting in a
collective, and ranks that were handed different labels or options never return different
losses.

Descriptor (int64): ``error`` (0, or 1 + the index of the error's class in :data:`ERRORS`),
``columns`` (this rank's vocabulary shard), ``rows``, ``hidden`` (the fused-linear form's ``D``,
else 0), ``dtype`` (1 + index in ``FLOAT_DTYPES``), ``layout`` (bits: separate base head, base
bias, bias, a gradient to all-reduce for ``hidden``), ``options`` and ``labels`` (63-bit BLAKE2b
digests of the loss options and of the labels), then :data:`MESSAGE_BYTES` bytes of the error
message. 8 * (8 + MESSAGE_BYTES / 8) = 320 bytes per rank.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.distributed as dist

from ._params import FLOAT_DTYPES

FIELDS = ("error", "columns", "rows", "hidden", "dtype", "layout", "options", "labels")
MESSAGE_BYTES = 256
ERRORS = (ValueError, TypeError, RuntimeError)
#: What the ranks must agree on, with how the error names it.
AGREE = {"rows": "the number of rows (tokens)", "hidden": "the hidden size D",
         "dtype": "the input dtype", "options": "the loss options",
         "labels": "the labels (global token ids, identical on every rank)",
         "layout": "which of base_weight / base_bias / bias are given and whether hidden needs a "
                   "gradient"}


def digest63(data: bytes) -> int:
    """A 63-bit BLAKE2b digest (fits an int64)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def describe(op: str, inputs: tuple, laid: tuple) -> dict:
    """The descriptor fields of one rank's well-formed call of ``op`` (``"tmkl"`` or
    ``"linear_tmkl"``): ``inputs`` as given to ``_validate.tmkl_inputs`` /
    ``linear_tmkl_inputs``, ``laid`` what it returned."""
    params, reduction, num_items = inputs[-3:]
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.item()
    x, y, linear = laid[0], laid[-1], op == "linear_tmkl"
    flags = (laid[2] is not None, laid[3] is not None, inputs[5] is not None,
             torch.is_grad_enabled() and inputs[0].requires_grad) if linear else ()
    y = y.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    return {"columns": inputs[1].shape[0] if linear else x.shape[1], "rows": x.shape[0],
            "hidden": x.shape[1] if linear else 0, "dtype": 1 + FLOAT_DTYPES.index(x.dtype),
            "layout": sum(1 << i for i, f in enumerate(flags) if f),
            "options": digest63(repr((params, reduction, num_items)).encode()),
            "labels": digest63(y.numpy().tobytes())}


def _device(group) -> torch.device:
    """Where the descriptor lives: the current CUDA device for NCCL, else the CPU (the same on
    every rank, whatever its inputs)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _ranks(values) -> str:
    groups: dict = {}
    for rank, v in enumerate(values):
        groups.setdefault(v, []).append(rank)
    return " vs ".join(f"ranks {r}" for r in groups.values())


def check_ranks_agree(group, descriptor: dict | None, error: Exception | None,
                      what: str) -> tuple[int, int]:
    """One ``all_gather`` of every rank's descriptor (``descriptor``: :func:`describe` of this
    rank's call, or ``None`` with the ``error`` its input checks raised); then, the same on every
    rank: the first failing rank's error (its class and message, naming the rank), or a
    ``ValueError`` naming the first field the ranks disagree on. Returns ``(offset, total)``:
    where this rank's vocabulary shard starts and the whole vocabulary's size."""
    row = [0] * len(FIELDS)
    if error is not None:
        row[0] = 1 + next(i for i, cls in enumerate(ERRORS) if isinstance(error, cls) or
                          cls is RuntimeError)
        message = str(error).encode()[:MESSAGE_BYTES]
    else:
        row[1:] = [descriptor[f] for f in FIELDS[1:]]
        message = b""
    text = np.frombuffer(message.ljust(MESSAGE_BYTES, b"\0"), dtype=np.int64)
    local = torch.tensor(row + text.tolist(), dtype=torch.int64, device=_device(group))
    table = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, local, group=group)
    table = torch.stack(table).cpu()
    rank, col = dist.get_rank(group), {f: i for i, f in enumerate(FIELDS)}
    failed = torch.nonzero(table[:, 0]).flatten().tolist()
    if failed:
        first = failed[0]
        text = table[first, len(FIELDS):].numpy().tobytes().rstrip(b"\0").decode(errors="ignore")
        others = f" (ranks {failed} failed)" if len(failed) > 1 else ""
        exc = ERRORS[int(table[first, 0]) - 1](f"{what} (vocab-parallel): rank {first}{others}: "
                                               f"{text}")
        raise exc from (error if rank == first else None)
    for field, name in AGREE.items():
        values = table[:, col[field]].tolist()
        if len(set(values)) > 1:
            shown = values if field in ("rows", "hidden") else (
                [str(FLOAT_DTYPES[v - 1]) for v in values] if field == "dtype" else None)
            detail = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown)) if shown else \
                _ranks(values)
            raise ValueError(f"{what} (vocab-parallel): the ranks disagree on {name}: {detail}")
    sizes = table[:, col["columns"]].tolist()
    return sum(sizes[:rank]), sum(sizes)
