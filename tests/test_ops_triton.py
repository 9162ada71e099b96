"""The Triton backend against the reference: every output and every gradient, NaN-poisoned outputs.

The backend runs whole sequences (hmlstm::triton_seq_fwd / triton_seq_bwd, hmlstm/ops/triton/seq_op.py).
Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1):
correct but slow, so the CPU cases are small. The full matrix (B up to 64, T up to 50), bf16, the
complete opcheck (with the AOT-dispatch checks that cannot trace interpreted kernels) and inductor's
compilation run where CUDA is present. Launch and synchronisation budgets: test_triton_launches.py; sm_90
compilation: test_triton_aot.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from harness import assert_bf16_within_2x, assert_matches_reference, case_id, make_case, rel_err
from hmlstm import HMLSTM
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
# forced patterns, each with both copy_boundary modes and both layer-norm settings, every pair of the three
# factors once (the full product, 12 cases, cost 100 s in the interpreter; the options above are the full one)
PATTERN_CASES = [
    make_case(3, 4, (16, 20, 12), pattern=pat, copy_boundary=cb, layer_norm=ln, seed=7, device=DEVICE)
    for pat, cb, ln in [("all_copy", "hold", True), ("all_copy", "recompute", False),
                        ("all_flush", "hold", False), ("all_flush", "recompute", True),
                        ("alternating", "hold", True), ("alternating", "recompute", False)]
]
SHAPE_CASES = [
    make_case(1, 1, (5, 7), input_size=3, device=DEVICE),
    make_case(1, 7, (13,), layer_norm=True, device=DEVICE),
    make_case(3, 7, (16, 20, 12), copy_boundary="recompute", device=DEVICE),
    make_case(3, 1, (5, 7), layer_norm=True, boundary="soft", device=DEVICE),
    make_case(20, 2, (40, 33), layer_norm=True, copy_boundary="recompute", device=DEVICE),  # > 1 block per dim
    make_case(3, 5, (16, 20, 12, 8), layer_norm=True, device=DEVICE),  # two layers in a phase of either parity
    make_case(3, 4, (12, 40, 9, 20), copy_boundary="recompute", boundary="sample", device=DEVICE),
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
def test_boundary_gradients_on_copy_rows(boundary, copy_boundary, layer_norm):
    """Layer 2's first step with FLUSH, UPDATE and COPY rows (every (z_{t-1}, z^{l-1}) pair, set through the
    initial state and layer 1's boundary), every output and gradient, and dL/dz (the probe), against the
    reference. The slope puts the COPY rows' boundary units inside the straight-through window, so under
    "recompute" their z gradient reaches z_{t-1} and z^{l-1} through (V h^{l+1})[4H] and (W x)[4H]
    (docs/spec.md, the boundary rule): the forced patterns of the model cases zero those rows."""
    hs = (16, 20, 12)
    case = make_case(6, 2, hs, boundary=boundary, copy_boundary=copy_boundary, layer_norm=layer_norm,
                     device=DEVICE)
    sd = dict(case.state_dict)
    row = 4 * hs[0]
    # layer 1 fires where x[:, :, 0] > 0 (and, with slope >= 1/4, saturates: |4 x| >= 2)
    for k in ("layers.0.weight_ih", "layers.0.weight_hh", "layers.0.weight_td"):
        sd[k] = sd[k].clone()
        sd[k][row] = 0.0
    sd["layers.0.weight_ih"][row, 0] = 4.0
    sd["layers.0.bias"] = sd["layers.0.bias"].clone()
    sd["layers.0.bias"][row] = 0.0
    zu = torch.tensor([1.0, 1, 0, 0, 0, 1], dtype=torch.float64, device=DEVICE)
    zb = torch.tensor([1.0, 0, 0, 1, 0, 0], dtype=torch.float64, device=DEVICE)
    x = case.x.clone()
    x[:, :, 0] = (0.5 + x[:, :, 0].abs()) * (2 * zu - 1)[:, None]
    copy = (zb == 0) & (zu == 0)
    h0 = case.state.h[1]
    s_copy = h0 @ sd["layers.1.weight_hh"][4 * hs[1]] + sd["layers.1.bias"][4 * hs[1]]
    slope = float(0.5 / s_copy[copy].abs().max())
    state = type(case.state)(case.state.h, case.state.c, (case.state.z[0], zb))
    results = []
    for backend in ("reference", "triton"):
        model = HMLSTM(case.input_size, hs, boundary=boundary, copy_boundary=copy_boundary, layer_norm=layer_norm,
                       backend=backend).to(device=DEVICE, dtype=torch.float64)
        model.load_state_dict(sd)
        leaves = [x.clone().requires_grad_(True)] + [t.clone().requires_grad_(True) for grp in state for t in grp]
        st = type(state)(tuple(leaves[1:4]), tuple(leaves[4:7]), tuple(leaves[7:]))
        probe = torch.zeros(2, 6, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
        gen = torch.Generator(device=DEVICE).manual_seed(3)
        out = model(leaves[0], state=st, slope=slope, generator=gen, probe=probe)
        outs = [*out.h, *out.c, *out.z, *out.state.h, *out.state.c, *out.state.z]
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(DEVICE)).sum() for t in outs)
        params = list(model.parameters())
        grads = torch.autograd.grad(loss, leaves + params + [probe])
        results.append({f"out{k}": t.detach() for k, t in enumerate(outs)} | {f"grad{k}": t for k, t in enumerate(grads)}
                       | {"z1": out.z[0].detach(), "dz_below": grads[-1][0, :, 0], "dz_prev": grads[len(leaves) - 1]})
    ref, got = results
    assert torch.equal(ref["z1"][:, 0], zu)  # layer 1 fired where it was set to
    # dL/dz^1_0 (the probe: layer 2's z^{l-1} at t = 0) and dL/dz0 of layer 2 (its z_{t-1} at t = 0)
    dz_below, dz_prev = ref["dz_below"], ref["dz_prev"]
    assert bool((dz_prev[copy] != 0).all()) and bool((dz_below[copy] != 0).all())
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

def _seq_args(layer_norm: bool, recompute: bool, need_grad: bool = True):
    """The arguments of hmlstm::triton_seq_fwd for a small 3-layer model with random weights and state."""
    case = make_case(3, 3, (16, 20, 12), layer_norm=layer_norm, copy_boundary="recompute" if recompute else "hold",
                     device=DEVICE)
    model = HMLSTM(case.input_size, case.hidden_sizes, layer_norm=layer_norm).double()
    model.load_state_dict(case.state_dict)
    wall = torch.cat([w.reshape(-1) for layer in model.layers for w in layer.params() if w is not None]).detach()
    req = lambda t: t.detach().clone().to(DEVICE).requires_grad_(need_grad)  # noqa: E731
    sizes = [case.input_size, *case.hidden_sizes]
    return [req(case.x), [req(t) for t in case.state.h], [req(t) for t in case.state.c],
            [req(t) for t in case.state.z], req(wall), torch.tensor(case.slope, dtype=torch.float64, device=DEVICE),
            None, None, sizes, 0, recompute, layer_norm, need_grad]


# The interpreter's kernels cannot be traced (wrap_triton returns them as plain callables), so the
# AOT-dispatch checks only run on a GPU.
_CPU_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _opcheck(op, args):
    kw = {} if DEVICE == "cuda" else {"test_utils": _CPU_OPCHECKS}
    torch.library.opcheck(op, args, **kw)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("recompute", [False, True], ids=["hold", "recompute"])
def test_opcheck_seq_fwd(layer_norm, recompute):
    _opcheck(torch.ops.hmlstm.triton_seq_fwd.default, _seq_args(layer_norm, recompute))


@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
def test_opcheck_seq_bwd(layer_norm):
    args = _seq_args(layer_norm, True)
    HS, CS, ZS, PRE = torch.ops.hmlstm.triton_seq_fwd(*args)
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(DEVICE) for t in (HS, CS, ZS)]
    x, _, _, _, wall, slope, noise = args[:7]
    _opcheck(torch.ops.hmlstm.triton_seq_bwd.default,
             [x.detach(), wall.detach(), slope, noise, HS.detach(), CS.detach(), ZS.detach(), PRE.detach(), *grads,
              args[8], 0, True, layer_norm])


def test_inference_call_refuses_backward():
    args = _seq_args(False, True, need_grad=False)
    for t in [args[0], *args[1], *args[2], *args[3], args[4]]:
        t.requires_grad_(True)
    HS, _, _, _ = torch.ops.hmlstm.triton_seq_fwd(*args)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        HS.sum().backward()


@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
def test_compile_fullgraph_whole_module(layer_norm):
    """torch.compile(fullgraph=True) of the whole module forward has no graph break. On the CPU the kernels are
    the interpreter's, which torch.compile cannot trace into, so the graph is checked with the "eager"
    backend; on a GPU inductor compiles it and the values must match eager."""
    case = make_case(3, 3, (16, 20, 12), layer_norm=layer_norm, copy_boundary="recompute", dtype=torch.float32,
                     device=DEVICE)
    model = HMLSTM(case.input_size, case.hidden_sizes, layer_norm=layer_norm, copy_boundary="recompute",
                   backend="triton").to(device=DEVICE, dtype=torch.float32)
    model.load_state_dict(case.state_dict)
    eager = model(case.x, state=case.state, slope=case.slope)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "eager")
    out = compiled(case.x, state=case.state, slope=case.slope)
    for a, b in zip(out.h + out.c + out.z, eager.h + eager.c + eager.z):
        torch.testing.assert_close(a, b)


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
