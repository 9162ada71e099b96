"""The CUDA backend (csrc/cell_cuda.cu behind hmlstm::cell_fwd / cell_bwd) against the reference.

Everything but the error messages needs a GPU and skips without one. On a CUDA machine the kernels must
have been built: a build that silently fell back to the CPU kernels fails `test_kernels_are_built`.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from harness import (assert_bf16_within_2x, assert_matches_reference, case_id, make_case, op_args, random_step,
                     rel_err)
from hmlstm import HMLSTM, CellConfig, backends, naive_cell_step

cuda_backend = pytest.importorskip("hmlstm.ops.cuda")
F64, F32 = torch.float64, torch.float32
GPU = torch.cuda.is_available()


def _params(cases):
    return [pytest.param(c, id=case_id(c)) for c in cases] or [None]


def test_unavailable_reason_names_the_fix():
    assert "CUDA devices only" in cuda_backend.unavailable_reason("cpu")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available on device cpu"):
        backends.resolve("cuda", torch.device("cpu"))
    reason = cuda_backend.unavailable_reason("cuda")
    if not cuda_backend.has_cuda_kernels():  # e.g. CI: a CPU-only torch
        assert "pip install --no-build-isolation --no-deps -e ." in reason
    elif GPU:
        assert reason is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine: nothing to compile the .cu with")
def test_cuda_source_compiles(tmp_path):
    """csrc/cell_cuda.cu compiles for sm_90 against this torch's headers, also on a machine without a GPU
    (and with a CPU-only torch, whose headers lack one generated CMake file: an empty stand-in is given)."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    src = Path(__file__).resolve().parents[1] / "csrc" / "cell_cuda.cu"
    cmd = ["nvcc", "-c", str(src), "-o", str(tmp_path / "cell_cuda.o"), "-std=c++17", "--expt-relaxed-constexpr",
           "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC", "-diag-suppress", "3306",
           *(f"-I{p}" for p in include_paths()), f"-I{tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "cell_cuda.o").stat().st_size > 0


@pytest.mark.gpu
def test_kernels_are_built():
    """On a CUDA machine the install must build the CUDA kernels (setup.py falls back to the CPU kernels
    only when their compile fails, which this catches), and `auto` must pick them."""
    assert cuda_backend.unavailable_reason("cuda") is None
    assert backends.resolve("auto", torch.device("cuda")) == "cuda"


# The shape matrix of the fused backends' tests: B in {1, 3, 64}, T in {1, 7, 50}, 1 to 3 layers with unequal sizes that
# are not multiples of 16; every boundary mode, both copy_boundary modes, LN on and off.
MATRIX = [
    make_case(B, T, hs, boundary=bd, copy_boundary=cb, layer_norm=ln, seed=k, device="cuda")
    for k, (B, T, hs, (bd, cb, ln)) in enumerate(itertools.product(
        (1, 3, 64), (1, 7, 50), ((13,), (40, 23), (33, 18, 9)),
        (("step", "hold", False), ("sample", "recompute", True), ("soft", "hold", True),
         ("step", "recompute", False))))
] if GPU else []
PATTERNS = [
    make_case(5, 8, (9, 7, 5), pattern=pat, copy_boundary=cb, layer_norm=ln, seed=3, device="cuda")
    for pat, cb, ln in itertools.product(("all_copy", "all_flush", "alternating"), ("hold", "recompute"),
                                         (False, True))
] if GPU else []
FLOAT32 = [
    make_case(64, 50, (24, 17, 9), boundary="sample", copy_boundary="recompute", layer_norm=True, dtype=F32,
              device="cuda"),
    make_case(64, 7, (33, 18), boundary="soft", layer_norm=True, dtype=F32, device="cuda"),
    make_case(5, 8, (9, 7, 5), pattern="alternating", copy_boundary="recompute", dtype=F32, device="cuda"),
    make_case(64, 20, (300, 257), layer_norm=True, dtype=F32, device="cuda"),  # H > one block of threads
] if GPU else []


@pytest.mark.gpu
@pytest.mark.parametrize("case", _params(MATRIX + PATTERNS + FLOAT32))
def test_matches_reference(case):
    """Every output and every gradient (input, initial state, weights) under random upstream gradients;
    fused outputs are NaN-poisoned before each run (HMLSTM_POISON_OUTPUTS, tests/conftest.py)."""
    assert_matches_reference("cuda", case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _params([
    make_case(64, 20, (40, 23, 9), pattern=pat, boundary=bd, copy_boundary=cb, layer_norm=ln, device="cuda")
    for pat, bd, cb, ln in [("random", "step", "hold", False), ("random", "sample", "recompute", True),
                            ("all_copy", "step", "recompute", False), ("alternating", "soft", "recompute", True)]
] if GPU else []))
def test_inference_matches_reference(case):
    """Without a gradient the forward saves nothing and COPY rows take no products."""
    outs = []
    for backend in ("reference", "cuda"):
        model = HMLSTM(case.input_size, case.hidden_sizes, boundary=case.boundary,
                       copy_boundary=case.copy_boundary, layer_norm=case.layer_norm,
                       backend=backend).to(device="cuda", dtype=case.dtype)
        model.load_state_dict(case.state_dict)
        gen = torch.Generator(device="cuda").manual_seed(case.seed + 1)
        with torch.no_grad():
            outs.append(model(case.x, state=case.state, slope=case.slope, generator=gen))
    ref, got = outs
    for a, b in zip(got.h + got.c + got.z, ref.h + ref.c + ref.z):
        assert rel_err(a, b) < 1e-10


@pytest.mark.gpu
def test_step_matches_the_reference_step():
    """One layer-step with FLUSH, UPDATE and COPY rows, every input's gradient, against naive_cell_step."""
    inputs = random_step(7, layer_norm=True, device="cuda")
    cfg = CellConfig(layer_norm=True, copy_boundary="recompute")
    names = ["x", "z_below", "h", "c", "z", "h_above"]
    outs, grads = [], []
    for step in (naive_cell_step, cuda_backend.fused_cell_step):
        leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
        p = type(inputs["p"])(*(t.detach().clone().requires_grad_(True) if t is not None else None
                                for t in inputs["p"]))
        h, c, z = step(leaves["x"], leaves["z_below"], leaves["h"], leaves["c"], leaves["z"], leaves["h_above"], p,
                       inputs["slope"], None, cfg)
        g = torch.Generator(device="cuda").manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g, device="cuda", dtype=t.dtype)).sum() for t in (h, c, z))
        wrt = list(leaves.values()) + [t for t in p if t is not None]
        outs.append((h, c, z))
        grads.append(torch.autograd.grad(loss, wrt))
    for a, b in zip(list(outs[1]) + list(grads[1]), list(outs[0]) + list(grads[0])):
        assert rel_err(a, b) < 1e-12


