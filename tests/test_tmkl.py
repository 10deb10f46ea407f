"""``tmkl_loss`` on every backend of the op against the independent fp64 oracle
(:func:`tests.helpers.oracle_tmkl`), forward and backward with random upstream gradients.

Backends: ``reference``; ``triton`` (the CPU interpreter without a GPU, with 32-column blocks so
rows span several blocks with a partial last one); ``cuda`` (without a GPU the kernels' per-thread
code compiled for the host, :func:`forgetkern._cuda_emulated.emulated`, through the public function). A
backend that cannot run here skips with its reason. Errors are held to a small multiple of plain
torch's own error in the input dtype (:func:`tests.helpers.check_tmkl`).
"""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import forgetkern
from forgetkern import _backend, _cuda, _cuda_emulated, reference
from forgetkern._params import STAT_KL, TMKLParams

from .helpers import (
    DEVICE,
    OPTION_IDS,
    OPTION_NAMES,
    OPTIONS,
    assert_close_to_ref,
    assert_tmkl_matches,
    backend_skip_reason,
    backends,
    check_tmkl,
    cuda_backend_on_cpu,
    naive_tmkl_grad,
    oracle_tmkl,
    oracle_tmkl_grad,
    run_tmkl,
    tmkl_inputs,
)

BLOCK_V = 32  # Triton's block width in these tests


def _set_triton_block(monkeypatch, width):
    from forgetkern.ops import tmkl as tmkl_ops

    original = getattr(tmkl_ops.launch_config, "original", tmkl_ops.launch_config)

    def small(v, dtype, block_v_=None, *args, **kw):
        return original(v, dtype, width, *args, **kw)

    small.original = original
    monkeypatch.setattr(tmkl_ops, "launch_config", small)


@pytest.fixture(params=backends("tmkl"))
def backend(request, monkeypatch):
    """Each backend of ``tmkl`` (see the module docstring)."""
    name = request.param
    if name == "triton":
        _set_triton_block(monkeypatch, BLOCK_V)
    elif name == "cuda":
        cuda_backend_on_cpu(monkeypatch)
    return name


def _edge_labels(y, v):
    """Targets in the first and last column and inside a misaligned row's scalar head."""
    n = y.shape[0]
    y[0] = 0
    if n > 2:
        y[-1] = v - 1
    if n > 3:
        y[3] = min(v - 1, 3)
    return y


# ------------------------------------------------------------------------------------------------
# every option, every dtype and layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(OPTION_NAMES, OPTIONS, ids=OPTION_IDS)
def test_every_option_matches_oracle(backend, direction, mask_target, temperature, dtype):
    # 101 columns = 3 full blocks of 32 + 5; rows start one element into wider rows (misaligned)
    z, b, y = tmkl_inputs(6, 101, dtype, scale=3.0, ignore=(2,), offsets=(1, 1))
    _edge_labels(y, 101)
    check_tmkl(z, b, y, backend, direction=direction, mask_target=mask_target,
               temperature=temperature, kl_weight=0.7, ce_weight=1.3)


LAYOUTS = {"contiguous": None, "same_offset": (3, 3), "mixed_offsets": (1, 2)}


@pytest.mark.parametrize("dtype,layout", [
    (torch.bfloat16, "contiguous"), (torch.bfloat16, "same_offset"), (torch.bfloat16, "mixed_offsets"),
    (torch.float16, "contiguous"), (torch.float16, "same_offset"), (torch.float16, "mixed_offsets"),
    (torch.float32, "mixed_offsets"), (torch.float64, "mixed_offsets"),
], ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype) else x)
def test_dtypes_and_layouts(backend, dtype, layout):
    """16-bit inputs: the per-row outputs accumulate in fp32 and are held to fp32's tolerance, the
    gradient to 1.5x the error of rounding the exact gradient to the dtype."""
    z, b, y = tmkl_inputs(5, 139, dtype, scale=3.0, offsets=LAYOUTS[layout])
    _edge_labels(y, 139)
    for kw in (dict(), dict(direction="reverse", temperature=1.7, kl_weight=2.0)):
        check_tmkl(z, b, y, backend, what=f"{kw}: ", **kw)


