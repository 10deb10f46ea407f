"""The correctness gate, and the plain-torch formula of every loss the benchmarks time.

Before a provider's time counts, its loss and its gradient (``dh`` for a fused-linear loss, ``dz``
for a loss on logits) at the benchmark shape must match an fp32 reference on the same inputs; a
provider that does not is recorded as ``wrong`` and not timed.

The references are the formulas below in plain torch, in fp32 with TF32 off, computed a chunk of
rows at a time on the benchmark's device (an ``N=8192, V=128256`` problem does not fit as one
fp32 ``N x V`` tensor with its temporaries): per chunk the fp32 logits ``h @ W.T``, the per-row
losses with autograd for ``dz``, then ``dh = dz @ W``. Each provider is checked against the
formula of what it computes (``FORMULAS``), so a cross-entropy-only peer is checked against
cross-entropy.

Errors: loss ``|L - L_ref| / max(|L_ref|, 1e-3)``; gradient ``||g - g_ref|| / ||g_ref||``
(Frobenius norms, accumulated in fp64). Tolerances (:data:`TOLERANCES`): 16-bit inputs allow
5e-3 on the loss and 3e-2 on the gradient (a provider may round its logits or ``dz`` to the input
dtype, ~4e-3 relative per element in bf16), fp32 inputs 1e-4 and 1e-3 (fp32 arithmetic; TF32
does not pass). NaN or infinity never passes.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

TOLERANCES = {  # input dtype -> (loss, gradient) relative tolerance
    torch.bfloat16: (5e-3, 3e-2),
    torch.float16: (5e-3, 3e-2),
    torch.float32: (1e-4, 1e-3),
    torch.float64: (1e-4, 1e-3),
}
#: rows per chunk of the references
REFERENCE_ROWS = 1024


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype not in TOLERANCES:
        raise ValueError(f"no gate tolerance for dtype {dtype}; expected one of {list(TOLERANCES)}")
    return TOLERANCES[dtype]


# ---------------------------------------------------------------------------------------------
# per-row formulas (fp32 logits in, one loss per row out; ignored rows give 0)
# ---------------------------------------------------------------------------------------------
def _valid(y: torch.Tensor, ignore_index: int):
    valid = y != ignore_index
    return valid, torch.where(valid, y, 0)


def ce_rows(z, y, ignore_index=-100):
    """``logsumexp(z) - z_y`` per row."""
    valid, ys = _valid(y, ignore_index)
    return F.cross_entropy(z, ys, reduction="none") * valid


def tmkl_rows(z, b, y, ignore_index=-100):
    """CE plus the target-masked forward KL ``sum_{v != y} p~_v (log p~_v - log q~_v)``, per row."""
    valid, ys = _valid(y, ignore_index)
    ce = F.cross_entropy(z, ys, reduction="none")
    hit = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ys[:, None], True)
    lq = z.masked_fill(hit, float("-inf")).log_softmax(-1)
    lp = b.masked_fill(hit, float("-inf")).log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).masked_fill(hit, 0.0).sum(-1)
    return (ce + kl) * valid


def kl_full_rows(z, b):
    """Full-vocabulary forward KL ``sum_v p_v (log p_v - log q_v)`` per row (no target, no mask)."""
    lq, lp = z.log_softmax(-1), b.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def topk_rows(z, rec, y, ignore_index=-100):
    """CE plus the masked forward KL against a top-k base record, per row: one bin per record
    token other than the target, one tail bin for every other non-target token (the record's
    ``tail_lse``), base masses from the record, adapted masses from ``z`` (temperature 1)."""
    values, idx, lse, tail_lse = rec
    valid, ys = _valid(y, ignore_index)
    ce = F.cross_entropy(z, ys, reduction="none")
    idx = idx.long()
    hit = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ys[:, None], True)
    lq = z.masked_fill(hit, float("-inf")).log_softmax(-1)  # log q~ over v != y
    support = idx != ys[:, None]
    lq_s = lq.gather(1, idx).masked_fill(~support, float("-inf"))
    values, lse, tail_lse = values.to(z.dtype), lse.to(z.dtype), tail_lse.to(z.dtype)
    lp_s = (values - lse[:, None]).masked_fill(~support, float("-inf"))
    in_tail = ~hit.clone().scatter_(1, idx, True)
    lq_t = lq.masked_fill(~in_tail, float("-inf")).logsumexp(-1)
    lp_t = tail_lse - lse
    log_p = torch.cat([lp_s, lp_t[:, None]], 1)
    log_q = torch.cat([lq_s, lq_t[:, None]], 1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    return (ce + kl) * valid


def _chunk_loss(formula: str, z, base, y, n_valid: int, n_rows: int, ignore_index: int):
    """One chunk's share of the reduced loss of ``formula`` (denominators are the whole batch's)."""
    den = max(n_valid, 1)
    if formula == "ce":
        return ce_rows(z, y, ignore_index).sum() / den
    if formula == "tmkl":
        return tmkl_rows(z, base, y, ignore_index).sum() / den
    if formula == "tmkl-topk":
        return topk_rows(z, base, y, ignore_index).sum() / den
    if formula == "kl-full":  # mean over the non-ignored rows (Liger's fused linear JSD, beta 0)
        valid = y != ignore_index
        return (kl_full_rows(z, base) * valid).sum() / den
    if formula == "ce+kl-full-batchmean":  # CE mean + KL summed over every row / N (KLDivLoss batchmean)
        return ce_rows(z, y, ignore_index).sum() / den + kl_full_rows(z, base).sum() / max(n_rows, 1)
    raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")


FORMULAS = ("ce", "tmkl", "tmkl-topk", "kl-full", "ce+kl-full-batchmean")


def torch_tmkl(z, b, y, ignore_index: int = -100):
    """What a user writes in plain torch on materialized logits: CE + target-masked forward KL,
    in fp32, mean over the non-ignored rows (the eager and ``torch.compile`` baseline)."""
    rows = tmkl_rows(z.float(), b.float(), y, ignore_index)
    return rows.sum() / (y != ignore_index).sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# references and the check
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def fp32_matmuls():
    """Full-precision fp32 matmuls (no TF32) inside the block."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])


