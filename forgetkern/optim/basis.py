"""FoLoRA's spectral bases: the generalized eigenbasis of (task, proxy) statistics per layer input,
the batched ``r x r`` bases of paired LoRA ``B``, their cache, and the change of Adam coordinates.

A parameter's basis lives in its optimizer state (``state[p]``), in one of three modes:

* ``"dense"`` (a LoRA ``A`` ``(r, n)``): ``lam (n,)``, ``V, W (n, n)``, ``gate (n,)`` and the
  trace-normalized statistics ``proxy, task (n, n)``; the Adam moments live in spectral
  coordinates ``g V``.
* ``"lowrank"`` (a LoRA ``A`` with ``basis=k``): ``lam (k,)``, ``V, W (n, k)``, ``gate (k,)`` and
  the sketches ``{proxy,task}_{Q,s,rho}``; the moments stay in parameter coordinates.
* ``"pair"`` (a LoRA ``B`` ``(d_out, r)``): ``lam (r,)``, ``V, W (r, r)``, ``gate (r,)`` of
  ``(A Σt Aᵀ, A Σp Aᵀ)``, re-solved at ``refreshed`` (its step count); spectral moments.

Everything is pure torch; the eigensolver is :func:`forgetkern.functional.generalized_eigh`, whose
backend (and its fallback for large ``n``) the implementation table picks.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import functional
from ..distributed import is_dtensor
from .gating import gate_values

#: Dtype the ``d_in x d_in`` generalized eigenproblems are solved in (stored results are float32).
SOLVE_DTYPE = torch.float64
#: State keys of a parameter's basis (all modes); replaced together when the basis changes.
BASIS_KEYS = ("mode", "lam", "V", "W", "gate", "refreshed", "proxy", "task", "proxy_Q", "proxy_s",
              "proxy_rho", "task_Q", "task_s", "task_rho")


# --------------------------------------------------------------------------------------------
# Spectral math
# --------------------------------------------------------------------------------------------
def trace_normalize(S: torch.Tensor, name: str = "statistic") -> torch.Tensor:
    """``S * n / trace(S)`` (mean eigenvalue 1) for ``(..., n, n)``; symmetrized.

    Raises:
        ValueError: non-finite entries or a non-positive trace.
    """
    if not bool(torch.isfinite(S).all()):
        raise ValueError(f"{name} has non-finite entries")
    n = S.shape[-1]
    tr = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1)
    if bool((tr <= 0).any()):
        raise ValueError(f"{name} has a non-positive trace; statistics must be E[x x^T] of real data")
    S = 0.5 * (S + S.mT)
    return S * (n / tr)[..., None, None]


def damped(S: torch.Tensor, damping: float) -> torch.Tensor:
    """``S + damping * I``."""
    if not damping:
        return S
    return S + damping * torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)


class Basis(NamedTuple):
    """Generalized eigenbasis of ``(task, proxy + damping I)`` (both trace-normalized).

    ``V^T (proxy + damping I) V = I`` over the kept directions and
    ``task V = (proxy + damping I) V diag(lam)``.

    Attributes:
        lam: ``(..., k)`` ascending ratios (task utility per unit proxy penalty).
        V: ``(..., n, k)`` eigenvectors (columns).
        W: ``(..., n, k)`` ``(proxy + damping I) V``; ``W^T = V^-1`` when ``k = n``. The spectral
            coefficients of a vector ``u`` are ``u W`` and ``u = (u W) V^T`` (row convention).
    """

    lam: torch.Tensor
    V: torch.Tensor
    W: torch.Tensor


def spectral_basis(task: torch.Tensor, proxy: torch.Tensor, damping: float, k: int | None = None,
                   backend: str | None = None) -> Basis:
    """Generalized eigenbasis of already trace-normalized ``task`` and ``proxy`` ``(..., n, n)``.

    Keeps the ``k`` lowest-ratio directions (all when ``k`` is ``None`` or ``>= n``).

    Raises:
        ValueError: ``proxy + damping I`` is not positive definite (message names ``proxy_cov``).
    """
    try:
        lam, V = functional.generalized_eigh(task, proxy, eps=damping, backend=backend)
    except ValueError as exc:
        if "positive definite" in str(exc):
            raise ValueError(
                f"proxy_cov (trace-normalized) + damping*I is not positive definite with "
                f"damping={damping}; increase damping ({exc})"
            ) from None
        raise
    n = task.shape[-1]
    if k is not None and k < n:
        lam, V = lam[..., :k].contiguous(), V[..., :k].contiguous()
    W = damped(proxy.to(V.dtype), damping) @ V
    return Basis(lam, V, W)


def normalized(V: torch.Tensor, W: torch.Tensor, basis_norm: str):
    """``basis_norm="unit"``: unit-length columns ``V D^-1`` with ``W D`` (``Wᵀ V = I`` kept)."""
    if basis_norm == "proxy":
        return V, W
    d = torch.linalg.vector_norm(V, dim=-2).clamp_min(torch.finfo(V.dtype).tiny)
    return V / d[..., None, :], W * d[..., None, :]


class Sketch(NamedTuple):
    """Low-rank-plus-isotropic approximation ``S ~ Q diag(s) Q^T + rho (I - Q Q^T)`` of a
    trace-normalized statistic (exact when ``Q`` has all ``n`` columns)."""

    Q: torch.Tensor  # (n, k) top-k eigenvectors
    s: torch.Tensor  # (k,) their eigenvalues
    rho: torch.Tensor  # () mean of the remaining eigenvalues


def sketch(S: torch.Tensor, k: int) -> Sketch:
    """Top-``k`` eigenpairs of a symmetric ``(n, n)`` ``S`` plus the mean of the rest."""
    n = S.shape[-1]
    evals, evecs = torch.linalg.eigh(S)
    k = min(k, n)
    s = evals[n - k:].clamp_min(0.0).contiguous()
    Q = evecs[:, n - k:].contiguous()
    rest = (torch.diagonal(S).sum() - s.sum()) / max(n - k, 1)
    rho = rest.clamp_min(0.0) if k < n else torch.zeros((), dtype=S.dtype, device=S.device)
    return Sketch(Q, s, rho)


def project(A: torch.Tensor, stat) -> torch.Tensor:
    """``A S A^T`` for ``A`` ``(r, n)`` and a dense ``S`` ``(n, n)`` or a :class:`Sketch`."""
    if isinstance(stat, Sketch):
        AQ = A @ stat.Q
        # A (Q diag(s - rho) Q^T + rho I) A^T
        out = (AQ * (stat.s - stat.rho)) @ AQ.mT + stat.rho * (A @ A.mT)
        return 0.5 * (out + out.mT)
    out = (A @ stat) @ A.mT
    return 0.5 * (out + out.mT)


# --------------------------------------------------------------------------------------------
# Layer bases (LoRA A): solve and cache
# --------------------------------------------------------------------------------------------
def check_statistics(param: torch.Tensor, proxy_cov, task_cov) -> None:
    """``param`` is a LoRA ``A`` ``(r, n)`` and both statistics are floating ``(n, n)`` tensors."""
    if param.dim() != 2:
        raise ValueError(f"param must be a LoRA A matrix (r, d_in), got shape {tuple(param.shape)}")
    n = param.shape[1]
    for name, stat in (("proxy_cov", proxy_cov), ("task_cov", task_cov)):
        if not isinstance(stat, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(stat).__name__}")
        if tuple(stat.shape) != (n, n):
            raise ValueError(
                f"{name} must be (d_in, d_in) = ({n}, {n}) for a LoRA A of shape "
                f"{tuple(param.shape)}, got {tuple(stat.shape)}"
            )
        if not stat.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {stat.dtype}")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def solve_layer(proxy_cov, task_cov, k: int | None, damping: float, basis_norm: str, device,
                eigh_backend: str | None = None) -> dict:
    """The state entries of a LoRA ``A``'s basis (``"dense"`` or ``"lowrank"``, see the module
    docstring, without ``gate``): solved in :data:`SOLVE_DTYPE`, stored in float32."""
    proxy = trace_normalize(proxy_cov.detach().to(device=device, dtype=SOLVE_DTYPE), "proxy_cov")
    task = trace_normalize(task_cov.detach().to(device=device, dtype=SOLVE_DTYPE), "task_cov")
    basis = spectral_basis(task, proxy, damping, k, backend=eigh_backend)
    V, W = normalized(basis.V, basis.W, basis_norm)
    out = {"lam": _f32(basis.lam), "V": _f32(V), "W": _f32(W)}
    if k is None or k >= proxy.shape[-1]:
        out.update(mode="dense", proxy=_f32(proxy), task=_f32(task))
    else:
        out["mode"] = "lowrank"
        for name, stat in (("proxy", proxy), ("task", task)):
            sk = sketch(stat, k)
            out.update({f"{name}_Q": _f32(sk.Q), f"{name}_s": _f32(sk.s), f"{name}_rho": _f32(sk.rho)})
    return out


class BasisCache:
    """Solved layer bases by the identity of their statistic tensors (and the options), so that
    layers given the very same statistics (q/k/v, gate/up) share one basis. Holds the statistics
    weakly: an entry dies with its tensors."""

    def __init__(self):
        self._entries: dict = {}

    def clear(self) -> None:
        self._entries = {}

    def get(self, proxy_cov, task_cov, k, damping, basis_norm, device, eigh_backend=None) -> dict:
        """:func:`solve_layer` of these arguments, solved once per live pair of statistics."""
        self._entries = {key: e for key, e in self._entries.items()
                         if e[0]() is not None and e[1]() is not None}  # drop dead entries
        key = (id(proxy_cov), id(task_cov), k, float(damping), basis_norm, str(device))
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is proxy_cov and hit[1]() is task_cov:
            return hit[2]
        new = solve_layer(proxy_cov, task_cov, k, float(damping), basis_norm, device, eigh_backend)
        self.put(proxy_cov, task_cov, k, damping, basis_norm, device, new)
        return new

    def put(self, proxy_cov, task_cov, k, damping, basis_norm, device, solved: dict) -> None:
        """Record ``solved`` (a :func:`solve_layer` result, e.g. solved on another rank)."""
        key = (id(proxy_cov), id(task_cov), k, float(damping), basis_norm, str(device))
        self._entries[key] = (weakref.ref(proxy_cov), weakref.ref(task_cov), solved)


def layer_layout(n: int, k: int | None) -> tuple[str, list]:
    """``(mode, [(state key, shape), ...])`` of the tensors :func:`solve_layer` returns for a
    ``d_in = n`` basis keeping ``k`` directions."""
    if k is None or k >= n:
        return "dense", [("lam", (n,)), ("V", (n, n)), ("W", (n, n)), ("proxy", (n, n)),
                         ("task", (n, n))]
    sk = [(f"{s}_{x}", shape) for s in ("proxy", "task") for x, shape in
          (("Q", (n, k)), ("s", (k,)), ("rho", ()))]
    return "lowrank", [("lam", (k,)), ("V", (n, k)), ("W", (n, k)), *sk]


def spread(solve, jobs: list, layouts: list, group, device) -> list[dict]:
    """``solve(jobs)`` spread over the ranks of ``group``: job ``i`` is solved on rank
    ``i % world`` (``solve`` gets each rank's jobs as one list, returns one dict per job) and the
    results are broadcast from there, one ``broadcast`` per owning rank of its results packed in
    one float32 buffer; ``layouts[i]`` lists job ``i``'s ``(key, shape)`` (known on every rank).
    Every rank returns every job's dict (float32 tensors), equal to solving all of them here.
    A rank whose ``solve`` raises still takes part in every broadcast (its buffer's leading flag
    says it failed), then every rank raises: that rank its own error, the others one naming it."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = list(range(rank, len(jobs), world))
    results: list = [None] * len(jobs)
    failed, failure = [], None
    try:
        for i, out in zip(mine, solve([jobs[i] for i in mine]) if mine else []):
            results[i] = out
    except (ValueError, RuntimeError) as exc:  # raised below, after the broadcasts
        failure = exc
    for src in range(min(world, len(jobs))):
        owned = [(i, key, shape) for i in range(src, len(jobs), world) for key, shape in layouts[i]]
        size = 1 + sum(math.prod(sh) for *_, sh in owned)  # a leading flag: 1 = the solve failed
        if src == rank and failure is None:
            buf = torch.cat([torch.zeros(1, device=device)] + [
                _f32(results[i][key]).reshape(-1).to(device) for i, key, _ in owned])
        else:
            buf = torch.full((size,), float(src == rank), dtype=torch.float32, device=device)
        dist.broadcast(buf, group=group, group_src=src)
        if bool(buf[0]):
            failed.append(src)
            continue
        buf = buf[1:]
        if src != rank:
            offset = 0
            for i, key, shape in owned:
                results[i] = results[i] or {}
                results[i][key] = buf[offset:offset + math.prod(shape)].view(shape).clone()
                offset += math.prod(shape)
    if failure is not None:
        raise failure
    if failed:
        raise ValueError(f"the basis solves of rank(s) {failed} failed (degenerate statistics): "
                         "their error names the layer")
    return results


# --------------------------------------------------------------------------------------------
# Coordinates
# --------------------------------------------------------------------------------------------
def gates_of(group: dict, lam: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 gates of a parameter group's gate option for ratios ``lam`` of a ``dim``-space."""
    return gate_values(lam, group["gate"], group["tau"], group["sharpness"], dim=dim).to(torch.float32)


def spectral(state: dict):
    """``(V, W)`` when the moments of this parameter live in spectral coordinates, else ``None``."""
    if state.get("mode") in ("dense", "pair"):
        return state["V"], state["W"]
    return None


def change_coordinates(state: dict, old, new) -> None:
    """Carry Adam moments from ``old`` to ``new`` coordinates (``(V, W)``; ``None``: parameter ones).

    The first moment transforms like the gradient (``g_new = g_old W_oldᵀ V_new``); the second
    moment with the element-wise squared transition matrix (exact when the coordinates of the
    gradient are uncorrelated)."""
    if "exp_avg" not in state or state.get("step", 0) == 0 or (old is None and new is None):
        return
    n = state["exp_avg"].shape[-1]
    T = torch.eye(n, dtype=torch.float32, device=state["exp_avg"].device)
    if old is not None:
        T = old[1].mT.to(T)
    if new is not None:
        T = T @ new[0].to(T)
    state["exp_avg"].copy_(state["exp_avg"] @ T)
    state["exp_avg_sq"].copy_(state["exp_avg_sq"] @ (T * T))


def set_basis(state: dict, new: dict | None) -> None:
    """Replace a parameter's basis entries by ``new`` (``None``: plain AdamW) and carry its moments."""
    old = spectral(state)
    for key in BASIS_KEYS:
        state.pop(key, None)
    if new:
        state.update(new)
    change_coordinates(state, old, spectral(state))


# --------------------------------------------------------------------------------------------
# Pair bases (LoRA B): one batched r x r solve
# --------------------------------------------------------------------------------------------
def _layer_stat(a_state: dict, name: str):
    if a_state["mode"] == "dense":
        return a_state[name]
    return Sketch(a_state[f"{name}_Q"], a_state[f"{name}_s"], a_state[f"{name}_rho"])


@torch.no_grad()
def solve_pairs(items, state, eigh_backend: str | None = None, process_group=None,
                name=lambda B: f"B {tuple(B.shape)}") -> None:
    """Re-solve the bases of paired ``B``, all of one rank ``r`` and device, in one eigensolver call
    (with ``process_group``: pair ``i`` on rank ``i % world``, then broadcast, see :func:`spread`).

    ``items``: ``[(B, A, group), ...]``; ``state``: the optimizer's per-parameter state;
    ``name(B)``: how errors name a pair whose statistics are degenerate. Per pair,
    in plain torch (``tn``: trace-normalize; ``damping`` of ``B``'s group)::

        P = tn(A Σp Aᵀ) + damping * I;  T = tn(A Σt Aᵀ)                  # (r, r)
        lam, V = generalized_eigh(T, P);  W = P @ V                     # batched over pairs
    """
    B0 = items[0][0]
    r, device = B0.shape[1], B0.device
    proxies, tasks = [], []
    for _, A, _ in items:  # an FSDP2-sharded A: its full (r, d_in) tensor, gathered
        a = (A.full_tensor() if is_dtensor(A) else A).detach().to(torch.float32)
        proxies.append(project(a, _layer_stat(state[A], "proxy")))
        tasks.append(project(a, _layer_stat(state[A], "task")))
    proxy, task = torch.stack(proxies), torch.stack(tasks)
    tr = torch.diagonal(proxy, dim1=-2, dim2=-1).sum(-1)

    def names(mask):
        return ", ".join(name(items[i][0]) for i in torch.nonzero(mask).flatten().tolist()[:4])

    finite = torch.isfinite(proxy).flatten(1).all(1) & torch.isfinite(task).flatten(1).all(1)
    if not bool(finite.all()):
        raise ValueError(f"{names(~finite)}: A Σ Aᵀ of the paired LoRA A has non-finite entries "
                         "(NaN or inf in A or its statistics)")
    if bool((tr <= 0).any()):
        raise ValueError(
            f"{names(tr <= 0)}: A Σp Aᵀ has a non-positive trace for the paired LoRA A (an "
            "all-zero A?); pair B only with a non-zero A"
        )
    proxy = trace_normalize(proxy, "A proxy_cov A^T")
    task = trace_normalize(task, "A task_cov A^T")
    damping = torch.tensor([g["damping"] for _, _, g in items], dtype=proxy.dtype, device=device)
    # per-pair damping folded into the proxy side (one batched call even with mixed groups)
    proxy = proxy + damping[:, None, None] * torch.eye(r, dtype=proxy.dtype, device=device)

    def solve(idx):
        try:
            lam, V = functional.generalized_eigh(task[idx], proxy[idx], eps=0.0, backend=eigh_backend)
        except ValueError as exc:
            bad = torch.zeros(len(items), dtype=torch.bool)
            bad[list(idx)] = torch.linalg.cholesky_ex(proxy[idx]).info.cpu() > 0
            raise ValueError(f"{names(bad)}: A Σp Aᵀ + damping*I is not positive definite; "
                             f"increase damping ({exc})") from None
        W = proxy[idx] @ V
        return [{"lam": lam[j], "V": V[j], "W": W[j]} for j in range(len(idx))]

    jobs = list(range(len(items)))
    solved = solve(jobs) if process_group is None else spread(
        solve, jobs, [[("lam", (r,)), ("V", (r, r)), ("W", (r, r))]] * len(jobs), process_group,
        device)
    for i, (B, _, group) in enumerate(items):
        Vi, Wi = normalized(solved[i]["V"], solved[i]["W"], group["basis_norm"])
        st = state[B]
        lam_i = _f32(solved[i]["lam"])
        set_basis(st, {"mode": "pair", "lam": lam_i, "V": _f32(Vi), "W": _f32(Wi),
                       "gate": gates_of(group, lam_i, r), "refreshed": st.get("step", 0)})
