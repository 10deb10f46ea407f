"""The one table: ``(op, backend)`` -> implementation, and the one place that picks the backend.

Every op has one interface, and every backend of the op implements it with the same signatures
(``docs/architecture.md`` lists them):

======================  ========================  ===============================================
op                      interface                 backends
======================  ========================  ===============================================
``tmkl``                ``forward``, ``backward`` reference, triton (``ops/tmkl.py``), cuda (``_cuda``)
``sparse_tmkl``         ``forward``, ``backward`` reference, triton (``ops/sparse_tmkl.py``)
``linear_tmkl``         ``forward``, ``backward`` every backend of ``tmkl``: the chunked driver
``linear_sparse_tmkl``  ``forward``, ``backward`` every backend of ``sparse_tmkl``: the chunked driver
``linear_tmkl_fused``   ``forward``, ``backward`` triton (``ops/linear_tmkl_fused.py``: on chip)
``generalized_eigh``    ``solve``                 reference, triton (``ops/generalized_eigh.py``), cuda
``folora_step``         ``step``                  reference, triton (``ops/folora_step.py``)
======================  ========================  ===============================================

The fused-linear ops of :data:`CHUNKED` have no kernels of their own: their implementation on a
backend is the chunked driver (:mod:`forgetkern._chunked`) bound to that backend's implementation
of a logits op, which it runs on each chunk of rows. :data:`FUSED` names the on-chip op that serves
``strategy="fused"``.

Choice, in order (docs/backends.md): an explicit ``backend=`` argument, then the
``FORGETKERN_BACKEND`` environment variable, then the CUDA extension if it is built and the tensors
are on a GPU, then Triton on a GPU (or on the CPU when ``TRITON_INTERPRET=1``), else the reference.

What a backend serves is declared in its own modules, never here: its home module
(:data:`HOMES`) says whether it runs on a device at all (``unavailable(device) -> reason or
None``, importing no kernels), and each :data:`TABLE` module may say which problems its kernels
serve (``unsupported(op, size) -> reason or None``, e.g. the eigensolvers' ``n``). A call that the
chosen backend runs but does not serve goes to the first of CUDA, Triton, reference that does.

An explicit ``backend=`` that cannot run on the call's tensors is an error that says why. The
environment variable is a process-wide preference: for an op that has no such backend at all (for
example ``cuda`` for an op implemented only in Triton) the automatic choice applies; for an op that
has it but cannot use it for these tensors, the call fails with the reason.

Nothing here initializes CUDA or imports Triton at import time: implementations are imported on
their first use.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from . import _chunked, _cuda
from ._params import BACKENDS, ENV_BACKEND, check_backend_name, env_backend

# op -> the names of its interface functions
INTERFACES: dict[str, tuple[str, ...]] = {
    "tmkl": ("forward", "backward"),
    "linear_tmkl": ("forward", "backward"),
    "sparse_tmkl": ("forward", "backward"),
    "linear_sparse_tmkl": ("forward", "backward"),
    "linear_tmkl_fused": ("forward", "backward"),
    "generalized_eigh": ("solve",),
    "folora_step": ("step",),
}

# (op, backend) -> (module, one attribute per interface function, in INTERFACES order)
TABLE: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("tmkl", "reference"): ("forgetkern.reference.tmkl", ("tmkl_forward", "tmkl_backward")),
    ("tmkl", "triton"): ("forgetkern.ops.tmkl", ("tmkl_forward", "tmkl_backward")),
    ("tmkl", "cuda"): ("forgetkern._cuda", ("tmkl_forward", "tmkl_backward")),
    ("sparse_tmkl", "reference"): ("forgetkern.reference.sparse_tmkl",
                                   ("sparse_tmkl_forward", "sparse_tmkl_backward")),
    ("sparse_tmkl", "triton"): ("forgetkern.ops.sparse_tmkl",
                                ("sparse_tmkl_forward", "sparse_tmkl_backward")),
    ("linear_tmkl_fused", "triton"): ("forgetkern.ops.linear_tmkl_fused",
                                      ("linear_tmkl_fused_forward", "linear_tmkl_fused_backward")),
    ("generalized_eigh", "reference"): ("forgetkern.reference.generalized_eigh",
                                        ("generalized_eigh",)),
    ("generalized_eigh", "triton"): ("forgetkern.ops.generalized_eigh", ("generalized_eigh",)),
    ("generalized_eigh", "cuda"): ("forgetkern._cuda", ("generalized_eigh",)),
    ("folora_step", "reference"): ("forgetkern.reference.folora_step", ("folora_step",)),
    ("folora_step", "triton"): ("forgetkern.ops.folora_step", ("folora_step",)),
}

#: backend -> its home module, whose ``unavailable(device)`` says why the backend cannot run on
#: ``device`` at all (``None``: it can); homes import no kernels
HOMES: dict[str, str] = {"reference": "forgetkern.reference", "triton": "forgetkern.ops",
                         "cuda": "forgetkern._cuda"}
_HOMES = {name: importlib.import_module(module) for name, module in HOMES.items()}

#: Fused-linear op -> the logits op whose kernels the chunked driver runs on each chunk of rows.
CHUNKED: dict[str, str] = {"linear_tmkl": "tmkl", "linear_sparse_tmkl": "sparse_tmkl"}
#: Fused-linear op -> the op of its on-chip strategy (``strategy="fused"``).
FUSED: dict[str, str] = {"linear_tmkl": "linear_tmkl_fused"}
# the chunked driver's interface functions of each fused-linear op, in INTERFACES order
_DRIVER = {"linear_tmkl": (_chunked.linear_tmkl_forward, _chunked.linear_tmkl_backward),
           "linear_sparse_tmkl": (_chunked.linear_sparse_tmkl_forward,
                                  _chunked.linear_sparse_tmkl_backward)}


def _op_backends() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for op, backend in TABLE:
        out[op] = out.get(op, ()) + (backend,)
    for op, rows_op in CHUNKED.items():
        out[op] = out[rows_op]
    return out


#: Which backends implement each op (derived from :data:`TABLE`).
OP_BACKENDS: dict[str, tuple[str, ...]] = _op_backends()


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op: the op's interface functions by name
    (``forward``/``backward``, ``solve`` or ``step``; the others are ``None``)."""

    op: str
    backend: str
    forward: Callable | None = None
    backward: Callable | None = None
    solve: Callable | None = None
    step: Callable | None = None
    #: a logits op's ``backward`` writes ``grad_out`` in any float dtype (else only in the logits'
    #: dtype: the chunked driver then writes in place and casts); the module's ``GRAD_ANY_DTYPE``
    grad_any_dtype: bool = True
    #: ``rows x V`` temporaries in the accumulation dtype a logits op allocates per row it is
    #: given (the chunked driver counts them in its budget); the module's ``CHUNK_TEMPORARIES``
    temporaries: int = 0
    #: the most bytes those temporaries take whatever the rows (``None``: no bound); the
    #: module's ``CHUNK_TEMPORARY_CAP``
    temporary_cap: int | None = None
    #: the module's ``unsupported(op, size) -> reason or None``: which problems it serves
    #: (``None``: every problem)
    unsupported: Callable | None = None


