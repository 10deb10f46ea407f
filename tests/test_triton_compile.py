"""The TMKL and fused-linear TMKL Triton kernels compile for an sm_90 GPU (ahead of time, no GPU).

The interpreter runs the kernels' numpy semantics and accepts programs the GPU compiler rejects;
``benchmarks/sm90_kernels.py --quick`` lowers each kernel family to SASS with the launchers' own
tile sizes. It runs in a subprocess because the test session imports the kernels in interpreter
mode. (FoLoRA's kernels: tests/test_folora_compile.py.)
"""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from .helpers import aot_compile_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_tmkl_kernels_compile_for_sm90(tmp_path):
    env = aot_compile_env(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sm90_kernels.py"), "--quick"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "FAILED" not in out and "compiled " in proc.stdout, out[-4000:]
    # every configuration the quick set names was compiled: tmkl fwd/bwd, linear fwd/bwd/bwd+dW
    # with pointer and TMA operand loads
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("tmkl", "linear"))]
    assert len(lines) == 16 and sum(" TMA" in ln for ln in lines) == 6, lines
