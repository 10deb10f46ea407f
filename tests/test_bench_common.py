"""The benchmark suite's reporting (records, merge, CSV, Markdown, plots) and the bench CLI on CPU."""
import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_common", None)


def _rec(common, provider, n, median, mode="full", note=""):
    return common.Record(op="tmkl", provider=provider, gpu="Test GPU 1", shape={"N": n, "V": 100},
                         dtype="bfloat16", mode=mode, median_ms=median, p20_ms=median and median * 0.9,
                         p80_ms=median and median * 1.1, peak_mem_bytes=median and int(n * 1e3),
                         floor_ms=0.5, torch="t", triton="tr", commit="c", note=note)


def test_save_merges_and_writes_all_formats(common, tmp_path):
    first = [_rec(common, "a", 10, 1.0), _rec(common, "b", 10, 2.0), _rec(common, "a", 20, 3.0)]
    path = common.save(first, tmp_path)
    assert path.name == "test-gpu-1.json"
    # a second run replaces the same case and keeps the others
    common.save([_rec(common, "a", 10, 0.75), _rec(common, "c", 10, None, note="out of memory")], tmp_path)
    data = json.loads(path.read_text())
    by = {(d["provider"], d["shape"]["N"]): d for d in data}
    assert len(data) == 4
    assert by[("a", 10)]["median_ms"] == 0.75 and by[("b", 10)]["median_ms"] == 2.0
    assert by[("c", 10)]["note"] == "out of memory" and by[("c", 10)]["median_ms"] is None
    for key in ("op", "provider", "gpu", "shape", "dtype", "mode", "median_ms", "p20_ms", "p80_ms",
                "peak_mem_bytes", "floor_ms", "torch", "triton", "commit"):
        assert key in data[0]
    rows = list(csv.DictReader(open(tmp_path / "test-gpu-1.csv")))
    assert float([r for r in rows if r["provider"] == "a" and r["shape"] == "N=10 V=100"][0]["ratio_to_floor"]) == 1.5
    md = (tmp_path / "test-gpu-1.md").read_text()
    assert "| a | N=10 V=100 | bfloat16 | full | 0.750 |" in md and "out of memory" in md
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "test-gpu-1-tmkl.png").stat().st_size > 1000


def test_format_table_shows_ratio(common):
    table = common.format_table([_rec(common, "a", 10, 1.0)])
    assert "2.00" in table.splitlines()[-1]


def test_bench_cli_without_gpu_runs_cpu_micro_benchmarks(capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    from forgetkern.cli import main

    assert main(["bench", "--op", "generalized_eigh"]) == 0
    assert "GPU results need a GPU" in capsys.readouterr().out
    assert calls and calls[0][:3] == [sys.executable, "-m", "pytest"]
    assert str(BENCH / "cpu_micro.py") in calls[0] and "generalized_eigh" in calls[0]


def test_torch_baseline_matches_forgetkern(common):
    """The plain-torch baseline the benchmarks time computes the same loss and gradient."""
    import torch

    import forgetkern

    gen = torch.Generator().manual_seed(5)
    z = (torch.randn(9, 37, generator=gen) * 3).requires_grad_()
    b = torch.randn(9, 37, generator=gen) * 3
    y = torch.randint(0, 37, (9,), generator=gen)
    y[::4] = -100
    up = torch.rand((), generator=gen) + 0.5
    (gz,) = torch.autograd.grad(common.torch_tmkl(z, b, y) * up, z)
    ref = forgetkern.tmkl_loss(z.double(), b.double(), y, backend="reference")
    (gr,) = torch.autograd.grad(ref * up.double(), z)
    assert common.torch_tmkl(z, b, y).item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gz, gr.float(), rtol=1e-5, atol=1e-6)
