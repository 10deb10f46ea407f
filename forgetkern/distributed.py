"""Vocabulary-parallel TMKL on ``torch.distributed``: each rank of a process group holds a
contiguous shard of the vocabulary (rank order; shard sizes may differ) of the logits and the base
logits (or of the LM head's rows), labels are global token ids identical on every rank.

Per row this computes exactly ``tmkl_loss`` on the whole vocabulary; per rank it reads only its
shard (docs/math.md §5: one pass, and merging partial passes). First, per call, one
``all_gather`` of a fixed-size descriptor per rank (:mod:`forgetkern._rank_check`): the same error on every rank when one rank's
inputs fail their checks or the ranks disagree (rows, dtype, options, labels). Then:

1. the selected backend's own ``tmkl`` kernels (reference, Triton; the usual choice,
   :func:`shard_backend`) run on the shard with shard-local labels (:func:`shard_labels`: a row
   whose target lies in another shard has the label :data:`ABSENT`, so nothing is masked there),
   giving the shard's per-row statistics; the fused-linear form runs them through the chunked
   driver (:func:`forgetkern._chunked.linear_pass`) on the head's rows of the shard;
2. the statistics become one partial record per row (:func:`forgetkern._partials.stats_to_part`,
   with the target logit from its owner), and the one merge of vocabulary parts
   (:func:`forgetkern._partials.merge_partials`, also the Triton forward's merge of its splits)
   merges the ranks' records: ``all_reduce(MAX)`` of the maxima of ``z/T``, ``b/T`` and
   (``T != 1``) ``z`` (2 or 3 floats per row), then ``all_reduce(SUM)`` of the sums and the KL
   accumulator moved to those maxima and of the target logit (4 or 5 floats per row);
3. every rank finishes the same per-row loss; the backward is the backend's own, local to the
   shard, from the saved whole-row statistics: no collective (the fused-linear form all-reduces
   the hidden state's gradient), no vocabulary-sized traffic.

The data-parallel (DDP, FSDP2) helpers live in :mod:`forgetkern.data_parallel`; their names are
re-exported here.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist

from . import _backend, _validate
from ._backend import Implementation
from ._chunked import linear_pass
from ._params import LinearTMKLParams, TMKLParams, accumulation_dtype, check_backend_name
from ._partials import merge_partials, stats_to_part
from ._rank_check import check_ranks_agree, describe
from .data_parallel import (DataParallel, data_parallel, full_weight,  # noqa: F401 (re-exported)
                            is_dtensor, is_linear, routed, unwrap)

_ANY_VOCAB = 2**62  # the label bound of the per-rank checks, before the whole vocabulary is known
#: The shard-local label of a row whose target lies in another shard: the kernels of
#: :data:`SHARD_BACKENDS` read a label below 0 other than ``ignore_index`` as "no target in these
#: columns" (nothing masked, no ``-e_y`` term) ...
ABSENT = -1
#: ... and of an ignored row: the shard's own ``ignore_index`` (a user's could be a column here).
IGNORED = -100
#: Backends whose ``tmkl`` kernels take :data:`ABSENT` labels (the CUDA kernels make a row with a
#: label outside the columns NaN).
SHARD_BACKENDS = ("reference", "triton")
_REDUCE_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def from_dtensors(logits, base_logits, labels, process_group):
    """Logits given as DTensors sharded on their last (vocabulary) dimension over a 1-D mesh:
    ``(local logits, local base logits, labels as a plain tensor, the mesh's process group)``.
    The local views keep autograd (the gradient flows back into the DTensor); ``base_logits`` must
    be sharded alike (or already local) and ``labels`` replicated (or plain)."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = logits.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"logits: a DTensor over a 1-D device mesh is expected, got a {mesh.ndim}-D mesh")
    placement = logits.placements[0]
    if not (isinstance(placement, Shard) and placement.dim in (-1, logits.dim() - 1)):
        raise ValueError(f"logits: a DTensor sharded on its last (vocabulary) dimension is expected, "
                         f"got placements {logits.placements}")
    group = mesh.get_group()
    if process_group is not None and process_group is not group:
        raise ValueError("process_group: the logits' DTensor mesh already names the group; "
                         "pass one or the other")
    if is_dtensor(base_logits):
        if base_logits.placements != logits.placements or base_logits.device_mesh != mesh:
            raise ValueError(f"base_logits: must be sharded like logits ({logits.placements}), got "
                             f"{base_logits.placements}")
        base_logits = base_logits.to_local()
    if is_dtensor(labels):
        if not all(isinstance(pl, Replicate) for pl in labels.placements):
            raise ValueError(f"labels: global ids replicated on every rank are expected, got "
                             f"placements {labels.placements}")
        labels = labels.to_local()
    return logits.to_local(), base_logits, labels, group


def shard_labels(labels: torch.Tensor, offset: int, columns: int, ignore_index: int) -> torch.Tensor:
    """This shard's labels (int64): the target's column in ``[0, columns)`` where this shard holds
    it, :data:`ABSENT` where another shard does, :data:`IGNORED` on ignored rows."""
    y = labels.long()
    local = y - offset
    here = (local >= 0) & (local < columns)
    local = torch.where(here, local, torch.full_like(local, ABSENT))
    return local.masked_fill(y == ignore_index, IGNORED)


def _shard_params(params: TMKLParams) -> TMKLParams:
    """The options the shard's kernels run with: :data:`IGNORED` as ``ignore_index``, and the base
    always computed (``compute_kl=False`` would make the chunked driver hand the logits in as their
    own base, whose CE-alone shortcut normalizes over the shard only)."""
    if isinstance(params, LinearTMKLParams):
        return replace(params, ignore_index=IGNORED, compute_kl=True)
    return replace(params, ignore_index=IGNORED)


def shard_backend(tensor: torch.Tensor, backend: str | None) -> str:
    """The backend whose ``tmkl`` kernels compute this rank's shard: the usual choice
    (``forgetkern._backend.resolve_name``) among :data:`SHARD_BACKENDS`; a preference for another
    (``FORGETKERN_BACKEND``, the automatic choice of the CUDA extension) gets Triton where it runs,
    else the reference, and an explicit ``backend=`` of another is an error."""
    check_backend_name(backend)
    if backend is not None and backend not in SHARD_BACKENDS:
        raise ValueError(f"backend={backend!r}: the vocab-parallel form (process_group=...) runs "
                         f"the {' or '.join(SHARD_BACKENDS)} kernels (the {backend} kernels take "
                         "no row whose target lies in another shard)")
    name = _backend.resolve_name("tmkl", tensor, backend=backend)
    if name in SHARD_BACKENDS:
        return name
    return "triton" if _backend.why_unavailable("triton", "tmkl", tensor.device) is None \
        else "reference"


def _all_reduce(group):
    """:data:`forgetkern._partials.AllReduce` over ``group``."""
    def all_reduce(t: torch.Tensor, op: str) -> None:
        dist.all_reduce(t, op=_REDUCE_OPS[op], group=group)
    return all_reduce


def _with_target_logits(rows: Implementation) -> Implementation:
    """``rows`` (a ``tmkl`` implementation) whose forward returns, in the place of the per-row
    loss (which means nothing for a part of the vocabulary), the target logit of each row whose
    target lies in these columns (0 elsewhere): what the partial record needs besides the
    statistics."""
    def forward(z, b, y, p):
        _, ce, kl, stats = rows.forward(z, b, y, p)
        z_y = z.gather(1, y.clamp_min(0)[:, None]).squeeze(1).to(stats.dtype)
        return torch.where(y >= 0, z_y, torch.zeros_like(z_y)), ce, kl, stats
    return replace(rows, forward=forward)


def _with_saved_stats(rows: Implementation, stats: torch.Tensor) -> Implementation:
    """``rows`` whose forward hands back the saved whole-row statistics, chunk after chunk (the
    chunked driver visits the rows in order), so that its backward pass runs the backend's
    backward on the shard from them instead of the shard's own statistics."""
    done = [0]

    def forward(z, b, y, p):
        st = stats[done[0]:done[0] + z.shape[0]]
        done[0] += z.shape[0]
        return st[:, 0], st[:, 0], st[:, 0], st
    return replace(rows, forward=forward)


def _own_base(base_logits, logits):
    """The base logits as a tensor of their own: a backend given the logits themselves as base
    takes the CE-alone shortcut, which normalizes over the shard only."""
    return logits[:] if base_logits is logits else base_logits


@torch.no_grad()
def tmkl_forward(logits, base_logits, labels, params: TMKLParams, *, rows: Implementation, group,
                 offset: int):
    """The ``tmkl`` forward on this rank's shard ``(N, V_r)``: every rank returns the same per-row
    ``(loss, ce, kl, stats)`` of the whole rows (``stats`` as :mod:`forgetkern._params`)."""
    y = shard_labels(labels, offset, logits.shape[1], params.ignore_index)
    z_y, _, _, stats = _with_target_logits(rows).forward(
        logits, _own_base(base_logits, logits), y, _shard_params(params))
    part = stats_to_part(stats, z_y, params)
    return merge_partials(part[:, None], labels, params, _all_reduce(group))


@torch.no_grad()
def tmkl_backward(logits, base_logits, labels, stats, coef_ce, coef_kl, params: TMKLParams,
                  grad_out, *, rows: Implementation, offset: int):
    """The gradient of this rank's shard by the backend's backward from the whole rows'
    statistics: local, no collective."""
    y = shard_labels(labels, offset, logits.shape[1], params.ignore_index)
    return rows.backward(logits, _own_base(base_logits, logits), y, stats, coef_ce, coef_kl,
                         _shard_params(params), grad_out)


@torch.no_grad()
def linear_tmkl_forward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels,
                        params, row_weight=None, needs=(False, False, False), *,
                        rows: Implementation, group, offset: int):
    """The ``linear_tmkl`` forward with the head sharded by rows (this rank's ``(V_r, D)`` rows of
    the vocabulary, biases likewise): the chunked driver over the backend's ``tmkl`` kernels, the
    logits of the shard formed chunk by chunk and never whole; every rank returns the same
    ``(loss, ce, kl, stats, None)``."""
    y = shard_labels(labels, offset, weight.shape[0], params.ignore_index)
    z_y, _, _, stats = linear_pass(_with_target_logits(rows), hidden, weight, bias, y,
                                   _shard_params(params), base_hidden=base_hidden,
                                   base_weight=base_weight, base_bias=base_bias)[:4]
    part = stats_to_part(stats, z_y, params)
    return (*merge_partials(part[:, None], labels, params, _all_reduce(group)), None)


