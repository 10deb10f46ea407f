"""The compiled CUDA extension ``forgetkern._C``: lazy loading and the ``forgetkern::`` torch ops.

``forgetkern._C`` (sources in ``csrc/``) is loaded on first use. A missing or broken build is never
an import error: :func:`available` returns ``False`` and :func:`load_error` says why
(``forgetkern.info()`` shows it).

The extension's launchers take raw device pointers, sizes, strides, a dtype code and a stream, so
they do not depend on the torch ABI. This module wraps them as ``torch.library`` custom ops with
fake (meta) implementations, so ``torch.compile`` traces through them without graph breaks:

* ``forgetkern::tmkl_forward`` -> ``(loss, ce, kl, stats)`` per row;
* ``forgetkern::tmkl_backward`` writes the gradient into a given buffer;
* ``forgetkern::tmkl_backward_inplace`` writes it over the logits;
* ``forgetkern::generalized_eigh`` -> ``(w, V, info)`` for a batch of ``n <= 64`` problems.

:func:`tmkl_forward` / :func:`tmkl_backward` have the backend interface of
:mod:`forgetkern.reference` (used by ``TMKLFunction`` for ``backend="cuda"``);
:func:`generalized_eigh` is ``forgetkern.generalized_eigh(..., backend="cuda")``.

Set ``FORGETKERN_CUDA_SYNC=1`` to synchronize after every launch, so that a fault inside a kernel
is reported by the call that launched it (debugging, compute-sanitizer runs).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from .ops.params import NUM_STATS, TMKLParams

#: Largest ``n`` the batched eigensolver kernel handles (``_C.EIGH_MAX_N``); larger problems use
#: the reference (cuSOLVER through torch).
EIGH_MAX_N = 64

#: dtype codes of the launchers (``_C.DTYPE_CODES``).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
_STATE: tuple | None = None  # (module or None, error or None) once loading was attempted


def _load():
    # a plain global rather than functools.lru_cache: torch.compile reads it without a graph break
    global _STATE
    if _STATE is None:
        _STATE = _try_import()
    return _STATE


def _try_import():
    try:
        return importlib.import_module("forgetkern._C"), None
    except ImportError as exc:  # not built, or built against a missing library
        msg = str(exc)
        if "No module named" in msg:
            msg = ("not built (install with nvcc on PATH, or build in place with "
                   "`python setup.py build_ext --inplace`; see docs/cuda.md)")
        return None, msg
    except Exception as exc:  # pragma: no cover - a broken binary
        return None, f"failed to load: {type(exc).__name__}: {exc}"


def extension():
    """The loaded ``forgetkern._C`` module, or ``None``."""
    return _load()[0]


def available() -> bool:
    """Whether ``forgetkern._C`` loaded."""
    return _load()[0] is not None


def load_error() -> str | None:
    """Why ``forgetkern._C`` did not load, or ``None`` if it did."""
    return _load()[1]


def _require(fn: str):
    ext = extension()
    if ext is None:
        raise RuntimeError(f"forgetkern._cuda.{fn}: the forgetkern._C extension is not available: "
                           f"{load_error()}")
    return ext


def _sync() -> bool:
    return os.environ.get("FORGETKERN_CUDA_SYNC", "0").lower() in ("1", "true", "yes", "on")


def _check_cuda(fn: str, **tensors: torch.Tensor) -> None:
    """Every tensor on the same CUDA device; raises before anything is launched."""
    device = None
    for name, t in tensors.items():
        if t.device.type != "cuda":
            raise ValueError(
                f"forgetkern._cuda.{fn}: {name} must be a CUDA tensor, got a {t.device.type} tensor "
                "(the CUDA backend runs on GPU tensors only; use backend='reference' or 'triton')"
            )
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"forgetkern._cuda.{fn}: {name} is on {t.device} but the other inputs "
                             f"are on {device}")


def _check_fake_device(fn: str, **tensors: torch.Tensor) -> None:
    """Tracing: CUDA and meta tensors are fine; CPU tensors would fail when the graph runs."""
    for name, t in tensors.items():
        if t.device.type not in ("cuda", "meta"):
            raise ValueError(f"forgetkern::{fn}: {name} must be a CUDA tensor, got a "
                             f"{t.device.type} tensor")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _check_rows(fn: str, logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor):
    if logits.dim() != 2 or base_logits.shape != logits.shape:
        raise ValueError(f"forgetkern::{fn}: logits and base_logits must be (N, V) of one shape, got "
                         f"{tuple(logits.shape)} and {tuple(base_logits.shape)}")
    if logits.dtype not in DTYPE_CODES or base_logits.dtype != logits.dtype:
        raise TypeError(f"forgetkern::{fn}: logits and base_logits must share a float dtype, got "
                        f"{logits.dtype} and {base_logits.dtype}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"forgetkern::{fn}: labels must have shape ({logits.shape[0]},), "
                         f"got {tuple(labels.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"forgetkern::{fn}: the vocabulary dimension must be non-empty")


def _unit_cols(x: torch.Tensor) -> torch.Tensor:
    """Rows with unit stride along V (any row stride is fine for the kernels)."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _row_stride(x: torch.Tensor) -> int:
    return x.stride(0) if x.shape[0] > 1 else x.shape[1]


