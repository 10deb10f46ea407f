"""Physical floors and predicted times: the cost model of every benchmark in this folder.

Rates
-----
Two ceilings, measured on the device at the start of each run (:func:`measure_rates`): the copy
bandwidth of a large device-to-device copy (bytes read + bytes written per second) and the rate
of a large bf16 GEMM on random data (flops per second). A dry run (CPU, no GPU) uses
:data:`H200_RATES` instead, the figures measured once on the H200 these benchmarks target (790
TFLOP/s, 4.3 TB/s), and every record of a dry run says so.

Floors
------
A floor is what no implementation can beat: ``max(flops / GEMM rate, bytes / copy rate)``, with
``flops`` the GEMMs the work needs and ``bytes`` what must cross device memory at least once
(each input read once, each output written once). Each provider's ratio is to the floor of the
work it does, so a cross-entropy-only peer is measured against the cross-entropy floor.

Fused-linear works, one GEMM = ``2·N·D·V`` flops (``N`` rows, ``D`` hidden, ``V`` vocabulary):

=============  ============  ==================  ============================================
work           forward       forward + backward  what it computes
=============  ============  ==================  ============================================
``tmkl-exact`` 2 GEMMs       3 GEMMs             CE + masked KL, base logits from base hidden
``ce``         1             2                   cross-entropy alone
``tmkl-topk``  1 + gather    2 + gather          CE + masked KL against a top-k base record
``jsd``        2             3                   full-vocabulary KL between two heads' logits
=============  ============  ==================  ============================================

plus one GEMM (``dW = dzᵀ h``) when the head is trained. The bytes: hidden states (both models'
where the work has a base side), the head once, the labels, the top-k record (``k`` values and
indices, three per-row numbers: the gather), ``dh`` (and ``dW``) written once.

The loss on materialized logits (``logits``) is memory-bound: its floor is bytes only. Two passes
(forward reads ``z`` and ``b``; backward reads them again and writes ``dz``: ``5·N·V`` elements)
is the floor of a loss with a separate backward; one pass (``z`` and ``b`` read once, ``dz``
written in the same pass: ``3·N·V``) is reported beside it. Forward alone: ``2·N·V``.

Other works: ``eigh`` (batched ``n x n`` generalized eigenproblems, fp32: read ``A`` and ``B``,
write the eigenvectors and eigenvalues; latency-bound by nature, so its ratio is large),
``train-step`` (the matmuls of one LoRA step, below) and ``optimizer-step`` (bytes of an
element-wise optimizer over the parameters plus its basis projections).

Training step floor: a decoder's matmul flops for ``T`` tokens are ``2·P·T`` forward and
``2·P·T`` for the backward through the frozen weights (activation gradients; LoRA's own weight
gradients and the attention-score products are left out, which only lowers the floor), with
``P`` the matmul parameters, LM head included. ``tmkl-live`` adds the base forward (``2·P·T``);
``tmkl-cache`` adds only the base head (``2·V·D·T``): the cache holds the base hidden states.

Predicted times of forgetkern's fused-linear strategies
-------------------------------------------------------
``predicted = GEMM flops / GEMM rate + bytes moved / copy rate``: the strategies run their GEMMs
and their element-wise kernels one after the other, so the two terms add. The byte models (``e``
the input element size, ``c`` the logits-chunk element size, 4 for fp32 chunks, ``R`` rows per
chunk, ``C = ceil(N / R)`` chunks, ``m`` the models whose logits the chunk holds: 2 for ``tmkl-exact``,
1 for ``ce`` and ``tmkl-topk``):

* ``chunked``: per chunk one vendor GEMM writes the logits of the ``m`` models (rows stacked:
  the head is read once), the TMKL logits kernel reads them and writes ``dL/dz`` in the input
  dtype, one GEMM reads ``dz`` and the head again and writes ``dh``. Bytes, forward + backward:
  ``m·N·V·c`` written + ``m·N·V·c`` read (logits), ``N·V·e`` written + ``N·V·e`` read (``dz``),
  ``2·C·V·D·e`` (the head, twice per chunk), ``(m + 1)·N·D·e`` (hidden states in, ``dh`` out),
  plus the top-k record for ``tmkl-topk``. GEMMs: ``m + 1``. A trained head adds one GEMM per
  chunk that reads ``dz`` and ``h`` and accumulates ``dW`` in fp32 (``2·C·V·D·4`` bytes).
  Forward alone: ``m`` GEMMs, the logits written and read once, the head ``C`` times.
* ``fused`` (on chip): logit tiles are formed with ``tl.dot`` and never written. The forward
  forms both models' tiles (2 GEMMs' worth), the backward forms them again and accumulates ``dh``
  (3 more): 5 in all; ``ce`` (``kl_weight=0``: no base tiles) and ``tmkl-topk`` form the adapted
  tiles only: 1 forward, 3 in all. Bytes: each pass reads the hidden
  states, the head and the labels once (L2 reuse of the head across row blocks assumed), the
  backward writes ``dh``.

Chunk rows ``R``: the chunk size the run passed (the benchmark passes the rows of the driver's
own plan, ``forgetkern._chunked.plan``), else :data:`ASSUMED_CHUNK_ROWS` (an assumption of this
model, stated in every record's ``model`` text). The materialized peers, the reference
backend and the other libraries get floors, not predictions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: fused-linear works and their GEMMs (forward, forward + backward), head frozen
LINEAR_GEMMS = {"tmkl-exact": (2, 3), "ce": (1, 2), "tmkl-topk": (1, 2), "jsd": (2, 3)}
#: works with a base (second) hidden-state input
_HAS_BASE_HIDDEN = ("tmkl-exact", "jsd")
#: passes a benchmark times: the forward alone (no gradient) or forward + backward
PASSES = ("forward", "full")
STRATEGIES = ("chunked", "fused")
#: rows per logits chunk assumed by the ``chunked`` model when the run sets none
ASSUMED_CHUNK_ROWS = 2048
#: bytes per row of a top-k record: k values (fp32) and indices (int32), then lse, tail, target
TOPK_ROW_BYTES = lambda k: 8 * k + 12  # noqa: E731
LABEL_BYTES = 8
#: per-row statistics a loss kernel saves between its passes (fp32 words)
ROW_STATS = 7


@dataclass(frozen=True)
class Rates:
    """The two ceilings. ``source`` says where they come from (measured, or the dry-run
    constants); ``dry`` marks rates that were not measured in this run."""

    gemm_flops_per_s: float
    copy_bytes_per_s: float
    source: str
    dry: bool = False

    def compute_ms(self, flops: float) -> float:
        return 1e3 * flops / self.gemm_flops_per_s

    def bandwidth_ms(self, nbytes: float) -> float:
        return 1e3 * nbytes / self.copy_bytes_per_s

    def describe(self) -> str:
        return (f"bf16 GEMM {self.gemm_flops_per_s / 1e12:.0f} TFLOP/s, copy "
                f"{self.copy_bytes_per_s / 1e12:.2f} TB/s ({self.source})")


H200_RATES = Rates(790e12, 4.3e12, "dry run: H200 figures, not measured in this run", dry=True)


@dataclass(frozen=True)
class Cost:
    """Flops and bytes of one call, their time under ``rates`` and how it was counted.
    ``combine`` is ``"max"`` for a floor and ``"sum"`` for a prediction."""

    flops: float
    nbytes: float
    ms: float
    text: str


def _cost(flops: float, nbytes: float, rates: Rates, combine: str, text: str) -> Cost:
    c, b = rates.compute_ms(flops), rates.bandwidth_ms(nbytes)
    ms = max(c, b) if combine == "max" else c + b
    return Cost(flops, nbytes, ms, f"{text}; {flops / 1e12:.3g} TFLOP + {nbytes / 1e9:.3g} GB")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _check_dims(**dims) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class LinearShape:
    """A fused-linear problem: ``n`` rows, ``d`` hidden, ``v`` vocabulary, ``elt`` bytes per
    input element, ``k`` the top-k record's width (``tmkl-topk`` only), ``train_weight`` when the
    head gets a gradient."""

    n: int
    d: int
    v: int
    elt: int
    k: int = 0
    train_weight: bool = False

    def __post_init__(self):
        _check_dims(n=self.n, d=self.d, v=self.v, elt=self.elt)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be an int >= 0, got {self.k!r}")

    @property
    def gemm_flops(self) -> float:
        return 2.0 * self.n * self.d * self.v


def linear_gemms(work: str, passes: str, train_weight: bool = False) -> int:
    """GEMMs (``2·N·D·V`` flops each) the fused-linear ``work`` needs in ``passes``."""
    _check("work", work, LINEAR_GEMMS)
    _check("passes", passes, PASSES)
    fwd, full = LINEAR_GEMMS[work]
    return fwd if passes == "forward" else full + int(train_weight)


def _gather_bytes(work: str, s: LinearShape) -> float:
    if work != "tmkl-topk":
        return 0.0
    if s.k < 1:
        raise ValueError("the tmkl-topk work needs the record's width k >= 1")
    return s.n * TOPK_ROW_BYTES(s.k)


def linear_floor(work: str, s: LinearShape, rates: Rates, passes: str = "full") -> Cost:
    """The floor of fused-linear ``work`` on shape ``s`` (module docstring)."""
    gemms = linear_gemms(work, passes, s.train_weight)
    hidden = (2 if work in _HAS_BASE_HIDDEN else 1) * s.n * s.d * s.elt
    nbytes = hidden + s.v * s.d * s.elt + s.n * LABEL_BYTES + _gather_bytes(work, s)
    if passes == "full":
        nbytes += s.n * s.d * s.elt + (s.v * s.d * s.elt if s.train_weight else 0)
    return _cost(gemms * s.gemm_flops, nbytes, rates, "max",
                 f"floor {work} {passes}: {gemms} GEMMs" + (" + gather" if work == "tmkl-topk" else ""))


def linear_predicted(strategy: str, work: str, s: LinearShape, rates: Rates, passes: str = "full",
                     *, chunk_rows: int | None = None, chunk_elt: int = 4) -> Cost:
    """Predicted time of forgetkern's ``strategy`` for ``work`` (module docstring)."""
    _check("strategy", strategy, STRATEGIES)
    _check("work", work, ("tmkl-exact", "ce", "tmkl-topk"))
    _check("passes", passes, PASSES)
    _check_dims(chunk_elt=chunk_elt)
    n, d, v, e = s.n, s.d, s.v, s.elt
    gather = _gather_bytes(work, s)
    full = passes == "full"
    if strategy == "chunked":
        assumed = chunk_rows is None
        rows = ASSUMED_CHUNK_ROWS if assumed else chunk_rows
        _check_dims(chunk_rows=rows)
        chunks = math.ceil(n / rows)
        m = 2 if work == "tmkl-exact" else 1
        gemms = m + (1 + int(s.train_weight) if full else 0)
        nbytes = 2 * m * n * v * chunk_elt + chunks * v * d * e + m * n * d * e + gather
        if full:
            nbytes += 2 * n * v * e + chunks * v * d * e + n * d * e
            if s.train_weight:
                nbytes += n * v * e + n * d * e + 2 * chunks * v * d * 4
        text = (f"chunked {work} {passes}: {gemms} GEMMs, R={rows} rows"
                f"{' (assumed)' if assumed else ''}, logits chunk {chunk_elt} B/element")
    else:
        one = work != "tmkl-exact"  # CE alone and the top-k record form no base logits on chip
        gemms = (3 if full else 1) if one else (5 if full else 2)
        gemms += int(full and s.train_weight)
        per_pass = (1 if one else 2) * n * d * e + v * d * e + n * LABEL_BYTES + gather
        nbytes = per_pass * (2 if full else 1) + (n * d * e + (v * d * e if s.train_weight else 0) if full else 0)
        text = f"fused {work} {passes}: {gemms} GEMM-equivalents on chip"
    return _cost(gemms * s.gemm_flops, nbytes, rates, "sum", text)


