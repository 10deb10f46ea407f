"""Backend dispatch and ``forgetkern.info()``."""
import subprocess
import sys

import pytest
import torch

import forgetkern
from forgetkern import _backend


def test_import_is_light():
    """Importing forgetkern neither imports Triton nor initializes CUDA."""
    code = ("import sys, torch, forgetkern; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialized'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_keys():
    data = forgetkern.info()
    for key in ("version", "torch", "triton", "cuda_extension", "gpu", "backends"):
        assert key in data
    assert data["version"] == forgetkern.__version__
    assert "reference" in data["backends"]
    assert isinstance(data["cuda_extension"], bool)


def test_resolution_order(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("FORGETKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.resolve("tmkl", cpu) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("tmkl", cpu) == "triton"
    assert _backend.resolve("tmkl", cpu, backend="reference") == "reference"
    monkeypatch.setenv("FORGETKERN_BACKEND", "reference")
    assert _backend.resolve("tmkl", cpu) == "reference"
    # explicit argument wins over the environment
    assert _backend.resolve("tmkl", cpu, backend="triton") == "triton"


def test_explicit_unavailable_backend_says_why(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.resolve("tmkl", cpu, backend="triton")
    with pytest.raises(RuntimeError, match="CUDA tensors|no .cuda. backend"):
        _backend.resolve("tmkl", cpu, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("tmkl", cpu, backend="fast")
    monkeypatch.setenv("FORGETKERN_BACKEND", "turbo")
    with pytest.raises(ValueError, match="FORGETKERN_BACKEND"):
        _backend.resolve("tmkl", cpu)


def test_env_backend_falls_back_for_ops_without_it(monkeypatch):
    monkeypatch.setitem(_backend.OP_BACKENDS, "only_ref", ("reference",))
    monkeypatch.setenv("FORGETKERN_BACKEND", "cuda")
    assert _backend.resolve("only_ref", torch.zeros(1)) == "reference"


def test_cli_info(capsys):
    from forgetkern.cli import main

    assert main(["info", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"version"' in out and '"backends"' in out