def _rows_of(base, s: slice):
    if base is None or isinstance(base, torch.Tensor):
        return None if base is None else base[s]
    return tuple(t[s] for t in base)


@dataclass(frozen=True)
class Reference:
    """The fp32 reference of one problem: the reduced loss and the input gradient (``dh``)."""

    formula: str
    loss: float
    grad: torch.Tensor


def linear_reference(formula: str, h, w, y, *, base_hidden=None, base_record=None,
                     ignore_index: int = -100, rows: int = REFERENCE_ROWS) -> Reference:
    """fp32 reference of a fused-linear loss: logits ``h @ w.T`` (and ``base_hidden @ w.T``, or a
    top-k ``base_record`` ``(values, indices, lse, tail_lse)``) chunk by chunk; returns the loss
    and ``dh`` (fp32)."""
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    n = h.shape[0]
    n_valid = int((y != ignore_index).sum())
    grad = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    total = 0.0
    with fp32_matmuls():
        w32 = w.detach().float()
        for start in range(0, n, rows):
            s = slice(start, min(n, start + rows))
            z = (h.detach()[s].float() @ w32.T).requires_grad_()
            if base_hidden is not None:
                base = base_hidden.detach()[s].float() @ w32.T
            else:
                base = _rows_of(base_record, s)
            part = _chunk_loss(formula, z, base, y[s], n_valid, n, ignore_index)
            (dz,) = torch.autograd.grad(part, z)
            grad[s] = dz @ w32
            total += float(part.detach())
            del z, base, dz
    return Reference(formula, total, grad)


@dataclass(frozen=True)
class GateResult:
    ok: bool
    loss_err: float
    grad_err: float
    text: str


def _rel(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(b), 1e-3)


def _result(formula, grad_name, loss_err, grad_err, tol) -> GateResult:
    ok = loss_err <= tol[0] and grad_err <= tol[1]
    text = (f"{'pass' if ok else 'FAIL'}: loss {loss_err:.1e}, {grad_name} {grad_err:.1e} vs fp32 "
            f"{formula} (tol {tol[0]:.0e} / {tol[1]:.0e})")
    return GateResult(ok, loss_err, grad_err, text)


def _grad_err(num2: float, den2: float) -> float:
    if not (math.isfinite(num2) and math.isfinite(den2)):
        return math.inf
    return math.sqrt(num2) / max(math.sqrt(den2), 1e-30)


def _loss_and_grad(loss_fn: Callable[[], torch.Tensor], x: torch.Tensor):
    """``loss_fn()`` and its backward once: ``(loss, x's gradient or None)``, ``x.grad`` left unset."""
    x.grad = None
    loss = loss_fn()
    loss.backward()
    got, x.grad = x.grad, None
    return loss, got