_LOADED: dict[tuple[str, str], Implementation] = {}  # a plain dict: torch.compile reads it


def implementation(op: str, backend: str) -> Implementation:
    """The :class:`Implementation` of ``op`` on ``backend`` (imported on first use)."""
    key = (op, backend)
    impl = _LOADED.get(key)
    if impl is None:
        if backend not in OP_BACKENDS.get(op, ()):
            raise ValueError(f"op {op!r} has no {backend!r} backend "
                             f"(it has: {', '.join(OP_BACKENDS.get(op, ()))})")
        if op in CHUNKED:
            impl = _LOADED[key] = chunked(op, implementation(CHUNKED[op], backend))
            return impl
        module_name, attrs = TABLE[key]
        module = importlib.import_module(module_name)
        fns = {name: getattr(module, attr) for name, attr in zip(INTERFACES[op], attrs)}
        impl = _LOADED[key] = Implementation(
            op=op, backend=backend, grad_any_dtype=getattr(module, "GRAD_ANY_DTYPE", True),
            temporaries=getattr(module, "CHUNK_TEMPORARIES", 0),
            temporary_cap=getattr(module, "CHUNK_TEMPORARY_CAP", None),
            unsupported=getattr(module, "unsupported", None), **fns)
    return impl


def chunked(op: str, rows: Implementation) -> Implementation:
    """The fused-linear ``op`` as the chunked driver over ``rows``, an implementation of the
    logits op ``CHUNKED[op]`` (the table's own, or a stand-in such as the CUDA host emulation)."""
    forward, backward = _DRIVER[op]
    return Implementation(op=op, backend=rows.backend, forward=partial(forward, rows=rows),
                          backward=partial(backward, rows=rows), unsupported=rows.unsupported)


