"""`forgetkern demo --smoke`: runs end to end and writes the documented JSON schema."""
import importlib.util
import json
import math

import pytest
import torch

from forgetkern.cli import main
from forgetkern.demo import data as D
from forgetkern.demo.config import LORA_METHODS
from forgetkern.demo.metrics import checkpoint_steps, forgetting_at
from forgetkern.demo.report import comparisons


def test_demo_smoke_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "demo.json"
    png = tmp_path / "frontier.png"
    threads = torch.get_num_threads()
    assert main(["demo", "--smoke", "--no-cache", "--no-progress", "--seed", "3",
                 "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the demo's --threads does not leak
    assert "retention" in printed and "base model" in printed
    payload = json.loads(out.read_text())
    cfg = payload["config"]
    assert cfg["mode"] == "smoke" and cfg["seeds"] == [3] and cfg["methods"] == list(LORA_METHODS)
    results = payload["results"]
    assert [r["method"] for r in results] == list(LORA_METHODS)
    for r in results:
        for key in ("method", "kl_weight", "seed", "base_retention_loss", "status"):
            assert key in r
        assert r["status"] == "ok", r
        for key in ("target_loss", "retention_loss", "target_accuracy", "forgetting"):
            assert math.isfinite(r[key]), (key, r)
        assert r["forgetting"] == pytest.approx(r["retention_loss"] - r["base_retention_loss"])
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == cfg["adapt_steps"]
        assert 0.0 <= r["target_accuracy"] <= 1.0
    # every run starts from the same base model
    assert len({r["base_retention_loss"] for r in results}) == 1
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --from-json replays the same table without training
    replot = tmp_path / "replot.png"
    assert main(["demo", "--from-json", str(out), "--plot", str(replot)]) == 0
    replayed = capsys.readouterr().out
    table = lambda text: text[text.index("method"):text.index("target: held-out")]  # noqa: E731
    assert table(replayed) == table(printed)
    if importlib.util.find_spec("matplotlib") is not None:
        assert replot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # runs of other seeds (e.g. parallel processes) join into one: the same run as seed 7
    saved = json.loads(out.read_text())
    (s0,) = saved["config"]["seeds"]
    other = json.loads(json.dumps(saved))
    other["config"]["seeds"] = [7]
    other["bases"] = {"7": saved["bases"][str(s0)]}
    for r in other["results"]:
        r["seed"] = 7
    (tmp_path / "seed7.json").write_text(json.dumps(other))
    both = tmp_path / "both.json"
    assert main(["demo", "--from-json", f"{out},{tmp_path / 'seed7.json'}", "--json", str(both),
                 "--no-plot"]) == 0
    joined = json.loads(both.read_text())
    assert joined["config"]["seeds"] == [s0, 7] and set(joined["bases"]) == {str(s0), "7"}
    assert len(joined["results"]) == 2 * len(saved["results"]) and joined["complete"]
    assert joined["config"]["cpu_s"] == pytest.approx(2 * saved["config"]["cpu_s"])
    with pytest.raises(SystemExit, match=rf"seeds \[{s0}\] are also in an earlier file"):
        main(["demo", "--from-json", f"{out},{both}", "--no-plot"])
    other["config"]["adapt_lr"] = 1.0
    (tmp_path / "lr.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="option 'adapt_lr' differs"):
        main(["demo", "--from-json", f"{out},{tmp_path / 'lr.json'}", "--no-plot"])


def test_corpus_split_is_deterministic_and_disjoint():
    files = D.stdlib_files()
    assert files == sorted(files) and len(files) > 20
    held = [f for f in files if D.is_retention_file(f)]
    assert 0 < len(held) < len(files)
    train_pairs, eval_pairs = D._split_pairs(0, 100)
    assert not set(train_pairs.tolist()) & set(eval_pairs.tolist())
    a = D.arithmetic_batches(2, 3, 40, seed=1)
    b = D.arithmetic_batches(2, 3, 40, seed=1)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    text = bytes(a[0]["input_ids"][0].tolist()).decode()
    for line in text.strip("\n").split("\n"):
        if len(line) == 9:
            assert int(line[:2]) + int(line[3:5]) == int(line[6:])


def test_curve_helpers():
    assert checkpoint_steps(150, 10)[-1] == 150
    assert checkpoint_steps(8, 1) == [8]
    curve = [{"target_loss": 3.0, "forgetting": 0.0}, {"target_loss": 2.0, "forgetting": 1.0}]
    assert forgetting_at(curve, 2.5) == pytest.approx(0.5)
    assert forgetting_at(curve, 1.0) is None


def test_comparisons_at_equal_target_loss():
    def run(method, w, pts):
        curve = [{"target_loss": t, "forgetting": f} for t, f in pts]
        return {"method": method, "kl_weight": w, "status": "ok", "curve": curve,
                "target_loss": pts[-1][0], "forgetting": pts[-1][1]}

    results = [run("ce", None, [(3.0, 0.0), (1.0, 1.0)]),
               run("kl", 1.0, [(3.0, 0.0), (2.0, 0.4)]),
               run("tmkl", 1.0, [(3.0, 0.0), (1.5, 0.3)])]
    lines = comparisons(results)
    assert lines[0] == "kl λ=1: forgetting +0.4000 vs CE +0.5000 at the same target loss 2.000"
    assert lines[1] == "tmkl λ=1: forgetting +0.3000 vs CE +0.7500 at the same target loss 1.500"
    # tmkl's curve at kl's final target loss 2.0: 0.3 * (3 - 2) / (3 - 1.5) = 0.2
    assert lines[2] == "tmkl λ=1: forgetting +0.2000 vs plain KL +0.4000 at the same target loss 2.000"


def test_plot_of_a_kl_weight_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    from forgetkern.demo.report import write_plot

    def run(method, w, end):
        curve = [{"target_loss": 3.0, "forgetting": 0.0}, {"target_loss": end[0], "forgetting": end[1]}]
        return {"method": method, "kl_weight": w, "status": "ok", "curve": curve,
                "target_loss": end[0], "forgetting": end[1]}

    results = [run("ce", None, (1.0, 0.5)), run("kl", 0.1, (1.1, 0.4)), run("kl", 1.0, (1.5, 0.2)),
               run("tmkl", 0.1, (1.1, 0.3)), run("tmkl", 1.0, (1.4, 0.1)),
               {"method": "folora", "kl_weight": None, "status": "skipped", "note": "x"}]
    png = tmp_path / "sweep.png"
    assert write_plot(str(png), results, "sweep")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["demo", "--smoke", "--methods", "sgd"])
    with pytest.raises(SystemExit, match="--model smollm2"):
        main(["demo", "--smoke", "--methods", "ce,dora+tmkl"])
    with pytest.raises(SystemExit):
        main(["demo", "--smoke", "--model", "x"])
    with pytest.raises(SystemExit):
        main(["demo", "--smoke", "--threads", "0"])
    with pytest.raises(SystemExit, match="--from-json"):
        main(["demo", "--from-json", str(tmp_path / "missing.json")])
    (tmp_path / "other.json").write_text('{"results": []}')
    with pytest.raises(SystemExit, match="nothing new for --json"):
        main(["demo", "--from-json", str(tmp_path / "other.json"), "--json", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="missing config, base"):
        main(["demo", "--from-json", str(tmp_path / "other.json")])


def test_bad_paths_fail_before_any_training(tmp_path, capsys):
    """An unwritable --json / --plot or a missing --model folder stops the demo at once."""
    import time

    from forgetkern.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    start = time.perf_counter()
    with pytest.raises(SystemExit, match="--json: expected a path in a writable folder"):
        main(["demo", "--smoke", "--no-plot", "--json", str(blocker / "out.json")])
    with pytest.raises(SystemExit, match="--plot: expected a path in a writable folder"):
        main(["demo", "--smoke", "--plot", str(blocker / "plot.png")])
    with pytest.raises(SystemExit, match="--model .*no such folder"):
        main(["demo", "--smoke", "--model", str(tmp_path / "missing"), "--data", str(blocker)])
    assert time.perf_counter() - start < 5  # nothing was trained
    assert not (tmp_path / "out.json").exists()


def test_resume_keeps_finished_runs_and_checks_the_settings(tmp_path, capsys):
    out = tmp_path / "run.json"
    args = ["demo", "--smoke", "--no-cache", "--no-progress", "--no-plot", "--methods", "ce,tmkl"]
    assert main(args + ["--json", str(out)]) == 0
    full = json.loads(out.read_text())
    partial = dict(full, results=full["results"][:1], complete=False)
    partial["results"][0]["marker"] = "kept"  # a finished run is not run again
    out.write_text(json.dumps(partial))
    assert main(args + ["--resume", str(out)]) == 0
    resumed = json.loads(out.read_text())
    assert resumed["complete"] and [r["method"] for r in resumed["results"]] == ["ce", "tmkl"]
    assert resumed["results"][0]["marker"] == "kept"
    for key in ("target_loss", "retention_loss", "forgetting"):
        assert resumed["results"][1][key] == pytest.approx(full["results"][1][key], rel=1e-6)
    with pytest.raises(SystemExit, match="other settings .*adapt_steps"):
        main(args + ["--steps", "3", "--resume", str(out)])
    with pytest.raises(SystemExit, match="--resume: expected an existing file"):
        main(args + ["--resume", str(tmp_path / "missing.json")])
