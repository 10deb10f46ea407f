"""Differential fuzz of ``tmkl_loss`` against an independent fp64 oracle (plain torch, written here,
not forgetkern's reference), over shapes, dtypes, every option, layouts, padding, ignore patterns,
the forms of ``num_items_in_batch``, in-place backward and components.

Tolerance rule (every case, loss, components and gradient, random upstream gradient), on the
error norm ``||actual - oracle||`` over the case:

* float64 inputs: ``<= 1e-9 * ||oracle|| + 1e-12 * scale``;
* float32 / bfloat16 / float16 inputs: ``<= 4 * ||plain fp32 torch - oracle|| + floor``, plain fp32
  torch being the same formula in fp32 on the same rounded inputs. ``floor = 8 eps32 * scale``, the
  rounding of fp32 log-probabilities, where ``scale`` is what the output is made of: for a loss,
  ``(log V + 1) (ce_weight + kl_weight T^2 + 1)`` per contributing row (summed for ``sum``, one row
  for ``mean``, per row for ``none``), and for the gradient, which is returned in the input's dtype,
  ``||oracle grad|| + |upstream|`` with ``eps32`` raised by 2 ulps of that dtype (the rounding of
  the output itself). A single small case can have a plain fp32 error that cancels by luck; the
  floor is what fp32 can promise for it;
* non-finite oracle values must be matched exactly (same positions, same values).

Budgets: the default run does ``CI_CASES`` cases per backend (about a minute on 2 cores);
``pytest -m slow tests/test_fuzz.py`` runs ``SLOW_REFERENCE_CASES`` reference cases and
``SLOW_TRITON_CASES`` Triton (interpreter) cases. ``FORGETKERN_FUZZ_SEED`` picks another seed.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

import forgetkern

from .helpers import DEVICE, backends, cuda_backend_on_cpu

CI_CASES = {"reference": 2000, "triton": 150, "cuda": 1000}
SLOW_REFERENCE_CASES = 10_000
SLOW_TRITON_CASES = 500
SEED = int(os.environ.get("FORGETKERN_FUZZ_SEED", "20261201"))
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def oracle(z, b, y, *, temperature, direction, mask_target, ignore_index, kl_weight, ce_weight):
    """Per-row ``(loss, ce, kl)`` of plain torch in the dtype of ``z`` (fp64 for the oracle, fp32
    for the baseline), differentiable in ``z``: CE plus the KL over the non-target columns of both
    distributions, each renormalized (padding columns are -inf in both models)."""
    n, v = z.shape
    valid = y != ignore_index
    ys = torch.where(valid, y, torch.zeros_like(y))
    ce = torch.nn.functional.cross_entropy(z, ys, reduction="none")
    x, u = z / temperature, b.to(z.dtype) / temperature
    if mask_target:
        hit = torch.nn.functional.one_hot(ys, v).bool()
        x = x.masked_fill(hit, float("-inf"))
        u = u.masked_fill(hit, float("-inf"))
    lq, lp = x.log_softmax(-1), u.log_softmax(-1)
    w, la, lo = (lp.exp(), lp, lq) if direction == "forward" else (lq.exp(), lq, lp)
    # (the difference is masked before the product: a masked product would back-propagate 0 * nan)
    kl = (w * torch.where(w > 0, la - lo, torch.zeros_like(w))).sum(-1)
    if mask_target and v == 1:  # nothing left after removing the target
        kl = torch.zeros_like(kl)
    zero = torch.zeros_like(ce)
    ce, kl = torch.where(valid, ce, zero), torch.where(valid, kl, zero)
    cew = ce * ce_weight if ce_weight else zero
    klw = kl * (kl_weight * temperature**2) if kl_weight else zero
    return cew + klw, ce, kl


def _case(rng: random.Random, dtypes=DTYPES):
    """One random case: tensors (fp64 masters rounded to the case dtype) and the call's options."""
    dtype = rng.choice(dtypes)
    n = rng.choice([0, 1, 1, 2, 3, 5, 8])
    v = rng.choice([1, 2, 3, 7, 31, 64, 100, 257])
    layout = rng.choice(["contiguous", "strided_rows", "3d", "strided_labels"])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    scale = rng.choice([0.1, 1.0, 3.0, 30.0])
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    b = z + rng.choice([0.0, 0.05, 1.0]) * torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    offset = rng.choice([0.0, 0.0, 1e3, -1e3, "opposite"])
    if offset == "opposite":
        z, b = z + 500.0, b - 500.0
    else:
        z, b = z + offset, b + offset
    y = torch.randint(0, v, (n,), generator=g)
    if n and rng.random() < 0.3:  # peaked rows: both models nearly certain of the target
        z[torch.arange(n), y] += 20.0
        b[torch.arange(n), y] += 18.0
    pad = rng.choice([0, 0, 1, 3]) if v > 4 else 0
    if pad:  # padded vocabulary: -inf in both models, never a target
        z[:, v - pad:] = float("-inf")
        b[:, v - pad:] = float("-inf")
        y = y % (v - pad)
    ignore_index = rng.choice([-100, -1])
    ignore = rng.choice(["none", "some", "all"])
    if ignore == "some":
        y[torch.rand(n, generator=g) < 0.3] = ignore_index
    elif ignore == "all":
        y[:] = ignore_index
    opts = dict(temperature=rng.choice([0.5, 1.0, 1.0, 2.0, 4.0]),
                direction=rng.choice(["forward", "reverse"]), mask_target=rng.random() < 0.7,
                ignore_index=ignore_index, kl_weight=rng.choice([0.0, 0.3, 1.0, 2.0]),
                ce_weight=rng.choice([0.0, 1.0, 1.0, 1.5]))
    call = dict(reduction=rng.choice(["mean", "sum", "none"]),
                return_components=rng.random() < 0.4, inplace_backward=rng.random() < 0.2)
    count = int((y != ignore_index).sum())
    if call["reduction"] == "mean" and count and rng.random() < 0.5:
        k = count + rng.randrange(3)
        call["num_items_in_batch"] = rng.choice([k, float(k), torch.tensor(k), torch.tensor([k])])
    return dtype, layout, z, b, y, opts, call


