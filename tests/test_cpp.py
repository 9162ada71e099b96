"""The C++ CPU backend (hmlstm::cell_fwd / cell_bwd) against the reference: values, every gradient, op
registration (opcheck, torch.compile), the work it skips, half precision and its error messages."""

import functools
import itertools
import os
import subprocess
import sys

import pytest
import torch

from harness import assert_matches_reference, make_case, op_args as _op_args, random_step as _random_step, \
    rel_err, run_case
from hmlstm import HMLSTM, CellConfig, LayerParams, backends, naive_cell_step
from hmlstm.sequence import stepwise_forward

cpp = pytest.importorskip("hmlstm.ops.cpp")
pytestmark = pytest.mark.skipif(cpp.unavailable_reason("cpu") is not None,
                                reason=f"C++ backend unavailable: {cpp.unavailable_reason('cpu')}")

F64, F32 = torch.float64, torch.float32


def _params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


# Every boundary mode x copy_boundary x layer norm, on a 3-layer model with unequal sizes.
MODES = [make_case(3, 7, (16, 20, 12), boundary=bd, copy_boundary=cb, layer_norm=ln, seed=s)
         for s, (bd, cb, ln) in enumerate(itertools.product(("step", "sample", "soft"), ("hold", "recompute"),
                                                            (False, True)))]
# Forced boundary patterns, both copy_boundary modes, LN on and off.
PATTERNS = [make_case(5, 8, (9, 7, 5), pattern=pat, copy_boundary=cb, layer_norm=ln, seed=3)
            for pat, cb, ln in itertools.product(("all_copy", "all_flush", "alternating"), ("hold", "recompute"),
                                                 (False, True))]
# Shapes: B in {1, 3, 64}, T in {1, 7, 50}, 1 to 3 layers, sizes that are not multiples of 16.
SHAPES = [
    make_case(1, 1, (5,)),
    make_case(1, 50, (9, 11, 7), boundary="sample", copy_boundary="recompute"),
    make_case(64, 1, (33, 18), layer_norm=True),
    make_case(64, 7, (24, 17, 9), boundary="soft"),
    make_case(3, 50, (13, 6), copy_boundary="recompute", layer_norm=True),
    make_case(64, 50, (19, 23, 10), seed=5),
    make_case(64, 50, (19, 23, 10), pattern="alternating", layer_norm=True, seed=6),
]
FLOAT32 = [
    make_case(3, 7, (16, 20, 12), dtype=F32),
    make_case(64, 50, (24, 17, 9), boundary="sample", copy_boundary="recompute", layer_norm=True, dtype=F32),
    make_case(64, 7, (33, 18), boundary="soft", layer_norm=True, dtype=F32),
    make_case(5, 8, (9, 7, 5), pattern="alternating", copy_boundary="recompute", dtype=F32),
]


@pytest.mark.parametrize("case", _params(MODES + PATTERNS + SHAPES + FLOAT32))
def test_matches_reference(case):
    """Every output and every gradient (input, initial state, weights) under random upstream gradients."""
    assert_matches_reference("cpp", case)


# -- the whole-sequence autograd node (hmlstm/ops/cpp_sequence.py) ----------------------------------------

def test_training_forward_is_one_sequence_node_and_inference_is_per_step():
    model = HMLSTM(5, (6, 4), backend="cpp").to(F64)
    x = torch.randn(2, 3, 5, dtype=F64)
    assert type(model(x).h[-1].grad_fn).__name__ == "FusedSequenceBackward"
    with torch.no_grad():
        assert model(x).h[-1].grad_fn is None


@pytest.mark.parametrize("case", _params([MODES[11], SHAPES[1], PATTERNS[5]]))
def test_per_step_autograd_matches_reference(case, monkeypatch):
    """The per-step op's own autograd (the path torch.compile traces), without the sequence node."""
    monkeypatch.setattr(cpp, "sequence_forward", functools.partial(stepwise_forward, cpp.fused_cell_step))
    assert_matches_reference("cpp", case)


@pytest.mark.parametrize("case", _params([MODES[0], MODES[11], PATTERNS[4]]))
def test_weight_gradients_over_many_chunks(case, monkeypatch):
    """Weight-gradient GEMMs flushed every one to three steps give the same gradients."""
    from hmlstm.ops import cpp_sequence

    monkeypatch.setattr(cpp_sequence, "CHUNK_ROWS", 7)
    assert_matches_reference("cpp", case)