def test_vocab_sizes_and_single_row(backend):
    for i, (n, v) in enumerate([(1, 1), (1, 33), (2, 5), (3, 2), (3, 7), (3, 8), (3, 9), (3, 64),
                                (2, 511)]):
        z, b, y = tmkl_inputs(n, v, scale=3.0, ignore=(), offsets=(2, 2))
        _edge_labels(y, v)
        check_tmkl(z, b, y, backend, temperature=0.8 if i % 2 else 1.0, what=f"n={n} v={v}: ")


def test_single_column_vocabulary_is_exactly_zero(backend):
    z = torch.randn(3, 1, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3, 1, dtype=torch.float64, device=DEVICE)
    y = torch.zeros(3, dtype=torch.long, device=DEVICE)
    loss, ce, kl = forgetkern.tmkl_loss(z, b, y, return_components=True, backend=backend)
    assert loss.item() == 0.0 and kl.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_llm_vocabulary_rows(backend, monkeypatch):
    """Two bf16 rows of a 128256-token vocabulary at the backend's own launch settings."""
    if backend == "triton":
        monkeypatch.undo()  # the real block size
    v = 128256
    z, b, _ = tmkl_inputs(2, v, torch.bfloat16, scale=4.0, offsets=(1, 1))
    y = torch.tensor([v - 1, 77777], device=DEVICE)
    check_tmkl(z, b, y, backend)