def _laid_out(t: torch.Tensor, layout: str, which: str):
    """``t`` ((N, V) or (N,)) in the case's layout, with the same values."""
    if layout == "strided_rows" and t.dim() == 2:
        wide = torch.full((t.shape[0], t.shape[1] + 5), 7.0, dtype=t.dtype)
        wide[:, 2:2 + t.shape[1]] = t
        return wide[:, 2:2 + t.shape[1]]
    if layout == "strided_labels" and which == "labels":
        table = torch.zeros(t.shape[0], 3, dtype=t.dtype)
        table[:, 1] = t
        return table[:, 1]
    if layout == "3d":
        return t.reshape(1, *t.shape)
    return t


def _reduce(per_row, y, reduction, ignore_index, num_items):
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    denom = float(num_items.reshape(()) if isinstance(num_items, torch.Tensor) else num_items) \
        if num_items is not None else float((y != ignore_index).sum())
    return total / max(denom, 1.0)


def run_case(case, backend):
    dtype, layout, z64, b64, y, opts, call = case
    z_in = z64.to(dtype)
    b_in = b64.to(dtype)
    z_r, b_r = z_in.double(), b_in.double()  # what the kernels see, exactly
    outs_n = 3 if call["return_components"] else 1
    gen = torch.Generator().manual_seed(y.numel() * 7919 + z64.shape[-1])
    n = y.shape[0]
    shape = (n,) if call["reduction"] == "none" else ()
    ups = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(outs_n)]

    # forgetkern
    leaf = _laid_out(z_in.clone(), layout, "logits").to(DEVICE)
    leaf = leaf.detach().requires_grad_()
    logits = leaf * 1.0 if call["inplace_backward"] else leaf
    base = _laid_out(b_in.clone(), layout, "logits").to(DEVICE)
    labels = _laid_out(y.clone(), layout, "labels").to(DEVICE)
    out = forgetkern.tmkl_loss(logits, base, labels, backend=backend, **opts, **call)
    out = list(out) if call["return_components"] else [out]
    torch.autograd.backward([o.reshape(shape) for o in out],
                            [u.to(out[0].dtype).to(DEVICE) for u in ups])
    got = [o.detach().double().cpu().reshape(shape) for o in out]
    got_g = leaf.grad.double().cpu().reshape(z64.shape)

    # oracle (fp64) and plain fp32 torch on the same rounded inputs
    def plain(dt):
        x = z_r.detach().to(dt).clone().requires_grad_()
        rows = oracle(x, b_r.to(dt), y, **opts)
        red = [_reduce(r, y, call["reduction"], opts["ignore_index"],
                       call.get("num_items_in_batch")) for r in rows[:outs_n]]
        pairs = [(r, u.to(dt)) for r, u in zip(red, ups) if r.requires_grad]
        if pairs:
            torch.autograd.backward(*zip(*pairs))
        grad = x.grad if x.grad is not None else torch.zeros_like(x)
        return [r.detach().double() for r in red], grad.double()

    want, want_g = plain(torch.float64)
    base_l, base_g = plain(torch.float32)

    eps32 = torch.finfo(torch.float32).eps
    v = z64.shape[-1]
    weights = opts["ce_weight"] + opts["kl_weight"] * opts["temperature"] ** 2 + 1.0
    rows = float((y != opts["ignore_index"]).sum())
    per_row = (torch.log(torch.tensor(float(v))).item() + 1.0) * weights
    scale_l = per_row * {"none": max(rows, 1.0) ** 0.5, "sum": rows, "mean": 1.0}[call["reduction"]]
    ups_norm = sum(float(u.norm()) for u in ups)
    for name, a, e, p in zip(("loss", "ce", "kl"), got, want, base_l):
        _check(name, a, e, p, dtype, 8 * eps32 * scale_l)
    scale_g = float(want_g.norm()) + ups_norm * weights
    _check("grad", got_g, want_g, base_g, dtype,
           (8 * eps32 + 2 * torch.finfo(dtype).eps) * scale_g)


