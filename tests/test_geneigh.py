"""Batched generalized symmetric eigensolver: reference and Triton (interpreted on the CPU)
against ``scipy.linalg.eigh(a, b)``. Checks are sign- and basis-independent: eigenvalues,
the residual ``A V - B V diag(w)`` and ``Vᵀ B V = I``."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import scipy.linalg
import torch

import forgetkern
from forgetkern import _backend

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not (_backend.triton_installed() and (torch.cuda.is_available() or _backend.triton_interpret())),
    reason="Triton needs a GPU or TRITON_INTERPRET=1"))]


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _spd(batch, n, gen, cond=None, dtype=torch.float64):
    """Random SPD ``(batch, n, n)``; with ``cond`` eigenvalues log-spaced from 1 to 1/cond."""
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64))
    if cond is None:
        ev = torch.rand(batch, n, generator=gen, dtype=torch.float64) * 2 + 0.1
    else:
        ev = torch.logspace(0, -np.log10(cond), n, dtype=torch.float64).expand(batch, n)
    return ((q * ev[:, None, :]) @ q.mT).to(dtype)


def _sym(batch, n, gen, dtype=torch.float64):
    x = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    return (x + x.mT).to(dtype)


def _check(A, B, eps, w, V, tol):
    """Eigenvalues vs scipy, residual, B-orthonormality (all relative, fp64)."""
    A64, B64 = A.double().cpu(), B.double().cpu()
    n = A.shape[-1]
    Bd = B64 + eps * torch.eye(n, dtype=torch.float64)
    w64, V64 = w.double().cpu(), V.double().cpu()
    assert w.shape == A.shape[:-1] and V.shape == A.shape
    assert bool((w64[..., 1:] >= w64[..., :-1]).all()), "eigenvalues not ascending"
    flat_a, flat_b = A64.reshape(-1, n, n), Bd.reshape(-1, n, n)
    for i, (a, b) in enumerate(zip(flat_a, flat_b)):
        ref = scipy.linalg.eigh(a.numpy(), b.numpy(), eigvals_only=True)
        scale = max(np.abs(ref).max(), 1e-30)
        err = np.abs(w64.reshape(-1, n)[i].numpy() - ref).max() / scale
        assert err <= tol, f"eigenvalues of entry {i}: relative error {err:.2e} > {tol:.1e}"
    resid = A64 @ V64 - Bd @ V64 * w64[..., None, :]
    scale = torch.linalg.matrix_norm(A64, ord=2).clamp_min(1e-30) * V64.abs().amax((-2, -1)).clamp_min(1)
    assert float((resid.abs().amax((-2, -1)) / scale).max()) <= tol * 10
    gram = V64.mT @ Bd @ V64
    assert float((gram - torch.eye(n, dtype=torch.float64)).abs().max()) <= tol * 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_matches_scipy_fp64(backend, n):
    gen = torch.Generator().manual_seed(n)
    dev = _device(backend)
    A, B = _sym(3, n, gen).to(dev), _spd(3, n, gen).to(dev)
    w, V = forgetkern.generalized_eigh(A, B, eps=1e-3, backend=backend)
    assert w.dtype == torch.float64
    _check(A, B, 1e-3, w, V, tol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_batch_shape_and_noncontiguous(backend):
    gen = torch.Generator().manual_seed(1)
    n = 5
    dev = _device(backend)
    A = _sym(4, n, gen, torch.float32).to(dev).reshape(2, 2, n, n)
    B = _spd(4, n, gen, dtype=torch.float32).to(dev).reshape(2, 2, n, n)
    Bt = B.transpose(-1, -2)  # a non-contiguous view of the same (symmetric) matrices
    assert not Bt.is_contiguous()
    w, V = forgetkern.generalized_eigh(A, Bt, eps=0.0, backend=backend)
    assert w.shape == (2, 2, n) and w.dtype == torch.float32
    _check(A, B, 0.0, w, V, tol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ill_conditioned_b(backend):
    gen = torch.Generator().manual_seed(2)
    n = 6
    dev = _device(backend)
    A = _sym(2, n, gen).to(dev)
    B = _spd(2, n, gen, cond=1e8).to(dev)
    w, V = forgetkern.generalized_eigh(A, B, eps=0.0, backend=backend)
    # the problem's own conditioning: eigenvalues up to ~1e8, accuracy ~ cond * machine eps
    _check(A, B, 0.0, w, V, tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_eigenvalues(backend):
    gen = torch.Generator().manual_seed(3)
    n = 6
    dev = _device(backend)
    # A = B X diag(w) X^T B with X^T B X = I has generalized eigenvalues w (with repeats)
    B = _spd(1, n, gen)[0]
    L = torch.linalg.cholesky(B)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    X = torch.linalg.solve_triangular(L.mT, q, upper=True)  # X^T B X = I
    lam = torch.tensor([-1.0, 0.5, 0.5, 0.5, 2.0, 2.0], dtype=torch.float64)
    A = B @ X @ torch.diag(lam) @ X.mT @ B
    A = 0.5 * (A + A.mT)
    w, V = forgetkern.generalized_eigh(A[None].to(dev), B[None].to(dev), backend=backend)
    assert torch.allclose(w[0].cpu(), lam, atol=1e-10)
    _check(A[None], B[None], 0.0, w, V, tol=1e-10)
    # equal matrices: every eigenvalue is 1 and any B-orthonormal basis is valid
    w, V = forgetkern.generalized_eigh(B[None].to(dev), B[None].to(dev), backend=backend)
    assert torch.allclose(w.cpu(), torch.ones(1, n, dtype=torch.float64), atol=1e-12)
    _check(B[None], B[None], 0.0, w, V, tol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_positive_definite_is_an_error(backend):
    dev = _device(backend)
    A = torch.eye(3, dtype=torch.float64, device=dev).expand(2, 3, 3).contiguous()
    B = A.clone()
    B[1, 2, 2] = -1.0
    with pytest.raises(ValueError, match=r"not positive definite.*\[1\]"):
        forgetkern.generalized_eigh(A, B, backend=backend)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        forgetkern.generalized_eigh(A, A, eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match="eps must be finite"):
        forgetkern.generalized_eigh(A, A, eps=float("inf"), backend=backend)
    with pytest.raises(ValueError, match="same shape"):
        forgetkern.generalized_eigh(A, A[:, :2, :2], backend=backend)


@pytest.mark.skipif(not (_backend.triton_installed() and (torch.cuda.is_available() or _backend.triton_interpret())),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
@settings(max_examples=8)
@given(n=st.integers(1, 12), batch=st.integers(1, 3), eps=st.sampled_from([0.0, 1e-3, 1.0]),
       log_cond=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_triton_fuzz_against_scipy(n, batch, eps, log_cond, seed):
    gen = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    A, B = _sym(batch, n, gen), _spd(batch, n, gen, cond=10.0**log_cond)
    w, V = forgetkern.generalized_eigh(A.to(dev), B.to(dev), eps=eps, backend="triton")
    _check(A, B, eps, w, V, tol=1e-9)


@pytest.mark.skipif(not (_backend.triton_installed() and (torch.cuda.is_available() or _backend.triton_interpret())),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("use_gather", [True, False])
def test_triton_rotation_paths(monkeypatch, use_gather):
    """Rotations by gathers (Triton >= 3.2) and by dense products (older Triton) agree with scipy."""
    from forgetkern.ops import geneigh

    if use_gather and not geneigh.USE_GATHER:
        pytest.skip("this Triton has no tl.gather")
    monkeypatch.setattr(geneigh, "USE_GATHER", use_gather)
    gen = torch.Generator().manual_seed(11)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    A, B = _sym(2, 7, gen), _spd(2, 7, gen, cond=1e3)
    w, V = geneigh.generalized_eigh(A.to(dev), B.to(dev), eps=1e-3)
    _check(A, B, 1e-3, w, V, tol=1e-10)


def test_triton_large_n_goes_to_reference():
    """n > 64 is served by the reference (batched), with the same contract."""
    from forgetkern.ops import geneigh

    gen = torch.Generator().manual_seed(4)
    n = geneigh.MAX_N + 1
    A, B = _sym(2, n, gen), _spd(2, n, gen)
    w, V, sweeps = geneigh.generalized_eigh(A, B, eps=1e-3, return_sweeps=True)
    assert sweeps is None
    wr, _ = forgetkern.generalized_eigh(A, B, eps=1e-3, backend="reference")
    assert torch.equal(w, wr)


@pytest.mark.skipif(not (_backend.triton_installed() and (torch.cuda.is_available() or _backend.triton_interpret())),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_jacobi_converges_in_few_sweeps():
    from forgetkern.ops import geneigh

    gen = torch.Generator().manual_seed(5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    A, B = _sym(2, 8, gen).to(dev), _spd(2, 8, gen).to(dev)
    _, _, sweeps = geneigh.generalized_eigh(A, B, return_sweeps=True)
    assert 1 <= int(sweeps.max()) < geneigh.MAX_SWEEPS


@pytest.mark.skipif(not (_backend.triton_installed() and (torch.cuda.is_available() or _backend.triton_interpret())),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_triton_odd_n_padded_tile(dtype, tol):
    """n = 17: an odd size in a 32-wide tile (15 padded indices), B with condition number 1e4."""
    gen = torch.Generator().manual_seed(17)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 17
    A, B = _sym(2, n, gen, dtype).to(dev), _spd(2, n, gen, cond=1e4, dtype=dtype).to(dev)
    w, V = forgetkern.generalized_eigh(A, B, eps=1e-3, backend="triton")
    assert w.dtype == dtype
    _check(A, B, 1e-3, w, V, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [16, 33, 64])
def test_triton_gpu_sizes(n):
    gen = torch.Generator().manual_seed(n)
    A, B = _sym(16, n, gen, torch.float32).cuda(), _spd(16, n, gen, dtype=torch.float32).cuda()
    w, V = forgetkern.generalized_eigh(A, B, eps=1e-3, backend="triton")
    _check(A, B, 1e-3, w, V, tol=1e-4)


def test_registered_backends_and_automatic_choice(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.OP_BACKENDS["generalized_eigh"] == ("reference", "triton", "cuda")
    assert _backend.OP_BACKENDS["folora_step"] == ("reference", "triton")
    x = torch.eye(3)
    runnable = _backend.triton_installed() and _backend.triton_interpret()
    assert _backend.resolve("generalized_eigh", x) == ("triton" if runnable else "reference")
    assert _backend.resolve("generalized_eigh", x, backend="reference") == "reference"