def logits_floor(n: int, v: int, elt: int, rates: Rates, passes: str = "full") -> tuple[Cost, Cost | None]:
    """``(floor, one-pass floor)`` of a loss on materialized ``(n, v)`` logits ``z`` and ``b``:
    two passes (``5·n·v`` elements) for forward + backward, with the one-pass floor
    (``3·n·v``) beside it; forward alone ``2·n·v`` (no one-pass floor)."""
    _check_dims(n=n, v=v, elt=elt)
    _check("passes", passes, PASSES)
    if passes == "forward":
        return _cost(0.0, 2 * n * v * elt + n * LABEL_BYTES, rates, "max", "floor logits forward: read z, b"), None
    two = _cost(0.0, 5 * n * v * elt + n * LABEL_BYTES, rates, "max",
                "floor logits full, 2 passes: read z, b twice, write dz")
    one = _cost(0.0, 3 * n * v * elt + n * LABEL_BYTES, rates, "max",
                "floor logits full, 1 pass: read z, b once, write dz")
    return two, one


def logits_predicted(n: int, v: int, elt: int, rates: Rates, passes: str = "full") -> Cost:
    """forgetkern's two-pass loss kernels: the two-pass bytes plus the per-row statistics saved
    by the forward and read by the backward."""
    floor, _ = logits_floor(n, v, elt, rates, passes)
    stats = n * ROW_STATS * 4 * (2 if passes == "full" else 1)
    return _cost(0.0, floor.nbytes + stats, rates, "sum", f"forgetkern 2-pass kernels {passes}")


