"""The ``folora_step`` op (FoLoRA's element-wise gated Adam step) across backends.

Every backend implements one interface, ``step(g, m, v, s, table, active, scalars, gates)``
(:func:`forgetkern.reference.folora_step`), with one scalar layout (``_params.FOLORA_SCALARS``).
Each is compared with an fp64 AdamW oracle written here; the reference is also held bit for bit to
``torch.optim.AdamW`` and to its own segment-by-segment form.
"""
import math

import pytest
import torch

from forgetkern import _backend, reference
from forgetkern._params import FOLORA_SCALARS, NUM_FOLORA_SCALARS, SegmentTable
from forgetkern.optim._flat import scalar_row

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backend_param(name):
    reason = _backend.why_unavailable(name, "folora_step", torch.device(DEVICE))
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


#: The shared parametrization: every backend of the op (those that cannot run here skip).
BACKENDS = [_backend_param(name) for name in _backend.OP_BACKENDS["folora_step"]]


# ---- inputs -----------------------------------------------------------------------------------
def segment_table(shapes, gated, device=DEVICE):
    """A SegmentTable of consecutive segments shaped ``shapes``; ``gated[i]``: segment ``i`` has
    its own gates (one per column). Returns ``(table, total elements, total gates)``."""
    start, numel, cols, gate_off, off, goff = [], [], [], [], 0, 0
    for shp, gd in zip(shapes, gated):
        start.append(off)
        numel.append(math.prod(shp))
        cols.append(shp[-1])
        gate_off.append(goff if gd else -1)
        goff += shp[-1] if gd else 0
        off += math.prod(shp)
    return SegmentTable(start, numel, cols, gate_off, torch.device(device)), off, goff


#: Segments spanning several 16-element blocks and ending mid-block, gate columns that do not
#: divide a block, a one-element segment; per segment (lr, beta1, beta2, eps, step).
SHAPES = [(7, 5), (3, 11), (13,), (4, 3), (1, 1)]
GATED = [True, False, False, True, True]
HYPER = [(1e-2, 0.9, 0.999, 1e-8, 3), (3e-3, 0.8, 0.99, 1e-6, 1), (1e-2, 0.9, 0.999, 1e-8, 5),
         (5e-2, 0.95, 0.9, 1e-8, 2), (1e-1, 0.5, 0.9, 1e-3, 10)]
ACTIVE = (0, 1, 3, 4)  # segment 2 has no gradient this step


def make_inputs(seed=7):
    gen = torch.Generator().manual_seed(seed)
    table, off, goff = segment_table(SHAPES, GATED)
    gates = torch.rand(goff, generator=gen)
    g = torch.randn(off, generator=gen)
    m = torch.randn(off, generator=gen) * 0.1
    v = torch.rand(off, generator=gen) * 0.01
    scalars = torch.tensor([scalar_row(step, lr, b1, b2, eps) for lr, b1, b2, eps, step in HYPER])
    return table, g, m, v, scalars, gates


def oracle(g, m, v, table, active, gates):
    """``(m, v, s)`` in float64 after one gated AdamW step of the ``active`` segments (the
    segments' hyperparameters from :data:`HYPER`); ``s`` is NaN where not written."""
    m, v = m.double().clone(), v.double().clone()
    s = torch.full_like(m, float("nan"))
    for i in active:
        lr, b1, b2, eps, step = HYPER[i]
        sl = slice(table.start[i], table.start[i] + table.numel[i])
        gi = g[sl].double()
        m[sl] = b1 * m[sl] + (1 - b1) * gi
        v[sl] = b2 * v[sl] + (1 - b2) * gi * gi
        u = -(lr / (1 - b1**step)) * m[sl] / (v[sl].sqrt() / math.sqrt(1 - b2**step) + eps)
        if table.gate[i] >= 0:
            c = table.cols[i]
            u = (u.view(-1, c) * gates[table.gate[i]: table.gate[i] + c].double()).view(-1)
        s[sl] = u
    return m, v, s


def run(backend, table, g, m, v, scalars, gates, active=ACTIVE, fill=123.0):
    """The op on ``backend``; returns ``(m, v, s)`` on the CPU (inputs untouched)."""
    impl = _backend.resolve("folora_step", g.to(DEVICE), backend=backend)
    assert impl.backend == backend
    m, v = m.clone().to(DEVICE), v.clone().to(DEVICE)
    s = torch.full(m.shape, fill, device=DEVICE)
    impl.step(g.to(DEVICE), m, v, s, table, active, scalars,
              None if gates is None else gates.to(DEVICE))
    return m.cpu(), v.cpu(), s.cpu()


