"""Plain-PyTorch implementations of every op's interface (docs/math.md).

These are the test oracle, the CPU production path and the benchmark baseline. They compute in
float32 for float16/bfloat16/float32 inputs and in float64 for float64 inputs, and they process
rows in chunks so that memory stays bounded by a few copies of one chunk's ``rows x V`` whatever
the number of rows. Inputs arrive validated and laid out by ``forgetkern._validate``.

The interfaces, shared with every other backend (``forgetkern._backend.INTERFACES``):

* ``tmkl_forward(logits, base_logits, labels, params) -> (loss, ce, kl, stats)`` with ``(N, V)``
  logits, ``(N,)`` labels; per-row ``loss``/``ce``/``kl`` and ``(N, NUM_STATS)`` statistics (layout in
  :mod:`forgetkern._params`); ignored rows give zeros.
* ``tmkl_backward(logits, base_logits, labels, stats, coef_ce, coef_kl, params, grad_out)``
  writes, for every row ``i``, ``coef_ce[i] * dCE_i/dz + coef_kl[i] * dKL_i/dz`` into ``grad_out``
  (which may be ``logits`` itself for an in-place backward) and returns it.
* the fused-linear ops have no reference of their own: the chunked driver
  (:mod:`forgetkern._chunked`) runs the two functions above on each chunk of rows.
* ``generalized_eigh(A, B, eps) -> (w, V, status)``.
* ``folora_step(g, m, v, s, table, active, scalars, gates) -> None``: the gated Adam step of every
  active segment of FoLoRA's flat buffers (``m``, ``v`` updated, ``s`` written).

The reference runs on every device and serves every problem size (:func:`unavailable`).
"""
from .folora_step import folora_adam, folora_step
from .generalized_eigh import generalized_eigh
from .tmkl import REFERENCE_CHUNK_BYTES, chunk_rows, tmkl_backward, tmkl_forward


def unavailable(device) -> str | None:
    """Why the reference cannot run on ``device``: never (``None``); read by ``_backend``."""
    return None


__all__ = ["tmkl_forward", "tmkl_backward", "generalized_eigh", "folora_step", "folora_adam",
           "REFERENCE_CHUNK_BYTES", "chunk_rows"]
