"""The batched generalized symmetric eigensolver ``generalized_eigh`` on every backend.

Backends: the reference (Cholesky + ``torch.linalg.eigh``), Triton (in the CPU interpreter without
a GPU), the CUDA kernel's own code run thread by thread on the CPU (``cuda-host``:
``forgetkern._cuda_emulated.emulated``), and the CUDA kernel on a GPU (``cuda``, ``gpu`` marker). Every
backend implements ``solve(A, B, eps) -> (w, V, status)``; the public function turns ``status``
into errors and warnings (``_validate.check_eigh_status``), the one failure contract tested here
on every backend.

Solutions are judged sign- and basis-independently: eigenvalues against LAPACK
(``scipy.linalg.eigh(a, b)``), the residual ``A V - B V diag(w)`` and ``Vᵀ B V = I``.
"""
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import forgetkern
from forgetkern import _backend, _cuda, _cuda_emulated, _params, _validate, reference

EXT = _cuda.extension()
TRITON_RUNS = _backend.triton_installed() and (torch.cuda.is_available() or _params.triton_interpret())
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs a GPU or TRITON_INTERPRET=1")
needs_ext = pytest.mark.skipif(EXT is None, reason=f"forgetkern._C not available: {_cuda.load_error()}")

BACKENDS = [
    "reference",
    pytest.param("triton", marks=needs_triton),
    pytest.param("cuda-host", marks=needs_ext),
    pytest.param("cuda", marks=[pytest.mark.gpu, needs_ext]),
]
KERNELS = BACKENDS[1:]  # the on-chip solvers (sweep limit, n <= EIGH_MAX_N)


def _device(backend):
    on_gpu = backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
    return "cuda" if on_gpu else "cpu"


def _implementation(backend, *, max_sweeps=0):
    """The backend's ``solve(A, B, eps) -> (w, V, status)``."""
    if backend == "cuda-host":
        return _cuda_emulated.emulated("generalized_eigh", max_sweeps=max_sweeps).solve
    return _backend.implementation("generalized_eigh", backend).solve


def _solve(backend, A, B, eps=0.0):
    """``(w, V)`` as ``forgetkern.generalized_eigh`` returns them, on ``backend``'s device."""
    dev = _device(backend)
    A, B = A.to(dev), B.to(dev)
    if backend == "cuda-host":  # not a backend of the table: what the public function does
        A, B, eps = _validate.generalized_eigh_inputs(A, B, eps)
        w, V, status = _implementation(backend)(A, B, eps)
        _validate.check_eigh_status(status, eps)
        return w, V
    return forgetkern.generalized_eigh(A, B, eps=eps, backend=backend)


# --------------------------------------------------------------------------------------------
# Problems and the judge
# --------------------------------------------------------------------------------------------
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


