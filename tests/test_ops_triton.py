"""The Triton backend against the reference: every output and every gradient, NaN-poisoned outputs.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1):
correct but slow, so the CPU cases are small. The full matrix (B up to 64, T up to 50), bf16, the
complete opcheck (with the AOT-dispatch checks that cannot trace interpreted kernels) and
torch.compile run where CUDA is present.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from harness import assert_bf16_within_2x, assert_matches_reference, case_id, make_case, random_step, rel_err
from hmlstm import HMLSTM, CellConfig, naive_cell_step
from hmlstm.backends import unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(unavailable_reason("triton", torch.device(DEVICE)) is not None,
                                reason=str(unavailable_reason("triton", torch.device(DEVICE))))


def _params(cases):
    return [pytest.param(c, id=case_id(c)) for c in cases]


# -- CPU (interpreter) and GPU: small shapes, every option ------------------------------------------------

OPTION_CASES = [
    make_case(3, 3, (16, 20, 12), boundary=bd, copy_boundary=cb, layer_norm=ln, seed=s, device=DEVICE)
    for s, (bd, cb, ln) in enumerate(itertools.product(("step", "sample", "soft"), ("hold", "recompute"),
                                                       (False, True)))
]
PATTERN_CASES = [
    make_case(3, 4, (16, 20, 12), pattern=pat, copy_boundary=cb, layer_norm=ln, seed=7, device=DEVICE)
    for pat, cb, ln in itertools.product(("all_copy", "all_flush", "alternating"), ("hold", "recompute"),
                                         (False, True))
]
SHAPE_CASES = [
    make_case(1, 1, (5, 7), input_size=3, device=DEVICE),
    make_case(1, 7, (13,), layer_norm=True, device=DEVICE),
    make_case(3, 7, (16, 20, 12), copy_boundary="recompute", device=DEVICE),
    make_case(3, 1, (5, 7), layer_norm=True, boundary="soft", device=DEVICE),
    make_case(20, 2, (70, 33), layer_norm=True, copy_boundary="recompute", device=DEVICE),  # > 1 block per dim
]


@pytest.mark.parametrize("case", _params(OPTION_CASES + PATTERN_CASES + SHAPE_CASES))
def test_matches_reference(case):
    assert_matches_reference("triton", case)


@pytest.mark.parametrize("case", _params([
    make_case(3, 3, (16, 20, 12), layer_norm=True, dtype=torch.float32, device=DEVICE),
    make_case(3, 3, (5, 7), boundary="soft", copy_boundary="recompute", dtype=torch.float32, device=DEVICE),
]))
def test_matches_reference_fp32(case):
    assert_matches_reference("triton", case)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("copy_boundary", ["hold", "recompute"])
@pytest.mark.parametrize("boundary", ["step", "sample", "soft"])
def test_step_boundary_gradients_on_copy_rows(boundary, copy_boundary, layer_norm):
    """One layer-step with FLUSH, UPDATE and COPY rows, every input's gradient, against naive_cell_step. The
    slope puts the COPY rows' boundary units inside the straight-through window, so under "recompute" their
    z gradient reaches z_{t-1} and z^{l-1} through (V h^{l+1})[4H] and (W x)[4H] (docs/spec.md, the boundary
    rule): the forced patterns of the model cases zero those rows and saturate the bias."""
    from hmlstm.ops.triton import fused_cell_step

    inputs = random_step(5, layer_norm=layer_norm, device=DEVICE)
    p, H = inputs["p"], inputs["h"].shape[1]
    copy = (inputs["z"] == 0) & (inputs["z_below"] == 0)
    s_copy = inputs["h"] @ p.U[4 * H] + p.b[4 * H]
    slope = 0.5 / s_copy[copy].abs().max()
    noise = torch.rand(inputs["h"].shape[0], generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64).to(DEVICE) if boundary == "sample" else None
    cfg = CellConfig(boundary=boundary, copy_boundary=copy_boundary, layer_norm=layer_norm)
    names = ["x", "z_below", "h", "c", "z", "h_above"]
    results = []
    for step in (naive_cell_step, fused_cell_step):
        leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in names}
        q = type(p)(*(t.detach().clone().requires_grad_(True) if t is not None else None for t in p))
        outs = step(*leaves.values(), q, slope, noise, cfg)
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(DEVICE)).sum() for t in outs)
        grads = torch.autograd.grad(loss, list(leaves.values()) + [t for t in q if t is not None])
        results.append(dict(zip(["h", "c", "z"], outs)) | {f"grad_{n}": gr for n, gr in zip(names, grads)}
                       | {f"grad_p{k}": gr for k, gr in enumerate(grads[len(names):])})
    ref, got = results
    assert bool((ref["grad_z"][copy] != 0).all()) and bool((ref["grad_z_below"][copy] != 0).all())
    bad = {k: rel_err(got[k], ref[k]) for k in ref if rel_err(got[k], ref[k]) > 1e-10}
    assert not bad, bad


def _forward(case, backend):
    model = HMLSTM(case.input_size, case.hidden_sizes, boundary=case.boundary, copy_boundary=case.copy_boundary,
                   layer_norm=case.layer_norm, backend=backend).to(device=case.x.device, dtype=case.dtype)
    model.load_state_dict(case.state_dict)
    gen = torch.Generator(device=case.x.device).manual_seed(case.seed + 1)
    with torch.no_grad():
        return model(case.x, state=case.state, slope=case.slope, generator=gen)


@pytest.mark.parametrize("case", _params([
    make_case(3, 4, (16, 20, 12), pattern=pat, boundary=bd, copy_boundary=cb, layer_norm=ln, device=DEVICE)
    for pat, bd, cb, ln in [("random", "step", "hold", False), ("random", "sample", "recompute", True),
                            ("all_copy", "step", "recompute", False), ("all_copy", "step", "hold", True),
                            ("alternating", "soft", "recompute", True), ("all_flush", "step", "hold", False)]
]))
def test_inference_matches_reference(case):
    """Without a gradient the forward takes its own path (COPY blocks do no gate work, nothing is saved)."""
    ref, got = _forward(case, "reference"), _forward(case, "triton")
    for name, r, g in [("h", ref.h, got.h), ("c", ref.c, got.c), ("z", ref.z, got.z)]:
        for layer, (a, b) in enumerate(zip(g, r)):
            assert rel_err(a, b) < 1e-10, f"{name}{layer} differs on {case.id}"


@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
def test_inference_skips_copy_rows_and_gated_off_terms(layer_norm):
    """Without a gradient, weights a step does not need are never read: poisoning them with NaN changes
    nothing. all_copy: layer 1 always UPDATEs with zb = 0 (its top-down weight is gated off), layers 2
    and 3 always COPY (none of their weights is needed under copy_boundary="hold")."""
    case = make_case(3, 4, (16, 20, 12), pattern="all_copy", layer_norm=layer_norm, device=DEVICE)
    ref = _forward(case, "reference")
    poisoned = dict(case.state_dict)
    nan_keys = ["layers.0.weight_td"] + [k for k in poisoned if k.startswith(("layers.1.", "layers.2."))]
    for k in nan_keys:
        poisoned[k] = torch.full_like(poisoned[k], float("nan"))
    case.state_dict = poisoned
    got = _forward(case, "triton")
    for a, b in zip(got.h + got.c + got.z, ref.h + ref.c + ref.z):
        assert rel_err(a, b) < 1e-10


def test_bf16_close_to_fp32():
    """bf16 inputs (fp32 accumulation inside): error vs an fp32 reference within 2x that of bf16 PyTorch."""
    case = make_case(3, 3, (16, 20, 12), pattern="alternating", layer_norm=True, dtype=torch.float32,
                     device=DEVICE)
    assert_bf16_within_2x("triton", case)


# -- the ops themselves ---------------------------------------------------------------------------------------

def _op_inputs(layer_norm: bool, copy_boundary: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    B, I, H, Ha = 3, 6, 16, 5
    G = 4 * H + 1

    def r(*shape, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * 0.5 + offset).to(DEVICE).requires_grad_()

    ln = (r(4 * H, offset=1.0), r(H, offset=1.0), r(H)) if layer_norm else (None, None, None)
    z_below = torch.tensor([1.0, 0.0, 1.0], dtype=dtype, device=DEVICE).requires_grad_()
    z = torch.tensor([0.0, 0.0, 1.0], dtype=dtype, device=DEVICE).requires_grad_()
    return [r(B, I), z_below, r(B, H), r(B, H), z, r(B, Ha), r(G, I), r(G, H), r(G, Ha), r(G), *ln,
            torch.tensor(1.3, dtype=dtype, device=DEVICE), None, "step", copy_boundary, True, True]


# The interpreter's kernels cannot be traced (wrap_triton returns them as plain callables), so the
# AOT-dispatch checks only run on a GPU.
_CPU_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _opcheck(op, args):
    kw = {} if DEVICE == "cuda" else {"test_utils": _CPU_OPCHECKS}
    torch.library.opcheck(op, args, **kw)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("copy_boundary", ["hold", "recompute"])
def test_opcheck_fwd(layer_norm, copy_boundary):
    _opcheck(torch.ops.hmlstm.triton_cell_fwd.default, _op_inputs(layer_norm, copy_boundary))


@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
def test_opcheck_bwd(layer_norm):
    args = _op_inputs(layer_norm, "recompute")
    h, c, z, pre = torch.ops.hmlstm.triton_cell_fwd(*args)
    tensors = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:15]]
    grads = [torch.randn_like(h), torch.randn_like(c), torch.randn_like(z)]
    _opcheck(torch.ops.hmlstm.triton_cell_bwd.default,
             tensors + [pre.detach()] + grads + ["step", "recompute", True])


def test_unavailable_reason_names_the_fix():
    from hmlstm.ops import triton as ops
    assert ops.unavailable_reason("cuda") is None
    assert ops.unavailable_reason("mps") is not None


# -- GPU only: the full shape matrix, bf16 everywhere, torch.compile -----------------------------------------

GPU_CASES = [
    make_case(B, T, hs, boundary=bd, copy_boundary=cb, layer_norm=ln, seed=k, device="cuda")
    if torch.cuda.is_available() else None
    for k, (B, T, hs, (bd, cb, ln)) in enumerate(itertools.product(
        (1, 3, 64), (1, 7, 50), ((48,), (40, 24), (64, 33, 20)),
        (("step", "hold", False), ("sample", "recompute", True), ("soft", "recompute", False),
         ("step", "recompute", True))))
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", _params([c for c in GPU_CASES if c is not None]) or [None])
def test_gpu_matches_reference(case):
    assert_matches_reference("triton", case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _params([
    make_case(B, T, hs, pattern=pat, layer_norm=True, boundary="soft" if pat == "random" else "step",
              dtype=torch.float32, device="cuda")
    for B, T, hs, pat in [(64, 50, (64, 33, 20), "alternating"), (64, 50, (128, 128), "all_copy"),
                          (3, 7, (40, 24), "all_flush"), (64, 7, (64, 33, 20), "random")]
] if torch.cuda.is_available() else []) or [None])
def test_gpu_bf16(case):
    assert_bf16_within_2x("triton", case)


@pytest.mark.gpu
@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
def test_compile_fullgraph_matches_eager(layer_norm):
    """torch.compile traces through the ops (triton_op + wrap_triton) without a graph break."""
    from hmlstm.ops.triton import fused_cell_step

    case = make_case(5, 1, (24, 20), layer_norm=layer_norm, copy_boundary="recompute", dtype=torch.float32,
                     device="cuda")
    model = HMLSTM(case.input_size, case.hidden_sizes, layer_norm=layer_norm, copy_boundary="recompute",
                   backend="triton").to(device="cuda", dtype=torch.float32)
    model.load_state_dict(case.state_dict)
    p, cfg = model.layers[0].params(), model.cfgs[0]
    slope = torch.tensor(case.slope, device="cuda")
    ones = torch.ones(case.B, device="cuda")

    def step(x, h, c, z, h_above):
        return fused_cell_step(x, ones, h, c, z, h_above, p, slope, None, cfg)

    args = (case.x[:, 0], case.state.h[0], case.state.c[0], case.state.z[0], case.state.h[1])
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True)(*args)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
