"""The command line's one argument-validation layer (forgetkern._args): every bad argument of
``cache-base``, ``demo`` and ``bench`` is one line on stderr and exit status 2, before anything is
written; outputs are written atomically."""
import json
import os
import re

import pytest
import torch

from forgetkern._args import UsageError
from forgetkern._files import atomic_open
from forgetkern.cli import main


def _fails(capsys, argv, pattern):
    """``main(argv)`` exits with status 2 and one stderr line matching ``pattern``."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2, (argv, info.value.code)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"forgetkern {argv[0]}: error: "), err
    assert re.search(pattern, lines[0]), (pattern, lines[0])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=67, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("model")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_cache_base_arguments(tmp_path, capsys, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "input_ids": [1, 2, 3, 4 + i]}) for i in range(3)))
    out = tmp_path / "out"
    base = ["cache-base", "--model", tiny_model, "--data", str(data), "--out", str(out), "--quiet"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra, pattern in (
            (["--k", "0"], r"argument --k: expected an integer >= 1, got '0'"),
            (["--k", "-3"], r"argument --k: expected an integer >= 1"),
            (["--k", "2.5"], r"argument --k: expected an integer, got '2.5'"),
            (["--temperature", "0"], r"--temperature: expected a finite number > 0, got '0'"),
            (["--temperature", "nan"], r"--temperature: expected a finite number > 0"),
            (["--temperature", "inf"], r"--temperature: expected a finite number > 0"),
            (["--seq-len", "-5"], r"--seq-len: expected an integer >= 2"),
            (["--batch-size", "0"], r"--batch-size: expected an integer >= 1"),
            (["--dtype", "float8"], r"--dtype: expected one of auto, float16, bfloat16"),
            (["--mode", "dense"], r"--mode: invalid choice"),
            (["--mode", "topk", "--k", "1000"], r"--k 1000: exceeds the model's vocabulary size 67"),
    ):
        _fails(capsys, base + extra, pattern)
    swap = lambda flag, value: [value if base[i - 1] == flag else a for i, a in enumerate(base)]  # noqa: E731
    _fails(capsys, swap("--data", str(tmp_path / "missing.jsonl")),
           r"--data: expected an existing file")
    _fails(capsys, swap("--model", str(tmp_path / "nomodel")), r"--model: .* is neither a model folder")
    (tmp_path / "empty").mkdir()
    _fails(capsys, swap("--model", str(tmp_path / "empty")), r"--model .*: cannot be loaded as a causal LM")
    _fails(capsys, swap("--out", str(afile)), r"--out: expected a folder path \(this is a file\)")
    _fails(capsys, swap("--out", str(afile / "sub")), r"--out: expected a folder path in a writable place")
    for lines, pattern in (
            (['{"input_ids": [1, 2, 3]}', '{"input_ids": [1, 2,'],
             r"d\.jsonl:2: not valid JSON"),
            (['{"input_ids": [1, 2]}', "", '{"input_ids": [1, 100, 3]}'],
             r"d\.jsonl:3: token id 100 is outside the model's vocabulary \[0, 67\)"),
            (['{"input_ids": [-1, 2, 3]}'], r"d\.jsonl:1: token id -1 is outside"),
            (['{"input_ids": [1, "a"]}'], r"d\.jsonl:1: 'input_ids' must be a list of integers"),
            (['{"tokens": [1, 2]}'], r"d\.jsonl:1: expected 'text' \(a string\) or 'input_ids'"),
            (['[1, 2, 3]'], r"d\.jsonl:1: expected a JSON object, got list"),
            (['{"id": 5, "input_ids": [1, 2]}', '{"id": 5, "input_ids": [3, 4]}'],
             r"d\.jsonl:2: id 5 was used at line 1"),
            (['{"input_ids": [1]}'], r"no example of 2 or more tokens"),
    ):
        data.write_text("\n".join(lines))
        _fails(capsys, base, pattern)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["afile", "d.jsonl", "empty"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    data.write_text('{"input_ids": [1, 2, 3]}')
    _fails(capsys, swap("--out", str(tmp_path / "mine")), r"holds files that are not a base cache's")
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]
    assert main(base) == 0 and (out / "manifest.json").exists()


def test_demo_arguments(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra, pattern in (
            (["--steps", "0"], r"argument --steps: expected an integer >= 1, got '0'"),
            (["--steps", "-4"], r"--steps: expected an integer >= 1"),
            (["--lr", "nan"], r"--lr: expected a finite number > 0, got 'nan'"),
            (["--lr", "0"], r"--lr: expected a finite number > 0"),
            (["--kl-weights", "1,-0.5"], r"--kl-weights: expected a finite number >= 0, got '-0.5'"),
            (["--kl-weights", "inf"], r"--kl-weights: expected a finite number >= 0"),
            (["--sweep-kl-weights", "x"], r"--sweep-kl-weights: expected a number, got 'x'"),
            (["--seeds", "1,1"], r"--seeds: expected distinct values"),
            (["--seeds", "-1"], r"--seeds: expected an integer >= 0"),
            (["--seed", "1", "--seeds", "2"], r"not allowed with argument"),
            (["--methods", "ce,sgd"], r"--methods: expected some of ce,kl"),
            (["--threads", "0"], r"--threads: expected an integer >= 1"),
            (["--seq-len", "1"], r"--seq-len: expected an integer >= 2"),
            (["--device", "cuda:99"], r"--device: expected a device this machine has"),
            (["--device", "tpu9"], r"--device: expected a device name"),
            (["--data", str(tmp_path / "none.txt")], r"--data: expected an existing file"),
            (["--json", str(tmp_path)], r"--json: expected a file path \(this is a folder\)"),
            (["--plot", str(afile / "p.png")], r"--plot: expected a path in a writable folder"),
            (["--from-json", str(tmp_path / "none.json")], r"--from-json: expected an existing file"),
            (["--from-json", str(afile)], r"--from-json: cannot read"),
    ):
        _fails(capsys, ["demo", "--smoke", "--no-progress"] + extra, pattern)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_bench_arguments(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _fails(capsys, ["bench", "--out", str(afile)], r"--out: expected a folder path \(this is a file\)")
    _fails(capsys, ["bench", "--op", "softmax"], r"--op: invalid choice")


def test_usage_error_is_exit_status_two_with_its_message():
    err = UsageError("--k: bad", "forgetkern cache-base")
    assert isinstance(err, SystemExit) and err.code == 2 and str(err) == "--k: bad"


def test_atomic_writes_keep_the_old_file_on_a_crash(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
    with atomic_open(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]