def _problem(batch, n, dtype, *, cond_b=10.0, repeated=False, seed=0):
    """``A`` shaped like a covariance minus a shift, ``B`` SPD with condition ``cond_b``; with
    ``repeated`` the generalized eigenvalues are ``i // 3`` (each three times)."""
    gen = torch.Generator().manual_seed(seed + n)
    B = _spd(batch, n, gen, cond=cond_b)
    if repeated:
        # A = B V0 diag(lam) V0^T B with V0^T B V0 = I: generalized eigenvalues lam, with repeats
        lam = torch.tensor([float(i // 3) for i in range(n)], dtype=torch.float64)
        L = torch.linalg.cholesky(B)
        u, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64, generator=gen))
        v0 = torch.linalg.solve_triangular(L.mT, u, upper=True)
        A = B @ v0 @ torch.diag_embed(lam.expand(batch, n)) @ v0.mT @ B
        A = 0.5 * (A + A.mT)
    else:
        x = torch.randn(batch, n, 2 * n, dtype=torch.float64, generator=gen)
        A = x @ x.mT / (2 * n) - 0.3 * torch.eye(n, dtype=torch.float64)
    return A.to(dtype), B.to(dtype)


def _measures(A64, Bd, w, V, w_ref):
    """(eigenvalue error, scaled residual, ``max|VᵀBV - I|``) of one solution, in fp64."""
    n = A64.shape[-1]
    scale = w_ref.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    ew = ((w - w_ref).abs() / scale).max().item()
    res = A64 @ V - Bd @ V @ torch.diag_embed(w)
    rr = (torch.linalg.matrix_norm(res) /
          (torch.linalg.matrix_norm(A64) + torch.linalg.matrix_norm(Bd) * w.abs().amax(-1))
          / torch.linalg.matrix_norm(V)).max().item()
    orth = (V.mT @ Bd @ V - torch.eye(n, dtype=torch.float64)).abs().max().item()
    return ew, rr, orth


def _check(A, B, eps, w, V, *, factor=10.0, tol=None):
    """Judge ``(w, V)`` by its eigenvalues, residual and B-orthonormality (never raw vectors).

    The limit of each measure is ``100 n`` machine epsilons of ``A``'s dtype, or ``factor`` times
    the same measure of LAPACK (fp64, how far two good solvers differ on this problem) and of the
    reference in ``A``'s dtype, whichever is larger; ``tol`` replaces the dtype's floor.
    """
    n = A.shape[-1]
    A64 = A.detach().double().cpu().reshape(-1, n, n)
    B64 = B.detach().double().cpu().reshape(-1, n, n)
    Bd = B64 + eps * torch.eye(n, dtype=torch.float64)
    assert w.shape == A.shape[:-1] and V.shape == A.shape, (w.shape, V.shape, A.shape)
    w64, V64 = w.double().cpu().reshape(-1, n), V.double().cpu().reshape(-1, n, n)
    ws, vs = zip(*(scipy.linalg.eigh(a.numpy(), bd.numpy()) for a, bd in zip(A64, Bd)))
    w_lapack, v_lapack = torch.tensor(np.stack(ws)), torch.tensor(np.stack(vs))
    floor = 100 * n * torch.finfo(A.dtype).eps if tol is None else tol
    limits = [floor] * 3
    w_same, v_same = reference.generalized_eigh(A.detach().cpu(), B.detach().cpu(), eps)[:2]
    for bw, bv in ((w_lapack, v_lapack), (w_same.reshape(-1, n), v_same.reshape(-1, n, n))):
        base = _measures(A64, Bd, bw.double(), bv.double(), w_lapack)
        limits = [max(lim, factor * x) for lim, x in zip(limits, base)]
    got = _measures(A64, Bd, w64, V64, w_lapack)
    assert bool((torch.diff(w64, dim=-1) >= 0).all()), "eigenvalues not ascending"
    for name, g, lim in zip(("eigenvalues", "residual", "V^T B V - I"), got, limits):
        assert g <= lim, f"{name}: error {g:.3e} exceeds {lim:.3e} (n={n}, {A.dtype})"


# --------------------------------------------------------------------------------------------
# Accuracy on every backend
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_matches_lapack_fp64(backend, n):
    gen = torch.Generator().manual_seed(n)
    A, B = _sym(3, n, gen), _spd(3, n, gen)
    w, V = _solve(backend, A, B, 1e-3)
    assert w.dtype == V.dtype == torch.float64
    _check(A, B, 1e-3, w, V, tol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 7, 16, 33, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sizes_and_dtypes(backend, n, dtype):
    A, B = _problem(2, n, dtype)
    w, V = _solve(backend, A, B, 1e-6)
    assert w.dtype == V.dtype == dtype and w.shape == (2, n) and V.shape == (2, n, n)
    _check(A, B, 1e-6, w, V)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_batch_shape_and_noncontiguous(backend):
    gen = torch.Generator().manual_seed(1)
    n = 5
    A = _sym(4, n, gen, torch.float32).reshape(2, 2, n, n)
    B = _spd(4, n, gen, dtype=torch.float32).reshape(2, 2, n, n)
    Bt = B.transpose(-1, -2)  # a non-contiguous view of the same (symmetric) matrices
    assert not Bt.is_contiguous()
    w, V = _solve(backend, A, Bt, 0.0)
    assert w.shape == (2, 2, n) and w.dtype == torch.float32
    _check(A, B, 0.0, w, V, tol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interface_returns_status_shaped_like_the_batch(backend):
    A, B = _problem(6, 4, torch.float64)
    dev = _device(backend)
    w, V, status = _implementation(backend)(A.view(2, 3, 4, 4).to(dev), B.view(2, 3, 4, 4).to(dev), 0.0)
    assert w.shape == (2, 3, 4) and V.shape == (2, 3, 4, 4)
    assert status.shape == (2, 3) and status.dtype == torch.int32
    assert bool((status.cpu() == _params.EIGH_OK).all())
    # a single matrix: a 0-d status
    w, V, status = _implementation(backend)(A[0].to(dev), B[0].to(dev), 0.0)
    assert w.shape == (4,) and status.shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ill_conditioned_b(backend):
    gen = torch.Generator().manual_seed(2)
    n = 6
    A, B = _sym(2, n, gen), _spd(2, n, gen, cond=1e8)
    w, V = _solve(backend, A, B, 0.0)
    # the problem's own conditioning: eigenvalues up to ~1e8, accuracy ~ cond * machine eps
    _check(A, B, 0.0, w, V, tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ill_conditioned_and_repeated(backend, dtype):
    for kw in (dict(cond_b=1e6), dict(repeated=True), dict(cond_b=1e6, repeated=True)):
        A, B = _problem(2, 24, dtype, **kw)
        w, V = _solve(backend, A, B, 0.0)
        _check(A, B, 0.0, w, V)
    # repeated eigenvalues come out repeated
    A, B = _problem(1, 12, torch.float64, repeated=True)
    w, _ = _solve(backend, A, B, 0.0)
    want = torch.tensor([float(i // 3) for i in range(12)], dtype=torch.float64)
    torch.testing.assert_close(w[0].cpu(), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_matrices(backend):
    gen = torch.Generator().manual_seed(3)
    B = _spd(1, 6, gen)
    # every eigenvalue is 1 and any B-orthonormal basis is valid
    w, V = _solve(backend, B, B, 0.0)
    torch.testing.assert_close(w.cpu(), torch.ones(1, 6, dtype=torch.float64), rtol=0, atol=1e-12)
    _check(B, B, 0.0, w, V, tol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_fp32_extreme_scales(backend, scale):
    """Entries near the ends of fp32's range: the convergence tests must not overflow (1e30
    squared is inf in fp32) or underflow (1e-30 squared is 0) and stop the sweeps early."""
    A, B = _problem(2, 12, torch.float64)
    A32 = (A * scale).float()
    w, V = _solve(backend, A32, B.float(), 0.0)
    assert torch.isfinite(w).all() and torch.isfinite(V).all()
    _check(A32, B.float(), 0.0, w, V)


# --------------------------------------------------------------------------------------------
# The one failure contract, on every backend
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_contract(backend):
    dev = _device(backend)
    A, B = _problem(4, 6, torch.float64)
    B[1] = -torch.eye(6, dtype=torch.float64)  # not positive definite: fails at column 0
    A[2, 0, 1] = A[2, 1, 0] = float("nan")  # non-finite input
    B[3, 2, 2] = float("inf")  # non-finite input in B (not "not positive definite")
    w, V, status = _implementation(backend)(A.to(dev), B.to(dev), 0.0)
    status = status.cpu()
    assert status[0] == _params.EIGH_OK and status[1] > 0
    assert status[2] == status[3] == _params.EIGH_NON_FINITE
    if backend != "reference":  # the kernels: the failing pivot + 1, NaN where a problem failed
        assert status[1] == 1
        assert w[1:].isnan().all() and V[1:].isnan().all()
        _check(A[:1], B[:1], 0.0, w[:1], V[:1])
    # what the public function raises: non-finite input first, naming the entries ...
    with pytest.raises(ValueError, match=r"non-finite values in A or B.*\[2, 3\]"):
        _solve(backend, A, B)
    # ... then B + eps I not positive definite
    with pytest.raises(ValueError, match=r"not positive definite \(eps=0.0\) for batch entries \[1\]"):
        _solve(backend, A[:2], B[:2])
    w, V = _solve(backend, A[:1], B[:1])  # no warning, no error
    _check(A[:1], B[:1], 0.0, w, V)


@pytest.mark.parametrize("backend", KERNELS)
def test_non_convergence_warns(backend, monkeypatch):
    """A problem that needs more sweeps than allowed gets EIGH_NO_CONVERGENCE and a warning; its
    last iterate is returned (finite, not NaN)."""
    A, B = _problem(2, 16, torch.float64)
    if backend == "cuda":
        pytest.skip("the device op has no sweep limit argument; the host emulation runs its code")
    if backend == "triton":
        from forgetkern.ops import generalized_eigh as eigh_ops

        monkeypatch.setattr(eigh_ops, "EIGH_MAX_SWEEPS", 1)
        solve = _implementation(backend)
    else:
        solve = _implementation(backend, max_sweeps=1)
    dev = _device(backend)
    w, V, status = solve(A.to(dev), B.to(dev), 0.0)
    assert status.tolist() == [_params.EIGH_NO_CONVERGENCE] * 2
    assert torch.isfinite(w).all() and torch.isfinite(V).all()
    with pytest.warns(RuntimeWarning, match=rf"did not converge in {_params.EIGH_MAX_SWEEPS} sweeps "
                                            r"for batch entries \[0, 1\]"):
        _validate.check_eigh_status(status, 0.0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton),
                                     pytest.param("cuda", marks=[pytest.mark.gpu, needs_ext])])
def test_invalid_inputs_rejected_by_the_public_function(backend):
    dev = _device(backend)
    A = torch.eye(3, dtype=torch.float64, device=dev).expand(2, 3, 3).contiguous()
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        forgetkern.generalized_eigh(A, A, eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match="eps must be finite"):
        forgetkern.generalized_eigh(A, A, eps=float("inf"), backend=backend)
    with pytest.raises(ValueError, match="same shape"):
        forgetkern.generalized_eigh(A, A[:, :2, :2], backend=backend)


# --------------------------------------------------------------------------------------------
# Kernel specifics: sweep limit, sizes above the limit, Triton paths, CUDA thread counts
# --------------------------------------------------------------------------------------------
def test_kernels_share_the_limits():
    from forgetkern.ops import generalized_eigh as eigh_ops

    assert eigh_ops.EIGH_MAX_N == _params.EIGH_MAX_N and eigh_ops.EIGH_MAX_SWEEPS == _params.EIGH_MAX_SWEEPS
    if EXT is not None:
        assert EXT.EIGH_MAX_N == _params.EIGH_MAX_N
        assert EXT.EIGH_MAX_SWEEPS == _params.EIGH_MAX_SWEEPS


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sizes_above_the_kernels_go_to_the_next_backend(backend):
    """Each kernel declares the sizes it serves (Triton n <= 32: it spills above; CUDA n <= 64); a
    problem its backend does not serve goes to the CUDA kernel where it runs, else the reference."""
    from forgetkern.ops.generalized_eigh import EIGH_TRITON_MAX_N

    A = torch.eye(_params.EIGH_MAX_N + 1, device="cuda" if torch.cuda.is_available() else "cpu")
    limit = EIGH_TRITON_MAX_N if backend == "triton" else _params.EIGH_MAX_N
    cuda_runs = _backend.why_unavailable("cuda", "generalized_eigh", A.device) is None
    above = "cuda" if cuda_runs and limit < _params.EIGH_MAX_N else "reference"
    for size, want in ((limit, backend), (limit + 1, above), (_params.EIGH_MAX_N + 1, "reference"),
                       (0, "reference")):
        try:
            got = _backend.resolve_name("generalized_eigh", A, backend=backend, size=size)
        except RuntimeError as exc:  # this backend cannot run here at all
            pytest.skip(str(exc))
        assert got == want, (size, got)
    reason = _backend.why_unavailable(backend, "generalized_eigh", A.device, size=limit + 1)
    assert reason is not None and f"1 <= n <= {limit}" in reason


@needs_triton
def test_triton_rejects_sizes_it_does_not_cover():
    from forgetkern.ops import generalized_eigh as eigh_ops

    A = torch.eye(eigh_ops.EIGH_MAX_N + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"1 <= n <= 64"):
        eigh_ops.generalized_eigh(A, A)


@needs_triton
@settings(max_examples=8)
@given(n=st.integers(1, 12), batch=st.integers(1, 3), eps=st.sampled_from([0.0, 1e-3, 1.0]),
       log_cond=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_triton_fuzz_against_lapack(n, batch, eps, log_cond, seed):
    gen = torch.Generator().manual_seed(seed)
    A, B = _sym(batch, n, gen), _spd(batch, n, gen, cond=10.0**log_cond)
    w, V = _solve("triton", A, B, eps)
    _check(A, B, eps, w, V, tol=1e-9)


@needs_ext
@settings(max_examples=8)
@given(n=st.integers(1, 12), batch=st.integers(1, 3), eps=st.sampled_from([0.0, 1e-3, 1.0]),
       log_cond=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_cuda_host_fuzz_against_lapack(n, batch, eps, log_cond, seed):
    gen = torch.Generator().manual_seed(seed)
    A, B = _sym(batch, n, gen), _spd(batch, n, gen, cond=10.0**log_cond)
    w, V = _solve("cuda-host", A, B, eps)
    _check(A, B, eps, w, V, tol=1e-9)


@needs_triton
@pytest.mark.parametrize("use_gather", [True, False])
def test_triton_rotation_paths(monkeypatch, use_gather):
    """Rotations by gathers (Triton >= 3.2) and by dense products (older Triton) agree with LAPACK."""
    from forgetkern.ops import generalized_eigh as eigh_ops

    if use_gather and not eigh_ops.USE_GATHER:
        pytest.skip("this Triton has no tl.gather")
    monkeypatch.setattr(eigh_ops, "USE_GATHER", use_gather)
    gen = torch.Generator().manual_seed(11)
    A, B = _sym(2, 7, gen), _spd(2, 7, gen, cond=1e3)
    w, V = _solve("triton", A, B, 1e-3)
    _check(A, B, 1e-3, w, V, tol=1e-10)


@needs_triton
def test_triton_jacobi_converges_in_few_sweeps():
    from forgetkern.ops import generalized_eigh as eigh_ops

    gen = torch.Generator().manual_seed(5)
    dev = _device("triton")
    A, B = _sym(2, 8, gen).to(dev), _spd(2, 8, gen).to(dev)
    _, _, status, sweeps = eigh_ops.generalized_eigh(A, B, return_sweeps=True)
    assert bool((status == 0).all())
    assert 1 <= int(sweeps.max()) < _params.EIGH_MAX_SWEEPS // 2


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_triton_odd_n_padded_tile(dtype, tol):
    """n = 17: an odd size in a 32-wide tile (15 padded indices), B with condition number 1e4."""
    gen = torch.Generator().manual_seed(17)
    n = 17
    A, B = _sym(2, n, gen, dtype), _spd(2, n, gen, cond=1e4, dtype=dtype)
    w, V = _solve("triton", A, B, 1e-3)
    assert w.dtype == dtype
    _check(A, B, 1e-3, w, V, tol=tol)


@needs_ext
@pytest.mark.parametrize("threads", [32, 96, 256])
def test_cuda_host_thread_counts(threads):
    A, B = _problem(2, 19, torch.float64)
    w, V, status = _cuda_emulated.emulated("generalized_eigh", threads=threads).solve(A, B, 1e-3)
    assert bool((status == 0).all())
    _check(A, B, 1e-3, w, V)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton),
                                     pytest.param("cuda", marks=needs_ext)])
@pytest.mark.parametrize("n", [16, 33, 64])
def test_gpu_large_batches(backend, n):
    A, B = _problem(64, n, torch.float32)
    w, V = _solve(backend, A, B, 1e-3)
    _check(A, B, 1e-3, w, V)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton),
                                     pytest.param("cuda", marks=needs_ext)])
def test_gpu_above_the_limit_is_the_reference(backend):
    A, B = _problem(2, _params.EIGH_MAX_N + 1, torch.float64)
    w, V = _solve(backend, A, B, 0.0)
    wr, _ = _solve("reference", A, B, 0.0)
    torch.testing.assert_close(w.cpu(), wr, rtol=1e-12, atol=1e-12)


def test_registered_backends_and_automatic_choice(monkeypatch):
    monkeypatch.delenv(_params.ENV_BACKEND, raising=False)
    assert _backend.OP_BACKENDS["generalized_eigh"] == ("reference", "triton", "cuda")
    x = torch.eye(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = "triton" if _backend.triton_installed() and _params.triton_interpret() else "reference"
        assert _backend.resolve_name("generalized_eigh", x, size=3) == expected
        assert _backend.resolve_name("generalized_eigh", x, backend="reference", size=3) == "reference"
