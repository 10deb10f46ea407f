"""The benchmarks' machinery on the CPU: the timing helper's counts, the results writer and reader,
the summary table, the plain-torch baseline, and ``forgetkern bench`` without a GPU."""
import csv
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MODULES = ("common", "floors", "gate", "smollm2_inputs", "suite", "bench_linear_tmkl", "bench_tmkl",
           "bench_generalized_eigh", "bench_train_step", "bench_folora_step")


@pytest.fixture
def bench():
    """The benchmarks folder on ``sys.path`` (its modules import each other by name)."""
    sys.path.insert(0, str(BENCH))
    import common

    yield common
    sys.path.remove(str(BENCH))
    for name in MODULES:
        sys.modules.pop(name, None)


def _case(common, floors, **kw):
    floor = floors.linear_floor("ce", floors.LinearShape(8, 4, 16, 2), floors.H200_RATES)
    args = dict(bench="linear_tmkl", work="ce", passes="full", provider="p", inputs="synthetic",
                shape={"N": 8, "D": 4, "V": 16}, dtype=torch.bfloat16, floor=floor)
    args.update(kw)
    return common.Case(**args)


def _ctx(common, floors, out, **kw):
    return common.Context(device=torch.device("cpu"), dry=True, rates=floors.H200_RATES,
                          results=common.Results(out), meta={"gpu": "cpu", "torch": "t", "triton": None,
                                                             "commit": "c"}, log=lambda s: None, **kw)


def test_measure_counts_and_slow_policy(bench, monkeypatch):
    common = bench
    calls = []
    t = common.measure(lambda: calls.append(1), device="cpu", warmup=3, reps=10)
    assert len(calls) == 13 and (t.warmup, t.reps) == (3, 10) and t.note == ""
    assert t.p20_ms <= t.median_ms <= t.p80_ms
    monkeypatch.setattr(common, "SLOW_ITERATION_S", 0.0)  # every iteration is "slow"
    calls.clear()
    t = common.measure(lambda: calls.append(1), device="cpu", warmup=3, reps=10)
    assert len(calls) == 4 and (t.warmup, t.reps) == (1, 3)
    assert "1 warm-up, 3 timed" in t.note
    calls.clear()
    t = common.measure(lambda: calls.append(1), device="cpu", warmup=3, reps=10, slow_policy=False)
    assert len(calls) == 13 and (t.warmup, t.reps) == (3, 10)
    with pytest.raises(common.OutOfTime):
        common.measure(lambda: None, device="cpu", budget_s=-1.0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="reps must be an int >= 1"):
            common.measure(lambda: None, device="cpu", reps=bad)


def test_grad_to_none_is_cleared_before_each_call(bench):
    x = torch.ones(3, requires_grad=True)
    seen = []

    def fn():
        seen.append(x.grad is None)
        (x * 2).sum().backward()

    bench.measure(fn, device="cpu", warmup=1, reps=3, grad_to_none=(x,))
    assert seen == [True] * 4 and x.grad is None


def test_results_appended_read_back_and_tabulated(bench, tmp_path):
    common = bench
    import floors

    ctx = _ctx(common, floors, tmp_path)
    ok = common.run_case(ctx, _case(common, floors, make=lambda: (lambda: None)))
    na = common.run_case(ctx, _case(common, floors, provider="q", unavailable="not installed"))
    boom = common.run_case(ctx, _case(common, floors, provider="r", make=lambda: 1 / 0))
    assert (ok.status, na.status, boom.status) == ("ok", "unavailable", "failed")
    assert "ZeroDivisionError" in boom.note and boom.median_ms is None
    assert ok.reps == 10 and ok.median_ms is not None and ok.ratio == ok.median_ms / ok.floor_ms
    assert ok.dry and "dry run" in ok.timing
    with open(tmp_path / "results.jsonl", "a") as fh:
        fh.write('{"bench": "cut off by a ki')  # a last line cut by a kill is left out
    records = common.load_records(tmp_path)
    assert [r["provider"] for r in records] == ["p", "q", "r"]
    assert set(records[0]) == set(common.FIELDS)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["provider"] for r in rows] == ["p", "q", "r"] and rows[0]["shape"] == "N=8 D=4 V=16"
    assert rows[1]["status"] == "unavailable" and rows[1]["median_ms"] == ""
    table = common.summary_table(records)
    assert "DRY RUN (3 of 3 records)" in table and "not installed" in table
    assert len(table.splitlines()) == 2 + 3 + 2
    with pytest.raises(ValueError, match="status must be one of"):
        ctx.results.append(common.Record(**{**records[0], "status": "fine"}))