@torch.no_grad()
def linear_tmkl_backward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels, stats,
                         coef_ce, coef_kl, params, needs, *, rows: Implementation, group,
                         offset: int):
    """``(grad_hidden, grad_weight_shard, grad_bias_shard)``: the chunked driver's backward pass on
    the shard from the whole rows' statistics, then ``grad_hidden`` (each rank's share in the
    inputs' dtype) summed over the ranks in the accumulation dtype (one ``all_reduce(SUM)`` of
    ``N x D``)."""
    y = shard_labels(labels, offset, weight.shape[0], params.ignore_index)
    dh, dw, db = linear_pass(_with_saved_stats(rows, stats), hidden, weight, bias, y,
                             _shard_params(params), base_hidden=base_hidden,
                             base_weight=base_weight, base_bias=base_bias, coef_ce=coef_ce,
                             coef_kl=coef_kl, needs=needs)[4:]
    if dh is not None:
        dh = dh.to(accumulation_dtype(hidden.dtype))
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        dh = dh.to(hidden.dtype)
    return dh, dw, db


def resolve(op: str, group, backend: str | None, *inputs):
    """The vocab-parallel form of ``op`` (``"tmkl"`` or ``"linear_tmkl"``): ``(Implementation,
    laid-out inputs)`` (``inputs``: the arguments of ``_validate.<op>_inputs``). Each rank checks
    its inputs and picks its backend (:func:`shard_backend`), then one ``all_gather``
    (:func:`forgetkern._rank_check.check_ranks_agree`) gives every rank the same verdict and the
    shard layout; then the labels meet the whole vocabulary."""
    validate = _validate.linear_tmkl_inputs if op == "linear_tmkl" else _validate.tmkl_inputs
    laid = descriptor = error = rows = None
    try:
        if op == "linear_tmkl" and inputs[-3].strategy == "fused":
            raise ValueError("the vocab-parallel form (process_group) runs the chunked strategy; "
                             "strategy='fused' has no vocab-parallel form")
        laid = validate(*inputs, num_classes=_ANY_VOCAB)  # global ids: bounded after the gather
        rows = _backend.implementation("tmkl", shard_backend(laid[0], backend))
        descriptor = describe(op, inputs, laid)
    except Exception as exc:  # noqa: BLE001 - every rank learns it in the check below
        error = exc
    offset, total = check_ranks_agree(group, descriptor, error, f"{op}_loss")
    _validate.check_labels(laid[-1], laid[-1].shape, total, inputs[-3].ignore_index)
    make = vocab_parallel_linear_tmkl if op == "linear_tmkl" else vocab_parallel_tmkl
    return make(group, offset, rows), laid


def vocab_parallel_linear_tmkl(group, offset: int, rows: Implementation | None = None
                               ) -> Implementation:
    """The ``linear_tmkl`` op's interface with the head sharded by rows over ``group`` (this rank's
    start at ``offset``), over ``rows``, a ``tmkl`` implementation (default: the reference's)."""
    rows = rows or _backend.implementation("tmkl", "reference")
    return Implementation(op="linear_tmkl", backend=rows.backend,
                          forward=partial(linear_tmkl_forward, rows=rows, group=group,
                                          offset=offset),
                          backward=partial(linear_tmkl_backward, rows=rows, group=group,
                                           offset=offset))


def vocab_parallel_tmkl(group, offset: int, rows: Implementation | None = None) -> Implementation:
    """The ``tmkl`` op's interface over ``group``'s vocabulary shards (this rank's starts at
    ``offset``), over ``rows``, a ``tmkl`` implementation (default: the reference's), for
    :class:`forgetkern._autograd.TMKLFunction`."""
    rows = rows or _backend.implementation("tmkl", "reference")
    return Implementation(op="tmkl", backend=rows.backend,
                          forward=partial(tmkl_forward, rows=rows, group=group, offset=offset),
                          backward=partial(tmkl_backward, rows=rows, offset=offset))
