"""The one input boundary: every op's checks, run once in the public function before any kernel
launches, each raising with a message naming the argument and what was expected. Backends and the
C++ bindings check nothing more than guards their own pointers and sizes.

Also the one failure contract of the eigensolvers (:func:`check_eigh_status`), shared by every
backend.
"""
from __future__ import annotations

import math
import warnings

import torch

from ._params import (GATES, EIGH_MAX_SWEEPS, EIGH_NO_CONVERGENCE, EIGH_NON_FINITE, FLOAT_DTYPES,
                      TMKLParams, accumulation_dtype)
REDUCTIONS = ("mean", "sum", "none")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_float(x: torch.Tensor, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )


def check_shape(x: torch.Tensor, name: str, shape, *, like: str = "shape", note: str = "") -> None:
    """The one shape check: ``ValueError`` naming the argument, the expected shape (``like``
    describes it, ``note`` says where it comes from) and the shape it got."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have {like} {tuple(shape)}{note}, got {tuple(x.shape)}")


def check_same_shape(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    check_shape(x, name, ref.shape, like=f"the same shape as {ref_name}")


def check_dtype(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """The one dtype-agreement check: ``TypeError`` naming the argument and both dtypes."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {x.dtype} does not match {ref_name} dtype {ref.dtype}; "
                        "cast one of them")


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(
                f"{name} is on {t.device} but {name0} is on {t0.device}; all inputs must share a device"
            )


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_labels(labels: torch.Tensor, expected_shape, num_classes: int, ignore_index: int,
                 what: str = "logits") -> None:
    """Labels must be integers shaped ``expected_shape`` with values in ``[0, num_classes)`` or
    ``ignore_index``. The value check reads the labels (one device sync); it is skipped while
    ``torch.compile`` traces."""
    check_tensor(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    check_shape(labels, "labels", expected_shape, note=f" ({what}.shape[:-1])")
    if labels.numel() == 0 or _compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        values = labels[bad]
        raise ValueError(
            f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"found {values.numel()} out-of-range value(s), e.g. {int(values[0])}"
        )


def check_num_items(num_items_in_batch) -> None:
    """``num_items_in_batch``: ``None``, or a positive whole number of tokens (a Python int, an
    integral float, or a one-element tensor as HF Trainer passes it). A tensor's value is read (one
    device sync), except while ``torch.compile`` traces."""
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}"
            )
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.dtype.is_complex:
            raise TypeError(f"num_items_in_batch must be a number, got {num_items_in_batch.dtype}")
        if _compiling():
            return
        value = num_items_in_batch.item()
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(
            f"num_items_in_batch must be an int or a scalar tensor, got {type(num_items_in_batch).__name__}"
        )
    else:
        value = num_items_in_batch
    if not (value > 0 and float(value).is_integer()):
        raise ValueError(
            f"num_items_in_batch must be > 0 and a whole number of tokens, got {value}"
        )


def rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., V)`` to ``(N, V)`` with unit stride along ``V`` (rows may keep any stride)."""
    out = x.reshape(-1, x.shape[-1])
    if out.shape[1] > 1 and out.stride(-1) != 1:
        out = out.contiguous()
    return out


def flat_labels(labels: torch.Tensor) -> torch.Tensor:
    """``(...)`` labels as one contiguous ``(N,)`` vector: every backend indexes labels with unit
    stride (a strided view, e.g. a column of a 2-D tensor, is copied)."""
    return labels.reshape(-1).contiguous()


def _logits(logits, name: str = "logits") -> None:
    """``(..., V)`` float logits with ``V > 0`` (the dense and the top-k form alike)."""
    check_tensor(logits, name)
    check_float(logits, name)
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (..., V)")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension (V > 0)")


def _head(hidden, weight, **biases) -> tuple[int, int]:
    """Hidden states ``(..., D)``, the ``(V, D)`` head and its ``(V,)`` biases (``None`` skipped),
    all of ``hidden``'s dtype (the dense and the top-k form alike); returns ``(D, V)``."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        check_tensor(t, name)
        check_float(t, name)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (..., D)")
    if (d := hidden.shape[-1]) == 0:
        raise ValueError("hidden must have a non-empty feature dimension (D > 0)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a (V, D) matrix, got shape {tuple(weight.shape)}")
    if weight.shape[1] != d:
        raise ValueError(f"weight must have D={d} columns (hidden.shape[-1]), got shape "
                         f"{tuple(weight.shape)}")
    if (v := weight.shape[0]) == 0:
        raise ValueError("weight must have a non-empty vocabulary dimension (V > 0)")
    check_dtype(weight, "weight", hidden, "hidden")
    for name, t in biases.items():
        if t is not None:
            check_tensor(t, name)
            check_shape(t, name, (v,), note=" (weight.shape[0])")
            check_dtype(t, name, hidden, "hidden")
    return d, v


