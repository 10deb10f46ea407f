"""CPU micro-benchmarks of the reference paths (pytest-benchmark).

These time forgetkern's CPU production path; they say nothing about GPU kernels.

    python -m pytest benchmarks/cpu_micro.py --benchmark-only [-k tmkl]
"""
import pytest
import torch

import forgetkern
from forgetkern.optim import FoLoRA

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="module")
def tmkl_inputs():
    gen = torch.Generator().manual_seed(0)
    n, v = 256, 32000
    z = (torch.randn(n, v, generator=gen) * 3).requires_grad_()
    b = torch.randn(n, v, generator=gen) * 3
    y = torch.randint(0, v, (n,), generator=gen)
    return z, b, y


def test_tmkl_reference_forward(benchmark, tmkl_inputs):
    z, b, y = tmkl_inputs
    benchmark.extra_info.update(op="tmkl", shape="N=256 V=32000", dtype="float32", mode="forward")
    with torch.no_grad():
        benchmark(forgetkern.tmkl_loss, z, b, y, backend="reference")


def test_tmkl_reference_forward_backward(benchmark, tmkl_inputs):
    z, b, y = tmkl_inputs
    benchmark.extra_info.update(op="tmkl", shape="N=256 V=32000", dtype="float32", mode="full")

    def step():
        z.grad = None
        forgetkern.tmkl_loss(z, b, y, backend="reference").backward()

    benchmark(step)


@pytest.mark.parametrize("n", [16, 32, 64])
def test_generalized_eigh_reference(benchmark, n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(224, n, n, generator=gen)
    a = a + a.mT
    m = torch.randn(224, n, n, generator=gen)
    bm = m @ m.mT / n + torch.eye(n)
    benchmark.extra_info.update(op="generalized_eigh", shape=f"batch=224 n={n}", dtype="float32")
    benchmark(forgetkern.generalized_eigh, a, bm, eps=1e-6, backend="reference")


def _folora(d: int, r: int, layers: int, basis):
    """A reference-path FoLoRA over ``layers`` random LoRA pairs with gradients and statistics."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4 * d, d, generator=gen)
    proxy, task = x.T @ x / (4 * d), torch.eye(d)
    params = []
    for _ in range(layers):
        a = torch.randn(r, d, generator=gen).requires_grad_()
        b = torch.randn(d, r, generator=gen).requires_grad_()
        a.grad, b.grad = torch.randn(r, d, generator=gen), torch.randn(d, r, generator=gen)
        params += [a, b]
    opt = FoLoRA(params, basis=basis, backend="reference", eigh_backend="reference")
    for a, b in zip(params[::2], params[1::2]):
        opt.set_statistics(a, proxy, task)
        opt.pair(b, a)
    return opt


@pytest.mark.parametrize("basis", ["dense", 32])
def test_folora_step_reference(benchmark, basis):
    """One FoLoRA step (reference element-wise path) for 8 LoRA layers, r=16, d_in=256."""
    d, r, layers = 256, 16, 8
    opt = _folora(d, r, layers, basis)
    benchmark.extra_info.update(op="folora_step", shape=f"layers={layers} r={r} d_in={d}",
                                dtype="float32", basis=str(basis))
    benchmark(opt.step)


@pytest.mark.parametrize("basis", ["dense", 16])
def test_folora_step_many_layers(benchmark, basis):
    """One FoLoRA step for 224 small LoRA pairs (a 7B model's count of adapted modules, r=8,
    d_in=64): the per-parameter overhead that the batched rotations and element-wise runs remove."""
    d, r, layers = 64, 8, 224
    opt = _folora(d, r, layers, basis)
    opt.step()  # builds the flat buffers and the first bases
    benchmark.extra_info.update(op="folora_step", shape=f"layers={layers} r={r} d_in={d}",
                                dtype="float32", basis=str(basis))
    benchmark(opt.step)


@pytest.fixture(scope="module")
def linear_tmkl_inputs():
    gen = torch.Generator().manual_seed(1)
    n, d, v = 256, 256, 32000
    h = torch.randn(n, d, generator=gen).requires_grad_()
    hb = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) / d**0.5
    y = torch.randint(0, v, (n,), generator=gen)
    return h, w, hb, y


def test_linear_tmkl_reference_forward(benchmark, linear_tmkl_inputs):
    h, w, hb, y = linear_tmkl_inputs
    benchmark.extra_info.update(op="linear_tmkl", shape="N=256 D=256 V=32000", dtype="float32",
                                mode="forward")
    with torch.no_grad():
        benchmark(forgetkern.linear_tmkl_loss, h, w, hb, y, backend="reference")


def test_linear_tmkl_reference_forward_backward(benchmark, linear_tmkl_inputs):
    h, w, hb, y = linear_tmkl_inputs
    benchmark.extra_info.update(op="linear_tmkl", shape="N=256 D=256 V=32000", dtype="float32",
                                mode="full")

    def step():
        h.grad = None
        forgetkern.linear_tmkl_loss(h, w, hb, y, backend="reference").backward()

    benchmark(step)