def _labels64(labels: torch.Tensor) -> torch.Tensor:
    return labels.to(torch.int64).contiguous()


# --------------------------------------------------------------------------------------------
# TMKL ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("forgetkern::tmkl_forward", mutates_args=())
def _tmkl_forward_op(
    logits: torch.Tensor,  # [N, V] adapted logits
    base_logits: torch.Tensor,  # [N, V] base logits, same dtype
    labels: torch.Tensor,  # [N] integer labels
    ignore_index: int,
    temperature: float,
    ce_weight: float,
    kl_scale: float,
    forward_kl: bool,
    mask_target: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = "tmkl_forward"
    _check_cuda(fn, logits=logits, base_logits=base_logits, labels=labels)
    _check_rows(fn, logits, base_logits, labels)
    ext = _require(fn)
    z, b, y = _unit_cols(logits), _unit_cols(base_logits), _labels64(labels)
    n, v = z.shape
    acc = _acc_dtype(z.dtype)
    loss = torch.empty(n, dtype=acc, device=z.device)
    ce = torch.empty_like(loss)
    kl = torch.empty_like(loss)
    stats = torch.empty(n, NUM_STATS, dtype=acc, device=z.device)
    with torch.cuda.device(z.device):
        ext.tmkl_forward(
            z=z.data_ptr(), stride_z=_row_stride(z), b=b.data_ptr(), stride_b=_row_stride(b),
            y=y.data_ptr(), loss=loss.data_ptr(), ce=ce.data_ptr(), kl=kl.data_ptr(),
            stats=stats.data_ptr(), n=n, v=v, ignore_index=ignore_index, inv_t=1.0 / temperature,
            ce_weight=ce_weight, kl_scale=kl_scale, forward_kl=forward_kl, mask_target=mask_target,
            separate_ce=temperature != 1.0, dtype=DTYPE_CODES[z.dtype], stream=_stream(z.device),
            sync=_sync(),
        )
    return loss, ce, kl, stats


@_tmkl_forward_op.register_fake
def _(logits, base_logits, labels, ignore_index, temperature, ce_weight, kl_scale, forward_kl,
      mask_target):
    _check_fake_device("tmkl_forward", logits=logits, base_logits=base_logits, labels=labels)
    _check_rows("tmkl_forward", logits, base_logits, labels)
    n = logits.shape[0]
    acc = _acc_dtype(logits.dtype)
    loss = logits.new_empty((n,), dtype=acc)
    return loss, torch.empty_like(loss), torch.empty_like(loss), logits.new_empty((n, NUM_STATS), dtype=acc)


def _launch_backward(fn, logits, base_logits, labels, stats, coef_ce, coef_kl, grad, ignore_index,
                     temperature, forward_kl, mask_target):
    _check_cuda(fn, logits=logits, base_logits=base_logits, labels=labels, stats=stats,
                coef_ce=coef_ce, coef_kl=coef_kl, grad=grad)
    _check_rows(fn, logits, base_logits, labels)
    n, v = logits.shape
    acc = _acc_dtype(logits.dtype)
    if stats.shape != (n, NUM_STATS) or stats.dtype != acc:
        raise ValueError(f"forgetkern::{fn}: stats must be ({n}, {NUM_STATS}) {acc} from tmkl_forward, "
                         f"got {tuple(stats.shape)} {stats.dtype}")
    if grad.shape != logits.shape or grad.dtype != logits.dtype or (v > 1 and grad.stride(1) != 1):
        raise ValueError(f"forgetkern::{fn}: grad must be {tuple(logits.shape)} {logits.dtype} with unit "
                         f"stride along V, got {tuple(grad.shape)} {grad.dtype} strides {grad.stride()}")
    if n > 1 and grad.stride(0) < v:
        raise ValueError(f"forgetkern::{fn}: grad rows must not overlap (row stride {grad.stride(0)} < V={v})")
    ext = _require(fn)
    inplace = grad.data_ptr() == logits.data_ptr()
    z = logits if inplace else _unit_cols(logits)
    b, y = _unit_cols(base_logits), _labels64(labels)
    stats = stats.contiguous()
    a = coef_ce.to(acc).contiguous()
    c = coef_kl.to(acc).contiguous()
    if a.shape != (n,) or c.shape != (n,):
        raise ValueError(f"forgetkern::{fn}: coef_ce and coef_kl must have shape ({n},), "
                         f"got {tuple(coef_ce.shape)} and {tuple(coef_kl.shape)}")
    with torch.cuda.device(z.device):
        ext.tmkl_backward(
            z=z.data_ptr(), stride_z=_row_stride(z), b=b.data_ptr(), stride_b=_row_stride(b),
            y=y.data_ptr(), stats=stats.data_ptr(), coef_ce=a.data_ptr(), coef_kl=c.data_ptr(),
            g=grad.data_ptr(), stride_g=_row_stride(grad), n=n, v=v, ignore_index=ignore_index,
            inv_t=1.0 / temperature, forward_kl=forward_kl, mask_target=mask_target,
            separate_ce=temperature != 1.0, dtype=DTYPE_CODES[z.dtype], stream=_stream(z.device),
            sync=_sync(),
        )


@torch.library.custom_op("forgetkern::tmkl_backward", mutates_args=("grad",))
def _tmkl_backward_op(
    logits: torch.Tensor,  # [N, V] adapted logits
    base_logits: torch.Tensor,  # [N, V] base logits
    labels: torch.Tensor,  # [N] labels
    stats: torch.Tensor,  # [N, 4] from tmkl_forward
    coef_ce: torch.Tensor,  # [N] coefficient of dCE/dz per row
    coef_kl: torch.Tensor,  # [N] coefficient of dKL/dz per row (KL unscaled)
    grad: torch.Tensor,  # [N, V] out, dtype of logits, unit stride along V
    ignore_index: int,
    temperature: float,
    forward_kl: bool,
    mask_target: bool,
) -> None:
    if grad.data_ptr() == logits.data_ptr() and grad.numel() > 0:
        raise ValueError("forgetkern::tmkl_backward: grad aliases logits; use tmkl_backward_inplace")
    _launch_backward("tmkl_backward", logits, base_logits, labels, stats, coef_ce, coef_kl, grad,
                     ignore_index, temperature, forward_kl, mask_target)


@_tmkl_backward_op.register_fake
def _(logits, base_logits, labels, stats, coef_ce, coef_kl, grad, ignore_index, temperature,
      forward_kl, mask_target):
    _check_fake_device("tmkl_backward", logits=logits, grad=grad)
    return None


@torch.library.custom_op("forgetkern::tmkl_backward_inplace", mutates_args=("logits",))
def _tmkl_backward_inplace_op(
    logits: torch.Tensor,  # [N, V] adapted logits, overwritten by the gradient (unit stride along V)
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    coef_ce: torch.Tensor,
    coef_kl: torch.Tensor,
    ignore_index: int,
    temperature: float,
    forward_kl: bool,
    mask_target: bool,
) -> None:
    _launch_backward("tmkl_backward_inplace", logits, base_logits, labels, stats, coef_ce, coef_kl,
                     logits, ignore_index, temperature, forward_kl, mask_target)


@_tmkl_backward_inplace_op.register_fake
def _(logits, base_logits, labels, stats, coef_ce, coef_kl, ignore_index, temperature, forward_kl,
      mask_target):
    _check_fake_device("tmkl_backward_inplace", logits=logits)
    return None


def _check_tmkl_call(fn: str, logits, base_logits, labels):
    _check_cuda(fn, logits=logits, base_logits=base_logits, labels=labels)
    if not torch.compiler.is_compiling():  # the op checks again when it runs
        _require(fn)


def tmkl_forward(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                 params: TMKLParams):
    """CUDA forward: per-row ``(loss, ce, kl, stats)`` for ``(N, V)`` logits.

    Same interface and results as :func:`forgetkern.reference.tmkl_forward`::

        ce = torch.logsumexp(z, -1) - z.gather(1, y[:, None])[:, 0]           # (N,)
        kl = masked KL over v != y of softmax(b/T) vs softmax(z/T)             # (N,)
        loss = ce_weight * ce + kl_weight * T**2 * kl;  stats: (N, 4)           # zeros where ignored
    """
    _check_tmkl_call("tmkl_forward", logits, base_logits, labels)
    return torch.ops.forgetkern.tmkl_forward(
        logits, base_logits, labels, params.ignore_index, params.temperature, params.ce_weight,
        params.kl_scale, params.forward_kl, params.mask_target)


def tmkl_backward(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                  stats: torch.Tensor, coef_ce: torch.Tensor, coef_kl: torch.Tensor,
                  params: TMKLParams, grad_out: torch.Tensor):
    """CUDA backward: writes ``coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz`` into ``grad_out``.

    ``grad_out`` may be ``logits`` itself (in-place backward). In plain torch::

        d_ce = z.softmax(-1) - F.one_hot(y, V)                                  # (N, V)
        d_kl = dKL/dz (DESIGN.md; zero at y when masked)                         # (N, V)
        grad_out[:] = coef_ce[:, None] * d_ce + coef_kl[:, None] * d_kl          # zeros where ignored
    """
    _check_tmkl_call("tmkl_backward", logits, base_logits, labels)
    args = (base_logits, labels, stats, coef_ce, coef_kl)
    opts = (params.ignore_index, params.temperature, params.forward_kl, params.mask_target)
    if grad_out is logits:
        if torch.compiler.is_compiling():
            # a traced graph must not mutate a tensor saved for backward: write a fresh buffer
            grad_out = torch.empty_like(logits)
            torch.ops.forgetkern.tmkl_backward(logits, *args, grad_out, *opts)
        else:
            torch.ops.forgetkern.tmkl_backward_inplace(logits, *args, *opts)
    else:
        torch.ops.forgetkern.tmkl_backward(logits, *args, grad_out, *opts)
    return grad_out


# --------------------------------------------------------------------------------------------
# Generalized eigensolver
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("forgetkern::generalized_eigh", mutates_args=())
def _generalized_eigh_op(
    A: torch.Tensor,  # [batch, n, n] symmetric, float32/float64
    B: torch.Tensor,  # [batch, n, n] symmetric positive definite after damping, dtype of A
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = "generalized_eigh"
    _check_cuda(fn, A=A, B=B)
    _check_eigh_batch(fn, A, B)
    ext = _require(fn)
    batch, n, _ = A.shape
    a, b = A.contiguous(), B.contiguous()
    w = torch.empty(batch, n, dtype=A.dtype, device=A.device)
    vecs = torch.empty(batch, n, n, dtype=A.dtype, device=A.device)
    info = torch.empty(batch, dtype=torch.int32, device=A.device)
    with torch.cuda.device(A.device):
        ext.generalized_eigh(a=a.data_ptr(), b=b.data_ptr(), w=w.data_ptr(), vecs=vecs.data_ptr(),
                             info=info.data_ptr(), batch=batch, n=n, eps=eps,
                             dtype=DTYPE_CODES[A.dtype], stream=_stream(A.device), sync=_sync())
    return w, vecs, info


def _check_eigh_batch(fn, A, B):
    if A.dim() != 3 or A.shape[1] != A.shape[2] or B.shape != A.shape:
        raise ValueError(f"forgetkern::{fn}: A and B must be (batch, n, n) of one shape, got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    if not 1 <= A.shape[1] <= EIGH_MAX_N:
        raise ValueError(f"forgetkern::{fn}: n must be in [1, {EIGH_MAX_N}], got {A.shape[1]}")
    if A.dtype not in (torch.float32, torch.float64) or B.dtype != A.dtype:
        raise TypeError(f"forgetkern::{fn}: A and B must both be float32 or both float64, got "
                        f"{A.dtype} and {B.dtype}")


@_generalized_eigh_op.register_fake
def _(A, B, eps):
    _check_fake_device("generalized_eigh", A=A, B=B)
    _check_eigh_batch("generalized_eigh", A, B)
    batch, n, _ = A.shape
    return A.new_empty((batch, n)), A.new_empty((batch, n, n)), A.new_empty((batch,), dtype=torch.int32)


def generalized_eigh(A: torch.Tensor, B: torch.Tensor, eps: float = 0.0):
    """Batched ``A v = w (B + eps I) v`` on the GPU: one thread block per problem for ``n <= 64``.

    In plain torch (what the reference does, and what this does for ``n > 64``)::

        L = torch.linalg.cholesky(B + eps * I)                      # (..., n, n)
        w, U = torch.linalg.eigh(L.inverse() @ A @ L.inverse().mT)  # ascending w: (..., n)
        V = L.inverse().mT @ U                                      # V^T (B + eps I) V = I

    Args:
        A: ``(..., n, n)`` symmetric CUDA tensor (only its symmetric part is used).
        B: ``(..., n, n)`` symmetric, positive definite once ``eps * I`` is added.
        eps: non-negative damping added to the diagonal of ``B``.

    Returns:
        ``(w, V)`` in float64 for float64 inputs and float32 otherwise. No autograd.

    Raises:
        ValueError: CPU tensors, mismatched shapes, negative ``eps``, a ``B + eps I`` that is not
            positive definite or non-finite inputs (the message lists the failing batch entries).
    """
    from . import reference
    from ._validate import _compiling, check_generalized_eigh_inputs

    check_generalized_eigh_inputs(A, B, eps)
    _check_cuda("generalized_eigh", A=A, B=B)
    n = A.shape[-1]
    if not 1 <= n <= EIGH_MAX_N:
        return reference.generalized_eigh(A, B, eps)
    _require("generalized_eigh")
    dtype = reference.accumulation_dtype(A.dtype if A.dtype == torch.float64 else B.dtype)
    batch_shape = A.shape[:-2]
    a = A.to(dtype).reshape(-1, n, n)
    b = B.to(dtype).reshape(-1, n, n)
    w, vecs, info = torch.ops.forgetkern.generalized_eigh(a, b, float(eps))
    if not _compiling() and info.numel():
        flat = info.cpu()
        bad = torch.nonzero(flat > 0).flatten()[:8].tolist()
        if bad:
            raise ValueError(
                f"B + eps*I is not positive definite (eps={eps}) for batch entries {bad} "
                "(flattened indices); increase eps"
            )
        bad = torch.nonzero(flat == -1).flatten()[:8].tolist()
        if bad:
            raise ValueError(f"non-finite values in A or B (after whitening) for batch entries {bad} "
                             "(flattened indices)")
        bad = torch.nonzero(flat == -2).flatten()[:8].tolist()
        if bad:
            warnings.warn(f"forgetkern.generalized_eigh: Jacobi iteration did not converge in "
                          f"{extension().EIGH_MAX_SWEEPS} sweeps for batch entries {bad}; results "
                          "may be inaccurate", RuntimeWarning, stacklevel=2)
    return w.reshape(*batch_shape, n), vecs.reshape(*batch_shape, n, n)