def _rest(labels, lead, num_classes: int, params: TMKLParams, reduction: str, num_items_in_batch,
          what: str, **tensors) -> None:
    """The checks every loss form shares after its own: labels, devices, reduction, counts."""
    check_tensor(labels, "labels")
    check_same_device(**tensors, labels=labels)
    check_reduction(reduction)
    check_num_items(num_items_in_batch)
    check_labels(labels, lead, num_classes, params.ignore_index, what=what)


def tmkl_inputs(logits, base_logits, labels, params: TMKLParams, reduction: str,
                num_items_in_batch, num_classes: int | None = None):
    """All checks of ``tmkl_loss`` on its tensors (options were checked by ``TMKLParams``); returns
    the layout every backend takes: ``(N, V)`` logits and base logits (unit stride along V, the
    base detached) and contiguous ``(N,)`` labels. ``num_classes``: the whole vocabulary when the
    logits are one shard of it (labels are then global ids); default ``V``."""
    _logits(logits)
    check_tensor(base_logits, "base_logits")
    check_float(base_logits, "base_logits")
    check_same_shape(base_logits, "base_logits", logits, "logits")
    check_dtype(base_logits, "base_logits", logits, "logits")
    vocab = logits.shape[-1] if num_classes is None else num_classes
    _rest(labels, logits.shape[:-1], vocab, params, reduction, num_items_in_batch, "logits",
          logits=logits, base_logits=base_logits)
    return rows(logits), rows(base_logits.detach()), flat_labels(labels)


def linear_tmkl_inputs(hidden, weight, base_hidden, labels, base_weight, bias, base_bias,
                       params: TMKLParams, reduction: str, num_items_in_batch,
                       num_classes: int | None = None):
    """All checks of ``linear_tmkl_loss`` on its tensors (options were checked by its params);
    returns ``(h (N, D), h_b (N, D) detached, W_b or None (None: the base shares weight),
    base bias or None, labels (N,) contiguous)``. With the head shared and no ``base_bias`` given,
    the base uses ``bias``."""
    d, v = _head(hidden, weight, bias=bias, base_bias=base_bias)
    check_tensor(base_hidden, "base_hidden")
    check_float(base_hidden, "base_hidden")
    check_same_shape(base_hidden, "base_hidden", hidden, "hidden")
    check_dtype(base_hidden, "base_hidden", hidden, "hidden")
    if base_weight is not None:
        check_tensor(base_weight, "base_weight")
        check_same_shape(base_weight, "base_weight", weight, "weight")
        check_dtype(base_weight, "base_weight", hidden, "hidden")
    vocab = v if num_classes is None else num_classes
    _rest(labels, hidden.shape[:-1], vocab, params, reduction, num_items_in_batch, "hidden",
          hidden=hidden, weight=weight, base_hidden=base_hidden, base_weight=base_weight, bias=bias,
          base_bias=base_bias)
    if base_bias is None and base_weight is None and bias is not None:
        base_bias = bias
    shared = base_weight is None or base_weight is weight
    return (hidden.reshape(-1, d), base_hidden.detach().reshape(-1, d),
            None if shared else base_weight.detach(),
            None if base_bias is None else base_bias.detach(), flat_labels(labels))