# ---- the scalar layout ------------------------------------------------------------------------
def test_scalar_layout_is_adamws_bias_corrections():
    assert FOLORA_SCALARS == ("neg_step_size", "bc2_sqrt", "eps", "beta2", "w1", "w2")
    assert NUM_FOLORA_SCALARS == len(FOLORA_SCALARS)
    lr, b1, b2, eps, step = 3e-3, 0.8, 0.99, 1e-6, 4
    row = dict(zip(FOLORA_SCALARS, scalar_row(step, lr, b1, b2, eps)))
    assert row == {"neg_step_size": -(lr / (1 - b1**step)), "bc2_sqrt": (1 - b2**step) ** 0.5,
                   "eps": eps, "beta2": b2, "w1": 1 - b1, "w2": 1 - b2}


# ---- every backend against the fp64 oracle ----------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("small_blocks", [False, True])
def test_step_matches_fp64_oracle(backend, small_blocks, monkeypatch):
    if small_blocks:  # Triton: 16-element programs, so segments span blocks and end mid-block
        if backend != "triton":
            pytest.skip("block size is a Triton launch setting")
        import forgetkern.ops.folora_step as kernel

        monkeypatch.setattr(kernel, "launch_config",
                            lambda total: {"BLOCK": 16, "VEC": 4, "num_warps": 4})
    table, g, m, v, scalars, gates = make_inputs()
    m_k, v_k, s_k = run(backend, table, g, m, v, scalars, gates)
    m_o, v_o, s_o = oracle(g, m, v, table, ACTIVE, gates)
    written = ~torch.isnan(s_o)
    # float32 arithmetic vs fp64: a few ulps of each quantity
    torch.testing.assert_close(m_k.double(), m_o, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(v_k.double(), v_o, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(s_k.double()[written], s_o[written], rtol=1e-5, atol=1e-8)
    # the inactive segment is left untouched, moments and step
    seg2 = slice(table.start[2], table.start[2] + table.numel[2])
    assert torch.equal(m_k[seg2], m[seg2]) and torch.equal(v_k[seg2], v[seg2])
    assert bool((s_k[seg2] == 123.0).all()) and bool((s_k[written] != 123.0).all())


def test_triton_windows_cover_misaligned_segments(monkeypatch):
    """Triton reads each segment in windows on 16-byte boundaries (``VEC`` = 4 floats): segments
    starting anywhere, whose last window leaves a few elements past it (a 16-element segment at
    offset 1), interior windows read unmasked, gated and ungated, all against the fp64 oracle."""
    reason = _backend.why_unavailable("triton", "folora_step", torch.device(DEVICE))
    if reason is not None:
        pytest.skip(str(reason))
    import forgetkern.ops.folora_step as kernel

    monkeypatch.setattr(kernel, "launch_config", lambda total: {"BLOCK": 16, "VEC": 4, "num_warps": 4})
    # starts 0, 1, 17, 52, 55: a 16-element segment whose window [0, 16) leaves element 16 over,
    # a 35-element one spanning windows [16, 32) (inside: unmasked), [32, 48), [48, 64)
    gen = torch.Generator().manual_seed(5)
    table, off, goff = segment_table([(1,), (2, 8), (5, 7), (3,), (4, 4)],
                                     [False, True, False, True, False])
    gates = torch.rand(goff, generator=gen)
    g, m = torch.randn(off, generator=gen), torch.randn(off, generator=gen) * 0.1
    v = torch.rand(off, generator=gen) * 0.01
    scalars = torch.tensor([scalar_row(step, lr, b1, b2, eps) for lr, b1, b2, eps, step in HYPER])
    active = (0, 1, 2, 3, 4)
    m_k, v_k, s_k = run("triton", table, g, m, v, scalars, gates, active=active)
    m_o, v_o, s_o = oracle(g, m, v, table, active, gates)
    assert not torch.isnan(s_o).any()  # every element written
    torch.testing.assert_close(m_k.double(), m_o, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(v_k.double(), v_o, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(s_k.double(), s_o, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_apply_per_column_of_gated_segments_only(backend):
    table, g, m, v, scalars, gates = make_inputs(seed=3)
    _, _, gated = run(backend, table, g, m, v, scalars, gates)
    _, _, open_ = run(backend, table, g, m, v, scalars, None)
    for i in ACTIVE:
        sl = slice(table.start[i], table.start[i] + table.numel[i])
        if table.gate[i] < 0:
            assert torch.equal(gated[sl], open_[sl])
        else:
            c = table.cols[i]
            expect = open_[sl].view(-1, c) * gates[table.gate[i]: table.gate[i] + c]
            torch.testing.assert_close(gated[sl].view(-1, c), expect, rtol=1e-6, atol=0)
            assert not torch.equal(gated[sl], open_[sl])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_active_segment_is_a_no_op(backend):
    table, g, m, v, scalars, gates = make_inputs()
    m_k, v_k, s_k = run(backend, table, g, m, v, scalars, gates, active=())
    assert torch.equal(m_k, m) and torch.equal(v_k, v) and bool((s_k == 123.0).all())


# ---- the reference: bit for bit -------------------------------------------------------------
def test_reference_segment_step_is_adamw_bit_for_bit():
    """One segment with no gate: the moments and the step of ``torch.optim.AdamW`` exactly."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 7, generator=gen)
    lr, betas, eps = 1e-2, (0.8, 0.99), 1e-8
    p = p0.clone().requires_grad_()
    opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=False)
    m, v = torch.zeros_like(p0), torch.zeros_like(p0)
    mine = p0.clone()
    for step in range(1, 5):
        grad = torch.randn(p0.shape, generator=gen)
        p.grad = grad.clone()
        opt.step()
        row = dict(zip(FOLORA_SCALARS, torch.tensor(scalar_row(step, lr, *betas, eps)).tolist()))
        mine += reference.folora_adam(grad, m, v, **row)
        assert torch.equal(m, opt.state[p]["exp_avg"]) and torch.equal(v, opt.state[p]["exp_avg_sq"])
        assert torch.equal(mine, p.detach())


def test_reference_runs_equal_segment_by_segment():
    """The reference updates adjacent segments with equal scalars as one run of the flat buffers
    (gates expanded per element): bit for bit the per-segment :func:`folora_adam`, with runs
    broken by a missing gradient and by different scalars."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(4, 6), (6, 4), (5,), (3, 6), (2, 2), (6, 4), (7, 3)]
    table, off, goff = segment_table(shapes, [True, False, False, True, True, True, False], "cpu")
    gates = torch.rand(goff, generator=gen)
    g, m, v = torch.randn(off, generator=gen), torch.randn(off, generator=gen), torch.rand(off, generator=gen)
    one, other = scalar_row(3, 1e-2, 0.9, 0.999, 1e-8), scalar_row(3, 5e-3, 0.9, 0.999, 1e-8)
    scalars = torch.tensor([one, one, one, one, other, one, one])
    active = [0, 1, 3, 4, 5, 6]  # segment 2 inactive: runs [0, 1], [3], [4], [5, 6]
    rows = scalars.tolist()
    from forgetkern.reference.folora_step import _folora_runs

    assert _folora_runs(table, active, rows) == [[0, 1], [3], [4], [5, 6]]
    m1, v1, s1 = m.clone(), v.clone(), torch.full((off,), 7.0)
    reference.folora_step(g, m1, v1, s1, table, active, scalars, gates)
    m2, v2, s2 = m.clone(), v.clone(), torch.full((off,), 7.0)
    for i in active:
        a, n, c, o = table.start[i], table.numel[i], table.cols[i], table.gate[i]
        gate = gates[o: o + c] if o >= 0 else None
        s2[a: a + n] = reference.folora_adam(g[a: a + n].view(-1, c), m2[a: a + n].view(-1, c),
                                             v2[a: a + n].view(-1, c), gate=gate,
                                             **dict(zip(FOLORA_SCALARS, rows[i]))).view(-1)
    assert torch.equal(m1, m2) and torch.equal(v1, v2) and torch.equal(s1, s2)
    assert bool((s1[table.start[2]: table.start[2] + table.numel[2]] == 7.0).all())


# ---- backends against each other --------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_kernel_matches_reference(backend):
    table, g, m, v, scalars, gates = make_inputs(seed=5)
    ref = run("reference", table, g, m, v, scalars, gates)
    got = run(backend, table, g, m, v, scalars, gates)
    for name, a, b, atol in zip("mvs", got, ref, (1e-7, 1e-9, 1e-8)):
        torch.testing.assert_close(a, b, rtol=1e-6 if name != "s" else 1e-5, atol=atol, msg=name)
