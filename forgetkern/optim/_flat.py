"""FoLoRA's flat buffers: every parameter of one device as one segment of flat float32 buffers.

Per device, ``g`` (gradient coordinates), ``m``, ``v`` (the Adam moments; each parameter's
``exp_avg``/``exp_avg_sq`` state entries are views into them) and ``s`` (the step) hold all
parameters back to back, so that the element-wise step is one call of the ``folora_step`` op for
all of them (:mod:`forgetkern._backend` picks its implementation once, when the buffers are
built). Around that call, gradients are rotated into spectral coordinates and steps back, one
batched matmul per group of parameters of equal shape and mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import _backend
from .._params import FOLORA_SCALARS, SegmentTable
from ..distributed import is_dtensor
from .basis import spectral

OP = "folora_step"


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (an FSDP2 shard: rows of the parameter), or ``t`` itself.
    FoLoRA's per-row math (``g V``, ``s Vᵀ``, Adam) runs on it as on a whole parameter."""
    return t.to_local() if is_dtensor(t) else t


def nonfinite_gradients(params, process_group=None) -> tuple[int, list[int]]:
    """``(count, mine)``: how many of ``params``' gradients hold NaN or inf (summed over the ranks
    of ``process_group`` when given, so that every rank decides alike: one ``all_reduce`` of one
    integer) and the indices of this rank's. One device sync."""
    have = [i for i, p in enumerate(params) if p.grad is not None and not p.grad.is_sparse]
    dev = params[0].device
    # the largest |g| of a gradient is NaN or inf exactly when the gradient holds one
    peaks = torch._foreach_norm([local(params[i].grad) for i in have], float("inf")) if have else []
    finite = torch.isfinite(torch.stack([t.to(dev, torch.float32) for t in peaks])) if have else \
        torch.zeros(0, dtype=torch.bool, device=dev)
    count = (~finite).sum()
    if process_group is not None:
        dist.all_reduce(count, group=process_group)
    count = int(count)
    return count, [have[i] for i in torch.nonzero(~finite).flatten().tolist()] if count else []


def scalar_row(step: int, lr: float, beta1: float, beta2: float, eps: float) -> list[float]:
    """One segment's row of the ``folora_step`` scalars (columns: ``_params.FOLORA_SCALARS``),
    with the bias corrections of ``torch.optim.AdamW`` at ``step``, in Python floats."""
    values = {
        "neg_step_size": -(lr / (1 - beta1**step)),
        "bc2_sqrt": (1 - beta2**step) ** 0.5,
        "eps": eps,
        "beta2": beta2,
        "w1": 1 - beta1,
        "w2": 1 - beta2,
    }
    return [values[name] for name in FOLORA_SCALARS]


@dataclass
class Flat:
    """The flat buffers of the parameters ``params`` on one device, and the step's implementation.

    ``table`` (segment layout and gate offsets) and ``gates`` (the flat gate buffer) follow the
    parameters' bases: :meth:`set_gates` rebuilds them when a basis changes.
    """

    params: list
    g: torch.Tensor  # (N,) float32 gradient coordinates
    m: torch.Tensor  # (N,) float32 first moments
    v: torch.Tensor  # (N,) float32 second moments
    s: torch.Tensor  # (N,) float32 step
    start: list[int]
    numel: list[int]
    impl: _backend.Implementation
    table: SegmentTable | None = None
    gates: torch.Tensor | None = None
    g_views: list = field(default_factory=list)  # per parameter: its slice of g, shaped like it
    s_views: list = field(default_factory=list)  # the same for s

    def set_gates(self, state) -> None:
        """The segment table and flat gate buffer for the parameters' current bases (gated:
        ``"dense"`` and ``"pair"``; ``"lowrank"`` gates act in the projection back)."""
        cols, gate_off, gates, off = [], [], [], 0
        for p in self.params:
            st, x = state[p], local(p)
            cols.append(max(x.shape[-1] if x.dim() >= 1 else 1, 1))
            if st.get("mode") in ("dense", "pair"):
                gate_off.append(off)
                gates.append(st["gate"].to(self.g.device))
                off += st["gate"].numel()
            else:
                gate_off.append(-1)
        self.table = SegmentTable(self.start, self.numel, cols, gate_off, self.g.device)
        self.gates = torch.cat(gates) if gates else None

    def load_gradients(self, active, state) -> None:
        """``g[i] = grad_i @ V_i`` (spectral moments) or ``grad_i`` for the ``active`` segments."""
        plain_dst, plain_src = [], []
        rotate: dict = {}  # (grad shape, grad dtype, V shape) -> [(index, grad, V)]
        for i in active:
            grad = local(self.params[i].grad)
            coords = spectral(state[self.params[i]])
            if coords is None:
                plain_dst.append(self.g_views[i])
                plain_src.append(grad)
            else:
                key = (tuple(grad.shape), grad.dtype, tuple(coords[0].shape))
                rotate.setdefault(key, []).append((i, grad, coords[0]))
        if plain_dst:
            torch._foreach_copy_(plain_dst, plain_src)
        for items in rotate.values():
            if len(items) == 1:
                i, grad, V = items[0]
                torch.matmul(grad.to(torch.float32), V, out=self.g_views[i])
                continue
            grads = torch.stack([g for _, g, _ in items]).to(torch.float32)
            out = torch.bmm(grads, torch.stack([V for _, _, V in items]))
            torch._foreach_copy_([self.g_views[i] for i, _, _ in items], list(out.unbind(0)))

    def apply_steps(self, active, state) -> None:
        """``p_i += s_i @ V_iᵀ`` (spectral), ``s_i @ Pᵀ`` (low-rank: ``P = I − V_k diag(1 − γ)
        W_kᵀ``) or ``s_i`` (plain AdamW), batched over parameters of one shape and mode."""
        updated, steps = [], []
        back: dict = {}
        for i in active:
            st = state[self.params[i]]
            p = local(self.params[i])
            mode = st.get("mode")
            if mode in ("dense", "pair", "lowrank"):
                key = (mode, tuple(p.shape), p.dtype, tuple(st["V"].shape))
                back.setdefault(key, []).append((p, self.s_views[i], st))
            else:
                updated.append(p)
                steps.append(self.s_views[i].to(p.dtype))
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


def build_flats(params, state, backend: str | None) -> dict:
    """``{device: Flat}`` for ``params``; existing moments are copied into the flat buffers (and
    the state entries become views of them). The ``folora_step`` implementation is resolved here,
    once per device (an explicit ``backend`` that cannot serve raises)."""
    by_dev: dict = {}
    for p in params:  # segments hold this rank's part of a DTensor parameter
        by_dev.setdefault(p.device, []).append(p)
    flats = {}
    for dev, ps in by_dev.items():
        start, numel, off = [], [], 0
        for p in ps:
            start.append(off)
            numel.append(local(p).numel())
            off += numel[-1]
        g, m, v, s = (torch.zeros(off, dtype=torch.float32, device=dev) for _ in range(4))
        flat = Flat(ps, g, m, v, s, start, numel, impl=_backend.resolve(OP, g, backend=backend))
        for p, a, n in zip(ps, start, numel):
            shape = local(p).shape
            flat.g_views.append(g[a: a + n].view(shape))
            flat.s_views.append(s[a: a + n].view(shape))
            st = state[p]
            st.setdefault("step", 0)
            for key, buf in (("exp_avg", m), ("exp_avg_sq", v)):
                view = buf[a: a + n].view(shape)
                if key in st:
                    view.copy_(st[key])
                st[key] = view
        flats[dev] = flat
    return flats