def eigh_floor(batch: int, n: int, rates: Rates) -> Cost:
    """Bytes of ``batch`` fp32 ``n x n`` generalized eigenproblems: read ``A`` and ``B``, write
    the eigenvectors and eigenvalues."""
    _check_dims(batch=batch, n=n)
    return _cost(0.0, 4 * batch * (3 * n * n + n), rates, "max", "floor eigh: read A, B; write V, w")


TRAIN_STEP_WORKS = ("ce", "tmkl-live", "tmkl-cache")


def train_step_floor(work: str, matmul_params: int, head_params: int, tokens: int,
                     rates: Rates) -> Cost:
    """Matmul floor of one LoRA training step (module docstring): ``matmul_params`` the
    decoder's matmul parameters with the LM head, ``head_params`` the head's (``V·D``)."""
    _check("work", work, TRAIN_STEP_WORKS)
    _check_dims(matmul_params=matmul_params, head_params=head_params, tokens=tokens)
    flops = 4.0 * matmul_params * tokens
    if work == "tmkl-live":
        flops += 2.0 * matmul_params * tokens
    elif work == "tmkl-cache":
        flops += 2.0 * head_params * tokens
    return _cost(flops, 0.0, rates, "max", f"floor train-step {work}: matmuls")


def optimizer_floor(nbytes: float, rates: Rates, text: str) -> Cost:
    """Bandwidth floor of an element-wise optimizer step moving ``nbytes``."""
    if not nbytes > 0:
        raise ValueError(f"nbytes must be > 0, got {nbytes!r}")
    return _cost(0.0, nbytes, rates, "max", f"floor optimizer-step: {text}")


def measure_rates(timer, device) -> Rates:
    """Measure both ceilings on ``device`` (CUDA) with ``timer`` (the benchmarks' one timing
    helper, ``timer(fn, device=...) -> Timing``): a 2 GiB bf16 copy and an 8192³ bf16 GEMM on
    random data, medians."""
    import torch

    n = 2**30  # bf16 elements: 2 GiB
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy = timer(lambda: dst.copy_(src), device=device)
    copy_rate = 2 * n * 2 / (copy.median_ms / 1e3)
    del src, dst
    g = 8192
    a = torch.randn(g, g, dtype=torch.bfloat16, device=device)
    b = torch.randn(g, g, dtype=torch.bfloat16, device=device)
    gemm = timer(lambda: a @ b, device=device)
    gemm_rate = 2 * g**3 / (gemm.median_ms / 1e3)
    del a, b
    torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device)
    return Rates(gemm_rate, copy_rate, f"measured on {name} in this run "
                 f"(copy 2 GiB: {copy.median_ms:.3f} ms; GEMM 8192^3 bf16: {gemm.median_ms:.3f} ms)")
