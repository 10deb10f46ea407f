"""The Triton kernels compile for an sm_90 GPU (ahead of time, no GPU), specialized as the JIT
would specialize them at LLM shapes, and the compiled code has the properties the kernels are
built for:

* the fused-linear backward's ``dh``/``dW`` reductions are fence-free vector atomics (relaxed
  ``tl.atomic_add``: no ``MEMBAR.*.GPU`` in the SASS, no fence or acquire/release atomic in the PTX);
* the TMKL forward's streaming loop reads bf16 logits with 16-byte vector loads only, and costs at
  most 29 SASS instructions per column (the H200 memory-bound budget, benchmarks/sm90_kernels.py).

``benchmarks/sm90_kernels.py --quick`` runs in a subprocess because the test session imports the
kernels in interpreter mode. (FoLoRA's kernels: tests/test_folora_compile.py.)
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from .helpers import aot_compile_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sm90")
    env = aot_compile_env(tmp)
    out = tmp / "kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sm90_kernels.py"), "--quick",
                           "--json", str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "FAILED" not in text, text[-4000:]
    records = json.loads(out.read_text())
    if any(r["reg"] is None for r in records):
        pytest.skip("cuobjdump (Triton's NVIDIA tools or the CUDA toolkit) is not available")
    return records


def _find(records, kernel, case):
    found = [r for r in records if r["kernel"] == kernel and case in r["case"]]
    assert found, f"{kernel} ({case}) was not compiled: {[(r['case'], r['kernel']) for r in records]}"
    return found


def test_every_kernel_family_compiles(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_tmkl_fwd_kernel", "_tmkl_bwd_kernel", "_sparse_tmkl_fwd_kernel",
                       "_sparse_tmkl_bwd_kernel", "_linear_tmkl_fused_fwd_kernel",
                       "_linear_tmkl_fused_bwd_kernel", "_generalized_eigh_kernel",
                       "_folora_step_kernel"}, kernels
    # CE alone (compute_kl=False) and the head trained (dW) both compiled
    assert any("no KL" in r["launch"] for r in compiled if r["kernel"] == "_linear_tmkl_fused_bwd_kernel")
    assert any("GRAD_W" in r["launch"] for r in compiled if r["kernel"] == "_linear_tmkl_fused_bwd_kernel")


def test_fused_linear_reductions_carry_no_fences(compiled):
    for r in _find(compiled, "_linear_tmkl_fused_bwd_kernel", "linear"):
        assert r["atomics"].get("128", 0) > 0, r  # 16-byte vector atomics of the dh tile
        assert r["gpu_fences"] == 0 and r["ptx_ordering"] == 0, r


def test_tmkl_forward_streams_bf16_in_16_byte_vectors(compiled):
    for r in _find(compiled, "_tmkl_fwd_kernel", "tmkl bf16"):
        assert r["loads"] and set(r["loads"]) == {"128"}, r  # only LDG.E.128 in the loop
        assert r["per_col"] is not None and r["per_col"] <= 29.0, r
        assert r["spill"] == 0, r