needs_packing = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                                   or not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_packing
@pytest.mark.parametrize("has_boundary", [True, False], ids=["z", "top"])
def test_packed_weights_give_the_plain_products(has_boundary):
    """cell_fwd / cell_bwd with oneDNN-packed weights (float32) equal the same ops with plain GEMMs."""
    from hmlstm.ops.cpp_sequence import _pack

    args = _op_args(F32, has_boundary, True, 0, True, False)
    p = LayerParams(*args[6:13])
    fwd_packed, bwd_packed = _pack([p], 6, False)[0], _pack([p], 6, True)[0]
    assert (fwd_packed[2] is None) == (not has_boundary)  # no top-down weight on the top layer
    plain = torch.ops.hmlstm.cell_fwd(*args[:15], 0, True, True, True, [], False)
    packed = torch.ops.hmlstm.cell_fwd(*args[:15], 0, True, True, True, fwd_packed, False)
    for a, b in zip(packed, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if has_boundary:  # the forward takes the 4H gate rows packed, not the whole (4H + 1)-row weight
        whole = [torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 6) for w in (p.W, p.U, p.V)]
        with pytest.raises(RuntimeError, match="packed weights must hold the 28 gate rows"):
            torch.ops.hmlstm.cell_fwd(*args[:15], 0, True, True, True, whole, False)
    h, c, z, pre = plain
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(t.shape, generator=g) for t in (h, c, z)]
    mask = [a is not None for a in args[:13]]
    mask[6:9] = [False, False, False]
    outs = [torch.ops.hmlstm.cell_bwd(*grads, *args[:15], pre, 0, True, True, mask, True, pk, False)
            for pk in ([], bwd_packed)]
    for a, b in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _seq_args(dtype, mode, recompute, layer_norm, packed, seed=0, B=6, T=5, I=4, sizes=(9, 7, 5)):
    """Random inputs of hmlstm::seq_fwd (x time first) with boundaries that mix COPY, UPDATE and FLUSH rows."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    L = len(sizes)
    params = []
    for l, H in enumerate(sizes):
        G = 4 * H + int(l < L - 1)
        below, above = (I if l == 0 else sizes[l - 1]), (sizes[l + 1] if l < L - 1 else 0)
        ln = (rnd(4 * H), rnd(H), rnd(H)) if layer_norm else (None, None, None)
        params.append(LayerParams(rnd(G, below), rnd(G, H), rnd(G, above), rnd(G), *ln))
    h0, c0 = [rnd(B, H) for H in sizes], [rnd(B, H) for H in sizes]
    z0 = [(torch.rand(B, generator=g) < 0.5).to(dtype) for _ in sizes[:-1]]
    noise = torch.rand(T, L - 1, B, generator=g, dtype=dtype) if mode == 1 else None
    pk = []
    if packed:
        from hmlstm.ops.cpp_sequence import _pack
        pk = [w for layer in _pack(params, B, False) for w in layer]
    fields = [[p[k] for p in params] for k in range(len(LayerParams._fields))]
    slope = torch.tensor(1.5, dtype=dtype)
    return [rnd(T, B, I), h0, c0, z0, *fields, slope, noise, mode, recompute], pk, params


SEQ = [pytest.param(dt, mode, rc, ln, pk, id=f"{str(dt)[6:]}-mode{mode}-{'recompute' if rc else 'hold'}"
                    f"-{'ln' if ln else 'noln'}{'-packed' if pk else ''}")
       for dt, mode, rc, ln, pk in [(F64, 0, False, False, False), (F64, 1, True, True, False),
                                    (F64, 2, False, True, False), (F32, 0, True, False, True),
                                    (F32, 1, False, True, True)]]


@pytest.mark.parametrize("dtype,mode,recompute,layer_norm,packed", SEQ)
@pytest.mark.parametrize("save", [True, False], ids=["save", "nosave"])
def test_seq_fwd_equals_the_per_step_op(dtype, mode, recompute, layer_norm, packed, save):
    """hmlstm::seq_fwd's buffers hold exactly what cell_fwd gives step by step (NaN-poisoned outputs)."""
    args, pk, params = _seq_args(dtype, mode, recompute, layer_norm, packed)
    x, h0, c0, z0 = args[:4]
    slope, noise = args[11], args[12]
    hs, cs, zs, pres = torch.ops.hmlstm.seq_fwd(*args, save, save, pk, True)
    T, B, _ = x.shape
    L = len(h0)
    h, c, z = list(h0), list(c0), list(z0) + [x.new_zeros(B)]
    for l in range(L):  # slot 0: the initial state
        assert torch.equal(hs[l][0], h0[l]) and torch.equal(cs[l][0], c0[l])
        if l < L - 1:
            assert torch.equal(zs[l][0], z0[l])
    for t in range(T):
        below, z_below = x[t], x.new_ones(B)
        for l, p in enumerate(params):
            top = l == L - 1
            n = noise[t, l] if (noise is not None and not top) else None
            outs = torch.ops.hmlstm.cell_fwd(below, z_below, h[l], c[l], z[l], x.new_zeros(B, 0) if top else h[l + 1],
                                             *p, slope, n, mode, recompute, save, save, pk[3 * l:3 * l + 3], True)
            h[l], c[l] = outs[0], outs[1]
            assert torch.equal(hs[l][t + 1], h[l]) and torch.equal(cs[l][t + 1], c[l]), (t, l)
            if not top:
                z[l] = outs[2]
                assert torch.equal(zs[l][t + 1], z[l]), (t, l)
            if save:
                assert torch.equal(pres[l][t], outs[3]), (t, l)
            else:
                assert pres[l].numel() == 0
            below, z_below = h[l], (z[l] if not top else x.new_ones(B))
    assert not any(torch.isnan(t).any() for t in (*hs, *cs, *zs, *(pres if save else [])))


