"""Benchmark: fused-linear losses, from hidden states and the LM head without the N x V logits.

Headline: N=8192 tokens, D=4096, V=128256, bf16, the head frozen and shared by both models (LoRA),
forward + backward. Three groups of cases, one per forgetkern work (``--works``):

* ``tmkl-exact``: ``linear_tmkl_loss(h, W, h_b, y)``, the base logits from the base hidden states.
  Peers: plain torch with both logits materialized (``torch-eager``) and its ``torch.compile``,
  Liger-Kernel's ``LigerFusedLinearJSD`` with ``jsd_beta=0`` (full-vocabulary KL, no CE: work
  ``jsd``).
* ``ce``: forgetkern with ``kl_weight=0``; peers doing cross-entropy alone: Liger-Kernel's
  ``LigerFusedLinearCrossEntropyLoss``, Cut Cross-Entropy's ``linear_cross_entropy``, torch's
  ``F.linear_cross_entropy`` (unchunked, and chunked with ``LinearCrossEntropyOptions``: auto and
  ``acc_policy="accurate"``) where this torch has it, and plain torch.
* ``tmkl-topk``: forgetkern against a ``TopKBase`` record (k=64) of the base logits; plain torch.

forgetkern runs once per fused-linear strategy it offers (``strategy=`` of ``linear_tmkl_loss``,
when its signature has it: ``forgetkern-chunked``, ``forgetkern-fused``; ``-cuda`` variants where
the CUDA extension serves the op), else once per backend (``forgetkern-triton``: the on-chip
kernel). ``forgetkern-fused-tma`` (``FORGETKERN_TMA=1``) and ``torch.compile`` run in the late
phase. ``forgetkern-reference`` runs in the dry mode, or when ``--providers`` names it.

Every case passes the correctness gate (``gate.py``) before it is timed; each record's floor is
its own work's (``floors.py``), with forgetkern's predicted time beside it.

Inputs (``--inputs``): ``synthetic`` (default): ``h`` ~ N(0, 1), ``h_b = h + 0.3·N(0, 1)`` (an
adapted model stays near its base), ``W`` ~ N(0, 9/D) (logits of standard deviation ~3), labels
uniform with every 17th ignored. ``smollm2``: real final hidden states and the real head of
SmolLM2-135M (``smollm2_inputs.py``) at that model's shape, N=8192 D=576 V=49152.

    python benchmarks/bench_linear_tmkl.py [--quick] [--works ce] [--inputs synthetic,smollm2]
    python benchmarks/bench_linear_tmkl.py --train-weight     # the head trained too (+1 GEMM)
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import floors  # noqa: E402
import gate  # noqa: E402
import smollm2_inputs  # noqa: E402

import forgetkern  # noqa: E402
from forgetkern import _backend  # noqa: E402
from forgetkern._params import ENV_TMA  # noqa: E402

NAME = "linear_tmkl"
# (N, D, V): Llama-3-8B-like head first, then a shorter and a longer batch, and a 32k vocabulary
SHAPES = [(8192, 4096, 128256), (4096, 4096, 128256), (16384, 4096, 128256), (8192, 4096, 32000)]
QUICK = [(8192, 4096, 128256)]
DRY = [(48, 32, 300)]
WORKS = ("tmkl-exact", "ce", "tmkl-topk")
INPUTS = ("synthetic", "smollm2")
TOPK, DRY_TOPK = 64, 8
IGNORE = -100
#: the gate's formula for each work a provider does
FORMULA = {"tmkl-exact": "tmkl", "ce": "ce", "tmkl-topk": "tmkl-topk", "jsd": "kl-full"}
COMPILE_SETUP_S = 90.0
TMA = {ENV_TMA: "1"}  # the on-chip kernel's operand tiles loaded by TMA (launch_config)


@dataclass
class Problem:
    """One set of inputs: ``h`` (requires grad), ``hb``, ``w``, ``y``; ``rec`` the top-k record
    of the base logits (``tmkl-topk`` only)."""

    h: torch.Tensor
    hb: torch.Tensor
    w: torch.Tensor
    y: torch.Tensor
    inputs: str
    rec: forgetkern.TopKBase | None = None
    refs: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.h.shape[0], self.h.shape[1], self.w.shape[0]


# ---------------------------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------------------------
def _forgetkern_base(p: Problem, work: str):
    return p.rec if work == "tmkl-topk" else p.hb


def _forgetkern(**options):
    def fn(p: Problem, work: str):
        return forgetkern.linear_tmkl_loss(p.h, p.w, _forgetkern_base(p, work), p.y,
                                           kl_weight=0.0 if work == "ce" else 1.0, **options)
    return fn


def strategies() -> tuple[str, ...]:
    """The fused-linear strategies ``linear_tmkl_loss`` offers, ``"auto"`` aside: none before it
    took ``strategy``; those ``forgetkern._params.STRATEGIES`` lists when it lists them,
    else the two the cost model knows (``floors.STRATEGIES``)."""
    if "strategy" not in inspect.signature(forgetkern.linear_tmkl_loss).parameters:
        return ()
    from forgetkern import _params

    listed = getattr(_params, "STRATEGIES", None) or floors.STRATEGIES
    return tuple(s for s in listed if s != "auto")


def planned_rows(n: int, v: int, dtype, work: str) -> int | None:
    """Rows per chunk the chunked driver picks by default for this problem (its own
    ``forgetkern._chunked.plan``), or ``None`` in a forgetkern without it."""
    try:
        from forgetkern import _chunked
        from forgetkern._params import LinearTMKLParams
    except ImportError:
        return None
    params = LinearTMKLParams(kl_weight=0.0) if work == "ce" else LinearTMKLParams()
    return _chunked.plan(n, v, dtype, params, None, dense=work == "tmkl-exact").rows


def _extension_reason(device) -> str | None:
    if "cuda" not in _backend.OP_BACKENDS.get("linear_tmkl", ()):
        return None  # no CUDA backend for this op: no such provider
    return _backend.why_unavailable("cuda", "linear_tmkl", torch.device(device)) or ""


def torch_eager(p: Problem, work: str):
    """Plain torch with the logits materialized (what a user writes)."""
    z = (p.h @ p.w.T).float()
    if work == "ce":
        return F.cross_entropy(z, p.y, ignore_index=IGNORE)
    if work == "tmkl-exact":
        return gate.torch_tmkl(z, (p.hb @ p.w.T).float(), p.y, IGNORE)
    rec = p.rec
    rows = gate.topk_rows(z, (rec.values, rec.indices, rec.lse, rec.tail_lse), p.y, IGNORE)
    return rows.sum() / (p.y != IGNORE).sum().clamp_min(1)


def providers(device, probe_extension: bool = True) -> list[common.Provider]:
    """Every provider, available or not (with the reason), in the order they run. Without
    ``probe_extension`` the CUDA extension is not looked at (it may be being built)."""
    P = common.Provider
    every = {w: w for w in WORKS}
    exact = {"tmkl-exact": "tmkl-exact"}
    out: list[common.Provider] = []
    offered = strategies()
    ext = _extension_reason(device) if probe_extension else None
    no_tma = "TMA needs an sm_90 GPU: not run in the dry mode"
    if offered:
        fused_why = _backend.why_unavailable("triton", "linear_tmkl_fused", torch.device(device)) \
            if "linear_tmkl_fused" in _backend.OP_BACKENDS else None
        for s in offered:
            model = s if s in floors.STRATEGIES else None
            out.append(P(f"forgetkern-{s}", _forgetkern(strategy=s), works=every, strategy=s, predicts=model,
                         unavailable=fused_why if s == "fused" else None))
            if ext is not None:
                out.append(P(f"forgetkern-{s}-cuda", _forgetkern(strategy=s, backend="cuda"), works=every,
                             strategy=s, predicts=model, needs_extension=True, unavailable=ext or None))
        if "fused" in offered:
            out.append(P("forgetkern-fused-tma", _forgetkern(strategy="fused"), works=exact, env=TMA,
                         strategy="fused", predicts="fused", late=True, skip_dry=no_tma))
    else:  # before the strategies: the Triton backend is the on-chip (fused) kernel
        why = _backend.why_unavailable("triton", "linear_tmkl", torch.device(device))
        out.append(P("forgetkern-triton", _forgetkern(backend="triton"), works=every, strategy="fused",
                     predicts="fused", unavailable=why))
        out.append(P("forgetkern-triton-tma", _forgetkern(backend="triton"), works=exact, env=TMA,
                     strategy="fused", predicts="fused", late=True, unavailable=why, skip_dry=no_tma))
    out.append(P("forgetkern-reference", _forgetkern(backend="reference"), works=every, opt_in=True))
    out.append(P("torch-eager", torch_eager, works=every))
    compiled = {}

    def torch_compile(p, work):
        if work not in compiled:
            compiled[work] = torch.compile(lambda q: torch_eager(q, work), dynamic=False)
        return compiled[work](p)

    out.append(P("torch-compile", torch_compile, works=every, late=True, setup_s=COMPILE_SETUP_S,
                 skip_dry="torch.compile is not run in the dry mode (compile time)"))
    gpu_only = "a GPU-only peer (Triton kernels): not run in the dry mode"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=IGNORE)
        flce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        out.append(P("liger-fused-linear-jsd", lambda p, work: jsd(p.h, p.w, p.hb, p.w, p.y),
                     works={"tmkl-exact": "jsd"}, skip_dry=gpu_only))
        out.append(P("liger-fused-linear-ce", lambda p, work: flce(p.w, p.h, p.y), works={"ce": "ce"},
                     skip_dry=gpu_only))
    except ImportError as exc:
        why = f"liger-kernel not importable ({exc})"
        out.append(P("liger-fused-linear-jsd", None, works={"tmkl-exact": "jsd"}, unavailable=why))
        out.append(P("liger-fused-linear-ce", None, works={"ce": "ce"}, unavailable=why))
    try:
        from cut_cross_entropy import linear_cross_entropy

        out.append(P("cce-linear-cross-entropy",
                     lambda p, work: linear_cross_entropy(p.h, p.w, p.y, ignore_index=IGNORE),
                     works={"ce": "ce"}, skip_dry=gpu_only))
    except ImportError as exc:
        out.append(P("cce-linear-cross-entropy", None, works={"ce": "ce"},
                     unavailable=f"cut-cross-entropy not importable ({exc})"))
    lce = getattr(F, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    variants = {"torch-linear-ce": None, "torch-linear-ce-chunked": {},
                "torch-linear-ce-chunked-accurate": {"acc_policy": "accurate"}}
    for name, opts in variants.items():
        if lce is None:
            why = f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
        elif opts is not None and options is None:
            why = f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions (chunking)"
        else:
            why = None
        kw = {} if opts is None or why else {"options": options(**opts)}
        out.append(P(name, None if why else (lambda p, work, _kw=kw: lce(p.h, p.w, p.y, ignore_index=IGNORE, **_kw)),
                     works={"ce": "ce"}, unavailable=why))
    return out


# ---------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------
def synthetic(n: int, d: int, v: int, dtype, device, seed: int = 0) -> Problem:
    gen = torch.Generator(device=device).manual_seed(seed + n + d + v)
    h32 = torch.randn(n, d, device=device, generator=gen)
    hb = (h32 + 0.3 * torch.randn(n, d, device=device, generator=gen)).to(dtype)
    h = h32.to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=device, generator=gen) * (3 / d**0.5)).to(dtype)
    y = torch.randint(0, v, (n,), device=device, generator=gen)
    y[::17] = IGNORE
    return Problem(h, hb, w, y, "synthetic")


def topk_record(p: Problem, k: int, rows: int = gate.REFERENCE_ROWS) -> forgetkern.TopKBase:
    """The top-k record of the base logits ``hb @ W.T`` (fp32), built a chunk of rows at a time."""
    parts = []
    with torch.no_grad(), gate.fp32_matmuls():
        w32 = p.w.float()
        for start in range(0, p.h.shape[0], rows):
            s = slice(start, start + rows)
            parts.append(forgetkern.topk_base(p.hb[s].float() @ w32.T, p.y[s], k, ignore_index=IGNORE))
    return forgetkern.TopKBase(*(torch.cat([getattr(r, f) for r in parts]) for f in
                                 ("values", "indices", "lse", "tail_lse", "target")), temperature=1.0,
                            labels=p.y)


def reference(p: Problem, work: str) -> gate.Reference:
    formula = FORMULA[work]
    if formula not in p.refs:
        base = {"base_hidden": p.hb} if formula in ("tmkl", "kl-full") else {}
        if formula == "tmkl-topk":
            base = {"base_record": (p.rec.values, p.rec.indices, p.rec.lse, p.rec.tail_lse)}
        p.refs[formula] = gate.linear_reference(formula, p.h, p.w, p.y, ignore_index=IGNORE, **base)
    return p.refs[formula]


def problems(ctx: common.Context, dtype):
    """Per selected input source and shape: ``(problem or None, inputs, why not, (N, D, V))``,
    built one at a time."""
    opts = ctx.options
    for source in opts.inputs:
        if source == "synthetic":
            for n, d, v in DRY if ctx.dry else (QUICK if opts.quick else SHAPES):
                yield synthetic(n, d, v, dtype, ctx.device), "synthetic", None, (n, d, v)
            continue
        try:
            h, hb, w, y, text = smollm2_inputs.load(opts.inputs_file, ctx.device, dtype)
        except FileNotFoundError as exc:
            yield None, "smollm2", str(exc), (8192, 576, 49152)
            continue
        if ctx.dry:  # a slice of the rows: the dry mode checks the plumbing, not the speed
            h, hb, y = h.detach()[:48].requires_grad_(), hb[:48], y[:48]
            text += "; dry run: its first 48 rows"
        yield Problem(h, hb, w, y, text), text, None, (h.shape[0], h.shape[1], w.shape[0])


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def _shape_dict(n, d, v, train_weight, k=None):
    shape = {"N": n, "D": d, "V": v}
    if k:
        shape["k"] = k
    if train_weight:
        shape["head"] = "trained"
    return shape


def run(ctx: common.Context) -> list[common.Record]:
    opts = ctx.options
    dtype = torch.bfloat16
    elt = torch.finfo(dtype).bits // 8
    chunk_elt = 4 if elt < 4 else elt
    k = DRY_TOPK if ctx.dry else TOPK
    provs = [pv for pv in providers(ctx.device, ctx.extension != "skip") if ctx.selects(pv)]
    records = []
    for problem, source, why, (n, d, v) in problems(ctx, dtype):
        if problem is not None:
            problem.w.requires_grad_(opts.train_weight)
        for group in opts.works:
            if problem is not None and group == "tmkl-topk" and problem.rec is None:
                problem.rec = topk_record(problem, k)
            for pv in provs:
                if group in pv.works:
                    case = _case(ctx, pv, problem, why, group, (n, d, v), dtype, elt, chunk_elt, k, source)
                    records.append(common.run_case(ctx, case))
        problem = None
    return records


def _case(ctx, pv: common.Provider, p: Problem | None, why: str, group: str, ndv, dtype, elt, chunk_elt,
          k, source) -> common.Case:
    n, d, v = ndv
    work = pv.works[group]
    opts = ctx.options
    shape = floors.LinearShape(n, d, v, elt, k=k if work == "tmkl-topk" else 0, train_weight=opts.train_weight)
    predicted = None
    if pv.predicts and work in ("tmkl-exact", "ce", "tmkl-topk"):
        predicted = floors.linear_predicted(pv.predicts, work, shape, ctx.rates, opts.passes,
                                            chunk_elt=chunk_elt, chunk_rows=planned_rows(n, v, dtype, work))
    case = common.Case(
        bench=NAME, work=work, passes=opts.passes, provider=pv.name, strategy=pv.strategy,
        inputs=source, shape=_shape_dict(n, d, v, opts.train_weight, k if work == "tmkl-topk" else None),
        dtype=dtype, floor=floors.linear_floor(work, shape, ctx.rates, opts.passes), predicted=predicted,
        unavailable=pv.unavailable or (why or None), setup_s=pv.setup_s,
        skip=pv.skip_dry if ctx.dry else None)
    if p is None or case.unavailable or case.skip:
        return case
    leaves = (p.h, p.w) if opts.train_weight else (p.h,)
    case.grad_to_none = leaves
    ref = lambda: reference(p, work)  # noqa: E731

    def check():
        with common.environment(pv.env):
            return gate.check_linear(lambda: pv.fn(p, group), p.h, ref(), dtype)

    def make():
        def call():
            with common.environment(pv.env):
                if opts.passes == "forward":
                    with torch.no_grad():
                        return pv.fn(p, group)
                return pv.fn(p, group).backward()
        return call
    case.gate, case.make = check, make
    return case


def main(argv=None):
    import suite

    return suite.main(["--only", NAME] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