def test_a_case_past_the_deadline_is_recorded_as_skipped(bench, tmp_path):
    import time

    import floors

    ctx = _ctx(bench, floors, tmp_path, deadline=time.time() + 1)
    rec = bench.run_case(ctx, _case(bench, floors, make=lambda: (lambda: None)))
    assert rec.status == "skipped" and "time budget" in rec.note
    assert json.loads((tmp_path / "results.jsonl").read_text())["status"] == "skipped"


def test_torch_baseline_matches_forgetkern(bench):
    """The plain-torch baseline the benchmarks time computes the same loss and gradient."""
    import forgetkern

    gen = torch.Generator().manual_seed(5)
    z = (torch.randn(9, 37, generator=gen) * 3).requires_grad_()
    b = torch.randn(9, 37, generator=gen) * 3
    y = torch.randint(0, 37, (9,), generator=gen)
    y[::4] = -100
    up = torch.rand((), generator=gen) + 0.5
    (gz,) = torch.autograd.grad(bench.torch_tmkl(z, b, y) * up, z)
    ref = forgetkern.tmkl_loss(z.double(), b.double(), y, backend="reference")
    (gr,) = torch.autograd.grad(ref * up.double(), z)
    assert bench.torch_tmkl(z, b, y).item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gz, gr.float(), rtol=1e-5, atol=1e-6)


def test_bench_ops_are_the_suite_benchmarks(bench):
    import suite

    from forgetkern import _bench

    assert _bench.OPS == tuple(suite.BENCHES)


def test_bench_cli_without_gpu_honors_out(capsys, monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    from forgetkern import _bench
    from forgetkern.cli import main

    calls = []
    monkeypatch.setattr(_bench, "call", lambda cmd, log=None: calls.append((cmd, log)) or 0)
    assert main(["bench", "--op", "generalized_eigh", "--out", str(tmp_path / "o")]) == 0
    assert "GPU results need a GPU" in capsys.readouterr().out
    (cmd, log), = calls
    assert cmd[:3] == [sys.executable, "-m", "pytest"] and str(BENCH / "cpu_micro.py") in cmd
    assert "generalized_eigh" in cmd and cmd[-2:] == ["--benchmark-json", str(tmp_path / "o" / "cpu_micro.json")]
    assert log == tmp_path / "o" / "cpu_micro.log"
    calls.clear()
    assert main(["bench", "--op", "tmkl", "--quick", "--out", str(tmp_path / "o")]) == 0
    assert calls[0][0][-2:] == ["--json", str(tmp_path / "o" / "cpu_tmkl_speed.json")]
    calls.clear()
    assert main(["bench", "--dry", "--op", "tmkl", "--out", str(tmp_path / "d")]) == 0
    assert calls[0][0] == [sys.executable, str(BENCH / "suite.py"), "--dry", "--only", "tmkl",
                           "--out", str(tmp_path / "d")]
    assert main(["bench", "--op", "train_step"]) == 2
    assert "has no CPU benchmark" in capsys.readouterr().err


def test_bench_call_tees_into_the_log(tmp_path, capsys):
    from forgetkern import _bench

    log = tmp_path / "x.log"
    assert _bench.call([sys.executable, "-c", "print('hello')"], log) == 0
    assert log.read_text() == "hello\n" and "hello" in capsys.readouterr().out


def test_environment_is_set_around_calls_and_restored(bench, monkeypatch):
    import os

    monkeypatch.setenv("FORGETKERN_BENCH_A", "old")
    monkeypatch.delenv("FORGETKERN_BENCH_B", raising=False)
    with bench.environment({"FORGETKERN_BENCH_A": "1", "FORGETKERN_BENCH_B": "2"}):
        assert (os.environ["FORGETKERN_BENCH_A"], os.environ["FORGETKERN_BENCH_B"]) == ("1", "2")
    assert os.environ["FORGETKERN_BENCH_A"] == "old" and "FORGETKERN_BENCH_B" not in os.environ
    with bench.environment(None):
        pass
