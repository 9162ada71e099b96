"""Every Triton kernel configuration launched at the PTB and text8 sizes compiles for sm_90 (H100/H200) in
fp32, bf16 and fp64 within an H100's shared memory (227 KB), without register spills: on the CPU, with no GPU.

benchmarks/aot_sm90.py records the launches the ops would make (their launchers run on meta tensors) and
compiles each with `triton.compile` for `GPUTarget("cuda", 90, 32)`; it runs in a subprocess without
TRITON_INTERPRET=1, which this test session sets (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import triton.backends.nvidia.compiler  # noqa: F401  (triton's CUDA backend: the compiler and ptxas)

    _NO_CUDA_BACKEND = None
except ImportError as e:
    _NO_CUDA_BACKEND = f"triton without its CUDA backend ({e})"


@pytest.mark.skipif(_NO_CUDA_BACKEND is not None, reason=str(_NO_CUDA_BACKEND))
def test_every_configuration_fits_an_h100(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "aot_sm90.py"), "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=1500)
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    bad = [r for r in records if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1, default=str)[:4000]
    assert res.returncode == 0, res.stderr[-3000:]
    # all four kernels, in all three dtypes, were compiled (and nothing was skipped silently)
    seen = {(r["kernel"], r["dtype"]) for r in records}
    kernels = {"_seq_pre_kernel", "_seq_update_kernel", "_seq_grad_kernel", "_seq_prod_kernel"}
    assert seen == {(k, d) for k in kernels for d in ("float32", "bfloat16", "float64")}
    assert all(r["shared_bytes"] <= 227 * 1024 and r["spill_stores"] == 0 for r in records)


def test_every_dot_names_its_output_dtype():
    """The GPU image's Triton (3.6) defaults tl.dot's out_dtype to float32 whatever the accumulator, so a float64
    accumulator does not compile there (measured: benchmarks/results/aot-sm90-2026-12-07-triton3.6.json); the
    Triton CI installs (3.9) infers it, so only this check keeps a new call from breaking the GPU's fp64 tests."""
    import ast
    from pathlib import Path

    calls = []
    for path in sorted(Path(ROOT, "hmlstm", "ops", "triton").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl":
                calls.append((path.name, node.lineno, {k.arg for k in node.keywords}))
    assert len(calls) >= 4, calls  # the kernels' products: forward (2) and backward (2)
    missing = [(f, line) for f, line, kw in calls if "out_dtype" not in kw]
    assert not missing, f"tl.dot without out_dtype at {missing}"
