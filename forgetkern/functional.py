"""Public functional API. Each function validates its inputs once (``_validate``), resolves the
backend once (``_backend``) and hands that implementation to the autograd Function."""
from __future__ import annotations

from dataclasses import replace

import torch

from . import _backend, _chunked, _validate, distributed
from ._autograd import (LinearSparseTMKLFunction, LinearTMKLFunction, SparseTMKLFunction,
                        TMKLFunction)
from ._params import LinearTMKLParams, TMKLParams, TopKBase, accumulation_dtype, env_backend
from .reference.sparse_tmkl import topk_record


def _reduce(per_row: torch.Tensor, labels: torch.Tensor, reduction: str, ignore_index: int,
            num_items_in_batch) -> torch.Tensor:
    """Reduce per-row values: ``none`` keeps ``labels.shape``; ``mean`` divides the sum by the
    number of non-ignored rows (or ``num_items_in_batch``), never by zero."""
    if reduction == "none":
        return per_row.view(labels.shape)
    total = per_row.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        denom = (labels != ignore_index).sum()
    elif isinstance(num_items_in_batch, torch.Tensor):
        denom = num_items_in_batch.to(device=total.device).reshape(())
    else:
        denom = torch.tensor(num_items_in_batch, device=total.device)
    return total / denom.to(total.dtype).clamp_min(1)


def tmkl_loss(
    logits: torch.Tensor,
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl_weight: float = 1.0,
    ce_weight: float = 1.0,
    temperature: float = 1.0,
    direction: str = "forward",
    mask_target: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    return_components: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
    process_group=None,
):
    """Cross-entropy plus target-masked KL to a frozen base model.

    In plain torch, for ``(N, V)`` logits ``z``, base logits ``b`` and ``(N,)`` labels ``y``
    (``mask_target=True``, forward direction, ``T = temperature``)::

        ce = F.cross_entropy(z, y, reduction="none")
        keep = ~F.one_hot(y, V).bool()                       # drop the target column
        kl = (lp := (b / T).masked_fill(~keep, -inf).log_softmax(-1)).exp().mul(
             lp - (z / T).masked_fill(~keep, -inf).log_softmax(-1)).nan_to_num().sum(-1)
        loss = ce_weight * ce + kl_weight * T**2 * kl          # then reduced

    but streamed over the vocabulary with O(N) extra memory and exact for confident targets.

    Args:
        logits: ``(..., V)`` adapted-model logits (float16/bfloat16/float32/float64).
        base_logits: ``(..., V)`` frozen base-model logits, same dtype; never gets a gradient.
            Or a :class:`TopKBase` record of them (a top-k base cache, :func:`topk_base`): the
            KL then runs over the record's support plus one tail bucket (docs/base_cache.md).
        labels: ``(...)`` integer targets in ``[0, V)`` or ``ignore_index``.
        kl_weight: weight of the KL term (multiplied by ``T**2``).
        ce_weight: weight of the cross-entropy term.
        temperature: ``T > 0`` applied to both distributions of the KL (never to the CE).
        direction: ``"forward"`` = KL(base || adapted) (default), ``"reverse"`` = KL(adapted || base).
        mask_target: remove the target from both distributions before the KL (TMKL);
            ``False`` gives the plain full-vocabulary KL.
        ignore_index: label value whose tokens contribute nothing.
        reduction: ``"mean"`` (over non-ignored tokens, or ``num_items_in_batch``), ``"sum"``
            or ``"none"`` (shaped like ``labels``, zeros at ignored tokens).
        num_items_in_batch: denominator of ``"mean"`` under gradient accumulation (HF Trainer).
        return_components: also return ``ce`` and the unscaled ``kl``, reduced alike.
        inplace_backward: write the gradient into ``logits``' storage (saves one logits-sized
            buffer; ``logits`` must not be used after backward).
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or ``None`` (automatic, see
            docs/architecture.md). A :class:`TopKBase` base: ``"reference"`` or ``"triton"``.
        process_group: a ``torch.distributed`` process group over which the vocabulary is sharded
            (vocab-parallel): ``logits``/``base_logits`` hold this rank's contiguous shard of the
            vocabulary (rank order, sizes may differ), ``labels`` the global token ids, identical
            on every rank. Every rank returns the same loss and gets its shard's gradient
            (:mod:`forgetkern.distributed`: the reference or Triton kernels on each shard).
            Logits given as DTensors sharded on the vocabulary dimension (``Shard(-1)`` over a
            1-D mesh) need no ``process_group``: it is the mesh's.

    Returns:
        ``loss``, or ``(loss, ce, kl)`` with ``return_components=True``. Losses are float32
        (float64 for float64 logits). A batch with no valid token gives ``0``.
    """
    params = TMKLParams(
        kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature, direction=direction,
        mask_target=mask_target, ignore_index=ignore_index, inplace_backward=inplace_backward,
    )
    if isinstance(base_logits, TopKBase):
        if process_group is not None:
            raise ValueError("a TopKBase base record has no vocab-parallel form (process_group)")
        z, rec, y = _validate.sparse_tmkl_inputs(logits, base_logits, labels, params, reduction,
                                                 num_items_in_batch)
        impl = _backend.resolve("sparse_tmkl", logits, backend=backend)
        outs = SparseTMKLFunction.apply(z, *rec, y, params, impl)
        outs = [_reduce(t, labels, reduction, ignore_index, num_items_in_batch) for t in outs]
        return tuple(outs) if return_components else outs[0]
    if distributed.is_dtensor(logits):  # sharded on the vocabulary: the group is the mesh's
        logits, base_logits, labels, process_group = distributed.from_dtensors(
            logits, base_logits, labels, process_group)
    if process_group is None:
        z, b, y = _validate.tmkl_inputs(logits, base_logits, labels, params, reduction,
                                        num_items_in_batch)
        impl = _backend.resolve("tmkl", logits, backend=backend)
    else:  # every rank's inputs checked, and checked against the other ranks'
        impl, (z, b, y) = distributed.resolve("tmkl", process_group, backend, logits, base_logits,
                                              labels, params, reduction, num_items_in_batch)
    loss, ce, kl = TMKLFunction.apply(z, b, y, params, impl)
    reduce = lambda t: _reduce(t, labels, reduction, ignore_index, num_items_in_batch)  # noqa: E731
    if return_components:
        return reduce(loss), reduce(ce), reduce(kl)
    return reduce(loss)