def check_linear(loss_fn: Callable[[], torch.Tensor], hidden: torch.Tensor, ref: Reference,
                 dtype: torch.dtype) -> GateResult:
    """Run ``loss_fn()`` and its backward once; compare the loss and ``hidden.grad`` with ``ref``."""
    loss, got = _loss_and_grad(loss_fn, hidden)
    if got is None:
        return GateResult(False, math.inf, math.inf, "FAIL: no gradient reached the hidden states")
    diff = (got.double() - ref.grad.double()).pow(2).sum().item()
    grad_err = _grad_err(diff, ref.grad.double().pow(2).sum().item())
    return _result(ref.formula, "dh", _rel(float(loss.detach()), ref.loss), grad_err, tolerance(dtype))


def check_logits(loss_fn: Callable[[], torch.Tensor], z: torch.Tensor, b: torch.Tensor, y,
                 formula: str, *, ignore_index: int = -100, rows: int = REFERENCE_ROWS) -> GateResult:
    """Run ``loss_fn()`` (a loss of the logits ``z``, ``b``) and its backward once; compare the loss
    and ``z.grad`` with the fp32 reference of ``formula``, computed chunk by chunk."""
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    loss, got = _loss_and_grad(loss_fn, z)
    if got is None:
        return GateResult(False, math.inf, math.inf, "FAIL: no gradient reached the logits")
    n = z.shape[0]
    n_valid = int((y != ignore_index).sum())
    total, num2, den2 = 0.0, 0.0, 0.0
    for start in range(0, n, rows):
        s = slice(start, min(n, start + rows))
        zc = z.detach()[s].float().requires_grad_()
        part = _chunk_loss(formula, zc, b.detach()[s].float(), y[s], n_valid, n, ignore_index)
        (dz,) = torch.autograd.grad(part, zc)
        total += float(part.detach())
        num2 += (got[s].double() - dz.double()).pow(2).sum().item()
        den2 += dz.double().pow(2).sum().item()
        del zc, dz
    return _result(formula, "dz", _rel(float(loss.detach()), total), _grad_err(num2, den2), tolerance(z.dtype))


#: relative tolerance of the eigensolvers' gate (fp32): eigenvalues, residual, B-orthonormality
EIGH_TOLERANCE = 1e-3


@torch.no_grad()
def check_eigh(solve: Callable[[], tuple], A: torch.Tensor, B: torch.Tensor, eps: float) -> GateResult:
    """Judge ``solve() -> (w, V)`` for ``A v = w (B + eps I) v`` by its eigenvalues (against fp64
    Cholesky whitening and ``eigh``, relative to the largest), its residual
    ``||A V - Bd V diag(w)|| / (||A|| + ||Bd|| max|w|)`` and ``||Vᵀ Bd V - I|| / sqrt(n)``, the worst
    problem of the batch; each must be at most :data:`EIGH_TOLERANCE`."""
    w, V = solve()[:2]
    n = A.shape[-1]
    A64, V64, w64 = A.double(), V.double(), w.double()
    Bd = B.double() + eps * torch.eye(n, dtype=torch.float64, device=A.device)
    L = torch.linalg.cholesky(Bd)
    C = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, A64, upper=False).mT, upper=False)
    w_ref = torch.linalg.eigvalsh((C + C.mT) / 2)
    scale = w_ref.abs().amax(-1).clamp_min(1e-30)
    errs = [
        ((w64 - w_ref).abs().amax(-1) / scale).amax().item(),
        (torch.linalg.matrix_norm(A64 @ V64 - Bd @ V64 * w64[..., None, :])
         / (torch.linalg.matrix_norm(A64) + torch.linalg.matrix_norm(Bd) * w64.abs().amax(-1))).amax().item(),
        (torch.linalg.matrix_norm(V64.mT @ Bd @ V64 - torch.eye(n, dtype=torch.float64, device=A.device))
         / n**0.5).amax().item(),
    ]
    errs = [e if math.isfinite(e) else math.inf for e in errs]
    ok = all(e <= EIGH_TOLERANCE for e in errs)
    text = (f"{'pass' if ok else 'FAIL'}: eigenvalues {errs[0]:.1e}, residual {errs[1]:.1e}, "
            f"VᵀBV-I {errs[2]:.1e} vs fp64 (tol {EIGH_TOLERANCE:.0e})")
    return GateResult(ok, errs[0], max(errs[1:]), text)
