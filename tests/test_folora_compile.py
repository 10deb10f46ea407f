"""FoLoRA's Triton kernels compile for an sm_90 GPU (ahead of time, no GPU needed).

The interpreter runs the kernels' numpy semantics; this checks that they also lower to PTX and
SASS (float64 ``tl.dot``, the data-dependent Jacobi ``while`` loop, int64 block tables). It runs
in a subprocess because the test session imports the kernels in interpreter mode.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from .helpers import aot_compile_env  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from forgetkern._params import (EIGH_MAX_SWEEPS, EIGH_NO_CONVERGENCE, EIGH_NON_FINITE,
                                    NUM_FOLORA_SCALARS)
    from forgetkern.ops.folora_step import _folora_step_kernel, launch_config as step_config
    from forgetkern.ops.generalized_eigh import USE_GATHER, _generalized_eigh_kernel, launch_config as eig_config

    target = GPUTarget("cuda", 90, 32)
    cases = [("*fp32", False, 16, False)] + [("*fp32", False, 16, True), ("*fp64", True, 5, True)] * USE_GATHER
    for ptr, fp64, n, gather in cases:
        cfg = eig_config(n)
        sig = {"a_ptr": ptr, "b_ptr": ptr, "w_ptr": ptr, "v_ptr": ptr, "status_ptr": "*i32",
               "sweeps_ptr": "*i32", "n": "i32", "tol2": "fp32", "BLOCK_N": "constexpr",
               "MAX_SWEEPS": "constexpr", "NON_FINITE": "constexpr", "NO_CONVERGENCE": "constexpr",
               "ACC_FP64": "constexpr", "USE_GATHER": "constexpr"}
        src = ASTSource(_generalized_eigh_kernel, sig,
                        constexprs={"BLOCK_N": cfg["BLOCK_N"], "MAX_SWEEPS": EIGH_MAX_SWEEPS,
                                    "NON_FINITE": EIGH_NON_FINITE, "NO_CONVERGENCE": EIGH_NO_CONVERGENCE,
                                    "ACC_FP64": fp64, "USE_GATHER": gather})
        k = triton.compile(src, target=target, options={"num_warps": cfg["num_warps"]})
        assert k.asm["cubin"], "no cubin"
    cfg = step_config(1 << 20)
    sig = {name: "*fp32" for name in ("g_ptr", "m_ptr", "v_ptr", "s_ptr")}
    sig.update(blk_seg_ptr="*i32", blk_start_ptr="*i64", seg_start_ptr="*i64", seg_end_ptr="*i64",
               seg_cols_ptr="*i64", seg_gate_ptr="*i64", scal_ptr="*fp32", gate_ptr="*fp32",
               BLOCK="constexpr", VEC="constexpr", NUM_SCALARS="constexpr", HAS_GATES="constexpr")
    for gates in (True, False):
        src = ASTSource(_folora_step_kernel, sig, constexprs={"BLOCK": cfg["BLOCK"], "VEC": cfg["VEC"],
                                                              "HAS_GATES": gates,
                                                              "NUM_SCALARS": NUM_FOLORA_SCALARS})
        k = triton.compile(src, target=target, options={"num_warps": cfg["num_warps"]})
        assert k.asm["cubin"], "no cubin"
    print("compiled")
    """
)


def test_kernels_compile_for_sm90(tmp_path):
    env = aot_compile_env(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
