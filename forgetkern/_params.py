"""The ground layer: every fact that host code and kernels share, defined once.

Option dataclasses (validated once, passed to the autograd Functions), the accumulation dtype,
environment flags, limits, and the layouts that kernels and host code read alike (per-row
statistics, partial records, the FoLoRA segment table and scalars, the eigensolver's status codes):
contracts that several modules share. This module imports nothing of forgetkern.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
BACKENDS = ("reference", "triton", "cuda")
DIRECTIONS = ("forward", "reverse")
GATES = ("soft", "sigmoid", "hard", "topk", "none")  # FoLoRA's per-direction gates
LOSSES = ("ce", "kl", "tmkl")  # the training losses of ForgetAwareStep / TMKLTrainer
PATHS = ("auto", "fused", "logits")  # how a training loss gets its logits

# --------------------------------------------------------------------------------------------
# Environment flags (read on each call, never cached: tests and users may change them)
# --------------------------------------------------------------------------------------------
ENV_BACKEND = "FORGETKERN_BACKEND"  # process-wide backend preference
ENV_TMA = "FORGETKERN_TMA"  # fused-linear Triton kernels load operands with TMA descriptors
ENV_TRITON_INTERPRET = "TRITON_INTERPRET"  # Triton's own CPU interpreter switch

_TRUE = ("1", "true", "yes", "on")


def check_backend_name(backend) -> None:
    """``backend``: ``None`` (automatic) or one of :data:`BACKENDS`."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (1/true/yes/on)."""
    return os.environ.get(name, "0").strip().lower() in _TRUE


def triton_interpret() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env_flag(ENV_TRITON_INTERPRET)