def generalized_eigh(A: torch.Tensor, B: torch.Tensor, *, eps: float = 0.0,
                     backend: str | None = None):
    """Batched generalized symmetric eigenproblem ``A v = lambda (B + eps I) v``.

    In plain torch::

        L = torch.linalg.cholesky(B + eps * I)                      # (..., n, n)
        w, U = torch.linalg.eigh(L.inverse() @ A @ L.inverse().mT)  # ascending w: (..., n)
        V = L.inverse().mT @ U                                      # V^T (B + eps I) V = I

    Args:
        A: ``(..., n, n)`` symmetric matrices.
        B: ``(..., n, n)`` symmetric positive-definite matrices (after damping).
        eps: non-negative damping added to the diagonal of ``B``.
        backend: ``"reference"``, ``"triton"`` (one program per matrix for ``n <= 32``),
            ``"cuda"`` (GPU tensors; one thread block per matrix for ``n <= 64``) or ``None``
            (automatic). A size the chosen kernel does not serve runs on the CUDA kernel where
            it can, else on the reference.

    Returns:
        ``(eigenvalues (..., n) ascending, eigenvectors (..., n, n) as columns)``.
    """
    A, B, eps = _validate.generalized_eigh_inputs(A, B, eps)
    impl = _backend.resolve("generalized_eigh", A, backend=backend, size=A.shape[-1])
    w, V, status = impl.solve(A, B, eps)
    _validate.check_eigh_status(status, eps)
    return w, V