# ------------------------------------------------------------------------------------------------
# shapes: 3-D inputs, reductions, strided rows, ignored rows, empty batch
# ------------------------------------------------------------------------------------------------
def test_three_d_inputs_and_reductions(backend):
    z, b, _ = tmkl_inputs(6, 50, ignore=())
    z, b = z.view(2, 3, 50), b.view(2, 3, 50)
    y = torch.randint(0, 50, (2, 3), device=DEVICE)
    y[0, 1] = -100
    g_rows = torch.randn(6, dtype=torch.float64)
    for reduction, num_items in (("mean", None), ("sum", None), ("none", None), ("mean", 20),
                                 ("mean", torch.tensor(7, device=DEVICE))):
        x = z.clone().requires_grad_()
        loss = forgetkern.tmkl_loss(x, b, y, reduction=reduction, num_items_in_batch=num_items,
                                    backend=backend)
        assert loss.shape == ((2, 3) if reduction == "none" else ())
        zo = z.detach().double().cpu().requires_grad_()
        per = oracle_tmkl(zo.view(6, 50), b.double().cpu().view(6, 50), y.cpu().view(6))[0]
        denom = 5 if num_items is None else float(num_items)  # mean: over the non-ignored tokens
        want = {"none": per.view(2, 3), "sum": per.sum(), "mean": per.sum() / denom}[reduction]
        assert_close_to_ref(loss.cpu(), want.detach(), torch.float32, what=f"{reduction} loss")
        g = g_rows.view(2, 3) if reduction == "none" else g_rows[0]
        (loss * g.to(loss)).sum().backward()
        (want * g).sum().backward()
        assert x.grad.shape == (2, 3, 50)
        assert_close_to_ref(x.grad.cpu(), zo.grad, torch.float32, what=f"{reduction} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_non_contiguous_rows(backend, dtype):
    big = torch.randn(10, 90, dtype=dtype, device=DEVICE)
    bigb = torch.randn(10, 90, dtype=dtype, device=DEVICE)
    z = big[::2, 5:75]  # row stride 180, unit column stride
    b = bigb[1::2, 10:80]
    assert not z.is_contiguous() and z.stride(-1) == 1
    y = torch.randint(0, 70, (5,), device=DEVICE)
    _, _, g = check_tmkl(z, b, y, backend, direction="reverse", temperature=1.5)
    # a column-strided view (stride along V != 1) is copied, still correct
    zt = torch.randn(70, 5, dtype=dtype, device=DEVICE).t()
    check_tmkl(zt, b, y, backend, g=g)
    # a strided 3-D view and strided labels
    z3 = torch.randn(2, 6, 70, dtype=dtype, device=DEVICE)[:, ::2]
    b3 = torch.randn(2, 3, 70, dtype=dtype, device=DEVICE)
    y3 = torch.randint(0, 70, (3, 2), device=DEVICE).t()
    assert not z3.is_contiguous() and not y3.is_contiguous()
    x = z3.clone().requires_grad_()
    loss = forgetkern.tmkl_loss(x, b3, y3, reduction="none", backend=backend)
    gl = torch.randn(2, 3, dtype=loss.dtype, device=DEVICE)
    (loss * gl).sum().backward()
    want, want_grad = oracle_tmkl_grad(z3.reshape(6, 70), b3.reshape(6, 70), y3.reshape(6),
                                       [gl.reshape(6), torch.zeros(6), torch.zeros(6)])
    assert_close_to_ref(loss.reshape(6).cpu(), want[0], dtype, what="3-D loss")
    assert_close_to_ref(x.grad.reshape(6, 70).cpu(), want_grad, dtype, what="3-D grad")
    # one base row broadcast to every row (row stride 0)
    b0 = torch.randn(1, 70, dtype=dtype, device=DEVICE).expand(5, 70)
    check_tmkl(z, b0, y, backend, g=g, what="broadcast base: ")


def test_all_rows_ignored_gives_zero_loss_and_grad(backend):
    z, b, _ = tmkl_inputs(4, 40)
    y = torch.full((4,), -100, device=DEVICE)
    x = z.clone().requires_grad_()
    loss = forgetkern.tmkl_loss(x, b, y, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    outs, grad, _ = run_tmkl(z, b, y, backend)  # per row, random upstream gradients
    assert all(torch.equal(o, torch.zeros_like(o)) for o in outs)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_empty_batch(backend):
    z = torch.randn(0, 10, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = forgetkern.tmkl_loss(z, z.detach(), y, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad.shape == (0, 10)


# ------------------------------------------------------------------------------------------------
# numerics: confident targets, padded vocabulary, large offsets (shift invariance)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_confident_targets(backend, dtype):
    """Both models put ~all mass on the target (p_y = 1 - O(e^-57): 1 - p_y underflows even in
    fp64): the masked KL must stay exact, where a ``log(1 - p_y)`` shortcut returns 0 or NaN."""
    n, v = 4, 70
    z, b, _ = tmkl_inputs(n, v, torch.float64, scale=1.0, ignore=())
    rows = torch.arange(n, device=DEVICE)
    y = rows * 17
    z[rows, y] = 60.0
    b[rows, y] = 55.0
    z, b = z.to(dtype), b.to(dtype)
    for direction in ("forward", "reverse"):
        outs, _, _ = check_tmkl(z, b, y, backend, direction=direction, what=f"{direction}: ")
        o = oracle_tmkl(z.cpu(), b.cpu(), y.cpu(), direction=direction)
        assert (o[2] > 1e-3).all()
        torch.testing.assert_close(outs[2].double().cpu(), o[2], rtol=1e-5, atol=0)
        torch.testing.assert_close(outs[1].double().cpu(), o[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_padded_neg_inf_columns(backend, dtype):
    """-inf columns where both models agree (a padded vocabulary) change nothing: the result is
    the oracle's on the unpadded columns, and the padded columns get an exactly zero gradient."""
    z, b, y = tmkl_inputs(5, 80, dtype, ignore=())
    y = y % 40
    z[:, 40:] = float("-inf")
    b[:, 40:] = float("-inf")
    for kw in (dict(), dict(direction="reverse", temperature=2.0), dict(mask_target=False)):
        outs, grad, g = run_tmkl(z, b, y, backend, **kw)
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[:, 40:], torch.zeros_like(grad[:, 40:]))
        want, want_grad = oracle_tmkl_grad(z[:, :40], b[:, :40], y, g, **kw)
        base, base_grad = naive_tmkl_grad(z[:, :40], b[:, :40], y, g, **kw)
        assert_tmkl_matches(outs, grad[:, :40], want, want_grad, dtype, base, base_grad, what=f"{kw}: ")
    # adapted -inf where the base has mass: infinite forward KL, reported; the reverse KL is finite
    z[0, 5 if int(y[0]) != 5 else 6] = float("-inf")
    _, _, kl = forgetkern.tmkl_loss(z, b, y, reduction="none", return_components=True, backend=backend)
    assert kl[0].item() == float("inf") and torch.isfinite(kl[1:]).all()
    _, _, kl = forgetkern.tmkl_loss(z, b, y, reduction="none", return_components=True,
                                    direction="reverse", backend=backend)
    want = oracle_tmkl(z[:, :40].cpu(), b[:, :40].cpu(), y.cpu(), direction="reverse")[2]
    assert torch.isfinite(kl).all()
    assert_close_to_ref(kl.cpu(), want, torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("offsets,scale,kw", [
    ((1000.0, 1000.0), 3.0, dict()),
    ((1000.0, 1000.0), 3.0, dict(direction="reverse", temperature=0.5)),
    ((1000.0, 1000.0), 3.0, dict(mask_target=False, temperature=4.0)),
    ((-1000.0, 1000.0), 20.0, dict(temperature=2.0)),  # peaked rows
    ((1000.0, -1000.0), 3.0, dict(temperature=0.5)),
    ((1000.0, -1000.0), 3.0, dict(direction="reverse", mask_target=False, temperature=0.5)),
], ids=["fwd-T1", "rev-T0.5", "full-T4", "peaked-T2", "opposite-fwd-T0.5", "opposite-rev-full-T0.5"])
def test_large_logit_offsets(backend, offsets, scale, kw):
    """Softmax is shift-invariant: with +-1000 on every logit the fp32 error stays within a small
    multiple of plain fp32 torch's own error on the same input (forming ``x - lse`` would carry the
    rounding of ``lse ~ 1e3`` into every log-probability)."""
    z, b, y = tmkl_inputs(6, 101, scale=scale, ignore=(2,), offsets=(1, 1))
    z, b = z + offsets[0], b + offsets[1]
    check_tmkl(z, b, y, backend, **kw)


# ------------------------------------------------------------------------------------------------
# gradient: finite differences, in place, base side, math properties
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("mask_target", [True, False], ids=["masked", "full"])
def test_gradcheck_fp64(backend, direction, mask_target):
    z, b, y = tmkl_inputs(3, 40, torch.float64)
    z = z.requires_grad_()

    def fn(x):
        return forgetkern.tmkl_loss(x, b, y, direction=direction, mask_target=mask_target,
                                    temperature=1.3, kl_weight=0.5, reduction="none",
                                    return_components=True, backend=backend)

    # the interpreter is slow (a full check of Triton takes ~20 s per option): random projections
    assert torch.autograd.gradcheck(fn, (z,), fast_mode=backend == "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("direction,temperature", [("forward", 1.0), ("reverse", 1.0), ("forward", 2.0)])
def test_inplace_backward(backend, direction, temperature, dtype):
    """The gradient written into the logits' own storage equals the out-of-place gradient: exactly
    where both buffers have the same layout, to rounding for a misaligned strided view (whose rows a
    kernel may take through its scalar path)."""
    n, v = 5, 60
    z, b, y = tmkl_inputs(n, v, dtype)
    g = torch.randn(n, device=DEVICE)
    kw = dict(direction=direction, temperature=temperature, reduction="none", backend=backend)
    x = z.clone().requires_grad_()
    (forgetkern.tmkl_loss(x, b, y, **kw) * g).sum().backward()
    assert torch.equal(x.grad[1], torch.zeros(v, dtype=dtype, device=DEVICE))  # ignored row: exactly 0
    leaf = z.clone().requires_grad_()
    logits = leaf * 1.0  # non-leaf: its storage receives the gradient
    (forgetkern.tmkl_loss(logits, b, y, inplace_backward=True, **kw) * g).sum().backward()
    torch.testing.assert_close(leaf.grad, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(logits.detach(), x.grad, rtol=0, atol=0)
    # a misaligned row-strided view of a non-leaf
    wide = torch.zeros(n, v + 5, dtype=dtype, device=DEVICE)
    wide[:, 1:v + 1] = z
    wide.requires_grad_()
    logits = (wide * 1.0)[:, 1:v + 1]
    (forgetkern.tmkl_loss(logits, b, y, inplace_backward=True, **kw) * g).sum().backward()
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)  # 1 ulp
    torch.testing.assert_close(wide.grad[:, 1:v + 1], x.grad, **tol)
    assert torch.equal(wide.grad[:, 0], torch.zeros(n, dtype=dtype, device=DEVICE))
    torch.testing.assert_close(logits.detach(), x.grad, **tol)


def test_zero_weights_are_exact(backend):
    z, b, y = tmkl_inputs(4, 50)
    outs, _, _ = run_tmkl(z, b, y, backend, kl_weight=0.0)
    ce_only = torch.nn.functional.cross_entropy(z, y, reduction="none", ignore_index=-100)
    torch.testing.assert_close(outs[0], ce_only, rtol=1e-5, atol=1e-5)
    outs, _, _ = run_tmkl(z, b, y, backend, ce_weight=0.0, temperature=2.0)
    torch.testing.assert_close(outs[0], 4.0 * outs[2], rtol=1e-6, atol=1e-7)


def test_no_gradient_to_base_logits(backend):
    z, b, y = tmkl_inputs(3, 40)
    b = b.clone().requires_grad_()
    x = z.clone().requires_grad_()
    forgetkern.tmkl_loss(x, b, y, backend=backend).backward()
    assert b.grad is None and x.grad is not None


def test_masked_kl_gradient_is_zero_at_target_and_sums_to_zero(backend):
    z, b, y = tmkl_inputs(9, 37, torch.float64, scale=3.0, ignore=())
    z.requires_grad_()
    _, _, kl = forgetkern.tmkl_loss(z, b, y, reduction="sum", return_components=True, backend=backend)
    (grad,) = torch.autograd.grad(kl, z)
    at_target = grad.gather(1, y[:, None]).squeeze(1)
    assert torch.equal(at_target, torch.zeros_like(at_target))
    torch.testing.assert_close(grad.sum(1), torch.zeros_like(grad[:, 0]), atol=1e-14, rtol=0)
    # the full KL does push on the target
    _, _, kl_full = forgetkern.tmkl_loss(z, b, y, reduction="sum", return_components=True,
                                         mask_target=False, backend=backend)
    (grad_full,) = torch.autograd.grad(kl_full, z)
    assert grad_full.gather(1, y[:, None]).abs().min() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_kl_matches_torch_kl_div(backend, temperature):
    z, b, y = tmkl_inputs(9, 37, torch.float64, scale=3.0, ignore=())
    kw = dict(mask_target=False, temperature=temperature, reduction="none", return_components=True,
              backend=backend)
    x, u = (z / temperature).log_softmax(-1), (b / temperature).log_softmax(-1)
    _, _, kl = forgetkern.tmkl_loss(z, b, y, **kw)
    expected = torch.nn.functional.kl_div(x, u, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)
    _, _, kl_rev = forgetkern.tmkl_loss(z, b, y, direction="reverse", **kw)
    expected_rev = torch.nn.functional.kl_div(u, x, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_rev, expected_rev, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# the interface below the public function: the saved per-row statistics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
def test_forward_statistics_match_the_reference(backend, dtype):
    """Every backend saves the same ``(N, NUM_STATS)`` statistics (``_params.STAT_*``) in the
    accumulation dtype: the reference's, in fp64, on the same rounded inputs (ignored rows' are
    never read)."""
    z, b, y = tmkl_inputs(6, 101, dtype, scale=3.0, ignore=(2,), offsets=(1, 2))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    valid = (y != -100).cpu()
    for params in (TMKLParams(), TMKLParams(direction="reverse", temperature=1.7, mask_target=False)):
        impl = _backend.resolve("tmkl", z, backend=backend)
        loss, ce, kl, stats = impl.forward(z, b, y, params)
        assert loss.dtype == ce.dtype == kl.dtype == stats.dtype == acc
        want = reference.tmkl_forward(z.double().cpu(), b.double().cpu(), y.cpu(), params)
        tol = 1e-11 if dtype == torch.float64 else 2e-5
        for name, got, exp in zip(("loss", "ce", "kl"), (loss, ce, kl), want):
            torch.testing.assert_close(got.double().cpu(), exp, rtol=tol, atol=tol,
                                       msg=lambda m: f"{params}: {name}: {m}")
        torch.testing.assert_close(stats.double().cpu()[valid], want[3][valid], rtol=tol, atol=tol,
                                   msg=lambda m: f"{params}: stats: {m}")
        torch.testing.assert_close(stats[:, STAT_KL].double().cpu()[valid], kl.double().cpu()[valid])


# ------------------------------------------------------------------------------------------------
# fuzz: every backend against the oracle on random small problems
# ------------------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
# a peaked row whose maxima lie ~12 apart at T=0.5: the CUDA KL is 17x plain torch's error off
@example(n=1, v=6, direction="forward", mask_target=False, temperature=0.5, scale=9.0, offset=0.0,
         seed=280)
@given(
    n=st.integers(1, 5),
    v=st.integers(1, 70),
    direction=st.sampled_from(["forward", "reverse"]),
    mask_target=st.booleans(),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    scale=st.floats(0.1, 20.0),
    offset=st.sampled_from([0.0, 0.0, 300.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_vs_oracle(backend, monkeypatch, n, v, direction, mask_target, temperature, scale,
                        offset, seed):
    if backend == "triton":
        _set_triton_block(monkeypatch, 16)
    gen = torch.Generator().manual_seed(seed)
    z, b, y = tmkl_inputs(n, v, scale=scale, ignore=(), generator=gen)
    y[torch.rand(n, generator=gen).to(DEVICE) < 0.2] = -100
    g = [torch.randn(n, generator=gen).to(DEVICE) for _ in range(3)]
    check_tmkl(z + offset, b + offset, y, backend, g=g, direction=direction, mask_target=mask_target,
               temperature=temperature)


# ------------------------------------------------------------------------------------------------
# Triton: lanes of 16-byte vectors, unmasked full blocks, vocabulary splits
# ------------------------------------------------------------------------------------------------
_TRITON_REASON = backend_skip_reason("tmkl", "triton")
needs_triton = pytest.mark.skipif(_TRITON_REASON is not None, reason=f"triton: {_TRITON_REASON}")


def _force_triton_launch(monkeypatch, width, splits):
    """Triton with ``width``-column blocks and ``splits`` programs per row; returns the list of
    launch settings the launchers used."""
    from forgetkern.ops import tmkl as tmkl_ops

    original = getattr(tmkl_ops.launch_config, "original", tmkl_ops.launch_config)
    used = []

    def forced(v, dtype, block_v_=None, n=None, device=None, splits_=None, aligned=True):
        cfg = original(v, dtype, width, n, device, splits, aligned)
        used.append(dict(cfg))
        return cfg

    forced.original = original
    monkeypatch.setattr(tmkl_ops, "launch_config", forced)
    return used


def _lane_inputs(layout, n, v, dtype, shift):
    """Logits ``+ shift`` in one of three row layouts: ``aligned`` (contiguous, ``v`` a multiple of
    16), ``aligned_ragged`` (rows 128 wide, ``v`` columns used: aligned rows, a partial last block),
    ``misaligned`` (rows starting one element into wider rows). Labels: row 1 ignored; the target
    in the first, last, and a block's first and last columns; row 4 nearly certain (its target
    40 above the row's maximum in the adapted model, 35 in the base: p_y ~ 1 - e^-35)."""
    width = {"aligned": v, "aligned_ragged": 128, "misaligned": v + 5}[layout]
    gen = torch.Generator().manual_seed(v)
    z = torch.randn(n, width, dtype=torch.float64, generator=gen).to(DEVICE) * 3.0
    b = torch.randn(n, width, dtype=torch.float64, generator=gen).to(DEVICE) * 3.0
    y = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    y[0], y[1], y[2], y[3], y[4] = 0, -100, v - 1, 32, 63
    lo = 1 if layout == "misaligned" else 0
    z[4, lo + 63] = z[4].max() + 40.0
    b[4, lo + 63] = b[4].max() + 35.0
    z = (z + shift[0]).to(dtype)[:, lo:lo + v]
    b = (b + shift[1]).to(dtype)[:, lo:lo + v]
    return z, b, y


@needs_triton
@pytest.mark.parametrize("layout,v,dtype,splits", [
    ("aligned", 96, torch.float32, 3), ("aligned_ragged", 83, torch.float32, 1),
    ("aligned_ragged", 83, torch.float32, 2), ("aligned_ragged", 83, torch.bfloat16, 3),
    ("misaligned", 83, torch.float32, 2),
], ids=["aligned-fp32-3", "ragged-fp32-1", "ragged-fp32-2", "ragged-bf16-3", "misaligned-fp32-2"])
def test_triton_lanes_and_vocabulary_splits(monkeypatch, layout, v, dtype, splits):
    """The Triton kernels with 32-column blocks: rows read as 16-byte lanes (aligned rows) or one
    column per lane (misaligned), full blocks unmasked, the target's block and the partial last
    block masked, and each row's vocabulary split over ``splits`` programs whose partial records
    the host merges. Rows: an ignored one, a nearly certain one, logits offset by +-1000, the
    target in the first, last, and a split's boundary column; forward and backward against the
    fp64 oracle for random upstream gradients, and the in-place backward."""
    from forgetkern.ops import tmkl as tmkl_ops

    used = _force_triton_launch(monkeypatch, 32, splits)
    for kw, shift in ((dict(), (1000.0, 1000.0)),
                      (dict(direction="reverse", temperature=2.0, kl_weight=0.7), (1000.0, -1000.0)),
                      (dict(mask_target=False), (0.0, 0.0))):
        z, b, y = _lane_inputs(layout, 6, v, dtype, shift)
        assert tmkl_ops.rows_aligned(z, b) == (layout != "misaligned")
        g = [torch.randn(y.shape, device=DEVICE) for _ in range(3)]
        grads = []
        for inplace in (False, True):
            # the logits as a view of a leaf with the same strides (a clone would be contiguous);
            # in place, a non-leaf view whose storage receives the gradient
            leaf = torch.zeros(z.storage_offset() + z.shape[0] * z.stride(0), dtype=dtype,
                               device=DEVICE)
            leaf.as_strided(z.shape, z.stride(), z.storage_offset()).copy_(z)
            leaf.requires_grad_()
            x = (leaf * 1.0 if inplace else leaf).as_strided(z.shape, z.stride(), z.storage_offset())
            used.clear()
            outs = forgetkern.tmkl_loss(x, b, y, reduction="none", return_components=True,
                                        inplace_backward=inplace, backend="triton", **kw)
            torch.autograd.backward(list(outs), [gi.to(outs[0].dtype) for gi in g])
            # the forward reads the logits in 16-byte lanes where rows are aligned, and so does the
            # in-place backward (an out-of-place gradient buffer may be laid out differently)
            vec = 16 // dtype.itemsize if layout != "misaligned" else 1
            assert [c["splits"] for c in used] == [min(splits, -(-v // 32))] * 2, used
            assert used[0]["VEC"] == vec and (not inplace or used[1]["VEC"] == vec), used
            grads.append(leaf.grad.as_strided(z.shape, z.stride(), z.storage_offset()))
        want, want_grad = oracle_tmkl_grad(z, b, y, g, **kw)
        base, base_grad = naive_tmkl_grad(z, b, y, g, **kw)
        assert_tmkl_matches([o.detach() for o in outs], grads[0], want, want_grad, dtype, base,
                            base_grad, what=f"{kw}: ")
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@needs_triton
def test_triton_launch_config_splits_and_lanes(monkeypatch):
    """Vocabulary splits only where rows are fewer than two per SM, whole blocks per split, every
    column covered once; lanes of 16 bytes on aligned rows, one column otherwise."""
    from forgetkern.ops import tmkl as tmkl_ops

    monkeypatch.setattr(tmkl_ops, "multiprocessor_count", lambda device=None: 132)
    cfg = tmkl_ops.launch_config
    big = cfg(128256, torch.bfloat16, None, 8192)
    assert (big["BLOCK_V"], big["VEC"], big["num_warps"], big["splits"]) == (8192, 8, 16, 1)
    for n, want in ((1, 16), (100, 3), (263, 2), (264, 1)):
        c = cfg(128256, torch.bfloat16, None, n)
        assert c["splits"] == want, (n, c)
        assert c["split_cols"] % c["BLOCK_V"] == 0
        assert (c["splits"] - 1) * c["split_cols"] < 128256 <= c["splits"] * c["split_cols"]
    assert cfg(50257, torch.float32, None, 4096, aligned=False)["VEC"] == 1
    assert cfg(50257, torch.float32, None, 4096)["VEC"] == 4
    assert cfg(1000, torch.float64, None, 1)["VEC"] == 2
    assert not tmkl_ops.rows_aligned(torch.empty(4, 50257)) and tmkl_ops.rows_aligned(torch.empty(4, 64))


# ------------------------------------------------------------------------------------------------
# GPU: every backend on the device at LLM vocabularies, at its own launch settings
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("v", [4099, 128256, 256000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_gpu_dtypes_and_vocab_sizes(backend, monkeypatch, dtype, v, direction):
    if backend == "triton":
        monkeypatch.undo()  # the real block size
    z, b, y = tmkl_inputs(4, v, dtype, scale=3.0)
    check_tmkl(z, b, y, backend, direction=direction, temperature=2.0 if v == 4099 else 1.0)


# ------------------------------------------------------------------------------------------------
# CUDA kernel specifics (host emulation, any machine with the extension built)
# ------------------------------------------------------------------------------------------------
needs_ext = pytest.mark.skipif(not _cuda.available(),
                               reason=f"forgetkern._C is not available: {_cuda.load_error()}")


def _emulated_run(z, b, y, params, coef_ce, coef_kl, threads):
    emu = _cuda_emulated.emulated("tmkl", threads=threads)
    loss, ce, kl, stats = emu.forward(z, b, y, params)
    grad = emu.backward(z, b, y, stats, coef_ce.to(stats.dtype), coef_kl.to(stats.dtype), params,
                        torch.full_like(z, float("nan"), memory_format=torch.contiguous_format))
    return (loss, ce, kl), grad


@needs_ext
@pytest.mark.parametrize("threads", [32, 64, 512])
def test_cuda_kernels_at_explicit_thread_counts(threads):
    """The block reduction at every block size the launcher can pick, on vocabularies shorter
    than a warp, around the vector width, and longer than the block."""
    params = TMKLParams(temperature=0.8)
    for v in (1, 2, 7, 8, 9, 64, 511, 4099):
        z, b, y = tmkl_inputs(3, v, scale=3.0, ignore=(), offsets=(2, 2), device="cpu")
        _edge_labels(y, v)
        a, c = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        outs, grad = _emulated_run(z, b, y, params, a, c, threads)
        zz = z.double().requires_grad_()
        o = oracle_tmkl(zz, b, y, temperature=0.8)
        torch.autograd.backward([o[1], o[2]], [a, c])  # the backward takes d/dce and d/dkl directly
        for name, got, want in zip(("loss", "ce", "kl"), outs, o):
            assert_close_to_ref(got, want.detach(), torch.float32, what=f"v={v} {name}")
        assert_close_to_ref(grad, zz.grad, torch.float32, what=f"v={v} grad")


@needs_ext
def test_cuda_kernels_unchecked_labels_give_nan():
    """A label outside [0, V) (the public function rejects it; the kernel's own guard) gives NaN,
    never an out-of-bounds read."""
    z, b, _ = tmkl_inputs(4, 97, ignore=(), device="cpu")
    y = torch.tensor([3, 97, -5, 20])
    outs, grad = _emulated_run(z, b, y, TMKLParams(), torch.ones(4), torch.ones(4), 0)
    assert outs[0][1].isnan() and outs[0][2].isnan() and grad[1].isnan().all()
    assert torch.isfinite(outs[0][[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()


def test_every_backend_of_the_table_is_tested():
    assert [p.values[0] for p in backends("tmkl")] == list(_backend.OP_BACKENDS["tmkl"])
    assert backend_skip_reason("tmkl", "reference") is None