@pytest.mark.parametrize("dtype,mode,recompute,layer_norm,packed", [p for p in SEQ if not p.values[4]])
def test_opcheck_seq_fwd(dtype, mode, recompute, layer_norm, packed):
    args, _, _ = _seq_args(dtype, mode, recompute, layer_norm, False, B=3, T=2)
    for save in (True, False):
        torch.library.opcheck(torch.ops.hmlstm.seq_fwd.default, (*args, save, save, [], False))


@pytest.mark.parametrize("dtype,mode,recompute,layer_norm,packed", [p for p in SEQ if not p.values[4]])
def test_opcheck_seq_bwd(dtype, mode, recompute, layer_norm, packed):
    args, _, params = _seq_args(dtype, mode, recompute, layer_norm, False, B=3, T=2)
    x = args[0]
    hs, cs, zs, pres = torch.ops.hmlstm.seq_fwd(*args, True, True, [], False)
    g = torch.Generator().manual_seed(1)
    rnd = lambda t: torch.randn(t.shape, generator=g, dtype=dtype)  # noqa: E731
    L = len(hs)
    grads = ([rnd(h[1:]) for h in hs], [None] * L, [rnd(z[1:]) for z in zs],
             [rnd(h[0]) for h in hs], [rnd(c[0]) for c in cs], [rnd(z[0]) for z in zs])
    for needs in ([1] * (1 + 3 * L - 1 + 7 * L), [0] * (1 + 3 * L - 1) + [1, 0, 1, 0, 1, 0, 1] * L):
        torch.library.opcheck(torch.ops.hmlstm.seq_bwd.default,
                              (*grads, x, hs, cs, zs, pres, *args[4:11], args[11], args[12], mode, recompute, True,
                               needs, [], 4, False))


def test_seq_fwd_names_the_bad_argument():
    args, _, _ = _seq_args(F64, 1, False, False, False)
    with pytest.raises(RuntimeError, match=r"packed must be \[\] or 3 per layer"):
        torch.ops.hmlstm.seq_fwd(*args, True, True, [None] * 4, False)
    bad = list(args)
    bad[12] = args[12][:, :1]
    with pytest.raises(RuntimeError, match=r"noise of shape \(T, L - 1, B\) = \(5, 2, 6\)"):
        torch.ops.hmlstm.seq_fwd(*bad, True, True, [], False)
    bad = list(args)
    bad[1] = [args[1][0][:2], *args[1][1:]]
    with pytest.raises(RuntimeError, match=r"h0\[0\] and c0\[0\] must be \(B, H\) with B = 6"):
        torch.ops.hmlstm.seq_fwd(*bad, True, True, [], False)
    bad = list(args)
    bad[3] = args[3][:1]
    with pytest.raises(RuntimeError, match="z0 must have L - 1 = 2 entries"):
        torch.ops.hmlstm.seq_fwd(*bad, True, True, [], False)
    hs, cs, zs, pres = torch.ops.hmlstm.seq_fwd(*args, True, True, [], False)
    finals = ([h[-1] for h in hs], [c[-1] for c in cs], [z[-1] for z in zs])
    with pytest.raises(RuntimeError, match=r"needs must hold 1 \+ \(3L - 1\) \+ 7L = 30 flags"):
        torch.ops.hmlstm.seq_bwd([None] * 3, [None] * 3, [None] * 2, *finals, args[0], hs, cs, zs, pres,
                                 *args[4:13], 1, False, True, [1] * 29, [], 64, False)