def linear_tmkl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    base_hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    base_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    kl_weight: float = 1.0,
    ce_weight: float = 1.0,
    temperature: float = 1.0,
    direction: str = "forward",
    mask_target: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    return_components: bool = False,
    inplace_backward: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    chunk_dtype: str = "accumulation",
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    backend: str | None = None,
    process_group=None,
):
    """:func:`tmkl_loss` straight from hidden states and the LM head, never materializing logits.

    In plain torch, for ``(N, D)`` hidden states ``h``, base hidden states ``h_b`` and a ``(V, D)``
    head ``W`` shared by both models (the LoRA case)::

        logits = h @ W.T + bias                              # (N, V), never formed here
        base_logits = h_b @ W_b.T + base_bias                # (N, V), W_b = W by default
        loss = tmkl_loss(logits, base_logits, labels, ...)   # same options, same result

    (with ``logit_scale`` ``s`` and ``logit_softcap`` ``c``, both logits are first
    ``c * tanh(s * logits / c)``). ``strategy="chunked"`` forms a chunk of rows' logits at a time
    with a vendor GEMM (fp32 for 16-bit inputs) and runs the backend's TMKL kernels on it;
    ``"fused"`` (Triton) forms logit tiles on chip; ``"auto"`` picks (docs/linear_tmkl.md).

    Args:
        hidden: ``(..., D)`` adapted-model final hidden states (float16/bfloat16/float32/float64).
        weight: ``(V, D)`` LM head, same dtype. Gets a gradient only if it requires grad.
        base_hidden: ``(..., D)`` frozen base-model hidden states; never gets a gradient. Or a
            :class:`TopKBase` record of the base logits (then no ``base_weight``/``base_bias``;
            the record holds the base logits as they are: ``logit_scale``/``logit_softcap``
            apply to the adapted side only).
        labels: ``(...)`` integer targets in ``[0, V)`` or ``ignore_index``.
        base_weight: ``(V, D)`` base LM head; ``None`` (default) uses ``weight`` itself (no copy).
            Never gets a gradient.
        bias: ``(V,)`` head bias or ``None``; gets a gradient only if it requires grad.
        base_bias: ``(V,)`` base head bias. ``None`` means ``bias`` when the head is shared
            (``base_weight=None``) and no bias when a separate ``base_weight`` is given.
        kl_weight, ce_weight, temperature, direction, mask_target, ignore_index, reduction,
            num_items_in_batch, return_components: as in :func:`tmkl_loss`. With
            ``kl_weight=0`` and no components the base model is not read at all (CE alone).
        inplace_backward: accepted for parity with :func:`tmkl_loss`; no effect here (there is no
            logits-sized gradient to write in place).
        strategy: ``"auto"`` (chunked unless ``memory_budget`` forbids a useful chunk; then
            fused where Triton runs), ``"chunked"`` or ``"fused"`` (Triton only; no form for a
            :class:`TopKBase` base).
        chunk_size: rows per chunk (chunked strategy); ``None`` sizes chunks from ``memory_budget``.
        memory_budget: bytes of one chunk's working set (logits and gradient buffers, the
            kernels' temporaries); ``None``: a quarter of the fp32 ``N x V`` logits, at most 1 GiB.
        chunk_dtype: ``"accumulation"`` (fp32 logits chunks for 16-bit inputs) or ``"input"``
            (chunks in the inputs' dtype: half the memory, logits rounded to that dtype).
        logit_scale: ``s > 0``, logits ``s * (h W^T + bias)`` (Cohere).
        logit_softcap: ``c > 0`` or ``None``, logits ``c * tanh(logits / c)`` after the scale
            (Gemma 2). Neither runs on ``strategy="fused"``.
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or ``None`` (automatic). A
            :class:`TopKBase` base runs on the backends of the sparse-base op, ``"reference"``
            and ``"triton"`` (chunked); the exact base on all three (``"cuda"``: chunked).
        process_group: a ``torch.distributed`` process group over which the head is sharded by
            rows (vocab-parallel): ``weight`` (and ``base_weight``, the biases) hold this rank's
            contiguous rows of the vocabulary in rank order, ``labels`` global ids identical on
            every rank; every rank returns the same loss, the gradient of its head shard, and the
            gradient w.r.t. ``hidden`` summed over the ranks (the chunked strategy, over the
            reference or Triton kernels on each shard).

    Returns:
        ``loss``, or ``(loss, ce, kl)`` with ``return_components=True``, reduced as in
        :func:`tmkl_loss`; float32 (float64 for float64 inputs).
    """
    params = LinearTMKLParams(
        kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature, direction=direction,
        mask_target=mask_target, ignore_index=ignore_index, inplace_backward=inplace_backward,
        strategy=strategy, chunk_size=chunk_size, memory_budget=memory_budget,
        chunk_dtype=chunk_dtype, logit_scale=logit_scale, logit_softcap=logit_softcap,
        compute_kl=kl_weight != 0 or return_components,
    )
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if isinstance(base_hidden, TopKBase):
        if process_group is not None:
            raise ValueError("a TopKBase base record has no vocab-parallel form (process_group)")
        h, rec, y = _validate.linear_sparse_tmkl_inputs(
            hidden, weight, base_hidden, labels, base_weight, bias, base_bias, params, reduction,
            num_items_in_batch)
        impl, params = _linear_strategy("linear_sparse_tmkl", h, weight, params, backend, grads)
        return _linear_apply(LinearSparseTMKLFunction, (h, weight, bias, *rec, y), params, impl,
                             labels, reduction, num_items_in_batch, return_components)
    inputs = (hidden, weight, base_hidden, labels, base_weight, bias, base_bias, params, reduction,
              num_items_in_batch)
    if process_group is None:
        h, hb, wb, bb, y = _validate.linear_tmkl_inputs(*inputs)
        impl, params = _linear_strategy("linear_tmkl", h, weight, params, backend, grads)
    else:  # every rank's inputs checked, and checked against the other ranks'
        impl, (h, hb, wb, bb, y) = distributed.resolve("linear_tmkl", process_group, backend,
                                                       *inputs)
    return _linear_apply(LinearTMKLFunction, (h, weight, hb, wb, bias, bb, y), params, impl,
                         labels, reduction, num_items_in_batch, return_components,
                         precompute=process_group is None)