OPCHECK = [pytest.param(dt, hb, ln, mode, rc, id=f"{str(dt)[6:]}-{'z' if hb else 'top'}-{'ln' if ln else 'noln'}"
                        f"-mode{mode}-{'recompute' if rc else 'hold'}")
           for dt, hb, ln, mode, rc in [(F64, True, False, 0, False), (F64, True, True, 1, True),
                                        (F64, False, False, 0, False), (F32, True, True, 2, True)]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,has_boundary,layer_norm,mode,recompute", OPCHECK)
def test_opcheck(dtype, has_boundary, layer_norm, mode, recompute):
    for requires_grad in (True, False):
        args = op_args(dtype, has_boundary, layer_norm, mode, recompute, requires_grad, device="cuda")
        torch.library.opcheck(torch.ops.hmlstm.cell_fwd.default, tuple(args))
    args = op_args(dtype, has_boundary, layer_norm, mode, recompute, False, device="cuda")
    h, c, z, pre = torch.ops.hmlstm.cell_fwd(*args[:15], mode, recompute, True, True, [], False)
    grads = [torch.randn_like(h), torch.randn_like(c), torch.randn_like(z)]
    mask = [a is not None for a in args[:13]]
    for return_ds in (False, True):
        torch.library.opcheck(torch.ops.hmlstm.cell_bwd.default,
                              (*grads, *args[:15], pre, mode, recompute, True, mask, return_ds, [], False))


@pytest.mark.gpu
def test_compile_fullgraph_matches_eager():
    case = make_case(5, 6, (24, 20), layer_norm=True, copy_boundary="recompute", dtype=F32, device="cuda")
    model = HMLSTM(case.input_size, case.hidden_sizes, layer_norm=True, copy_boundary="recompute",
                   backend="cuda").to(device="cuda", dtype=F32)
    model.load_state_dict(case.state_dict)
    eager = model(case.x, state=case.state, slope=case.slope)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)(case.x, state=case.state, slope=case.slope)
    for a, b in zip(compiled.h + compiled.c + compiled.z, eager.h + eager.c + eager.z):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _params([
    make_case(B, T, hs, pattern=pat, layer_norm=True, boundary="soft" if pat == "random" else "step",
              dtype=F32, device="cuda")
    for B, T, hs, pat in [(64, 50, (64, 33, 20), "alternating"), (64, 50, (128, 128), "all_copy"),
                          (3, 7, (40, 24), "all_flush"), (64, 7, (64, 33, 20), "random")]
] if GPU else []))
def test_bf16_within_2x_of_torch(case):
    assert_bf16_within_2x("cuda", case)