def cache_dir() -> str:
    """forgetkern's user cache folder: ``$XDG_CACHE_HOME/forgetkern`` (default
    ``~/.cache/forgetkern``). Nothing is created here."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "forgetkern")


def env_backend() -> str | None:
    """The ``FORGETKERN_BACKEND`` preference, lower-cased, or ``None`` when unset."""
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    return value or None


# --------------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float dtype (every backend)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# TMKL layouts
# --------------------------------------------------------------------------------------------
# Per-row statistics that a TMKL forward saves for its backward, as columns of an (N, 7) tensor
# in the accumulation dtype. Every backend (reference, Triton, CUDA) uses this layout. Each
# normalizer is kept as its row max and its log-sum apart (``LSE = m + ls``): log-probabilities are
# formed as ``(x - m) - ls``, which is shift-invariant (``x - LSE`` is not: LSE carries the logits'
# rounding). A max is stored as 0 for a row with no finite entry (its log-sum is then -inf).
STAT_M_Z = 0  # max over the kept columns of z/T (all columns when mask_target=False)
STAT_LS_Z = 1  # log sum exp(z/T - m_z) over the kept columns
STAT_M_B = 2  # max over the kept columns of b/T
STAT_LS_B = 3  # log sum exp(b/T - m_b) over the kept columns
STAT_M_CE = 4  # max of the CE normalizer, over every column of z (temperature never applies)
STAT_LS_CE = 5  # log sum exp(z - m_ce) over every column
STAT_KL = 6  # the row's KL (unscaled: no T^2, no kl_weight)
NUM_STATS = 7

# Columns of the per-(row, vocabulary split) partial record of the fused-linear Triton forward;
# maxima and log-sums as in the statistics above, over the split's columns only.
PART_M_Z = 0
PART_LS_Z = 1
PART_M_B = 2
PART_LS_B = 3
PART_KL = 4  # the split's KL accumulator over its own weight distribution, offsets to its maxima
PART_M_CE = 5  # (only when T != 1)
PART_LS_CE = 6  # (only when T != 1)
PART_ZY = 7  # z_y if the target column lies in the split, else 0
NUM_PART = 8


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class TMKLParams:
    """Non-tensor options of one TMKL call (see ``forgetkern.tmkl_loss`` for their meaning).

    The per-token loss is ``ce_weight * CE + kl_weight * temperature**2 * KL``.
    """

    kl_weight: float = 1.0
    ce_weight: float = 1.0
    temperature: float = 1.0
    direction: str = "forward"
    mask_target: bool = True
    ignore_index: int = -100
    inplace_backward: bool = False

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        for name in ("kl_weight", "ce_weight", "temperature"):
            object.__setattr__(self, name, _check_number(name, getattr(self, name)))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        for name in ("mask_target", "inplace_backward"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")

    @property
    def forward_kl(self) -> bool:
        return self.direction == "forward"

    @property
    def kl_scale(self) -> float:
        """Weight of the raw KL in the token loss: ``kl_weight * T**2``."""
        return self.kl_weight * self.temperature**2

    @property
    def separate_ce(self) -> bool:
        """CE needs its own log-sum-exp (temperature != 1); otherwise it reuses the KL statistics.
        Every backend (Triton flag, CUDA template switch, reference) reads this one rule."""
        return self.temperature != 1.0


#: How the fused-linear loss runs: per chunk of rows a vendor GEMM and the backend's TMKL kernels
#: (``"chunked"``), logit tiles on chip (``"fused"``, Triton), or ``"auto"`` (docs/linear_tmkl.md).
STRATEGIES = ("auto", "chunked", "fused")
#: dtype of the chunked strategy's logits: the accumulation dtype (fp32 for 16-bit inputs) or the
#: inputs' own (``"input"``: half the chunk memory, logits rounded to that dtype).
CHUNK_DTYPES = ("accumulation", "input")


@dataclass(frozen=True)
class LinearTMKLParams(TMKLParams):
    """:class:`TMKLParams` plus the fused-linear options (``forgetkern.linear_tmkl_loss``).

    ``chunk_size`` (rows per chunk) and ``memory_budget`` (bytes of one chunk's working set) size the
    chunked strategy's chunks; ``strategy`` is one of :data:`STRATEGIES`, ``chunk_dtype`` one of
    :data:`CHUNK_DTYPES`; ``logit_scale`` ``s`` and ``logit_softcap`` ``c`` transform both models'
    logits, ``z = c * tanh(s * (h W^T + bias) / c)``; ``compute_kl=False`` (only with
    ``kl_weight == 0``) skips the base model entirely.
    """

    chunk_size: int | None = None
    memory_budget: int | None = None
    strategy: str = "auto"
    chunk_dtype: str = "accumulation"
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    compute_kl: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("chunk_size", "memory_budget"):
            if (value := getattr(self, name)) is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            object.__setattr__(self, name, int(value))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.chunk_dtype not in CHUNK_DTYPES:
            raise ValueError(f"chunk_dtype must be one of {CHUNK_DTYPES}, got {self.chunk_dtype!r}")
        for name in ("logit_scale", "logit_softcap"):
            value = getattr(self, name)
            if (value is not None or name == "logit_scale") and not _check_number(name, value) > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            object.__setattr__(self, name, None if value is None else float(value))
        if not isinstance(self.compute_kl, bool):
            raise TypeError(f"compute_kl must be a bool, got {type(self.compute_kl).__name__}")
        if not self.compute_kl and self.kl_weight != 0.0:
            raise ValueError(f"compute_kl=False needs kl_weight == 0, got {self.kl_weight}")

    @property
    def transforms_logits(self) -> bool:
        """Whether ``logit_scale`` or ``logit_softcap`` changes the logits."""
        return self.logit_scale != 1.0 or self.logit_softcap is not None


def guarded(weight: float, value: torch.Tensor) -> torch.Tensor:
    """``weight * value`` with a zero weight giving exactly zero (never ``0 * inf = nan``)."""
    return value * weight if weight != 0.0 else torch.zeros_like(value)


def row_outputs(ce, kl, stats, valid, p: TMKLParams):
    """Per-row ``(loss, ce, kl, stats)`` from per-row CE, KL and ``(N, NUM_STATS)`` statistics (any
    backend that finishes rows on the host). Loss, CE, KL and statistics are zero on rows where
    ``valid`` is false; a KL below zero by rounding reports as 0 (NaN stays NaN)."""
    zero = torch.zeros_like(ce)
    ce = torch.where(valid, ce, zero)
    kl = torch.where(valid & ~(kl < 0), kl, zero)
    loss = guarded(p.ce_weight, ce) + guarded(p.kl_scale, kl)
    stats = torch.where(valid[:, None], stats, torch.zeros_like(stats))
    return loss, ce, kl, stats


def merge_lse(m: torch.Tensor, ls: torch.Tensor, dim: int = 1):
    """Merge log-sum-exps given as ``(max, log-sum)`` pairs along ``dim`` into one pair, keeping the
    max and the log-sum apart (shift-invariant). An empty part has ``ls = -inf``; an empty result
    has max ``0`` and log-sum ``-inf``."""
    raw = torch.where(ls == float("-inf"), torch.full_like(m, float("-inf")), m)
    top = raw.amax(dim=dim)
    top = top.masked_fill(top == float("-inf"), 0.0)
    return top, ((m - top.unsqueeze(dim)) + ls).exp().sum(dim=dim).log()


def with_target(m_z: torch.Tensor, ls_z: torch.Tensor, z_y: torch.Tensor):
    """``(max, log-sum)`` of the CE normalizer ``LSE(z) = logaddexp(LSE'(z), z_y)`` from the kept
    columns' pair and the target logit (``T == 1``, target masked)."""
    raw = torch.where(ls_z == float("-inf"), torch.full_like(m_z, float("-inf")), m_z)
    m_c = torch.maximum(raw, z_y)
    m_c = m_c.masked_fill(m_c == float("-inf"), 0.0)
    return m_c, (((m_z - m_c) + ls_z).exp() + (z_y - m_c).exp()).log()


# Sparse-base TMKL (docs/base_cache.md): the per-row statistics keep the layout above, with the
# base's two columns holding the adapted model's tail bucket instead (the base side is a record).
SP_M_T = STAT_M_B  # max of z/T over the tail: columns outside the support, never the target
SP_LS_T = STAT_LS_B  # log sum exp(z/T - m_t) over the tail


class TopKBase(NamedTuple):
    """A sparse record of the base model's next-token distribution, per token (``...`` = the
    labels' shape), at ``temperature`` ``T``: pass it as ``base_logits`` / ``base_hidden``.

    * ``values`` ``(..., k)``: the ``k`` largest base logits ``b_v`` (raw, not divided by ``T``);
    * ``indices`` ``(..., k)``: their token ids (int32 or int64, distinct per token);
    * ``lse`` ``(...)``: ``LSE_{u != y}(b_u / T)``, the non-target log-normalizer, computed
      directly (never from ``log(1 - p_y)``);
    * ``tail_lse`` ``(...)``: ``LSE(b_u / T)`` over the tail, ``u`` outside ``indices`` and
      ``u != y``, computed directly (``-inf`` when empty), so the base tail mass never comes from
      a cancelling ``1 - sum``;
    * ``target`` ``(...)``: the target's logit ``b_y`` (raw);
    * ``labels`` ``(...)``: the targets ``y`` the record was made for (``ignore_index`` where
      ignored). ``lse`` and ``target`` depend on them, so the loss requires them and checks them
      against its own labels: a record paired with other labels is an error, not a wrong KL.
    """

    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor
    tail_lse: torch.Tensor
    target: torch.Tensor
    temperature: float = 1.0
    labels: torch.Tensor | None = None


@dataclass(frozen=True)
class LossConfig:
    """How a training step turns a batch into a loss, validated once and shared by
    ``ForgetAwareStep``, ``forget_aware_loss`` and ``TMKLTrainer``.

    ``loss``: ``"ce"`` (plain fine-tuning), ``"kl"`` (CE + full-vocabulary KL) or ``"tmkl"``;
    ``path``: ``"fused"`` (hidden states + LM head, no logits), ``"logits"`` or ``"auto"``;
    ``tmkl``: the options of the KL term (``mask_target`` follows ``loss``).
    """

    loss: str = "tmkl"
    path: str = "auto"
    kl_weight: float = 1.0
    ce_weight: float = 1.0
    temperature: float = 1.0
    direction: str = "forward"
    ignore_index: int = -100
    backend: str | None = None
    chunk_size: int | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        check_backend_name(self.backend)
        # validates kl_weight, ce_weight, temperature, direction, ignore_index, chunk_size
        self.params()

    @property
    def uses_base(self) -> bool:
        """Whether the loss needs the base model's outputs."""
        return self.loss != "ce"

    def params(self) -> LinearTMKLParams:
        """The loss options as the kernels' parameter bundle."""
        return LinearTMKLParams(
            kl_weight=self.kl_weight, ce_weight=self.ce_weight, temperature=self.temperature,
            direction=self.direction, mask_target=self.loss == "tmkl",
            ignore_index=self.ignore_index, chunk_size=self.chunk_size)

    def loss_kwargs(self) -> dict:
        """Keyword arguments of ``tmkl_loss`` / ``linear_tmkl_loss`` for this configuration."""
        kw = dict(kl_weight=self.kl_weight, ce_weight=self.ce_weight, temperature=self.temperature,
                  direction=self.direction, mask_target=self.loss == "tmkl",
                  ignore_index=self.ignore_index, backend=self.backend)
        return kw


# --------------------------------------------------------------------------------------------
# Generalized eigensolver: limits and the status codes every backend reports
# --------------------------------------------------------------------------------------------
#: Largest ``n`` the on-chip eigensolvers (Triton program, CUDA thread block) handle; larger
#: problems run on the reference (cuSOLVER / LAPACK through torch). The CUDA extension reports its
#: own value as ``_C.EIGH_MAX_N`` and a test ties the two.
EIGH_MAX_N = 64
#: Cyclic Jacobi sweeps of the on-chip eigensolvers before they report non-convergence
#: (``_C.EIGH_MAX_SWEEPS`` must match).
EIGH_MAX_SWEEPS = 40
# Per-problem status codes written by the on-chip eigensolvers (and derived by the reference).
EIGH_OK = 0
EIGH_NOT_PD = 1  # B + eps I is not positive definite (CUDA reports the failing pivot, > 0)
EIGH_NON_FINITE = -1  # NaN or inf in A or B, or produced by the whitening
EIGH_NO_CONVERGENCE = -2  # Jacobi did not converge in EIGH_MAX_SWEEPS sweeps

# --------------------------------------------------------------------------------------------
# FoLoRA: the flat segment table and the per-segment scalars of the gated Adam step
# --------------------------------------------------------------------------------------------
#: Columns of the per-segment scalar table, read by the reference and the Triton step alike.
FOLORA_SCALARS = ("neg_step_size", "bc2_sqrt", "eps", "beta2", "w1", "w2")
NUM_FOLORA_SCALARS = len(FOLORA_SCALARS)


@dataclass
class SegmentTable:
    """Where each parameter (segment) lives in FoLoRA's flat buffers and which gates it uses.

    Host lists (``start``, ``numel``, ``cols``, ``gate``) serve the reference path; the device
    block table for the Triton kernel is built on demand by :meth:`device_tables` and cached per
    set of active segments.
    """

    start: list[int]
    numel: list[int]
    cols: list[int]
    gate: list[int]  # offset into the flat gate buffer, -1 when ungated
    device: torch.device
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def device_tables(self, active: tuple[int, ...], block: int):
        """``(blk_seg, blk_start, seg_start, seg_end, seg_cols, seg_gate)`` for ``active``
        segments (indices into this table), as device tensors."""
        key = (active, block)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        blk_seg, blk_start = [], []
        for i in active:
            for off in range(self.start[i], self.start[i] + self.numel[i], block):
                blk_seg.append(i)
                blk_start.append(off)
        dev = self.device
        tables = (
            torch.tensor(blk_seg, dtype=torch.int32, device=dev),
            torch.tensor(blk_start, dtype=torch.int64, device=dev),
            torch.tensor(self.start, dtype=torch.int64, device=dev),
            torch.tensor([s + n for s, n in zip(self.start, self.numel)], dtype=torch.int64, device=dev),
            torch.tensor([max(c, 1) for c in self.cols], dtype=torch.int64, device=dev),
            torch.tensor(self.gate, dtype=torch.int64, device=dev),
        )
        if len(self._cache) > 8:
            self._cache.clear()
        self._cache[key] = tables
        return tables