def _linear_strategy(op, hidden, weight, params, backend, grads):
    """``(implementation, params)`` of one fused-linear call: the strategy (docs/linear_tmkl.md),
    chosen once here, and for the chunked one its rows per chunk (``params.chunk_size``)."""
    fused = _backend.FUSED.get(op)
    if params.strategy == "fused":
        if fused is None:
            raise ValueError("strategy='fused' has no form for a TopKBase base record; use 'chunked'")
        if params.transforms_logits:
            raise ValueError("strategy='fused' does not apply logit_scale/logit_softcap; use "
                             "strategy='chunked' or 'auto'")
        return _backend.resolve(fused, hidden, backend=backend or "triton"), params
    name = _backend.resolve_name(op, hidden, backend=backend)
    rows = _backend.implementation(_backend.CHUNKED[op], name)
    plan = _chunked.plan(hidden.shape[0], weight.shape[0], hidden.dtype, params, rows,
                         dense=op == "linear_tmkl", grads=grads)
    chosen = (backend or env_backend()) in (None, "triton")
    if (params.strategy == "auto" and params.chunk_size is None and not plan.useful
            and fused is not None and chosen and not params.transforms_logits
            and _backend.why_unavailable("triton", fused, hidden.device) is None):
        return _backend.implementation(fused, "triton"), params
    return _backend.implementation(op, name), replace(params, chunk_size=plan.rows)


def _linear_apply(function, args, params, impl, labels, reduction, num_items_in_batch,
                  return_components, precompute=True):
    """Run a fused-linear Function whose forward may precompute gradients for the upstream
    gradient each row's loss receives from the reduction (``row_weight``: ``1/denominator`` for
    ``"mean"``), then reduce."""
    hidden = args[0]
    acc = accumulation_dtype(hidden.dtype)
    row_weight = torch.ones((), dtype=acc, device=hidden.device)
    if reduction == "mean" and labels.numel() > 0:
        unit = torch.zeros(labels.numel(), dtype=acc, device=hidden.device)
        unit[0] = 1.0
        row_weight = _reduce(unit, labels, reduction, params.ignore_index, num_items_in_batch)
    outs = function.apply(*args, row_weight, torch.is_grad_enabled() and precompute, params, impl)
    outs = [_reduce(t, labels, reduction, params.ignore_index, num_items_in_batch) for t in outs]
    return tuple(outs) if return_components else outs[0]


def topk_base(base_logits: torch.Tensor, labels: torch.Tensor, k: int, *, temperature: float = 1.0,
              ignore_index: int = -100) -> TopKBase:
    """The :class:`TopKBase` record of base logits: what a top-k base cache stores per token.

    In plain torch, for ``(N, V)`` base logits ``b`` and ``(N,)`` labels ``y``::

        values, indices = b.topk(k, dim=-1)                   # (N, k), (N, k)
        u = (b / T).scatter(-1, y[:, None], -inf)             # the target removed
        lse, tail_lse = u.logsumexp(-1), u.scatter(-1, indices, -inf).logsumexp(-1)

    with ``target = b.gather(-1, y[:, None])`` and ``labels = y`` (the record names its targets);
    rows of ignored labels use label 0 (the loss ignores them). Shapes follow ``labels``:
    ``base_logits (..., V)`` gives ``(..., k)`` / ``(...)``.
    Float32 (float64 for float64 logits), indices int32.
    """
    params = TMKLParams(temperature=temperature, ignore_index=ignore_index)
    _validate.check_tensor(base_logits, "base_logits")
    _validate.check_float(base_logits, "base_logits")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= base_logits.shape[-1]:
        raise ValueError(f"k must be an int in [1, V={base_logits.shape[-1]}], got {k!r}")
    _validate.check_labels(labels, base_logits.shape[:-1], base_logits.shape[-1], ignore_index)
    lead = tuple(labels.shape)
    values, idx, lse, tail, target = topk_record(
        _validate.rows(base_logits.detach()), _validate.flat_labels(labels), k,
        params.temperature, ignore_index)
    return TopKBase(values.view(*lead, k), idx.view(*lead, k), lse.view(lead), tail.view(lead),
                    target.view(lead), params.temperature, labels.detach().clone())
