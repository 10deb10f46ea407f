"""Backend dispatch and ``forgetkern.info()``."""
import subprocess
import sys

import pytest
import torch

import forgetkern
from forgetkern import _backend, _params


def test_import_is_light():
    """Importing forgetkern neither imports Triton nor initializes CUDA."""
    code = ("import sys, torch, forgetkern; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialized'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_keys():
    data = forgetkern.info()
    for key in ("version", "torch", "triton", "cuda_extension_built", "cuda_extension_usable", "gpu", "backends"):
        assert key in data
    assert data["version"] == forgetkern.__version__
    assert "reference" in data["backends"]
    assert isinstance(data["cuda_extension_built"], bool)


def test_resolution_order(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("FORGETKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.resolve_name("tmkl", cpu) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve_name("tmkl", cpu) == "triton"
    assert _backend.resolve_name("tmkl", cpu, backend="reference") == "reference"
    monkeypatch.setenv("FORGETKERN_BACKEND", "reference")
    assert _backend.resolve_name("tmkl", cpu) == "reference"
    # explicit argument wins over the environment
    assert _backend.resolve_name("tmkl", cpu, backend="triton") == "triton"


def test_explicit_unavailable_backend_says_why(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.resolve_name("tmkl", cpu, backend="triton")
    with pytest.raises(RuntimeError, match="CUDA tensors|no .cuda. backend"):
        _backend.resolve_name("tmkl", cpu, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve_name("tmkl", cpu, backend="fast")
    monkeypatch.setenv("FORGETKERN_BACKEND", "turbo")
    with pytest.raises(ValueError, match="FORGETKERN_BACKEND"):
        _backend.resolve_name("tmkl", cpu)


def test_env_backend_falls_back_for_ops_without_it(monkeypatch):
    # linear_sparse_tmkl has no CUDA-extension backend: the environment preference does not apply
    monkeypatch.setenv("FORGETKERN_BACKEND", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.resolve_name("linear_sparse_tmkl", torch.zeros(1)) == "reference"


def test_table_is_the_one_dispatch():
    """Every op's backends come from the table, each with its op's whole interface."""
    for (op, backend) in _backend.TABLE:
        impl = _backend.implementation(op, backend)
        assert (impl.op, impl.backend) == (op, backend)
        for name in _backend.INTERFACES[op]:
            assert callable(getattr(impl, name)), (op, backend, name)
    assert set(_backend.OP_BACKENDS) == set(_backend.INTERFACES)
    assert _backend.resolve("tmkl", torch.zeros(1), backend="reference").forward is \
        forgetkern.reference.tmkl_forward
    # a fused-linear op is the chunked driver over its logits op, on every backend of that op
    for op, rows_op in _backend.CHUNKED.items():
        assert _backend.OP_BACKENDS[op] == _backend.OP_BACKENDS[rows_op]
        for backend in _backend.OP_BACKENDS[op]:
            impl = _backend.implementation(op, backend)
            for name in _backend.INTERFACES[op]:
                assert getattr(impl, name).keywords["rows"] is _backend.implementation(rows_op, backend)


def test_eigensolver_size_fallback_is_declared_by_the_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FORGETKERN_BACKEND", raising=False)
    cpu = torch.zeros(1)
    from forgetkern._params import EIGH_MAX_N

    if _backend.triton_installed():
        from forgetkern.ops.generalized_eigh import EIGH_TRITON_MAX_N

        assert _backend.resolve_name("generalized_eigh", cpu, size=EIGH_TRITON_MAX_N) == "triton"
        assert _backend.resolve_name("generalized_eigh", cpu, size=EIGH_TRITON_MAX_N + 1) == "reference"
        assert _backend.resolve_name("generalized_eigh", cpu, backend="triton",
                                     size=EIGH_TRITON_MAX_N + 1) == "reference"
    assert _backend.resolve_name("generalized_eigh", cpu, size=EIGH_MAX_N + 1) == "reference"


def test_backends_declare_what_they_serve():
    """Every backend's home declares where it runs, and every table module's declaration (where it
    has one) answers with None or a reason string; the table itself holds no per-op rule."""
    import importlib
    import inspect

    assert set(_backend.HOMES) == set(_params.BACKENDS)
    for backend, home in _backend.HOMES.items():
        reason = importlib.import_module(home).unavailable(torch.device("cpu"))
        assert reason is None or isinstance(reason, str), (backend, reason)
    assert importlib.import_module(_backend.HOMES["reference"]).unavailable(torch.device("meta")) is None
    source = inspect.getsource(_backend)
    for op in _backend.INTERFACES:
        assert f'op == "{op}"' not in source and f"op == '{op}'" not in source, op
    cuda = importlib.import_module(_backend.TABLE[("generalized_eigh", "cuda")][0])
    assert cuda.unsupported("generalized_eigh", _params.EIGH_MAX_N) is None
    assert "n <= 64" in cuda.unsupported("generalized_eigh", _params.EIGH_MAX_N + 1)
    assert cuda.unsupported("tmkl", 10**9) is None


def test_cli_info(capsys):
    from forgetkern.cli import main

    assert main(["info", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"version"' in out and '"backends"' in out


def test_modules_and_loss_configs_check_the_backend_name_at_construction():
    from forgetkern.train import loss_config

    for make in (lambda: forgetkern.TMKLLoss(backend="fast"),
                 lambda: forgetkern.LinearTMKLLoss(backend="fast"),
                 lambda: loss_config("tmkl", backend="fast")):
        with pytest.raises(ValueError, match="backend must be one of"):
            make()


def test_info_tells_built_from_usable(monkeypatch):
    """``cuda_extension_built`` says whether the extension compiled and loads, and
    ``cuda_extension_usable`` whether this machine can run it (a GPU), each with its reason."""
    from forgetkern import _cuda

    data = forgetkern.info()
    assert data["cuda_extension_usable"] == (data["cuda_extension_built"] and torch.cuda.is_available())
    if not torch.cuda.is_available():
        assert "no CUDA GPU on this machine" in data["cuda_extension_unusable_why"]
    monkeypatch.setattr(_cuda, "_STATE", (None, "not built (test)"))
    data = forgetkern.info()
    assert data["cuda_extension_built"] is False and data["cuda_extension_usable"] is False
    assert data["cuda_extension_unusable_why"]
