"""The benchmark suite on the CPU: floors per work, the correctness gate (a wrong provider is
caught), the dry run end to end in a subprocess (every record has its own work's floor), results
that survive a kill mid-run, and the GPU run's command."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
MODULES = ("common", "floors", "gate", "smollm2_inputs", "suite", "bench_linear_tmkl", "bench_tmkl",
           "bench_generalized_eigh", "bench_train_step", "bench_folora_step")


@pytest.fixture
def mods():
    sys.path.insert(0, str(BENCH))
    import common
    import floors
    import gate

    yield common, floors, gate
    sys.path.remove(str(BENCH))
    for name in MODULES:
        sys.modules.pop(name, None)


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # forgetkern's CPU path is the reference; kernels need a GPU
    return env


# ---------------------------------------------------------------------------------------------
# floors
# ---------------------------------------------------------------------------------------------
def test_floors_count_each_works_gemms(mods):
    _, floors, _ = mods
    r = floors.H200_RATES
    assert r.dry and "not measured" in r.source
    s = floors.LinearShape(8192, 4096, 128256, 2, k=64)
    gemm_ms = 1e3 * 2 * 8192 * 4096 * 128256 / 790e12
    exact, ce = floors.linear_floor("tmkl-exact", s, r), floors.linear_floor("ce", s, r)
    topk, jsd = floors.linear_floor("tmkl-topk", s, r), floors.linear_floor("jsd", s, r)
    assert exact.ms == pytest.approx(3 * gemm_ms) and jsd.ms == pytest.approx(3 * gemm_ms)
    assert ce.ms == pytest.approx(2 * gemm_ms) and topk.ms == pytest.approx(2 * gemm_ms)
    assert topk.nbytes - ce.nbytes == 8192 * (8 * 64 + 12)  # the gather
    assert floors.linear_floor("tmkl-exact", s, r, "forward").ms == pytest.approx(2 * gemm_ms)
    trained = floors.LinearShape(8192, 4096, 128256, 2, train_weight=True)
    assert floors.linear_floor("ce", trained, r).ms == pytest.approx(3 * gemm_ms)
    # the loss on logits is memory-bound: 2 passes (5 N V elements), 1 pass beside it (3 N V)
    two, one = floors.logits_floor(8192, 128256, 2, r)
    assert two.flops == 0 and two.ms / one.ms == pytest.approx(5 / 3, rel=1e-4)
    assert two.ms == pytest.approx(1e3 * (5 * 8192 * 128256 * 2 + 8192 * 8) / 4.3e12)
    # predictions add GEMM and memory time and never beat the floor
    for strategy in floors.STRATEGIES:
        for work in ("tmkl-exact", "ce", "tmkl-topk"):
            pred = floors.linear_predicted(strategy, work, s, r)
            assert pred.ms > floors.linear_floor(work, s, r).ms
    fused = floors.linear_predicted("fused", "tmkl-exact", s, r)
    assert fused.flops == 5 * s.gemm_flops
    assert floors.linear_predicted("fused", "ce", s, r).flops == 3 * s.gemm_flops  # no base GEMM
    chunked = floors.linear_predicted("chunked", "tmkl-exact", s, r, chunk_rows=1024)
    assert chunked.flops == 3 * s.gemm_flops and "R=1024" in chunked.text
    assert "assumed" in floors.linear_predicted("chunked", "ce", s, r).text
    step = floors.train_step_floor("tmkl-live", 10**9, 10**8, 8192, r)
    assert step.flops == 6 * 10**9 * 8192
    with pytest.raises(ValueError, match="work must be one of"):
        floors.linear_floor("kl", s, r)
    with pytest.raises(ValueError, match="n must be a positive int"):
        floors.LinearShape(0, 4, 4, 2)
    with pytest.raises(ValueError, match="strategy must be one of"):
        floors.linear_predicted("auto", "ce", s, r)
    with pytest.raises(ValueError, match="k >= 1"):
        floors.linear_floor("tmkl-topk", floors.LinearShape(8, 4, 16, 2), r)


# ---------------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------------
class _ScaledGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return 1.1 * g


def test_gate_passes_right_providers_and_catches_wrong_ones(mods, tmp_path):
    common, floors, gate = mods
    import bench_linear_tmkl as lin

    p = lin.synthetic(40, 16, 300, torch.bfloat16, "cpu")
    p.y[:8] = ((p.hb[:8].float() @ p.w.float().T)).argmax(-1)  # targets the base is sure of
    ref = lin.reference(p, "tmkl-exact")
    check = lambda fn: gate.check_linear(fn, p.h, ref, torch.bfloat16)  # noqa: E731
    good = check(lambda: lin.torch_eager(p, "tmkl-exact"))
    assert good.ok and "pass" in good.text, good.text
    assert check(lambda: lin.torch_eager(p, "ce")).ok is False  # the KL term dropped
    scaled = check(lambda: gate.torch_tmkl(_ScaledGrad.apply(p.h) @ p.w.T, p.hb @ p.w.T, p.y))
    assert not scaled.ok and scaled.loss_err < 1e-3 and scaled.grad_err > 0.05, scaled.text
    nan = check(lambda: lin.torch_eager(p, "tmkl-exact") * float("nan"))
    assert not nan.ok and math.isinf(nan.loss_err)
    # unmasked KL (the target not removed) against the masked reference
    unmasked = check(lambda: gate.ce_rows((p.h @ p.w.T).float(), p.y).sum() / (p.y != -100).sum()
                     + (gate.kl_full_rows((p.h @ p.w.T).float(), (p.hb @ p.w.T).float())
                        * (p.y != -100)).sum() / (p.y != -100).sum())
    assert not unmasked.ok, unmasked.text
    # through run_case: a wrong provider is recorded as wrong and not timed
    ctx = common.Context(device=torch.device("cpu"), dry=True, rates=floors.H200_RATES,
                         results=common.Results(tmp_path), meta=common.meta(torch.device("cpu")),
                         log=lambda s: None)
    timed = []
    case = common.Case(bench="linear_tmkl", work="tmkl-exact", passes="full", provider="wrong",
                       inputs="synthetic", shape={"N": 40}, dtype=torch.bfloat16,
                       floor=floors.linear_floor("tmkl-exact", floors.LinearShape(40, 16, 300, 2), floors.H200_RATES),
                       gate=lambda: check(lambda: lin.torch_eager(p, "ce")), make=lambda: timed.append(1))
    rec = common.run_case(ctx, case)
    assert rec.status == "wrong" and rec.median_ms is None and not timed and "FAIL" in rec.gate
    assert json.loads((tmp_path / "results.jsonl").read_text())["status"] == "wrong"


def test_gate_on_logits_and_eigensolvers(mods):
    _, _, gate = mods
    import bench_generalized_eigh as eig
    import bench_tmkl

    z, b, y = bench_tmkl.problem(30, 200, torch.bfloat16, "cpu")
    assert gate.check_logits(lambda: gate.torch_tmkl(z, b, y), z, b, y, "tmkl").ok
    wrong = gate.check_logits(lambda: gate.torch_tmkl(z, b, y), z, b, y, "ce+kl-full-batchmean")
    assert not wrong.ok
    a, bb = eig.problem(3, 6, "cpu")
    from forgetkern import reference

    assert gate.check_eigh(lambda: reference.generalized_eigh(a, bb, eps=eig.EPS), a, bb, eig.EPS).ok
    bad = gate.check_eigh(lambda: (reference.generalized_eigh(a, bb, eps=eig.EPS)[0] * 1.01,
                                   reference.generalized_eigh(a, bb, eps=eig.EPS)[1]), a, bb, eig.EPS)
    assert not bad.ok and "FAIL" in bad.text


def test_topk_formula_is_forgetkerns_sparse_loss(mods):
    """The gate's plain-torch top-k formula computes what forgetkern's TopKBase loss computes."""
    _, _, gate = mods
    import forgetkern

    gen = torch.Generator().manual_seed(3)
    z = torch.randn(12, 50, generator=gen, dtype=torch.float64) * 3
    b = torch.randn(12, 50, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, 50, (12,), generator=gen)
    y[:4] = b[:4].argmax(-1)  # the target inside the record
    y[5] = -100
    rec = forgetkern.topk_base(b, y, 7)
    ours = gate.topk_rows(z, (rec.values, rec.indices, rec.lse, rec.tail_lse), y)
    theirs = forgetkern.tmkl_loss(z, rec, y, reduction="none", backend="reference")
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# the dry run, end to end, and a kill mid-run
# ---------------------------------------------------------------------------------------------
def _expected_floor(floors, r: dict) -> float:
    rates, s, bench = floors.H200_RATES, r["shape"], r["bench"]
    elt = {"bfloat16": 2, "float16": 2, "float32": 4}[r["dtype"]]
    if bench == "linear_tmkl":
        shape = floors.LinearShape(s["N"], s["D"], s["V"], elt, k=s.get("k", 0),
                                   train_weight=s.get("head") == "trained")
        return floors.linear_floor(r["work"], shape, rates, r["passes"]).ms
    if bench == "tmkl":
        return floors.logits_floor(s["N"], s["V"], elt, rates, r["passes"])[0].ms
    if bench == "generalized_eigh":
        return floors.eigh_floor(s["batch"], s["n"], rates).ms
    if bench == "train_step":
        import bench_train_step as ts

        total, head = ts.matmul_params(ts.DRY_MODEL[1])
        return floors.train_step_floor(r["work"], total, head, s["B"] * s["L"], rates).ms
    assert bench == "folora_step" and r["work"] == "optimizer-step"
    import bench_folora_step as fs

    nbytes = fs.ADAM_STREAMS * 4 * s["params"]
    d_ins = [d_in for _, d_in, _ in fs.linears(fs.DRY_DIMS)] * s["blocks"]
    if "-dense-" in r["provider"]:
        nbytes += sum(4 * 2 * d * d for d in d_ins)
    elif "-lowrank" in r["provider"]:
        nbytes += sum(4 * 2 * fs.DRY_K * d for d in d_ins)
    return floors.optimizer_floor(nbytes, rates, "").ms


def test_dry_suite_runs_end_to_end(mods, tmp_path, monkeypatch, capsys):
    """The whole suite (every benchmark, both phases) in its dry mode, in this process."""
    common, floors, _ = mods
    import suite

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernels need a GPU; the CPU path is the reference
    out = tmp_path / "dry"
    status = suite.main(["--dry", "--profile", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert status == 0, stdout[-3000:]
    records = common.load_records(out)
    assert {r["bench"] for r in records} == {"linear_tmkl", "tmkl", "generalized_eigh", "train_step",
                                             "folora_step"}
    assert "DRY RUN" in stdout and (out / "profile.txt").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(records)
    for r in records:
        assert r["dry"] is True and "not measured" in r["rates"], r
        assert r["command"].startswith("python benchmarks/suite.py --dry"), r["command"]
        assert r["floor_ms"] > 0 and r["floor_ms"] == pytest.approx(_expected_floor(floors, r)), r
        if r["status"] == "ok":
            assert "dry run" in r["timing"] and r["ratio"] == pytest.approx(r["median_ms"] / r["floor_ms"])
            assert r["reps"] >= 3 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    by = {(r["bench"], r["work"], r["provider"]): r for r in records}
    # each provider against its own work's floor: a CE-only peer against the CE floor
    ce, exact = by[("linear_tmkl", "ce", "torch-linear-ce")], by[("linear_tmkl", "tmkl-exact", "torch-eager")]
    assert ce["floor_ms"] < exact["floor_ms"]
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["bench"] for r in ok} == {"linear_tmkl", "tmkl", "generalized_eigh", "train_step", "folora_step"}
    assert all(r["gate"].startswith("pass") for r in ok if r["bench"] in ("linear_tmkl", "tmkl", "generalized_eigh"))
    assert all(r["tokens_per_s"] > 0 for r in ok if r["bench"] == "train_step")
    assert not [r for r in records if r["status"] in ("wrong", "failed")], [
        (r["provider"], r["note"], r["gate"]) for r in records if r["status"] in ("wrong", "failed")]


def test_results_survive_a_kill_mid_run(mods, tmp_path):
    common, _, _ = mods
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(BENCH / "suite.py"), "--dry", "--only", "linear_tmkl",
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())
    path = out / "results.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if path.exists() and path.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    records = common.load_records(out)
    assert len(records) >= 2 and all(set(r) == set(common.FIELDS) for r in records)
    with open(out / "results.csv") as fh:
        rows = [row for row in csv.reader(fh)]
    header, body = rows[0], [row for row in rows[1:] if len(row) == len(rows[0])]
    assert header == common.FIELDS and len(records) - 1 <= len(body) <= len(records)
    assert [row[header.index("provider")] for row in body] == [r["provider"] for r in records][:len(body)]
    assert "DRY RUN" in common.summary_table(records)


# ---------------------------------------------------------------------------------------------
# the GPU run's command, inputs and configs
# ---------------------------------------------------------------------------------------------
def test_gpu_run_command_fits_the_device_limits():
    text = (BENCH / "README.md").read_text()
    block = re.search(r"```text\nrun\(command=(.*?)\)\n```", text, re.S)
    assert block, "benchmarks/README.md must show the GPU run's call"
    command = re.search(r'"(.*?)"', block.group(1), re.S).group(1)
    assert len(command) <= 2000 and "benchmarks/gpu_suite.sh" in command
    carry = re.search(r"carry=\[(.*?)\]", block.group(1)).group(1)
    assert {c.strip().strip('"') for c in carry.split(",")} <= {".whl", ".bench_inputs"}
    timeout = int(re.search(r"timeout_s=(\d+)", block.group(1)).group(1))
    budget = int(re.search(r"GPU_SUITE_BUDGET_S=(\d+)", command).group(1))
    assert budget < timeout <= 600


def test_smollm2_head_dequantizes_per_block(mods):
    import smollm2_inputs as si

    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (5, 64), generator=gen, dtype=torch.int8)
    scale = torch.rand(5, 2, generator=gen).half()
    w = si.dequantize(q, scale)
    assert torch.equal(w[:, :32], q[:, :32].float() * scale[:, :1].float())
    assert torch.equal(w[:, 32:], q[:, 32:].float() * scale[:, 1:].float())
    with pytest.raises(FileNotFoundError, match="smollm2_inputs.py"):
        si.load(Path("/nonexistent/smollm2.pt"), "cpu", torch.bfloat16)


def test_train_step_smollm2_config_is_the_real_models():
    """The training-step benchmark's SmolLM2-135M config is the real model's (from its cached
    folder, else read from the GGUF file)."""
    from forgetkern import models

    ok, why = models.available("smollm2")
    if not ok:
        pytest.skip(why)
    folder = Path(models.local_folder("smollm2"))
    if (folder / "config.json").exists():
        real = json.loads((folder / "config.json").read_text())
    else:
        from transformers import AutoConfig

        gguf = Path(models._gguf_path(models.MODELS["smollm2"]))
        real = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
    sys.path.insert(0, str(BENCH))
    try:
        import bench_train_step as ts
    finally:
        sys.path.remove(str(BENCH))
        for name in MODULES:
            sys.modules.pop(name, None)
    for key, value in ts.MODELS["smollm2-135m"].items():
        have = real.get(key)
        if key == "rope_theta" and have is None:
            have = (real.get("rope_parameters") or {}).get("rope_theta")
        assert have == (pytest.approx(value) if isinstance(value, float) else value), key


@pytest.mark.slow
def test_gpu_suite_script_dry(tmp_path):
    """benchmarks/gpu_suite.sh with GPU_SUITE_DRY=1: every step's plumbing, the files it leaves."""
    out = tmp_path / "gs"
    env = dict(_env(), GPU_SUITE_DRY="1", GPU_SUITE_BUDGET_S="600", PYTHON=sys.executable)
    res = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), str(out)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"results.jsonl", "results.csv", "summary.txt", "suite.log"} <= set(files)
    assert "DRY RUN" in res.stdout.splitlines()[-2] or "DRY RUN" in res.stdout[-2000:]


