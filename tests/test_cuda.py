"""The CUDA extension forgetkern._C and its torch ops.

What is CUDA-specific: the extension is built and imports wherever nvcc is present, its launchers
reject bad arguments and CPU tensors before anything is launched, the fake (meta) implementations
give the right shapes, torch.compile traces the ops; with a GPU (``gpu`` marker) opcheck and compiled
training. The kernels' correctness is tested by op across backends, the CUDA kernels' own
per-thread code in host emulation without a GPU (``forgetkern._cuda_emulated``) and the device
kernels with one: tests/test_tmkl.py, tests/test_tmkl_contract.py, tests/test_fuzz.py and
tests/test_generalized_eigh.py.
"""
import itertools
import os
import shutil
import subprocess
import warnings

import pytest
import torch

import forgetkern
from forgetkern import _backend, _cuda, _cuda_emulated, _params
from forgetkern._params import TMKLParams

from .helpers import rel_err

EXT = _cuda.extension()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"forgetkern._C not available: {_cuda.load_error()}")
OPTIONS = list(itertools.product(["forward", "reverse"], [True, False], [1.0, 2.0]))
HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Build and loading
# --------------------------------------------------------------------------------------------
def test_extension_built_where_nvcc_is():
    """Where setup.py finds nvcc and the build is not skipped, the extension must be there (CI)."""
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    nvcc_in_home = any(h and os.path.isfile(os.path.join(h, "bin", "nvcc")) for h in homes)
    if shutil.which("nvcc") is None and not nvcc_in_home:
        pytest.skip("nvcc not found (the places setup.py looks): the CUDA extension is not built here")
    if os.environ.get("FORGETKERN_SKIP_CUDA_BUILD", "").strip().lower() not in ("", "0", "false", "no", "off"):
        pytest.skip("FORGETKERN_SKIP_CUDA_BUILD is set")
    info = forgetkern.info()
    assert info["cuda_extension_built"] is True, info["cuda_extension_error"]
    assert info["cuda_extension_error"] is None