def test_second_backward_through_a_retained_graph_gives_the_same_gradients():
    """The sequence backward leaves what the forward saved intact (retain_graph=True, e.g. two losses)."""
    case = make_case(3, 6, (8, 6, 5), layer_norm=True, seed=4)
    model = HMLSTM(case.input_size, case.hidden_sizes, layer_norm=True, backend="cpp").to(F64)
    out = model(case.x, state=case.state, slope=case.slope)
    loss = sum((h * torch.randn_like(h)).sum() for h in out.h)
    first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_sequence_outputs_are_views_that_refuse_in_place_edits():
    """The (B, T, H) outputs are views of the buffers the backward reads (as nn.LSTM's batch_first output is a
    view); editing one in place would corrupt the gradient, so autograd refuses it."""
    model = HMLSTM(5, (6, 4), backend="cpp").to(F64)
    out = model(torch.randn(2, 3, 5, dtype=F64))
    assert out.h[0].shape == (2, 3, 6) and not out.h[0].is_contiguous()
    with pytest.raises(RuntimeError, match="modified inplace"):
        out.h[0].add_(1.0)


@pytest.mark.parametrize("case", _params([FLOAT32[1]]))
def test_sequence_without_packed_weights(case, monkeypatch):
    from hmlstm.ops import cpp_sequence

    monkeypatch.setattr(cpp_sequence, "USE_PACKED_WEIGHTS", False)
    assert_matches_reference("cpp", case)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_baseline_row_kernels_match_the_reference(dtype, tmp_path):
    """HMLSTM_CPU_ISA=base forces the row kernels built without AVX2 (csrc/cell_rows.h; on an AVX2 + FMA CPU
    the other build runs by default): every output and gradient still matches the reference, in a fresh
    process since the choice is made once per process."""
    prog = f"""
import sys, torch
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
from harness import make_case, run_case
case = make_case(64, 20, (24, 17, 9), boundary="sample", copy_boundary="recompute", layer_norm=True, seed=7,
                 dtype={dtype})
torch.save(run_case(case, "cpp"), {str(tmp_path / "base.pt")!r})
"""
    env = {**os.environ, "HMLSTM_CPU_ISA": "base"}
    subprocess.run([sys.executable, "-c", prog], check=True, env=env)
    base = torch.load(tmp_path / "base.pt")
    case = make_case(64, 20, (24, 17, 9), boundary="sample", copy_boundary="recompute", layer_norm=True, seed=7,
                     dtype=dtype)
    ref, default = run_case(case, "reference"), run_case(case, "cpp")
    tol = 1e-10 if dtype == F64 else 1e-4  # assert_matches_reference's
    for k in ref:
        assert rel_err(base[k], ref[k]) < tol, k
        assert rel_err(base[k], default[k]) < tol, k


def test_float32_nonlinearities_propagate_nan_and_saturate():
    """The float32 kernels' own exp (csrc/cell_cpu.cpp) keeps NaN a NaN and saturates, as libm does."""
    model = HMLSTM(3, (4, 2), backend="cpp")
    x = torch.tensor([[[0.0, 1.0, -1.0], [float("nan"), 0.0, 0.0]]])
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out.h[0][0, 0]).all() and torch.isnan(out.h[0][0, 1]).all()
        big = model(torch.full((1, 2, 3), 1e30))  # gates saturate at 0 / 1, h stays in [-1, 1]
    assert torch.isfinite(big.h[0]).all() and big.h[0].abs().max() <= 1


