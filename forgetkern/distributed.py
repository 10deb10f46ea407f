"""Vocabulary-parallel TMKL on ``torch.distributed``: each rank of a process group holds a
contiguous shard of the vocabulary (rank order; shard sizes may differ) of the logits and the base
logits, labels are global token ids identical on every rank.

Per row, in plain torch over the whole vocabulary, this computes exactly ``tmkl_loss``; per rank it
reads only its shard (docs/math.md §5). First, per call, one ``all_gather`` of a
fixed-size descriptor per rank (:mod:`forgetkern._rank_check`): the same error on every rank when
one rank's inputs fail their checks or the ranks disagree (rows, dtype, options, labels). Then:
1. local statistics of the shard, each normalizer as its max and its sum apart, and the KL
   accumulator as a sum of differences of offsets to the local maxima (the rank that owns the
   target removes it from its sums when ``mask_target``);
2. ``all_reduce(MAX)`` of the maxima of ``z/T``, ``b/T`` and (``T != 1``) ``z``: ``3 N`` floats;
3. every rank rescales its sums and its KL accumulator to the global maxima (offsets move by the
   change of the maxima), then ``all_reduce(SUM)`` of the three sums, the accumulator and the target
   logit (from its owner): ``5 N`` floats;
4. every rank finishes the same per-row loss; the backward is local to the shard, from the saved
   global statistics: no collective, no vocabulary-sized traffic.

The helpers at the end serve a data-parallel (DDP, FSDP2) training step (:func:`data_parallel`).
The math is the reference's in row chunks (CPU and GPU tensors, gloo or NCCL);
:func:`vocab_parallel_tmkl` gives it the ``tmkl`` op's interface for the usual autograd Function.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a torch without torch.distributed: isinstance(x, ()) is always False
    FSDPModule = ()

from . import _validate
from ._backend import Implementation, implementation
from ._chunked import logits_chunk, plan
from ._rank_check import check_ranks_agree, describe
from ._params import TMKLParams, accumulation_dtype, row_outputs, with_target
from .reference import tmkl as ref

NEG_INF = float("-inf")
_ANY_VOCAB = 2**62  # the label bound of the per-rank checks, before the whole vocabulary is known


def is_dtensor(x) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (without importing it otherwise)."""
    cls = type(x)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


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


def _local_labels(labels, offset, columns, p: TMKLParams):
    """Labels within this shard (``-1`` where the target lies elsewhere or the row is ignored)
    and the rows that count."""
    y = labels.long()
    valid = y != p.ignore_index
    y_loc = y - offset
    here = valid & (y_loc >= 0) & (y_loc < columns)
    return torch.where(here, y_loc, torch.full_like(y_loc, -1)), valid


def _raw_max(m, s):
    """The max as seen by an all-reduce: ``-inf`` where the shard has no mass."""
    return torch.where(s == 0, torch.full_like(m, NEG_INF), m)


def _safe(m):
    return m.masked_fill(m == NEG_INF, 0.0)


def _shard_partials(z, b, y_loc, p: TMKLParams):
    """One chunk of one shard: local maxima (safe), sums and the KL accumulator
    ``sum_v w_v ((a_v - m_a) - (o_v - m_o))`` over the shard's kept columns, the CE normalizer's
    max and sum over the shard (``T != 1``) and the target logit where this shard owns it."""
    xs = ref._scaled(z, y_loc, p)
    m_z, s_z, e_z = ref._shifted(xs)
    us = ref._scaled(b, y_loc, p)
    m_b, s_b, e_b = ref._shifted(us)
    w, terms = (e_b, us.sub_(xs)) if p.forward_kl else (e_z, xs.sub_(us))
    acc = terms.mul_(w).masked_fill_(w == 0, 0.0).sum(dim=1)
    del xs, us, e_z, e_b, w, terms
    if p.separate_ce:
        zs = z.to(acc.dtype, copy=True)
        m_c, s_c, _ = ref._shifted(zs)
        del zs
    else:
        m_c, s_c = m_z, s_z
    here = y_loc >= 0
    z_y = z.gather(1, y_loc.clamp_min(0)[:, None]).squeeze(1).to(acc.dtype)
    z_y = torch.where(here, z_y, torch.zeros_like(z_y))
    return m_z, s_z, m_b, s_b, acc, m_c, s_c, z_y