# The implementations that import no Triton are loaded now, so that a call traced by
# torch.compile finds them in _LOADED (dynamo does not trace importlib).
for _key, (_module, _) in TABLE.items():
    if _module.startswith("forgetkern.reference") or _module == "forgetkern._cuda":
        implementation(*_key)
for _op, _rows_op in CHUNKED.items():
    for _name in ("reference", "cuda"):
        if _name in OP_BACKENDS[_op]:
            implementation(_op, _name)


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return _HOMES["triton"].triton_installed()


def cuda_extension_available() -> bool:
    """Whether the compiled ``forgetkern._C`` extension loads in this process."""
    return _cuda.available()


def _device_of(tensors) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def why_unavailable(backend: str, op: str, device: torch.device,
                    size: int | None = None) -> str | None:
    """Return ``None`` if ``backend`` can run ``op`` on ``device`` (and, given ``size``, serves a
    problem of that size), else the reason it cannot: the backend's own declarations."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}"
    supported = OP_BACKENDS.get(op, ("reference",))
    if backend not in supported:
        return f"op {op!r} has no {backend!r} backend (it has: {', '.join(supported)})"
    reason = _HOMES[backend].unavailable(device)
    return reason if reason is not None or size is None else unsupported(op, backend, size)


def unsupported(op: str, backend: str, size: int | None) -> str | None:
    """Why ``backend``'s implementation of ``op`` does not serve a problem of ``size`` (its
    module's ``unsupported``; ``None``: it does). Imports the implementation."""
    declared = implementation(op, backend).unsupported
    return None if declared is None else declared(op, size)


def resolve_name(op: str, *tensors, backend: str | None = None, size: int | None = None) -> str:
    """The backend name for one call of ``op`` on ``tensors`` (see the module docstring).

    Args:
        op: op name, a key of :data:`INTERFACES`.
        tensors: the call's tensors (the first tensor's device decides).
        backend: explicit choice, or ``None`` for the environment variable / automatic choice.
        size: the problem size where a backend's kernel has a limit (``n`` of the eigensolver).

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: an explicitly requested backend that cannot run on these tensors.
    """
    device = _device_of(tensors)
    supported = OP_BACKENDS.get(op, ("reference",))
    chosen = None
    if backend is not None:
        check_backend_name(backend)
        chosen, asked = backend, f"backend={backend!r}"
    elif env := env_backend():
        if env not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS}, got {env!r}")
        if env in supported:
            chosen, asked = env, f"{ENV_BACKEND}={env}"
    if chosen is not None:
        reason = why_unavailable(chosen, op, device)
        if reason is not None:
            raise RuntimeError(f"{asked} cannot run {op}: {reason}")
        if unsupported(op, chosen, size) is None:
            return chosen
    for candidate in ("cuda", "triton"):
        if (candidate in supported and why_unavailable(candidate, op, device) is None
                and unsupported(op, candidate, size) is None):
            return candidate
    return "reference"


def resolve(op: str, *tensors, backend: str | None = None, size: int | None = None) -> Implementation:
    """The :class:`Implementation` for one call of ``op`` (arguments as :func:`resolve_name`)."""
    return implementation(op, resolve_name(op, *tensors, backend=backend, size=size))


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable in this process for tensors on ``device`` (default: the GPU if present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out = ["reference"]
    for b in ("triton", "cuda"):
        reasons = [why_unavailable(b, op, device) for op in OP_BACKENDS if b in OP_BACKENDS[op]]
        if reasons and any(r is None for r in reasons):
            out.append(b)
    return out