def generalized_eigh_inputs(A, B, eps):
    """``A``, ``B``: float ``(..., n, n)`` of one shape on one device; ``eps`` a finite number
    ``>= 0``. Returns ``(A, B, eps)`` in the working dtype every backend solves in (float64 if
    either input is float64, else float32) and ``eps`` as a float."""
    check_tensor(A, "A")
    check_tensor(B, "B")
    check_float(A, "A")
    check_float(B, "B")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be (..., n, n) square matrices, got shape {tuple(A.shape)}")
    check_same_shape(B, "B", A, "A")
    if A.device != B.device:
        raise ValueError(f"B is on {B.device} but A is on {A.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not (0.0 <= eps < float("inf")):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    dtype = accumulation_dtype(torch.promote_types(A.dtype, B.dtype))
    return A.to(dtype), B.to(dtype), float(eps)


def check_eigh_status(status: torch.Tensor, eps: float) -> None:
    """The eigensolvers' one failure contract, for every backend: per-problem ``status`` codes
    (``forgetkern._params.EIGH_*``) become

    * ``ValueError`` "non-finite values in A or B" (NaN/inf input, or produced by whitening),
    * ``ValueError`` "B + eps*I is not positive definite ...; increase eps",
    * ``RuntimeWarning`` when Jacobi did not converge in ``EIGH_MAX_SWEEPS`` sweeps,

    each naming up to 8 failing batch entries (flattened indices). Skipped while tracing.
    """
    if _compiling() or status.numel() == 0:
        return
    flat = status.reshape(-1).cpu()

    def entries(mask):
        return torch.nonzero(mask).flatten()[:8].tolist()

    bad = entries(flat == EIGH_NON_FINITE)
    if bad:
        raise ValueError(f"non-finite values in A or B (NaN or inf, or overflow while whitening) "
                         f"for batch entries {bad} (flattened indices)")
    bad = entries(flat > 0)
    if bad:
        raise ValueError(f"B + eps*I is not positive definite (eps={eps}) for batch entries {bad} "
                         "(flattened indices); increase eps")
    bad = entries(flat == EIGH_NO_CONVERGENCE)
    if bad:
        warnings.warn(f"forgetkern.generalized_eigh: Jacobi iteration did not converge in "
                      f"{EIGH_MAX_SWEEPS} sweeps for batch entries {bad} (flattened indices); "
                      "results may be inaccurate", RuntimeWarning, stacklevel=3)


def check_gate(gate: str, tau: float, sharpness: float = 4.0) -> None:
    """A FoLoRA gate name and its parameters (see ``forgetkern.optim.gating.gate_values``)."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau!r}")
    if gate in ("soft", "hard") and tau < 0:
        raise ValueError(f"tau must be >= 0 for gate={gate!r}, got {tau}")
    if gate == "sigmoid":
        if tau <= 0:
            raise ValueError(f"tau must be > 0 for gate='sigmoid' (the ratio where the gate is 1/2), got {tau}")
        if not (isinstance(sharpness, (int, float)) and math.isfinite(sharpness) and sharpness > 0):
            raise ValueError(f"sharpness must be a finite number > 0, got {sharpness!r}")
    if gate == "topk" and not (0.0 < tau <= 1.0):
        raise ValueError(f"tau must be in (0, 1] for gate='topk' (fraction of directions kept), got {tau}")


def check_folora_options(group: dict) -> None:
    """The FoLoRA step's boundary: one parameter group's options (the constructor's defaults, or a
    group with the defaults filled in). Raises ``ValueError`` naming the first invalid option."""
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and lr >= 0.0):
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not wd >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {wd!r}")
    check_gate(group["gate"], group["tau"], group["sharpness"])
    damping = group["damping"]
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0.0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    basis = group["basis"]
    if basis != "dense" and (isinstance(basis, bool) or not isinstance(basis, int) or basis < 1):
        raise ValueError(f"basis must be 'dense' or a positive int k (low-rank gating), got {basis!r}")
    every = group["refresh_every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"refresh_every must be a positive int, got {every!r}")
    if group["basis_norm"] not in ("proxy", "unit"):
        raise ValueError(f"basis_norm must be 'proxy' or 'unit', got {group['basis_norm']!r}")


def _topk_base_inputs(base, labels, vocab: int, params: TMKLParams, device, arg: str):
    """The checks of a top-k base record (``forgetkern._params.TopKBase``) passed as ``arg`` for
    ``labels`` over a vocabulary of ``vocab``; returns its rows as every backend takes them:
    ``(values (N, k), indices (N, k) int64, lse, tail_lse, target (N,))``, contiguous, detached.
    Indices and the record's labels are read (one sync), except while ``torch.compile`` traces."""
    if isinstance(t := base.temperature, bool) or not isinstance(t, (int, float)) or not math.isclose(
            float(t), params.temperature, rel_tol=1e-9):
        raise ValueError(f"{arg} was recorded at temperature {t!r} but the loss runs at "
                         f"temperature={params.temperature}; they must be equal")
    if base.labels is None:
        raise ValueError(f"{arg}.labels is None: a record must name the labels it was made for "
                         "(forgetkern.topk_base does; or TopKBase(..., labels=y))")
    for name in ("values", "indices", "lse", "tail_lse", "target", "labels"):
        value, integer = getattr(base, name), name in ("indices", "labels")
        check_tensor(value, f"{arg}.{name}")
        if value.device != device:
            raise ValueError(f"{arg}.{name} is on {value.device} but the inputs are on {device}")
        if not integer:
            check_float(value, f"{arg}.{name}")
        elif value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{arg}.{name} must be an integer tensor, got {value.dtype}")
    values, indices, lead = base.values, base.indices, tuple(labels.shape)
    if values.dim() != len(lead) + 1 or tuple(values.shape[:-1]) != lead:
        raise ValueError(f"{arg}.values must have shape {lead + ('k',)} (one row per label), "
                         f"got {tuple(values.shape)}")
    if not 1 <= (k := values.shape[-1]) <= vocab:
        raise ValueError(f"{arg} must keep 1 <= k <= V={vocab} tokens per row, got k={k}")
    check_same_shape(indices, f"{arg}.indices", values, f"{arg}.values")
    for name in ("lse", "tail_lse", "target", "labels"):
        check_same_shape(getattr(base, name), f"{arg}.{name}", labels, "labels")
    idx = indices.reshape(-1, k).long().contiguous()
    if idx.numel() and not _compiling():
        paired = ((labels == params.ignore_index) | (base.labels == labels)).reshape(-1)
        if not bool(paired.all()):
            raise ValueError(f"{arg} was recorded for other labels: {arg}.labels != labels at "
                             f"{int((~paired).sum())} row(s), e.g. row {int(torch.nonzero(~paired)[0])}")
        if bool(((idx < 0) | (idx >= vocab)).any()):
            raise ValueError(f"{arg}.indices must be token ids in [0, {vocab})")
        ordered = idx.sort(dim=1).values
        if k > 1 and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError(f"{arg}.indices must be distinct within each row")
    return (values.detach().reshape(-1, k).contiguous(), idx,
            *(x.detach().reshape(-1).contiguous() for x in (base.lse, base.tail_lse, base.target)))


def sparse_tmkl_inputs(logits, base, labels, params: TMKLParams, reduction: str,
                       num_items_in_batch):
    """All checks of ``tmkl_loss`` with a top-k base record (the logits and labels checked as in
    :func:`tmkl_inputs`); returns ``(z (N, V), base rows (see :func:`_topk_base_inputs`),
    labels (N,))``."""
    _logits(logits)
    _rest(labels, logits.shape[:-1], logits.shape[-1], params, reduction, num_items_in_batch,
          "logits", logits=logits)
    rec = _topk_base_inputs(base, labels, logits.shape[-1], params, logits.device, "base_logits")
    return rows(logits), rec, flat_labels(labels)


def linear_sparse_tmkl_inputs(hidden, weight, base, labels, base_weight, bias, base_bias,
                              params: TMKLParams, reduction: str, num_items_in_batch):
    """All checks of ``linear_tmkl_loss`` with a top-k base record as ``base_hidden`` (the head
    and labels checked as in :func:`linear_tmkl_inputs`; no base head: ``base_weight`` and
    ``base_bias`` must be ``None``); returns ``(h (N, D), base rows, labels (N,))``."""
    if base_weight is not None or base_bias is not None:
        raise ValueError("base_weight/base_bias must be None when base_hidden is a TopKBase "
                         "record: the record already holds the base model's logits")
    d, v = _head(hidden, weight, bias=bias)
    _rest(labels, hidden.shape[:-1], v, params, reduction, num_items_in_batch, "hidden",
          hidden=hidden, weight=weight, bias=bias)
    rec = _topk_base_inputs(base, labels, v, params, hidden.device, "base_hidden")
    return hidden.reshape(-1, d), rec, flat_labels(labels)