def _check(name, actual, expected, plain, dtype, floor):
    bad = ~torch.isfinite(expected)
    if bad.any():
        assert torch.equal(actual[bad].nan_to_num(1.5), expected[bad].nan_to_num(1.5)), name
        actual, expected, plain = actual[~bad], expected[~bad], plain[~bad]
    err = float((actual - expected).norm()) if actual.numel() else 0.0
    if not torch.isfinite(actual).all():
        err = float("inf")
    if dtype == torch.float64:
        limit = 1e-9 * float(expected.norm()) + 1e-12 * floor / torch.finfo(torch.float32).eps
    else:
        limit = 4 * float((plain - expected).norm()) + floor
    assert err <= limit, f"{name}: error {err:.3e} > {limit:.3e} ({dtype})"


def _fuzz(backend, cases, seed, monkeypatch):
    if backend == "cuda":
        cuda_backend_on_cpu(monkeypatch)
    if backend == "triton":  # rows span several blocks, with a partial last one
        from forgetkern.ops import tmkl as tmkl_ops

        real = tmkl_ops.launch_config
        monkeypatch.setattr(tmkl_ops, "launch_config",
                            lambda v, dtype, block_v=None, *a, **k: real(v, dtype, 16, *a, **k))
    rng = random.Random(f"{seed}-{backend}")
    for i in range(cases):
        case = _case(rng)
        try:
            run_case(case, backend)
        except AssertionError as exc:
            dtype, layout, z, b, y, opts, call = case
            raise AssertionError(f"case {i} (seed {seed}, backend {backend}): dtype={dtype} "
                                 f"layout={layout} shape={tuple(z.shape)} labels={y.tolist()} "
                                 f"{opts} {call}: {exc}") from None


@pytest.mark.parametrize("backend", backends("tmkl"))
def test_fuzz_ci_budget(backend, monkeypatch):
    _fuzz(backend, CI_CASES[backend], SEED, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("backend,cases", [
    pytest.param("reference", SLOW_REFERENCE_CASES, id="reference"),
    *[pytest.param("triton", SLOW_TRITON_CASES, id="triton", marks=p.marks)
      for p in backends("tmkl") if p.values[0] == "triton"],
])
def test_fuzz_slow_budget(backend, cases, monkeypatch):
    _fuzz(backend, cases, SEED + 1, monkeypatch)


def test_fuzz_topk_record_pairing():
    """A top-k record names the labels it was made for: paired with labels that differ on any
    counted row it is refused, on both forms; otherwise (differences on ignored rows only) the
    loss is the one of the record made for the loss's own labels."""
    rng = random.Random(f"{SEED}-pairing")
    for i in range(150):
        n, v = rng.choice([1, 2, 5]), rng.choice([2, 7, 31])
        k = rng.randint(1, v)
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        z, b = torch.randn(n, v, generator=g, dtype=torch.float64), torch.randn(n, v, generator=g)
        y = torch.randint(0, v, (n,), generator=g)
        y[torch.rand(n, generator=g) < 0.3] = -100
        y_rec = y.clone()
        for r in range(n):
            if rng.random() < 0.3:
                y_rec[r] = rng.choice([-100, rng.randrange(v)])
        rec = forgetkern.topk_base(b.double(), y_rec, k)
        counted = y != -100
        mismatch = bool((counted & (y_rec != y)).any())
        h, w = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(v, 3, dtype=torch.float64)
        for form in ("logits", "linear"):
            def call(r):
                if form == "logits":
                    return forgetkern.tmkl_loss(z, r, y, backend="reference")
                return forgetkern.linear_tmkl_loss(h, w, r, y, backend="reference")
            if mismatch:
                with pytest.raises(ValueError, match="recorded for other labels"):
                    call(rec)
            else:
                own = forgetkern.topk_base(b.double(), y, k)  # other rows where y is ignored
                assert torch.equal(call(rec), call(own)), (i, form)
