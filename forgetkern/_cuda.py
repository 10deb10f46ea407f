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
* ``forgetkern::generalized_eigh`` -> ``(w, V, status)`` for a batch of ``n <= EIGH_MAX_N`` problems.

Checks: the public functions validate every input once (``forgetkern._validate``) and the binding
(``csrc/bindings.cpp``) guards its own pointers and sizes. This module checks only what neither can
know -- that the extension loaded and the tensors live on a CUDA device -- and normalizes the layouts
the kernels need (unit stride along a row, int64 labels, contiguous statistics and matrices).

Backend interfaces (``forgetkern._backend``): :func:`tmkl_forward` / :func:`tmkl_backward` (the
``tmkl`` op) and :func:`generalized_eigh` (``solve`` of the ``generalized_eigh`` op), with the
signatures of :mod:`forgetkern.reference`. :func:`forgetkern._cuda_emulated.emulated` returns the
same interfaces running the kernels' own per-thread code on the CPU (``_C.emulate_*``), so tests
can run the CUDA backend's code without a GPU. What the backend serves: :func:`unavailable` and
:func:`unsupported`, read by the dispatch table.
"""
from __future__ import annotations

import importlib
import torch

from ._params import EIGH_MAX_N, NUM_STATS, TMKLParams, accumulation_dtype, env_flag

#: ``FORGETKERN_CUDA_SYNC=1``: synchronize after every launch, so that a fault inside a kernel is
#: reported by the call that launched it (debugging, compute-sanitizer runs).
ENV_CUDA_SYNC = "FORGETKERN_CUDA_SYNC"

#: dtype codes of the launchers (``_C.DTYPE_CODES``).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
#: The TMKL backward kernel writes its gradient in the logits' dtype only (``grad_out`` of another
#: dtype goes through a buffer): the chunked fused-linear driver writes in place and casts itself.
GRAD_ANY_DTYPE = False


# ---- Loading ----
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


def unavailable(device: torch.device) -> str | None:
    """Why the extension cannot run on ``device`` (``None``: it can); read by ``_backend``."""
    if device.type != "cuda":
        return f"the CUDA extension needs CUDA tensors (got {device.type} tensors)"
    return None if available() else f"the forgetkern._C extension is not available: {load_error()}"


def unsupported(op: str, size: int | None) -> str | None:
    """Why the kernels of ``op`` do not serve a problem of ``size`` (``None``: they do)."""
    if op == "generalized_eigh" and size is not None and not 1 <= size <= EIGH_MAX_N:
        return f"the CUDA eigensolver serves 1 <= n <= {EIGH_MAX_N}, got n={size}"
    return None


def _require(fn: str):
    ext = extension()
    if ext is None:
        raise RuntimeError(f"forgetkern._cuda.{fn}: the forgetkern._C extension is not available: "
                           f"{load_error()}")
    return ext


# ---- What the C boundary cannot know: where the memory is ----
def _check_device(fn: str, kinds: tuple[str, ...], **tensors: torch.Tensor) -> None:
    """Every tensor on one device of a type in ``kinds``; raises before anything is launched.

    The launchers get raw pointers: ``("cuda",)`` for the device ops, ``("cuda", "meta")`` while
    tracing (fake tensors), ``("cpu",)`` for the host emulation."""
    device = None
    for name, t in tensors.items():
        if t.device.type not in kinds:
            where = "a CUDA tensor" if kinds[0] == "cuda" else "a CPU tensor"
            hint = (" (the CUDA backend runs on GPU tensors only; use backend='reference' or 'triton')"
                    if kinds[0] == "cuda" else " (the host emulation reads host memory)")
            raise ValueError(f"forgetkern._cuda.{fn}: {name} must be {where}, got a "
                             f"{t.device.type} tensor{hint}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"forgetkern._cuda.{fn}: {name} is on {t.device} but the other inputs "
                             f"are on {device}")


def _check_cuda(fn: str, **tensors: torch.Tensor) -> None:
    _check_device(fn, ("cuda",), **tensors)


def _check_traced(fn: str, **tensors: torch.Tensor) -> None:
    # tracing: CUDA and meta tensors are fine; CPU tensors would fail when the graph runs
    _check_device(fn, ("cuda", "meta"), **tensors)


def _launch_options(device: torch.device) -> dict:
    """The device launchers' stream and sync arguments (the host emulation takes neither)."""
    return {"stream": torch.cuda.current_stream(device).cuda_stream, "sync": env_flag(ENV_CUDA_SYNC)}