def test_linear_providers_follow_the_api(mods, monkeypatch):
    """One forgetkern provider per strategy when ``linear_tmkl_loss`` takes ``strategy`` (with a
    ``-cuda`` twin where the op has a CUDA backend), the backends before that."""
    import bench_linear_tmkl as lin

    import forgetkern

    provs = {p.name: p for p in lin.providers("cpu")}  # today's API: strategy=, a CUDA backend
    assert {"forgetkern-chunked", "forgetkern-fused", "forgetkern-chunked-cuda", "forgetkern-fused-cuda",
            "forgetkern-fused-tma"} <= set(provs) and "forgetkern-triton" not in provs
    assert lin.planned_rows(8192, 128256, torch.bfloat16, "tmkl-exact") >= 512
    plain = forgetkern.linear_tmkl_loss

    def without_strategy(*args, **kw):  # a forgetkern before strategy=: the Triton backend is the fused kernel
        return plain(*args, **kw)

    monkeypatch.setattr(forgetkern, "linear_tmkl_loss", without_strategy)
    names = [p.name for p in lin.providers("cpu")]
    assert "forgetkern-triton" in names and not [n for n in names if n.startswith("forgetkern-chunked")]
    monkeypatch.setattr(forgetkern, "linear_tmkl_loss", plain)
    assert provs["forgetkern-chunked"].predicts == "chunked" and provs["forgetkern-fused-tma"].late
    cuda = provs["forgetkern-chunked-cuda"]
    assert cuda.needs_extension and "CUDA tensors" in cuda.unavailable
    assert not [p for p in lin.providers("cpu", probe_extension=False) if p.needs_extension]
