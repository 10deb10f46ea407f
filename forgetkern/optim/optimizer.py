"""FoLoRA: Adam with per-direction gates in the generalized eigenbasis of (task, proxy) statistics."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from .. import _backend
from ..ops.folora import NUM_SCALARS, SegmentTable
from . import functional as F
from .gating import GATES, Sketch, check_gate, damped, gate_values, project, sketch, spectral_basis, \
    trace_normalize

#: Dtype the ``d_in x d_in`` generalized eigenproblems are solved in (stored results are float32).
SOLVE_DTYPE = torch.float64


@dataclass
class _Flat:
    """Flat float32 buffers of every parameter on one device (moments are state views)."""

    params: list
    g: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    start: list
    numel: list
    g_views: list = None  # per parameter: its slice of g, shaped like the parameter
    s_views: list = None  # the same for s


def _validate_basis(basis):
    if basis == "dense":
        return
    if isinstance(basis, bool) or not isinstance(basis, int) or basis < 1:
        raise ValueError(f"basis must be 'dense' or a positive int k (low-rank gating), got {basis!r}")


def _normalized(V, W, basis_norm):
    """``basis_norm="unit"``: unit-length columns ``V D^-1`` with ``W D`` (``Wᵀ V = I`` kept)."""
    if basis_norm == "proxy":
        return V, W
    d = torch.linalg.vector_norm(V, dim=-2).clamp_min(torch.finfo(V.dtype).tiny)
    return V / d[..., None, :], W * d[..., None, :]


class FoLoRA(Optimizer):
    r"""Gated Adam for LoRA: update directions scored by task utility per unit forgetting penalty.

    For a LoRA ``A`` ``(r, d_in)`` with proxy and task statistics ``Σp, Σt`` ``(d_in, d_in)``
    (``E[x xᵀ]`` of the layer input on proxy and task data), in plain torch per step::

        lam, V = generalized_eigh(tn(Σt), tn(Σp), eps=damping)   # tn: trace-normalize; V: (d_in, d_in)
        g_ = A.grad @ V                                          # spectral coordinates (r, d_in)
        u = adam(g_)                                             # moments live in these coordinates
        A += -lr * (gate(lam) * u) @ V.T                         # gate: soft lam / (lam + tau), ...

    A LoRA ``B`` ``(d_out, r)`` paired with its ``A`` gets the same treatment with the ``r x r``
    statistics ``A Σp Aᵀ``, ``A Σt Aᵀ``, re-solved every ``refresh_every`` steps for all pairs in
    one batched call of the small eigensolver. Other parameters get plain AdamW. See
    ``docs/folora.md`` for the method and every option.

    Args:
        params: parameters or parameter groups (as for ``torch.optim.AdamW``).
        lr, betas, eps, weight_decay: AdamW hyperparameters (decoupled weight decay).
        gate: ``"soft"`` ``lam/(lam+tau)`` (default), ``"sigmoid"``, ``"hard"`` (``lam >= tau``),
            ``"topk"`` (the fraction ``tau`` of directions with the largest ratios), or
            ``"none"`` (all gates 1).
        tau: the gate's threshold / scale (a fraction in ``(0, 1]`` for ``topk``).
        damping: ``eps`` added to the trace-normalized proxy statistic before the solve.
        basis: ``"dense"`` (a full ``d_in x d_in`` basis per layer input), or an int ``k``:
            low-rank gating that keeps only the ``k`` lowest-ratio directions (``O(k d_in)``
            memory; the Adam moments then stay in parameter coordinates, see the docs).
        refresh_every: steps between re-solves of the ``r x r`` problems of paired ``B``.
        basis_norm: scale of the basis vectors: ``"proxy"`` (default, ``Vᵀ(Σp+damping I)V = I``:
            a unit step in every spectral coordinate costs the same proxy penalty) or ``"unit"``
            (unit-length columns: step lengths as AdamW's, only the directions and gates change).
        sharpness: slope of the ``sigmoid`` gate in ``log(lam)``.
        backend: element-wise kernel: ``"triton"`` (one fused launch for every parameter;
            CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``), ``"reference"`` (torch,
            the same arithmetic as ``torch.optim.AdamW``) or ``None`` (automatic).
        eigh_backend: backend of the batched small eigensolver (``None``: automatic).
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, gate: str = "soft", tau: float = 1.0,
                 damping: float = 1e-3, basis="dense", refresh_every: int = 10, *,
                 basis_norm: str = "proxy", sharpness: float = 4.0, backend: str | None = None,
                 eigh_backend: str | None = None):
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        check_gate(gate, tau, sharpness)
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0.0):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        _validate_basis(basis)
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive int, got {refresh_every!r}")
        if basis_norm not in ("proxy", "unit"):
            raise ValueError(f"basis_norm must be 'proxy' or 'unit', got {basis_norm!r}")
        if backend is not None and backend not in ("reference", "triton"):
            raise ValueError(f"backend must be 'reference', 'triton' or None, got {backend!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, gate=gate,
                        tau=tau, damping=damping, basis=basis, refresh_every=refresh_every,
                        basis_norm=basis_norm, sharpness=sharpness)
        super().__init__(params, defaults)  # validates every group (add_param_group)
        self.backend = backend
        self.eigh_backend = eigh_backend
        self._pairs: dict = {}  # B -> A
        self._flat: dict | None = None
        self._gating = None
        self._basis_cache: dict = {}

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the flat buffers are rebuilt at the next
        step (existing moments are carried over)."""
        group = {**self.defaults, **param_group}  # validated before it joins the optimizer
        check_gate(group["gate"], group["tau"], group["sharpness"])
        _validate_basis(group["basis"])
        if group["basis_norm"] not in ("proxy", "unit"):
            raise ValueError(f"basis_norm must be 'proxy' or 'unit', got {group['basis_norm']!r}")
        super().add_param_group(param_group)
        self._flat = None
        self._gating = None

    # ---- ownership ----------------------------------------------------------------------------
    def _all_params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def _group_of(self, param, name: str) -> dict:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"{name} must be a parameter tensor, got {type(param).__name__}")
        for group in self.param_groups:
            for p in group["params"]:
                if p is param:
                    return group
        raise ValueError(
            f"{name} (shape {tuple(param.shape)}) is not a parameter of this optimizer; "
            "pass it in params when constructing FoLoRA"
        )

    # ---- statistics ---------------------------------------------------------------------------
    def set_statistics(self, param: torch.Tensor, proxy_cov: torch.Tensor, task_cov: torch.Tensor) -> None:
        """Gate the LoRA ``A`` matrix ``param`` ``(r, d_in)`` by ``(task_cov, proxy_cov)``.

        Both statistics are ``(d_in, d_in)`` (``E[x xᵀ]`` of the layer input; any positive scale:
        they are trace-normalized). The generalized eigenbasis is solved once here (in float64,
        stored in float32); layers given the very same statistic tensors share one basis. Adam
        moments already accumulated are carried into the new coordinates.

        Raises:
            ValueError: ``param`` not owned or not 2-D, statistics of the wrong shape or not
                finite, or ``proxy_cov`` not positive definite even after damping.
        """
        group = self._group_of(param, "param")
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
        k = None if group["basis"] == "dense" else int(group["basis"])
        key = (id(proxy_cov), id(task_cov), k, float(group["damping"]), group["basis_norm"],
               str(param.device))
        self._basis_cache = {k_: v for k_, v in self._basis_cache.items()
                             if v[0]() is not None and v[1]() is not None}  # drop dead entries
        hit = self._basis_cache.get(key)
        if hit is not None and hit[0]() is proxy_cov and hit[1]() is task_cov:
            new = hit[2]
        else:
            new = self._solve_layer(proxy_cov, task_cov, k, float(group["damping"]),
                                    group["basis_norm"], param.device)
            self._basis_cache[key] = (weakref.ref(proxy_cov), weakref.ref(task_cov), new)
        state = self.state[param]
        old = self._spectral(state)
        for key_ in ("mode", "lam", "V", "W", "proxy", "task", "proxy_Q", "proxy_s", "proxy_rho",
                     "task_Q", "task_s", "task_rho"):
            state.pop(key_, None)
        state.update(new)
        state["gate"] = self._gates(group, state["lam"], n)
        self._change_coordinates(state, old, self._spectral(state))
        self._gating = None

    def _solve_layer(self, proxy_cov, task_cov, k, damping, basis_norm, device) -> dict:
        proxy = trace_normalize(proxy_cov.detach().to(device=device, dtype=SOLVE_DTYPE), "proxy_cov")
        task = trace_normalize(task_cov.detach().to(device=device, dtype=SOLVE_DTYPE), "task_cov")
        backend = self.eigh_backend if proxy.shape[-1] <= 64 else None
        basis = spectral_basis(task, proxy, damping, k, backend=backend)
        V, W = _normalized(basis.V, basis.W, basis_norm)
        f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
        out = {"lam": f32(basis.lam), "V": f32(V), "W": f32(W)}
        if k is None or k >= proxy.shape[-1]:
            out.update(mode="dense", proxy=f32(proxy), task=f32(task))
        else:
            out["mode"] = "lowrank"
            for name, stat in (("proxy", proxy), ("task", task)):
                sk = sketch(stat, k)
                out.update({f"{name}_Q": f32(sk.Q), f"{name}_s": f32(sk.s), f"{name}_rho": f32(sk.rho)})
        return out

    def _gates(self, group, lam, dim):
        return gate_values(lam, group["gate"], group["tau"], group["sharpness"], dim=dim).to(torch.float32)

    @staticmethod
    def _spectral(state):
        """``(V, W)`` when the moments of this parameter live in spectral coordinates."""
        if state.get("mode") == "dense" or state.get("mode") == "pair":
            return state["V"], state["W"]
        return None

    @staticmethod
    def _change_coordinates(state, old, new) -> None:
        """Carry Adam moments from ``old`` to ``new`` coordinates (``None``: parameter ones).

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

    def pair(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """Gate the LoRA ``B`` ``(d_out, r)`` with the ``r x r`` statistics ``A Σ Aᵀ`` of its ``A``.

        ``A`` must have statistics (:meth:`set_statistics`). The small problems of all pairs are
        re-solved every ``refresh_every`` steps of ``B`` in one batched eigensolver call.
        """
        self._group_of(B, "B")
        self._group_of(A, "A")
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"B (d_out, r) and A (r, d_in) must share r, got B {tuple(B.shape)} and A {tuple(A.shape)}"
            )
        if "lam" not in self.state.get(A, {}):
            raise ValueError("A has no statistics: call set_statistics(A, proxy_cov, task_cov) before pair(B, A)")
        if B is A:
            raise ValueError("B and A must be different parameters")
        self._pairs[B] = A
        state = self.state[B]
        old = self._spectral(state)
        for key in ("mode", "lam", "V", "W", "gate", "refreshed"):
            state.pop(key, None)
        if old is not None and "exp_avg" in state:
            self._change_coordinates(state, old, None)
        self._gating = None

    def _layer_stat(self, A_state, name):
        if A_state["mode"] == "dense":
            return A_state[name]
        return Sketch(A_state[f"{name}_Q"], A_state[f"{name}_s"], A_state[f"{name}_rho"])

    @torch.no_grad()
    def refresh(self, force: bool = False) -> int:
        """Re-solve the ``r x r`` problems of the paired ``B`` that are due (every
        ``refresh_every`` of their steps; all with ``force``), batched by ``r``. Returns how many."""
        due = []
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for B, A in self._pairs.items():
            group = group_of[id(B)]
            st = self.state[B]
            step = st.get("step", 0)
            last = st.get("refreshed")
            if force or last is None or step - last >= group["refresh_every"]:
                due.append((B, A, group))
        by_r: dict = {}
        for item in due:
            by_r.setdefault((item[0].shape[1], item[0].device), []).append(item)
        for (r, device), items in by_r.items():
            proxies, tasks = [], []
            for B, A, _ in items:
                a_state = self.state[A]
                a = A.detach().to(torch.float32)
                proxies.append(project(a, self._layer_stat(a_state, "proxy")))
                tasks.append(project(a, self._layer_stat(a_state, "task")))
            proxy = torch.stack(proxies)
            task = torch.stack(tasks)
            tr = torch.diagonal(proxy, dim1=-2, dim2=-1).sum(-1)
            if bool((tr <= 0).any()):
                raise ValueError(
                    "A Σp Aᵀ has a non-positive trace for a paired LoRA A (an all-zero A?); "
                    "pair B only with a non-zero A"
                )
            proxy = trace_normalize(proxy, "A proxy_cov A^T")
            task = trace_normalize(task, "A task_cov A^T")
            damping = torch.tensor([g["damping"] for _, _, g in items], dtype=proxy.dtype, device=device)
            # per-pair damping folded into B (one batched call even with mixed groups)
            proxy = proxy + damping[:, None, None] * torch.eye(r, dtype=proxy.dtype, device=device)
            try:
                from ..functional import generalized_eigh

                lam, V = generalized_eigh(task, proxy, eps=0.0, backend=self.eigh_backend)
            except ValueError as exc:
                raise ValueError(f"A Σp Aᵀ + damping*I is not positive definite; increase damping ({exc})") from None
            W = proxy @ V
            for i, (B, _, group) in enumerate(items):
                st = self.state[B]
                old = self._spectral(st)
                Vi, Wi = _normalized(V[i], W[i], group["basis_norm"])
                st.update(mode="pair", lam=lam[i].float().contiguous(), V=Vi.float().contiguous(),
                          W=Wi.float().contiguous())
                st["gate"] = self._gates(group, st["lam"], r)
                st["refreshed"] = st.get("step", 0)
                self._change_coordinates(st, old, self._spectral(st))
        if due:
            self._gating = None
        return len(due)

    # ---- flat buffers -------------------------------------------------------------------------
    def _build_flat(self) -> dict:
        by_dev: dict = {}
        for p in self._all_params():
            by_dev.setdefault(p.device, []).append(p)
        flats = {}
        for dev, params in by_dev.items():
            start, numel, off = [], [], 0
            for p in params:
                start.append(off)
                numel.append(p.numel())
                off += p.numel()
            mk = lambda: torch.zeros(off, dtype=torch.float32, device=dev)  # noqa: E731
            flat = _Flat(params, mk(), mk(), mk(), mk(), start, numel)
            flat.g_views = [flat.g[a: a + n].view(p.shape) for p, a, n in zip(params, start, numel)]
            flat.s_views = [flat.s[a: a + n].view(p.shape) for p, a, n in zip(params, start, numel)]
            for p, a, n in zip(params, start, numel):
                st = self.state[p]
                st.setdefault("step", 0)
                for key, buf in (("exp_avg", flat.m), ("exp_avg_sq", flat.v)):
                    view = buf[a: a + n].view(p.shape)
                    if key in st:
                        view.copy_(st[key])
                    st[key] = view
            flats[dev] = flat
        return flats

    def _build_gating(self) -> dict:
        """Per device: the segment table (gate offsets) and the flat gate buffer."""
        out = {}
        for dev, flat in self._flat.items():
            cols, gate_off, gates, off = [], [], [], 0
            for p in flat.params:
                st = self.state[p]
                c = p.shape[-1] if p.dim() >= 1 else 1
                cols.append(max(c, 1))
                if st.get("mode") in ("dense", "pair"):
                    gate_off.append(off)
                    gates.append(st["gate"].to(dev))
                    off += st["gate"].numel()
                else:
                    gate_off.append(-1)
            table = SegmentTable(flat.start, flat.numel, cols, gate_off, dev)
            buf = torch.cat(gates) if gates else None
            out[dev] = (table, buf)
        return out

    def _use_triton(self, device) -> bool:
        if self.backend == "reference":
            return False
        try:
            return _backend.resolve("folora_step", torch.empty(0, device=device), backend=self.backend) == "triton"
        except RuntimeError:
            if self.backend == "triton":
                raise
            return False

    # ---- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (see the class docstring). ``closure`` as in ``torch.optim``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._flat is None:
            self._flat = self._build_flat()
            self._gating = None
        # new steps first (refresh is due by the step count before the update), then bases
        self.refresh()
        if self._gating is None:
            self._gating = self._build_gating()
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for dev, flat in self._flat.items():
            table, gate_buf = self._gating[dev]
            active, scalars = [], []
            decay: dict = {}  # weight-decay factor -> parameters
            rotate: dict = {}  # (grad shape, grad dtype, V shape) -> [(index, grad, V)]
            plain_dst, plain_src = [], []
            for i, p in enumerate(flat.params):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FoLoRA does not support sparse gradients")
                group = group_of[id(p)]
                st = self.state[p]
                st["step"] += 1
                beta1, beta2 = group["betas"]
                step_size, bc2_sqrt = F.bias_corrections(st["step"], group["lr"], beta1, beta2)
                if group["weight_decay"]:
                    decay.setdefault(1 - group["lr"] * group["weight_decay"], []).append(p)
                coords = self._spectral(st)
                if coords is not None:
                    key = (tuple(p.grad.shape), p.grad.dtype, tuple(coords[0].shape))
                    rotate.setdefault(key, []).append((i, p.grad, coords[0]))
                else:
                    plain_dst.append(flat.g_views[i])
                    plain_src.append(p.grad)
                active.append(i)
                scalars.append((step_size, bc2_sqrt, group["eps"], beta1, beta2))
            if not active:
                continue
            # batched over parameters: weight decay, then g~ = g V per shape group (one bmm each)
            for factor, ps in decay.items():
                torch._foreach_mul_(ps, factor)
            if plain_dst:
                torch._foreach_copy_(plain_dst, plain_src)
            for items in rotate.values():
                if len(items) == 1:
                    i, grad, V = items[0]
                    torch.matmul(grad.to(torch.float32), V, out=flat.g_views[i])
                    continue
                grads = torch.stack([g for _, g, _ in items]).to(torch.float32)
                out = torch.bmm(grads, torch.stack([V for _, _, V in items]))
                torch._foreach_copy_([flat.g_views[i] for i, _, _ in items], list(out.unbind(0)))
            if self._use_triton(dev):
                from ..ops.folora import folora_adam_step

                rows = [[0.0] * NUM_SCALARS for _ in flat.params]
                for i, (ss, bc2, eps, b1, b2) in zip(active, scalars):
                    rows[i] = [-ss, bc2, eps, b2, 1 - b1, 1 - b2]  # ops.folora.SCALARS
                rows = torch.tensor(rows, dtype=torch.float32).to(dev, non_blocking=True)
                folora_adam_step(flat.g, flat.m, flat.v, flat.s, table, tuple(active), rows, gate_buf)
            else:
                full = [None] * len(flat.params)
                for i, sc in zip(active, scalars):
                    full[i] = sc
                F.adam_step_segments(flat.g, flat.m, flat.v, flat.s, table, active, full, gate_buf)
            # back to parameter coordinates, batched over parameters of one shape and mode
            updated, steps = [], []
            back: dict = {}
            for i in active:
                p = flat.params[i]
                st = self.state[p]
                mode = st.get("mode")
                if mode in ("dense", "pair", "lowrank"):
                    key = (mode, tuple(p.shape), p.dtype, tuple(st["V"].shape))
                    back.setdefault(key, []).append((p, flat.s_views[i], st))
                else:
                    updated.append(p)
                    steps.append(flat.s_views[i].to(p.dtype))
            for (mode, *_), items in back.items():
                s = torch.stack([sv for _, sv, _ in items])
                V = torch.stack([st["V"] for _, _, st in items])
                if mode == "lowrank":
                    # s P^T with P = I - V_k diag(1 - gate) V_k^T (Σp + damping I)
                    W = torch.stack([st["W"] for _, _, st in items])
                    gate = torch.stack([st["gate"] for _, _, st in items])
                    s = s - ((s @ W) * (1.0 - gate[:, None, :])) @ V.mT
                else:
                    s = s @ V.mT
                updated += [p for p, _, _ in items]
                steps += list(s.to(items[0][0].dtype).unbind(0))
            torch._foreach_add_(updated, steps)
        return loss

    # ---- state dict ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: per-parameter moments, step counts,
        bases, gates and statistics (tensors copied), plus the ``B -> A`` pairing."""
        sd = super().state_dict()
        sd["state"] = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
                       for i, st in sd["state"].items()}
        index = {id(p): i for i, p in enumerate(self._all_params())}
        sd["pairs"] = [[index[id(B)], index[id(A)]] for B, A in self._pairs.items()]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Inverse of :meth:`state_dict`; tensors keep their saved dtype (moments stay float32
        for low-precision parameters)."""
        state_dict = dict(state_dict)
        pairs = state_dict.pop("pairs", [])
        saved_state = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        params = self._all_params()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        self.state.clear()
        for pid, p in zip(saved_ids, params):
            if pid in saved_state:
                self.state[p] = {k: (v.to(device=p.device).clone() if isinstance(v, torch.Tensor) else v)
                                 for k, v in saved_state[pid].items()}
        pos = {pid: j for j, pid in enumerate(saved_ids)}
        self._pairs = {}
        for b, a in pairs:
            self._pairs[params[pos.get(b, b)]] = params[pos.get(a, a)]
        self._flat = None
        self._gating = None
        self._basis_cache = {}

    # ---- wiring a model -----------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: torch.nn.Module, stats: dict, *, adapter_name: str | None = None,
                   **options) -> "FoLoRA":
        """FoLoRA over the trainable parameters of a forgetkern- or PEFT-LoRA ``model``.

        ``stats`` is ``{layer name: (proxy_cov, task_cov)}`` as returned by
        :func:`forgetkern.optim.calibrate`. Every named layer's ``lora_A`` gets
        :meth:`set_statistics` and its ``lora_B`` is :meth:`pair`-ed with it; other trainable
        parameters get AdamW. ``options`` are the constructor's keyword arguments.

        Raises:
            ValueError: a name in ``stats`` that is not a LoRA layer of ``model``, or no
                trainable parameter.
        """
        from ._lora import lora_modules

        layers = lora_modules(model, adapter_name)
        unknown = sorted(set(stats) - set(layers))
        if unknown:
            raise ValueError(
                f"stats has layers that are not LoRA layers of the model: {unknown[:5]}"
                f"{'...' if len(unknown) > 5 else ''} (LoRA layers include {sorted(layers)[:5]})"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        opt = cls(params, **options)
        for name, value in stats.items():
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"stats[{name!r}] must be a (proxy_cov, task_cov) pair")
            layer = layers[name]
            if not layer.A.requires_grad:
                continue
            opt.set_statistics(layer.A, value[0], value[1])
            if layer.B.requires_grad:
                opt.pair(layer.B, layer.A)
        opt._basis_cache = {}
        return opt

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by the optimizer: ``moments``, ``bases`` (V, W, gates, ratios) and
        ``statistics`` (dense statistics or sketches), each shared tensor counted once."""
        seen: set = set()
        out = {"moments": 0, "bases": 0, "statistics": 0}
        kinds = {"exp_avg": "moments", "exp_avg_sq": "moments", "lam": "bases", "V": "bases",
                 "W": "bases", "gate": "bases"}
        for st in self.state.values():
            for k, v in st.items():
                if not isinstance(v, torch.Tensor):
                    continue
                key = (v.untyped_storage().data_ptr(), v.storage_offset(), v.numel())
                if key in seen:
                    continue
                seen.add(key)
                out[kinds.get(k, "statistics")] += v.numel() * v.element_size()
        return out


__all__ = ["FoLoRA", "GATES", "damped"]