def test_gpu_suite_script_parses():
    """benchmarks/gpu_suite.sh (run only on GPU machines) is at least valid bash."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_suite.sh")
    result = subprocess.run([bash, "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), "gpu_suite.sh must be executable"


@needs_ext
def test_extension_constants_match_python():
    assert EXT.EIGH_MAX_N == _params.EIGH_MAX_N
    assert EXT.EIGH_MAX_SWEEPS == _params.EIGH_MAX_SWEEPS
    assert EXT.NUM_STATS == _params.NUM_STATS
    assert EXT.DTYPE_CODES == {str(k).removeprefix("torch."): v for k, v in _cuda.DTYPE_CODES.items()}
    archs = EXT.CUDA_ARCHS.split(";")
    assert archs and all(a[:2].isdigit() for a in archs)
    assert EXT.cuda_runtime_version() >= 11000
    # launch settings: whole warps within the kernels' limits
    for v in (1, 37, 32000, 128256, 256000):
        for code in range(4):
            t = EXT.tmkl_threads(v, code)
            assert t % 32 == 0 and 64 <= t <= EXT.TMKL_MAX_THREADS
    for n in range(1, 65):
        t = EXT.generalized_eigh_threads(n)
        assert t % 32 == 0 and 32 <= t <= EXT.EIGH_MAX_THREADS
    assert EXT.generalized_eigh_shared_bytes(64, 3) < 160 * 1024  # fits sm_80's opt-in limit


def test_missing_extension_is_a_reason_not_an_import_error(monkeypatch):
    monkeypatch.setattr(_cuda, "_STATE", (None, "not built (test)"))
    assert not _cuda.available()
    assert forgetkern.info()["cuda_extension_built"] is False
    assert forgetkern.info()["cuda_extension_error"] == "not built (test)"
    reason = _backend.why_unavailable("cuda", "tmkl", torch.device("cuda"))
    assert "not built (test)" in reason
    z, y = torch.zeros(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="not built"):
        _cuda.tmkl_forward(z, z, y, TMKLParams())
    with pytest.raises(RuntimeError, match="not built"):
        _cuda.generalized_eigh(torch.eye(3), torch.eye(3))
    with pytest.raises(RuntimeError, match="not built"):
        _cuda_emulated.emulated("tmkl")


# --------------------------------------------------------------------------------------------
# CPU tensors and bad arguments are rejected before anything runs
# --------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for forgetkern._C and records every launch."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def launch(*args, **kwargs):
            self.calls.append(name)

        return launch


def test_cpu_tensors_raise_before_any_launch(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(_cuda, "_STATE", (rec, None))
    z = torch.randn(3, 10)
    y = torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        forgetkern.tmkl_loss(z, z, y, backend="cuda")
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        _cuda.tmkl_forward(z, z, y, TMKLParams())
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        torch.ops.forgetkern.tmkl_forward(z, z, y, -100, 1.0, 1.0, 1.0, True, True, False)
    stats = torch.zeros(3, _params.NUM_STATS)
    coef = torch.ones(3)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        torch.ops.forgetkern.tmkl_backward(z, z, y, stats, coef, coef, torch.empty_like(z), -100, 1.0, True, True,
                                           False)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        torch.ops.forgetkern.tmkl_backward_inplace(z.clone(), z, y, stats, coef, coef, -100, 1.0, True, True, False)
    a = torch.eye(4)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        forgetkern.generalized_eigh(a, a, backend="cuda")
    with pytest.raises(ValueError, match="A must be a CUDA tensor"):
        _cuda.generalized_eigh(a, a)
    with pytest.raises(ValueError, match="A must be a CUDA tensor"):
        torch.ops.forgetkern.generalized_eigh(a[None], a[None], 0.0)
    assert rec.calls == []


@needs_ext
def test_launchers_validate_arguments():
    kw = dict(z=0, stride_z=10, b=0, stride_b=10, y=0, loss=0, ce=0, kl=0, stats=0, n=2, v=10,
              ignore_index=-100, inv_t=1.0, ce_weight=1.0, kl_scale=1.0, forward_kl=True,
              mask_target=True, separate_ce=False, dtype=0)
    with pytest.raises(ValueError, match="tmkl_forward: z must be a non-null device pointer"):
        EXT.tmkl_forward(**kw)
    with pytest.raises(ValueError, match="dtype must be a dtype code"):
        EXT.tmkl_forward(**{**kw, "dtype": 7})
    with pytest.raises(ValueError, match="threads must be 0"):
        EXT.tmkl_forward(**{**kw, "threads": 48})
    with pytest.raises(ValueError, match="inv_t"):
        EXT.tmkl_forward(**{**kw, "inv_t": 0.0})
    with pytest.raises(ValueError, match="aligned"):
        EXT.tmkl_forward(**{**kw, "z": 4096 + 2, "b": 4096, "y": 4096})
    ekw = dict(a=4096, b=4096, w=4096, vecs=4096, info=4096, batch=1, n=65, eps=0.0, dtype=0)
    with pytest.raises(ValueError, match=r"n must be in \[1, 64\]"):
        EXT.generalized_eigh(**ekw)
    with pytest.raises(ValueError, match="float32 .0. or float64"):
        EXT.generalized_eigh(**{**ekw, "n": 8, "dtype": 2})
    with pytest.raises(ValueError, match="eps"):
        EXT.generalized_eigh(**{**ekw, "n": 8, "eps": -1.0})
    with pytest.raises(ValueError, match=r"max_sweeps must be in \[0, 40\]"):
        EXT.generalized_eigh(**{**ekw, "n": 8, "max_sweeps": 41})


@needs_ext
def test_host_emulation_reads_host_memory_only():
    z = torch.zeros(2, 5, device="meta")
    y = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="logits must be a CPU tensor"):
        _cuda_emulated.emulated("tmkl").forward(z, z, y, TMKLParams())
    with pytest.raises(ValueError, match="A must be a CPU tensor"):
        _cuda_emulated.emulated("generalized_eigh").solve(z[None, :2, :2], z[None, :2, :2])
    with pytest.raises(ValueError, match="op must be"):
        _cuda_emulated.emulated("linear_tmkl")


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path on a machine without a GPU")
def test_failed_launch_raises_naming_the_kernel():
    # valid-looking arguments pass the checks; the launch itself fails without a GPU or driver and
    # the error names the kernel (no memory is touched: nothing runs)
    p = 1 << 20
    with pytest.raises(RuntimeError, match="launching tmkl_fwd_kernel failed: cuda"):
        EXT.tmkl_forward(z=p, stride_z=10, b=p, stride_b=10, y=p, loss=p, ce=p, kl=p, stats=p, n=2, v=10,
                         ignore_index=-100, inv_t=1.0, ce_weight=1.0, kl_scale=1.0, forward_kl=True,
                         mask_target=True, separate_ce=False, dtype=0)
    with pytest.raises(RuntimeError, match="launching tmkl_bwd_kernel failed: cuda"):
        EXT.tmkl_backward(z=p, stride_z=10, b=p, stride_b=10, y=p, stats=p, coef_ce=p, coef_kl=p, g=p,
                          stride_g=10, n=2, v=10, ignore_index=-100, inv_t=1.0, forward_kl=True,
                          mask_target=True, separate_ce=False, dtype=0)
    with pytest.raises(RuntimeError, match="generalized_eigh_kernel failed: cuda"):
        EXT.generalized_eigh(a=p, b=p, w=p, vecs=p, info=p, batch=1, n=8, eps=0.0, dtype=0)


# --------------------------------------------------------------------------------------------
# Fake (meta) implementations: what torch.compile traces with
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fake_tmkl_ops_on_meta(dtype):
    z = torch.empty(5, 33, dtype=dtype, device="meta")
    y = torch.empty(5, dtype=torch.int64, device="meta")
    loss, ce, kl, stats = torch.ops.forgetkern.tmkl_forward(z, z, y, -100, 2.0, 1.0, 1.0, False, True, True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for t in (loss, ce, kl):
        assert t.shape == (5,) and t.dtype == acc and t.device.type == "meta"
    assert stats.shape == (5, _params.NUM_STATS) and stats.dtype == acc
    g = torch.empty_like(z)
    assert torch.ops.forgetkern.tmkl_backward(z, z, y, stats, loss, loss, g, -100, 2.0, False, True, True) is None
    assert torch.ops.forgetkern.tmkl_backward_inplace(z, z, y, stats, loss, loss, -100, 2.0, False, True,
                                                      True) is None
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):  # would fail when run
        torch.ops.forgetkern.tmkl_forward(torch.zeros(5, 33), z, y, -100, 2.0, 1.0, 1.0, False, True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_generalized_eigh_on_meta(dtype):
    a = torch.empty(7, 16, 16, dtype=dtype, device="meta")
    w, v, info = torch.ops.forgetkern.generalized_eigh(a, a, 1e-6)
    assert w.shape == (7, 16) and v.shape == (7, 16, 16) and info.shape == (7,)
    assert w.dtype == v.dtype == dtype and info.dtype == torch.int32
    # the public wrapper: any batch shape, status shaped like the batch
    a = torch.empty(2, 3, 16, 16, dtype=dtype, device="meta")
    w, v, status = _cuda.generalized_eigh(a, a, 1e-6)
    assert w.shape == (2, 3, 16) and v.shape == (2, 3, 16, 16) and status.shape == (2, 3)


def test_fake_tmkl_forward_under_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(4, 10, device="meta")
        y = torch.empty(4, dtype=torch.int64, device="meta")
        loss, _, _, stats = torch.ops.forgetkern.tmkl_forward(z, z, y, -100, 1.0, 1.0, 1.0, True, True, False)
        assert loss.shape == (4,) and stats.shape == (4, _params.NUM_STATS)


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_traces_the_cuda_ops_without_graph_breaks(monkeypatch, inplace):
    """torch.compile(fullgraph=True) of tmkl_loss(backend="cuda"), forward and backward, traced on
    meta tensors (the device checks are lifted for "meta"; the fake implementations run)."""
    from torch._dynamo.backends.common import aot_autograd

    orig = _backend.why_unavailable
    monkeypatch.setattr(_backend, "why_unavailable",
                        lambda b, op, d: None if (b == "cuda" and d.type == "meta") else orig(b, op, d))
    if EXT is None:
        monkeypatch.setattr(_cuda, "_STATE", (_Recorder(), None))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    def f(z, b, y):
        return forgetkern.tmkl_loss(z * 1.0, b, y, backend="cuda", temperature=1.5,
                                    inplace_backward=inplace)

    z = torch.randn(6, 50, device="meta", requires_grad=True)
    b = torch.randn(6, 50, device="meta")
    y = torch.zeros(6, dtype=torch.long, device="meta")
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = torch.compile(f, fullgraph=True,
                                 backend=aot_autograd(fw_compiler=record, bw_compiler=record))(z, b, y)
            loss.backward()
    finally:
        torch._dynamo.reset()
    assert loss.shape == () and z.grad.shape == (6, 50)
    assert len(graphs) == 2
    assert "forgetkern.tmkl_forward" in graphs[0]
    # the backward graph writes a fresh buffer through the out-variant, also for inplace_backward
    assert "forgetkern.tmkl_backward.default" in graphs[1]
    assert "tmkl_backward_inplace" not in graphs[1]


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu


def _gpu_inputs(n, v, dtype, *, scale=3.0, seed=0, ignore=(1,)):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    z = (torch.randn(n, v, device="cuda", generator=gen, dtype=torch.float64) * scale).to(dtype)
    b = (torch.randn(n, v, device="cuda", generator=gen, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, v, (n,), device="cuda", generator=gen)
    for i in ignore:
        if i < n:
            y[i] = -100
    return z, b, y


@gpu
@needs_ext
def test_gpu_opcheck():
    z, b, y = _gpu_inputs(4, 1003, torch.float32)
    args = (z, b, y, -100, 2.0, 1.0, 1.0, False, True, True)
    torch.library.opcheck(torch.ops.forgetkern.tmkl_forward.default, args)
    loss, ce, kl, stats = torch.ops.forgetkern.tmkl_forward(*args)
    a, c = torch.randn(4, device="cuda"), torch.randn(4, device="cuda")
    torch.library.opcheck(torch.ops.forgetkern.tmkl_backward.default,
                          (z, b, y, stats, a, c, torch.empty_like(z), -100, 2.0, False, True, True))
    torch.library.opcheck(torch.ops.forgetkern.tmkl_backward_inplace.default,
                          (z.clone(), b, y, stats, a, c, -100, 2.0, False, True, True))
    x = torch.randn(3, 16, 32, device="cuda")
    A, B = x @ x.mT / 32, torch.eye(16, device="cuda").expand(3, 16, 16).contiguous()
    torch.library.opcheck(torch.ops.forgetkern.generalized_eigh.default, (A, B, 1e-6))


@gpu
@needs_ext
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_compiled_training_step_matches_eager(inplace):
    torch._dynamo.reset()
    d, v = 64, 1027

    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(d, v).cuda(), torch.nn.Linear(d, v).cuda().requires_grad_(False)

    def step(head, base, h, y):
        loss = forgetkern.tmkl_loss(head(h), base(h), y, backend="cuda", temperature=1.5,
                                    inplace_backward=inplace)
        loss.backward()
        return loss.detach()

    h = torch.randn(2, 9, d, device="cuda")
    y = torch.randint(0, v, (2, 9), device="cuda")
    y[0, 3] = -100
    head_e, base_e = make()
    loss_e = step(head_e, base_e, h, y)
    head_c, base_c = make()
    loss_c = torch.compile(step)(head_c, base_c, h, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head_c.weight.grad, head_e.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_c.bias.grad, head_e.bias.grad, rtol=1e-4, atol=1e-6)


@gpu
@needs_ext
def test_gpu_tmkl_loss_compiles_without_graph_breaks():
    torch._dynamo.reset()

    def f(z, b, y):
        return forgetkern.tmkl_loss(z, b, y, backend="cuda", direction="reverse")

    z, b, y = _gpu_inputs(6, 501, torch.float32)
    x = z.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = torch.compile(f, fullgraph=True)(x, b, y)
    loss.backward()
    x2 = z.clone().requires_grad_()
    f(x2, b, y).backward()
    torch.testing.assert_close(loss, f(z, b, y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-7)


@gpu
@needs_ext
def test_gpu_automatic_backend_is_cuda():
    z, b, y = _gpu_inputs(2, 100, torch.float32)
    assert _backend.resolve_name("tmkl", z) == "cuda"
    assert _backend.resolve_name("generalized_eigh", z, size=8) == "cuda"
    assert "cuda" in forgetkern.info()["backends"]
    assert rel_err(forgetkern.tmkl_loss(z, b, y), forgetkern.tmkl_loss(z, b, y, backend="reference")) < 1e-5