# ---- Layouts the kernels need, and the pointer arguments (one adaptation for launch, emulation)
def _dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES.get(dtype, -1)  # the binding rejects an unknown code with its own error


def _unit_cols(x: torch.Tensor) -> torch.Tensor:
    """Rows with unit stride along V (any row stride is fine for the kernels)."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _row_stride(x: torch.Tensor) -> int:
    return x.stride(0) if x.shape[0] > 1 else x.shape[1]


def _labels64(labels: torch.Tensor) -> torch.Tensor:
    return labels.to(torch.int64).contiguous()


def _tmkl_forward_call(launcher, logits, base_logits, labels, ignore_index, temperature, ce_weight,
                       kl_scale, forward_kl, mask_target, separate_ce, **launch):
    z, b, y = _unit_cols(logits), _unit_cols(base_logits), _labels64(labels)
    n, v = z.shape
    acc = accumulation_dtype(z.dtype)
    loss = torch.empty(n, dtype=acc, device=z.device)
    ce = torch.empty_like(loss)
    kl = torch.empty_like(loss)
    stats = torch.empty(n, NUM_STATS, dtype=acc, device=z.device)
    launcher(z=z.data_ptr(), stride_z=_row_stride(z), b=b.data_ptr(), stride_b=_row_stride(b),
             y=y.data_ptr(), loss=loss.data_ptr(), ce=ce.data_ptr(), kl=kl.data_ptr(),
             stats=stats.data_ptr(), n=n, v=v, ignore_index=ignore_index, inv_t=1.0 / temperature,
             ce_weight=ce_weight, kl_scale=kl_scale, forward_kl=forward_kl, mask_target=mask_target,
             separate_ce=separate_ce, dtype=_dtype_code(z.dtype), **launch)
    return loss, ce, kl, stats


def _tmkl_backward_call(launcher, logits, base_logits, labels, stats, coef_ce, coef_kl, grad,
                        ignore_index, temperature, forward_kl, mask_target, separate_ce, **launch):
    # the kernel writes rows with unit stride along V in the logits' dtype: another layout or dtype
    # gets a buffer, copied back (the chunked driver avoids that: GRAD_ANY_DTYPE)
    same = grad.dtype == logits.dtype and (grad.shape[1] <= 1 or grad.stride(1) == 1)
    g = grad if same else torch.empty(grad.shape, dtype=logits.dtype, device=grad.device)
    inplace = g is grad and grad.data_ptr() == logits.data_ptr() and grad.numel() > 0
    z = grad if inplace else _unit_cols(logits)
    b, y = _unit_cols(base_logits), _labels64(labels)
    acc = accumulation_dtype(z.dtype)
    s, a, c = stats.contiguous(), coef_ce.to(acc).contiguous(), coef_kl.to(acc).contiguous()
    n, v = z.shape
    launcher(z=z.data_ptr(), stride_z=_row_stride(z), b=b.data_ptr(), stride_b=_row_stride(b),
             y=y.data_ptr(), stats=s.data_ptr(), coef_ce=a.data_ptr(), coef_kl=c.data_ptr(),
             g=g.data_ptr(), stride_g=_row_stride(g), n=n, v=v, ignore_index=ignore_index,
             inv_t=1.0 / temperature, forward_kl=forward_kl, mask_target=mask_target, separate_ce=separate_ce, dtype=_dtype_code(z.dtype), **launch)
    if g is not grad:
        grad.copy_(g)


def _generalized_eigh_call(launcher, A, B, eps, **launch):
    batch, n, _ = A.shape
    a, b = A.contiguous(), B.contiguous()
    w = torch.empty(batch, n, dtype=A.dtype, device=A.device)
    vecs = torch.empty(batch, n, n, dtype=A.dtype, device=A.device)
    status = torch.empty(batch, dtype=torch.int32, device=A.device)
    launcher(a=a.data_ptr(), b=b.data_ptr(), w=w.data_ptr(), vecs=vecs.data_ptr(),
             info=status.data_ptr(), batch=batch, n=n, eps=eps, dtype=_dtype_code(A.dtype), **launch)
    return w, vecs, status


def _tmkl_forward_options(params: TMKLParams) -> tuple:
    return (params.ignore_index, params.temperature, params.ce_weight, params.kl_scale,
            params.forward_kl, params.mask_target, params.separate_ce)


def _tmkl_backward_options(params: TMKLParams) -> tuple:
    return (params.ignore_index, params.temperature, params.forward_kl, params.mask_target,
            params.separate_ce)


# ---- TMKL ops ----
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
    separate_ce: bool,  # TMKLParams.separate_ce: CE keeps its own log-sum-exp
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = "tmkl_forward"
    ext = _require(fn)
    _check_cuda(fn, logits=logits, base_logits=base_logits, labels=labels)
    with torch.cuda.device(logits.device):
        return _tmkl_forward_call(ext.tmkl_forward, logits, base_logits, labels, ignore_index,
                                  temperature, ce_weight, kl_scale, forward_kl, mask_target,
                                  separate_ce, **_launch_options(logits.device))


@_tmkl_forward_op.register_fake
def _(logits, base_logits, labels, ignore_index, temperature, ce_weight, kl_scale, forward_kl,
      mask_target, separate_ce):
    _check_traced("tmkl_forward", logits=logits, base_logits=base_logits, labels=labels)
    n = logits.shape[0]
    acc = accumulation_dtype(logits.dtype)
    loss = logits.new_empty((n,), dtype=acc)
    return loss, torch.empty_like(loss), torch.empty_like(loss), logits.new_empty((n, NUM_STATS), dtype=acc)


def _launch_backward(fn, logits, base_logits, labels, stats, coef_ce, coef_kl, grad, *options):
    ext = _require(fn)
    _check_cuda(fn, logits=logits, base_logits=base_logits, labels=labels, stats=stats,
                coef_ce=coef_ce, coef_kl=coef_kl, grad=grad)
    with torch.cuda.device(logits.device):
        _tmkl_backward_call(ext.tmkl_backward, logits, base_logits, labels, stats, coef_ce, coef_kl,
                            grad, *options, **_launch_options(logits.device))


@torch.library.custom_op("forgetkern::tmkl_backward", mutates_args=("grad",))
def _tmkl_backward_op(
    logits: torch.Tensor,  # [N, V] adapted logits
    base_logits: torch.Tensor,  # [N, V] base logits
    labels: torch.Tensor,  # [N] labels
    stats: torch.Tensor,  # [N, NUM_STATS] from tmkl_forward
    coef_ce: torch.Tensor,  # [N] coefficient of dCE/dz per row
    coef_kl: torch.Tensor,  # [N] coefficient of dKL/dz per row (KL unscaled)
    grad: torch.Tensor,  # [N, V] out, dtype of logits; must not alias logits
    ignore_index: int,
    temperature: float,
    forward_kl: bool,
    mask_target: bool,
    separate_ce: bool,
) -> None:
    # the op's schema says only grad is written: an aliasing call must use the in-place op
    if grad.data_ptr() == logits.data_ptr() and grad.numel() > 0:
        raise ValueError("forgetkern::tmkl_backward: grad aliases logits; use tmkl_backward_inplace")
    _launch_backward("tmkl_backward", logits, base_logits, labels, stats, coef_ce, coef_kl, grad,
                     ignore_index, temperature, forward_kl, mask_target, separate_ce)


@_tmkl_backward_op.register_fake
def _(logits, base_logits, labels, stats, coef_ce, coef_kl, grad, ignore_index, temperature,
      forward_kl, mask_target, separate_ce):
    _check_traced("tmkl_backward", logits=logits, grad=grad)
    return None


@torch.library.custom_op("forgetkern::tmkl_backward_inplace", mutates_args=("logits",))
def _tmkl_backward_inplace_op(
    logits: torch.Tensor,  # [N, V] adapted logits, overwritten by the gradient
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    coef_ce: torch.Tensor,
    coef_kl: torch.Tensor,
    ignore_index: int,
    temperature: float,
    forward_kl: bool,
    mask_target: bool,
    separate_ce: bool,
) -> None:
    _launch_backward("tmkl_backward_inplace", logits, base_logits, labels, stats, coef_ce, coef_kl,
                     logits, ignore_index, temperature, forward_kl, mask_target, separate_ce)


@_tmkl_backward_inplace_op.register_fake
def _(logits, base_logits, labels, stats, coef_ce, coef_kl, ignore_index, temperature, forward_kl,
      mask_target, separate_ce):
    _check_traced("tmkl_backward_inplace", logits=logits)
    return None


def tmkl_forward(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                 params: TMKLParams):
    """CUDA forward: per-row ``(loss, ce, kl, stats)`` for ``(N, V)`` logits.

    Same interface and results as :func:`forgetkern.reference.tmkl_forward`::

        ce = torch.logsumexp(z, -1) - z.gather(1, y[:, None])[:, 0]           # (N,)
        kl = masked KL over v != y of softmax(b/T) vs softmax(z/T)             # (N,)
        loss = ce_weight * ce + kl_weight * T**2 * kl;  stats: (N, NUM_STATS)   # zeros where ignored
    """
    return torch.ops.forgetkern.tmkl_forward(logits, base_logits, labels, *_tmkl_forward_options(params))


def tmkl_backward(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor,
                  stats: torch.Tensor, coef_ce: torch.Tensor, coef_kl: torch.Tensor,
                  params: TMKLParams, grad_out: torch.Tensor):
    """CUDA backward: writes ``coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz`` into ``grad_out``.

    ``grad_out`` may be ``logits`` itself (in-place backward). In plain torch::

        d_ce = z.softmax(-1) - F.one_hot(y, V)                                  # (N, V)
        d_kl = dKL/dz (docs/math.md §2; zero at y when masked)                  # (N, V)
        grad_out[:] = coef_ce[:, None] * d_ce + coef_kl[:, None] * d_kl          # zeros where ignored
    """
    args = (base_logits, labels, stats, coef_ce, coef_kl)
    opts = _tmkl_backward_options(params)
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


# ---- Generalized eigensolver ----
@torch.library.custom_op("forgetkern::generalized_eigh", mutates_args=())
def _generalized_eigh_op(
    A: torch.Tensor,  # [batch, n, n] symmetric, float32/float64, n <= EIGH_MAX_N
    B: torch.Tensor,  # [batch, n, n] symmetric positive definite after damping, dtype of A
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = "generalized_eigh"
    ext = _require(fn)
    _check_cuda(fn, A=A, B=B)
    with torch.cuda.device(A.device):
        return _generalized_eigh_call(ext.generalized_eigh, A, B, eps, **_launch_options(A.device))


@_generalized_eigh_op.register_fake
def _(A, B, eps):
    _check_traced("generalized_eigh", A=A, B=B)
    batch, n, _ = A.shape
    return A.new_empty((batch, n)), A.new_empty((batch, n, n)), A.new_empty((batch,), dtype=torch.int32)


def _solve(run, A: torch.Tensor, B: torch.Tensor, eps: float):
    """``(..., n, n)`` problems as one flat batch in the working dtype through ``run``."""
    n = A.shape[-1]
    batch_shape = A.shape[:-2]
    # A and B arrive in the working dtype, chosen at the boundary (forgetkern._validate)
    w, vecs, status = run(A.reshape(-1, n, n), B.reshape(-1, n, n), float(eps))
    return w.reshape(*batch_shape, n), vecs.reshape(*batch_shape, n, n), status.reshape(batch_shape)


def generalized_eigh(A: torch.Tensor, B: torch.Tensor, eps: float = 0.0):
    """Batched ``A v = w (B + eps I) v`` on the GPU: one thread block per problem (``n <= 64``).

    The ``solve`` interface of the ``generalized_eigh`` op: inputs already validated
    (``forgetkern._validate``), ``n <= EIGH_MAX_N`` (the table sends larger problems to the
    reference); the caller turns ``status`` into errors (``_validate.check_eigh_status``).
    In plain torch::

        L = torch.linalg.cholesky(B + eps * I)                      # (..., n, n)
        w, U = torch.linalg.eigh(L.inverse() @ A @ L.inverse().mT)  # ascending w: (..., n)
        V = L.inverse().mT @ U                                      # V^T (B + eps I) V = I

    Returns:
        ``(w, V, status)``: ``(..., n)`` and ``(..., n, n)`` in float64 if ``A`` or ``B`` is
        float64 and float32 otherwise, and the ``(...)`` int32 status codes
        (``forgetkern._params.EIGH_*``; NaN outputs where a problem failed). No autograd.
    """
    return _solve(torch.ops.forgetkern.generalized_eigh, A, B, eps)
