"""Input checks shared by the public functions. Every check runs before any kernel launches and
raises with a message naming the argument and what was expected."""
from __future__ import annotations

import torch

from .ops.params import REDUCTIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_float(x: torch.Tensor, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )


def check_same_shape(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}"
        )


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
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(
            f"labels must have shape {tuple(expected_shape)} ({what}.shape[:-1]), "
            f"got {tuple(labels.shape)}"
        )
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
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}"
            )
        return
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(
            f"num_items_in_batch must be an int or a scalar tensor, got {type(num_items_in_batch).__name__}"
        )
    if num_items_in_batch <= 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")


def check_tmkl_inputs(logits, base_logits, labels, ignore_index: int, reduction: str,
                      num_items_in_batch) -> None:
    """All checks of ``tmkl_loss`` on its tensors (options are checked by ``TMKLParams``)."""
    check_tensor(logits, "logits")
    check_tensor(base_logits, "base_logits")
    check_float(logits, "logits")
    check_float(base_logits, "base_logits")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (..., V)")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension (V > 0)")
    check_same_shape(base_logits, "base_logits", logits, "logits")
    if base_logits.dtype != logits.dtype:
        raise TypeError(
            f"base_logits dtype {base_logits.dtype} does not match logits dtype {logits.dtype}; "
            "cast one of them"
        )
    check_tensor(labels, "labels")
    check_same_device(logits=logits, base_logits=base_logits, labels=labels)
    check_reduction(reduction)
    check_num_items(num_items_in_batch)
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)


def check_linear_tmkl_inputs(hidden, weight, base_hidden, labels, base_weight, bias, base_bias,
                             ignore_index: int, reduction: str, num_items_in_batch) -> None:
    """All checks of ``linear_tmkl_loss`` on its tensors (options are checked by its params)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("base_hidden", base_hidden)):
        check_tensor(t, name)
        check_float(t, name)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (..., D)")
    d = hidden.shape[-1]
    if d == 0:
        raise ValueError("hidden must have a non-empty feature dimension (D > 0)")
    check_same_shape(base_hidden, "base_hidden", hidden, "hidden")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a (V, D) matrix, got shape {tuple(weight.shape)}")
    if weight.shape[1] != d:
        raise ValueError(
            f"weight must have D={d} columns (hidden.shape[-1]), got shape {tuple(weight.shape)}"
        )
    v = weight.shape[0]
    if v == 0:
        raise ValueError("weight must have a non-empty vocabulary dimension (V > 0)")
    for name, t in (("weight", weight), ("base_hidden", base_hidden)):
        if t.dtype != hidden.dtype:
            raise TypeError(
                f"{name} dtype {t.dtype} does not match hidden dtype {hidden.dtype}; cast one of them"
            )
    if base_weight is not None:
        check_tensor(base_weight, "base_weight")
        check_same_shape(base_weight, "base_weight", weight, "weight")
        if base_weight.dtype != hidden.dtype:
            raise TypeError(
                f"base_weight dtype {base_weight.dtype} does not match hidden dtype {hidden.dtype}"
            )
    for name, t in (("bias", bias), ("base_bias", base_bias)):
        if t is None:
            continue
        check_tensor(t, name)
        if tuple(t.shape) != (v,):
            raise ValueError(f"{name} must have shape ({v},) (weight.shape[0]), got {tuple(t.shape)}")
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match hidden dtype {hidden.dtype}")
    check_tensor(labels, "labels")
    check_same_device(hidden=hidden, weight=weight, base_hidden=base_hidden, labels=labels,
                      base_weight=base_weight, bias=bias, base_bias=base_bias)
    check_reduction(reduction)
    check_num_items(num_items_in_batch)
    check_labels(labels, hidden.shape[:-1], v, ignore_index, what="hidden")


def check_generalized_eigh_inputs(A, B, eps) -> None:
    """``A``, ``B``: float ``(..., n, n)`` of one shape on one device; ``eps`` finite and ``>= 0``."""
    check_tensor(A, "A")
    check_tensor(B, "B")
    check_float(A, "A")
    check_float(B, "B")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be (..., n, n) square matrices, got shape {tuple(A.shape)}")
    check_same_shape(B, "B", A, "A")
    if A.device != B.device:
        raise ValueError(f"B is on {B.device} but A is on {A.device}")
    if not (0.0 <= eps < float("inf")):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
