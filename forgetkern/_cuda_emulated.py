"""The CUDA kernels' own per-thread code run on the CPU (``_C.emulate_*``), behind the backend
interfaces of :mod:`forgetkern._cuda`: tests check the CUDA backend's code without a GPU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ._cuda import (_check_device, _generalized_eigh_call, _require, _solve, _tmkl_backward_call,
                    _tmkl_backward_options, _tmkl_forward_call, _tmkl_forward_options)
from ._params import TMKLParams


# --------------------------------------------------------------------------------------------
# Host emulation with the backend interfaces (tests without a GPU)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Emulated:
    """The CUDA backend's interface of one op running the kernels' code on the CPU: ``forward``
    and ``backward`` (``tmkl``) or ``solve`` (``generalized_eigh``); the others are ``None``."""

    op: str
    forward: Callable | None = None
    backward: Callable | None = None
    solve: Callable | None = None


def emulated(op: str, *, threads: int = 0, max_sweeps: int = 0) -> Emulated:
    """The CUDA kernels of ``op`` run thread by thread on the CPU (``_C.emulate_*``), with the
    signatures of :func:`tmkl_forward` / :func:`tmkl_backward` or :func:`generalized_eigh`, on
    CPU tensors. Tests only: it is slow and it is not a backend of the table.

    Args:
        op: ``"tmkl"`` or ``"generalized_eigh"``.
        threads: threads per emulated block (``0``: the launch setting the device would use).
        max_sweeps: the eigensolver's Jacobi sweep limit (``0``: ``EIGH_MAX_SWEEPS``; fewer
            forces the non-convergence status in tests).
    """
    ext = _require(f"emulated({op!r})")
    if op == "tmkl":
        def forward(logits, base_logits, labels, params: TMKLParams):
            _check_device("emulated('tmkl').forward", ("cpu",), logits=logits,
                          base_logits=base_logits, labels=labels)
            return _tmkl_forward_call(ext.emulate_tmkl_forward, logits, base_logits, labels,
                                      *_tmkl_forward_options(params), threads=threads)

        def backward(logits, base_logits, labels, stats, coef_ce, coef_kl, params: TMKLParams,
                     grad_out):
            _check_device("emulated('tmkl').backward", ("cpu",), logits=logits,
                          base_logits=base_logits, labels=labels, stats=stats, coef_ce=coef_ce,
                          coef_kl=coef_kl, grad_out=grad_out)
            _tmkl_backward_call(ext.emulate_tmkl_backward, logits, base_logits, labels, stats,
                                coef_ce, coef_kl, grad_out, *_tmkl_backward_options(params),
                                threads=threads)
            return grad_out

        return Emulated(op, forward=forward, backward=backward)
    if op == "generalized_eigh":
        def run(a, b, eps):
            return _generalized_eigh_call(ext.emulate_generalized_eigh, a, b, eps, threads=threads,
                                          max_sweeps=max_sweeps)

        def solve(A, B, eps: float = 0.0):
            _check_device("emulated('generalized_eigh').solve", ("cpu",), A=A, B=B)
            return _solve(run, A, B, eps)

        return Emulated(op, solve=solve)
    raise ValueError(f"op must be 'tmkl' or 'generalized_eigh', got {op!r}")
