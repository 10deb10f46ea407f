"""FoLoRA: Adam with per-direction gates in the generalized eigenbasis of (task, proxy) statistics.

The optimizer is the bookkeeping around three seams: :mod:`.basis` (solving, caching and
refreshing the spectral bases, carrying moments across them), :mod:`._flat` (the flat buffers and
the rotations into and out of spectral coordinates) and the ``folora_step`` op (the element-wise
gated Adam update of all parameters, one call; its implementation comes from the table in
:mod:`forgetkern._backend`).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch.optim import Optimizer

from .. import _backend
from .._params import NUM_FOLORA_SCALARS
from .._validate import check_folora_options
from ..lora.discovery import lora_modules
from ._flat import OP, build_flats, local, nonfinite_gradients, scalar_row
from .basis import (BasisCache, check_statistics, gates_of, layer_layout, set_basis, solve_layer,
                    solve_pairs, spread)


def _check_backend(backend) -> None:
    if backend is not None and backend not in _backend.OP_BACKENDS[OP]:
        raise ValueError(f"backend must be one of {_backend.OP_BACKENDS[OP]} or None, got {backend!r}")


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
        backend: implementation of the element-wise ``folora_step`` op: ``"triton"`` (one fused
            launch for every parameter; CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``),
            ``"reference"`` (torch, the same arithmetic as ``torch.optim.AdamW``) or ``None``
            (automatic). Resolved once per device when the flat buffers are built (the first
            step); an explicit backend that cannot serve raises there.
        eigh_backend: backend of the batched small eigensolver (``None``: automatic).
        process_group: data parallel (every rank holds the same statistics and steps the same
            parameters, whole under DDP or FSDP2 shards): the eigen solves are spread over its
            ranks, layer (or pair) ``i`` on rank ``i % world``, and broadcast (one packed
            ``broadcast`` per rank; results equal one process). ``None``: all solved here.

    FSDP2-sharded (DTensor) parameters are stepped shard by shard (each rank's rows; a paired
    ``B``'s refresh gathers its ``A``); the state dict then holds this rank's moments.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, gate: str = "soft", tau: float = 1.0,
                 damping: float = 1e-3, basis="dense", refresh_every: int = 10, *,
                 basis_norm: str = "proxy", sharpness: float = 4.0, backend: str | None = None,
                 eigh_backend: str | None = None, process_group=None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, gate=gate,
                        tau=tau, damping=damping, basis=basis, refresh_every=refresh_every,
                        basis_norm=basis_norm, sharpness=sharpness)
        check_folora_options(defaults)
        _check_backend(backend)
        self._step_backend = backend
        self.eigh_backend = eigh_backend
        self.process_group = process_group
        self._pairs: dict = {}  # B -> A
        self._flat: dict | None = None  # device -> _flat.Flat, built at the first step
        self._gates_stale = True
        self._bases = BasisCache()
        self._names: dict = {}  # id(param) -> its name in the model (from_model)
        #: Steps skipped because a gradient held NaN or inf (the state was left untouched).
        self.skipped_steps = 0
        super().__init__(params, defaults)  # every group goes through add_param_group

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the flat buffers are rebuilt at the next
        step (existing moments are carried over)."""
        check_folora_options({**self.defaults, **param_group})  # before it joins the optimizer
        super().add_param_group(param_group)
        self._flat = None

    @property
    def backend(self) -> str | None:
        """The requested ``folora_step`` backend (``None``: automatic). Setting it re-resolves the
        implementation of the flat buffers already built."""
        return self._step_backend

    @backend.setter
    def backend(self, backend: str | None) -> None:
        _check_backend(backend)
        self._step_backend = backend
        for flat in (self._flat or {}).values():
            flat.impl = _backend.resolve(OP, flat.g, backend=backend)

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

    def param_name(self, param) -> str:
        """How messages name ``param``: its name in the model (:meth:`from_model`), else its place
        in the parameter groups."""
        where = [f"param_groups[{gi}]['params'][{i}]" for gi, g in enumerate(self.param_groups)
                 for i, p in enumerate(g["params"]) if p is param]
        return self._names.get(id(param)) or f"{(where or ['a parameter'])[0]} {tuple(param.shape)}"

    @contextlib.contextmanager
    def _named(self, param):
        """A ``ValueError`` / ``TypeError`` raised inside, re-raised naming ``param``."""
        try:
            yield
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{self.param_name(param)}: {exc}") from exc

    # ---- bases --------------------------------------------------------------------------------
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
        with self._named(param):
            check_statistics(param, proxy_cov, task_cov)
            k = None if group["basis"] == "dense" else int(group["basis"])
            new = self._bases.get(proxy_cov, task_cov, k, group["damping"], group["basis_norm"],
                                  param.device, self.eigh_backend)
        set_basis(self.state[param], {**new, "gate": gates_of(group, new["lam"], param.shape[1])})
        self._gates_stale = True

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
        set_basis(self.state[B], None)  # plain coordinates until the first refresh
        self._gates_stale = True

    @torch.no_grad()
    def refresh(self, force: bool = False) -> int:
        """Re-solve the ``r x r`` problems of the paired ``B`` that are due (every
        ``refresh_every`` of their steps; all with ``force``), batched by ``r``. Returns how many."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        by_r: dict = {}
        for B, A in self._pairs.items():
            group = group_of[id(B)]
            st = self.state[B]
            last = st.get("refreshed")
            if force or last is None or st.get("step", 0) - last >= group["refresh_every"]:
                by_r.setdefault((B.shape[1], B.device), []).append((B, A, group))
        for items in by_r.values():
            solve_pairs(items, self.state, self.eigh_backend, self.process_group,
                        name=self.param_name)
        due = sum(len(items) for items in by_r.values())
        if due:
            self._gates_stale = True
        return due

    # ---- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (see the class docstring). ``closure`` as in ``torch.optim``.

        A gradient holding NaN or inf skips the whole step, as mixed-precision gradient scalers
        do: no parameter, moment or step count changes, :attr:`skipped_steps` counts it and a
        ``RuntimeWarning`` names the parameters (with a ``process_group``, every rank skips when
        any rank's gradients are non-finite). The check runs here, before any backend's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._all_params()
        count, mine = nonfinite_gradients(params, self.process_group)
        if count:
            self.skipped_steps += 1
            names = [self.param_name(params[i]) for i in mine[:4]] or ["another rank's parameters"]
            warnings.warn(f"FoLoRA: step skipped (the {self.skipped_steps}. so far): non-finite "
                          f"gradients (NaN or inf) in {', '.join(names)}"
                          f"{f' and {len(mine) - 4} more' if len(mine) > 4 else ''}; parameters "
                          "and moments are unchanged", RuntimeWarning, stacklevel=2)
            return loss
        if self._flat is None:
            self._flat = build_flats(self._all_params(), self.state, self._step_backend)
            self._gates_stale = True
        self.refresh()  # due by the step count before this update
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for flat in self._flat.values():
            if self._gates_stale:
                flat.set_gates(self.state)
            active, decay = [], {}  # decay: weight-decay factor -> parameters
            rows = [[0.0] * NUM_FOLORA_SCALARS for _ in flat.params]  # inactive rows: unread
            for i, p in enumerate(flat.params):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FoLoRA does not support sparse gradients")
                group, st = group_of[id(p)], self.state[p]
                st["step"] += 1
                rows[i] = scalar_row(st["step"], group["lr"], *group["betas"], group["eps"])
                if group["weight_decay"]:
                    decay.setdefault(1 - group["lr"] * group["weight_decay"], []).append(p)
                active.append(i)
            if not active:
                continue
            for factor, ps in decay.items():
                torch._foreach_mul_([local(p) for p in ps], factor)
            flat.load_gradients(active, self.state)  # g = grad V (spectral) or grad
            flat.impl.step(flat.g, flat.m, flat.v, flat.s, flat.table, tuple(active),
                           torch.tensor(rows, dtype=torch.float32), flat.gates)
            flat.apply_steps(active, self.state)  # p += s Vᵀ (spectral), s Pᵀ (low-rank) or s
        self._gates_stale = False
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
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Inverse of :meth:`state_dict`; tensors keep their saved dtype (moments stay float32
        for low-precision parameters)."""
        state_dict = dict(state_dict)
        pairs = state_dict.pop("pairs", [])
        self.skipped_steps = int(state_dict.pop("skipped_steps", 0))
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
        self._gates_stale = True
        self._bases.clear()

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
        opt._names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        for name, value in stats.items():
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"stats[{name!r}] must be a (proxy_cov, task_cov) pair")
        if opt.process_group is not None:
            opt._spread_solves([(layers[n].A, *v) for n, v in stats.items() if layers[n].A.requires_grad])
        for name, value in stats.items():
            layer = layers[name]
            if not layer.A.requires_grad:
                continue
            opt.set_statistics(layer.A, value[0], value[1])
            if layer.B.requires_grad:
                opt.pair(layer.B, layer.A)
        opt._bases.clear()
        return opt

    def _spread_solves(self, items) -> None:
        """The distinct layer bases of ``[(A, proxy_cov, task_cov), ...]`` solved over the ranks of
        the process group (:func:`.basis.spread`) into the cache :meth:`set_statistics` reads."""
        jobs, seen, owner = [], set(), {}
        for A, proxy, task in items:
            group = self._group_of(A, "param")
            with self._named(A):
                check_statistics(A, proxy, task)
            k = None if group["basis"] == "dense" else int(group["basis"])
            key = (id(proxy), id(task), k, group["damping"], group["basis_norm"], str(A.device))
            if key not in seen:
                seen.add(key)
                jobs.append((proxy, task, k, group["damping"], group["basis_norm"], A.device))
                owner[id(jobs[-1])] = A

        def solve(js):  # a degenerate statistic's error names the (first) layer that reads it
            out = []
            for j in js:
                with self._named(owner[id(j)]):
                    out.append(solve_layer(*j, self.eigh_backend))
            return out

        layouts = [layer_layout(job[0].shape[0], job[2]) for job in jobs]
        solved = spread(solve, jobs, [lay for _, lay in layouts], self.process_group,
                        jobs[0][5] if jobs else None)
        for job, (mode, _), out in zip(jobs, layouts, solved):
            self._bases.put(*job, {**out, "mode": mode})

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


__all__ = ["FoLoRA"]