def test_compiled_model_with_gradients_matches_eager():
    """Under torch.compile the model runs the per-step ops (traceable) and matches eager training."""
    case = make_case(3, 3, (6, 5), layer_norm=True, copy_boundary="recompute", dtype=F32)
    model = HMLSTM(case.input_size, case.hidden_sizes, layer_norm=True, copy_boundary="recompute", backend="cpp")
    model.load_state_dict(case.state_dict)

    def loss_and_grads(fn):
        loss = fn(case.x).h[-1].square().sum()
        return [loss.detach(), *torch.autograd.grad(loss, list(model.parameters()))]

    eager = loss_and_grads(model)
    torch._dynamo.reset()
    compiled = loss_and_grads(torch.compile(model, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- one layer-step with only some inputs requiring grad (the paths that skip gradient work) ------------

def _grads_of(step, inputs, names, cfg, seed=1):
    inputs = {k: v for k, v in inputs.items()}
    leaves = {}
    for n in names:
        if n.startswith("p."):
            field = n[2:]
            t = getattr(inputs["p"], field).detach().requires_grad_(True)
            inputs["p"] = inputs["p"]._replace(**{field: t})
        else:
            t = inputs[n].detach().requires_grad_(True)
            inputs[n] = t
        leaves[n] = t
    out = step(**inputs, cfg=cfg)
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in out if t is not None)
    return [t.detach() for t in out if t is not None], torch.autograd.grad(loss, list(leaves.values()))


@pytest.mark.parametrize("names", [("p.W", "p.U", "p.V", "p.b"), ("x", "h"), ("h_above", "c"), ("z",), ("z_below",),
                                   ("x", "z", "p.ln_gates", "p.ln_cell_w", "p.ln_cell_b")],
                         ids=lambda n: "+".join(n))
@pytest.mark.parametrize("copy_boundary", ["hold", "recompute"])
def test_partial_requires_grad(names, copy_boundary):
    """Gradients when only some inputs require grad (COPY rows then skip the recurrent product)."""
    cfg = CellConfig(copy_boundary=copy_boundary, layer_norm=True)
    inputs = _random_step(7, layer_norm=True)
    ref_out, ref_grads = _grads_of(naive_cell_step, inputs, names, cfg)
    out, grads = _grads_of(cpp.fused_cell_step, inputs, names, cfg)
    for a, b in zip(out + list(grads), ref_out + list(ref_grads)):
        assert rel_err(a, b) < 1e-12


def test_top_layer_returns_no_z():
    inputs = _random_step(2, has_boundary=False)
    h, c, z = cpp.fused_cell_step(**inputs, cfg=CellConfig(has_boundary=False))
    rh, rc, _ = naive_cell_step(**inputs, cfg=CellConfig(has_boundary=False))
    assert z is None and rel_err(h, rh) < 1e-12 and rel_err(c, rc) < 1e-12


def test_no_grad_copy_rows_are_copied_and_nothing_is_saved():
    """With no gradient required a COPY row is a pure copy, and the op saves no pre-activations."""
    inputs = _random_step(4)
    inputs["z"] = torch.zeros(6, dtype=F64)
    inputs["z_below"] = torch.tensor([0.0, 0, 0, 1, 0, 0], dtype=F64)
    p = inputs["p"]
    with torch.no_grad():
        h, c, z, pre = torch.ops.hmlstm.cell_fwd(
            inputs["x"], inputs["z_below"], inputs["h"], inputs["c"], inputs["z"], inputs["h_above"], p.W, p.U, p.V,
            p.b, None, None, None, inputs["slope"], None, 0, False, False, False, [], True)
    copy = inputs["z_below"] == 0
    assert torch.equal(h[copy], inputs["h"][copy]) and torch.equal(c[copy], inputs["c"][copy])
    assert torch.equal(z[copy], torch.zeros(int(copy.sum()), dtype=F64))
    assert pre.numel() == 0 and not torch.isnan(h).any()


def test_all_copy_layer_passes_state_through_exactly():
    case = make_case(4, 6, (8, 6, 5), pattern="all_copy")
    model = HMLSTM(case.input_size, case.hidden_sizes, backend="cpp").to(F64)
    model.load_state_dict(case.state_dict)
    with torch.no_grad():
        out = model(case.x, state=case.state, slope=case.slope)
    for layer in (1, 2):  # layers above the first COPY at every step
        assert torch.equal(out.h[layer], case.state.h[layer][:, None].expand_as(out.h[layer]))
        assert torch.equal(out.c[layer], case.state.c[layer][:, None].expand_as(out.c[layer]))


# -- op registration ------------------------------------------------------------------------------

OPCHECK = [pytest.param(dt, hb, ln, mode, rc, id=f"{str(dt)[6:]}-{'z' if hb else 'top'}-{'ln' if ln else 'noln'}"
                        f"-mode{mode}-{'recompute' if rc else 'hold'}")
           for dt, hb, ln, mode, rc in [(F64, True, False, 0, False), (F64, True, True, 1, True),
                                        (F64, False, False, 0, False), (F32, True, True, 2, True),
                                        (F32, False, True, 0, False)]]


@pytest.mark.parametrize("dtype,has_boundary,layer_norm,mode,recompute", OPCHECK)
def test_opcheck_cell_fwd(dtype, has_boundary, layer_norm, mode, recompute):
    for requires_grad in (True, False):
        args = _op_args(dtype, has_boundary, layer_norm, mode, recompute, requires_grad)
        torch.library.opcheck(torch.ops.hmlstm.cell_fwd.default, tuple(args))


@pytest.mark.parametrize("dtype,has_boundary,layer_norm,mode,recompute", OPCHECK)
def test_opcheck_cell_bwd(dtype, has_boundary, layer_norm, mode, recompute):
    args = _op_args(dtype, has_boundary, layer_norm, mode, recompute, False)
    h, c, z, pre = torch.ops.hmlstm.cell_fwd(*args[:15], mode, recompute, True, True, [], False)
    grads = [torch.randn_like(h), torch.randn_like(c), torch.randn_like(z)]
    mask = [a is not None for a in args[:13]]
    torch.library.opcheck(torch.ops.hmlstm.cell_bwd.default,
                          (*grads, *args[:15], pre, mode, recompute, True, mask, False, [], False))
    # the variant that also returns ds and ds_copy (the sequence backward's weight-gradient input)
    mask[6:9] = [False, False, False]
    torch.library.opcheck(torch.ops.hmlstm.cell_bwd.default,
                          (*grads, *args[:15], pre, mode, recompute, True, mask, True, [], False))


def test_compile_fullgraph_matches_eager():
    inputs = _random_step(5, layer_norm=True, dtype=F32)
    cfg = CellConfig(layer_norm=True, copy_boundary="recompute")

    def two_steps(x, z_below, h, c, z, h_above, p, slope, noise):
        h1, c1, z1 = cpp.fused_cell_step(x, z_below, h, c, z, h_above, p, slope, noise, cfg)
        return cpp.fused_cell_step(x, z_below, h1, c1, z1, h_above, p, slope, noise, cfg)

    eager = two_steps(**inputs)
    torch._dynamo.reset()
    compiled = torch.compile(two_steps, fullgraph=True)(**inputs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_coexists_with_python_ops_in_the_namespace():
    """The C++ TORCH_LIBRARY(hmlstm) and a Python FRAGMENT (the Triton backend's) load in either order."""
    prog = """
import torch
@torch.library.custom_op("hmlstm::triton_probe", mutates_args=())
def probe(x: torch.Tensor) -> torch.Tensor:
    return x.clone()
import hmlstm.ops.cpp
assert torch.ops.hmlstm.triton_probe(torch.ones(2)).sum() == 2 and hasattr(torch.ops.hmlstm, "cell_fwd")
"""
    subprocess.run([sys.executable, "-c", prog], check=True)


# -- precision ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_within_twice_the_reference_error(dtype):
    """bf16/fp16 inputs: the fused op (fp32 accumulation, fp32 cell) is at least as close to the fp32
    reference as the reference itself run in that dtype, up to a factor 2 (flash-attention's rule)."""
    case = make_case(8, 6, (24, 16), dtype=F32, pattern="alternating")
    exact = run_case(case, "reference")
    ours = run_case(case, "cpp", dtype=dtype)
    theirs = run_case(case, "reference", dtype=dtype)
    for k in exact:
        if k.startswith(("z", "final_z", "grad_state")):
            continue  # boundary values are discrete; a rounding flip moves them by 1 in either run
        assert rel_err(ours[k], exact[k]) <= 2 * rel_err(theirs[k], exact[k]) + 1e-3, k
    assert ours["c0"].dtype == F32 and ours["h0"].dtype == dtype


# -- errors ---------------------------------------------------------------------------------------

def test_unavailable_build_names_the_install_command(monkeypatch):
    from hmlstm.ops import extension

    monkeypatch.setattr(extension, "IMPORT_ERROR", ImportError("No module named 'hmlstm._C'"))
    reason = cpp.unavailable_reason("cpu")
    assert "pip install torch==2.13.0 && pip install --no-build-isolation -e ." in reason
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        backends.resolve("cpp", torch.device("cpu"))


def test_gpu_device_is_refused_with_the_alternative():
    assert "CPU only" in cpp.unavailable_reason("cuda")
    with pytest.raises(RuntimeError, match="backend='triton'"):
        backends.resolve("cpp", torch.device("cuda"))


def test_kernel_rejects_mixed_dtypes():
    args = _op_args(F64, True, False, 0, False, False)
    args[0] = args[0].float()
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.hmlstm.cell_fwd(*args)