@torch.no_grad()
def tmkl_forward(logits, base_logits, labels, params: TMKLParams, *, group, offset: int,
                 chunk_bytes: int | None = None):
    """The ``tmkl`` forward on this rank's shard ``(N, V_r)``: every rank returns the same per-row
    ``(loss, ce, kl, stats)`` of the whole rows (``stats`` as :mod:`forgetkern._params`)."""
    n, v = logits.shape
    acc_dtype = accumulation_dtype(logits.dtype)
    parts = [torch.zeros(n, dtype=acc_dtype, device=logits.device) for _ in range(8)]
    y_loc, valid = _local_labels(labels, offset, v, params)
    step = ref.chunk_rows(v, logits.dtype, chunk_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        for out, value in zip(parts, _shard_partials(logits[start:stop], base_logits[start:stop],
                                                     y_loc[start:stop], params)):
            out[start:stop] = value
    return _combine(parts, valid, params, group)


def _combine(parts, valid, params: TMKLParams, group):
    """Every rank's per-row shard partials into the whole rows' ``(loss, ce, kl, stats)``: one
    ``all_reduce(MAX)`` of ``3 N`` and one ``all_reduce(SUM)`` of ``5 N`` floats."""
    m_z, s_z, m_b, s_b, acc, m_c, s_c, z_y = parts
    # 1. the global maxima (raw: -inf where a shard has no mass)
    top = torch.stack([_raw_max(m_z, s_z), _raw_max(m_b, s_b), _raw_max(m_c, s_c)])
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    gz, gb, gc = (_safe(t) for t in top)

    # 2. sums and the accumulator moved to the global maxima, then summed
    def moved(s, m, g):
        return torch.where(s == 0, torch.zeros_like(s), s * (m - g).exp())

    sz, sb, sc = moved(s_z, m_z, gz), moved(s_b, m_b, gb), moved(s_c, m_c, gc)
    dz, db = m_z - gz, m_b - gb
    if params.forward_kl:
        a = torch.where(s_b == 0, torch.zeros_like(acc), (acc + s_b * (db - dz)) * (m_b - gb).exp())
    else:
        a = torch.where(s_z == 0, torch.zeros_like(acc), (acc + s_z * (dz - db)) * (m_z - gz).exp())
    sums = torch.stack([sz, sb, sc, a, z_y])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    sz, sb, sc, a, z_y = sums
    ls_z, ls_b = sz.log(), sb.log()
    s_w, ls_w, ls_o = (sb, ls_b, ls_z) if params.forward_kl else (sz, ls_z, ls_b)
    kl = a / s_w - ls_w + ls_o
    kl = torch.where(ls_o == NEG_INF, torch.full_like(kl, float("inf")), kl)
    kl = torch.where(s_w == 0, torch.zeros_like(kl), kl)
    if params.separate_ce:
        m_ce, ls_ce = gc, sc.log()
    elif params.mask_target:
        m_ce, ls_ce = with_target(gz, ls_z, z_y)
    else:
        m_ce, ls_ce = gz, ls_z
    ce = (m_ce - z_y) + ls_ce
    stats = torch.stack([gz, ls_z, gb, ls_b, m_ce, ls_ce, kl], dim=1)
    return row_outputs(ce, kl, stats, valid, params)


@torch.no_grad()
def tmkl_backward(logits, base_logits, labels, stats, coef_ce, coef_kl, params: TMKLParams,
                  grad_out, *, offset: int, chunk_bytes: int | None = None):
    """The gradient of this rank's shard from the global statistics: local, no collective."""
    n, v = logits.shape
    y_loc, valid = _local_labels(labels, offset, v, params)
    step = ref.chunk_rows(v, logits.dtype, chunk_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        sl = slice(start, stop)
        grad = ref._chunk_grad(logits[sl], base_logits[sl], y_loc[sl], valid[sl], stats[sl],
                               coef_ce[sl], coef_kl[sl], params)
        grad_out[sl].copy_(grad)
    return grad_out


@torch.no_grad()
def linear_tmkl_forward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels,
                        params, row_weight=None, needs=(False, False, False), *, group, offset: int):
    """The ``linear_tmkl`` forward with the head sharded by rows (this rank's ``(V_r, D)`` rows of
    the vocabulary, biases likewise): the logits of the shard are formed chunk by chunk and never
    whole; every rank returns the same ``(loss, ce, kl, stats, None)``."""
    n = hidden.shape[0]
    v = weight.shape[0]
    acc_dtype = accumulation_dtype(hidden.dtype)
    wb = weight if base_weight is None else base_weight
    parts = [torch.zeros(n, dtype=acc_dtype, device=hidden.device) for _ in range(8)]
    y_loc, valid = _local_labels(labels, offset, v, params)
    step = plan(n, v, hidden.dtype, params, implementation("tmkl", "reference"), dense=True).rows
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        z = logits_chunk(hidden[sl], weight, bias, acc_dtype)
        b = logits_chunk(base_hidden[sl], wb, base_bias, acc_dtype)
        for out, value in zip(parts, _shard_partials(z, b, y_loc[sl], params)):
            out[sl] = value
    return (*_combine(parts, valid, params, group), None)


@torch.no_grad()
def linear_tmkl_backward(hidden, weight, base_hidden, base_weight, bias, base_bias, labels, stats,
                         coef_ce, coef_kl, params, needs, *, group, offset: int):
    """``(grad_hidden, grad_weight_shard, grad_bias_shard)``: the shard's gradients, local, then
    ``grad_hidden`` summed over the ranks (one ``all_reduce(SUM)`` of ``N x D``)."""
    n, d = hidden.shape
    v = weight.shape[0]
    acc_dtype = accumulation_dtype(hidden.dtype)
    wb = weight if base_weight is None else base_weight
    need_h, need_w, need_b = (bool(x) for x in needs)
    dh = torch.zeros(n, d, dtype=acc_dtype, device=hidden.device) if need_h else None
    dw = torch.zeros(v, d, dtype=acc_dtype, device=hidden.device) if need_w else None
    db = torch.zeros(v, dtype=acc_dtype, device=hidden.device) if need_b else None
    y_loc, valid = _local_labels(labels, offset, v, params)
    step = plan(n, v, hidden.dtype, params, implementation("tmkl", "reference"), dense=True).rows
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        h = hidden[sl]
        z = logits_chunk(h, weight, bias, acc_dtype)
        b = logits_chunk(base_hidden[sl], wb, base_bias, acc_dtype)
        g = ref._chunk_grad(z, b, y_loc[sl], valid[sl], stats[sl], coef_ce[sl], coef_kl[sl], params)
        del z, b
        if need_h:
            dh[sl] = g.to(weight.dtype) @ weight
        if need_w:
            dw.addmm_(g.T, h.to(acc_dtype))
        if need_b:
            db += g.sum(0)
    if need_h:
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        dh = dh.to(hidden.dtype)
    return dh, dw, db


def resolve(op: str, group, backend: str | None, *inputs):
    """The vocab-parallel form of ``op`` (``"tmkl"`` or ``"linear_tmkl"``): ``(Implementation,
    laid-out inputs)`` (``inputs``: the arguments of ``_validate.<op>_inputs``). Each rank checks
    its inputs, then one ``all_gather`` (:func:`forgetkern._rank_check.check_ranks_agree`) gives
    every rank the same verdict and the shard layout; then the labels meet the whole vocabulary."""
    validate = _validate.linear_tmkl_inputs if op == "linear_tmkl" else _validate.tmkl_inputs
    laid = descriptor = error = None
    try:
        if backend not in (None, "reference"):
            raise ValueError(f"backend={backend!r}: the vocab-parallel form (process_group=...) "
                             "runs the reference implementation; use backend=None")
        params = inputs[-3]
        if op == "linear_tmkl" and (params.strategy == "fused" or params.transforms_logits):
            raise ValueError("the vocab-parallel form (process_group) runs the chunked reference "
                             "without strategy='fused', logit_scale or logit_softcap")
        laid = validate(*inputs, num_classes=_ANY_VOCAB)  # global ids: bounded after the gather
        descriptor = describe(op, inputs, laid)
    except Exception as exc:  # noqa: BLE001 - every rank learns it in the check below
        error = exc
    offset, total = check_ranks_agree(group, descriptor, error, f"{op}_loss")
    _validate.check_labels(laid[-1], laid[-1].shape, total, inputs[-3].ignore_index)
    make = vocab_parallel_linear_tmkl if op == "linear_tmkl" else vocab_parallel_tmkl
    return make(group, offset), laid


def vocab_parallel_linear_tmkl(group, offset: int) -> Implementation:
    """The ``linear_tmkl`` op's interface with the head sharded by rows over ``group``."""
    return Implementation(op="linear_tmkl", backend="reference",
                          forward=partial(linear_tmkl_forward, group=group, offset=offset),
                          backward=partial(linear_tmkl_backward, group=group, offset=offset))


def vocab_parallel_tmkl(group, offset: int) -> Implementation:
    """The ``tmkl`` op's interface over ``group``'s vocabulary shards (this rank's starts at
    ``offset``), for :class:`forgetkern._autograd.TMKLFunction`."""
    return Implementation(op="tmkl", backend="reference",
                          forward=partial(tmkl_forward, group=group, offset=offset),
                          backward=partial(tmkl_backward, offset=offset))


# ---- data parallel: a training step on a DistributedDataParallel or FSDP2 (fully_shard) model ----
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
