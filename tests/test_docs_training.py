"""The plain-loop example of docs/training.md runs as written."""
import pathlib
import re

import torch

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "training.md"


def test_plain_loop_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/training.md has no python example"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "__doc_example__"})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("kl" in line for line in lines)
    assert (tmp_path / "adapters.safetensors").stat().st_size > 0
