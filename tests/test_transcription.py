"""An independent transcription of the HM-LSTM's equations against `hmlstm.reference`, in float64.

The cell below is written from the specification (docs/spec.md: eq. 1-9, the boundary rule, the layer-norm
placement), not from the reference: per-block weight slices instead of one (G, .) product, explicit branch
weights w_F, w_U, w_C, a hand-written layer norm and a straight-through step of its own, and its own time
loop over layers. Values and every gradient (input, initial state, every weight) must agree with the
reference model; that separates "the model's gradient" from "a bug in the code" when a gradient explodes.
"""

from __future__ import annotations

import pytest
import torch

from hmlstm import HMLSTM, HMLSTMState

EPS = 1e-5


class _StraightThrough(torch.autograd.Function):
    """z = [s > 0] (hard_sigm(s) > 0.5), gradient a/2 inside |a s| < 1."""

    @staticmethod
    def forward(ctx, s, a):
        ctx.save_for_backward(s, a)
        return (s > 0).to(s.dtype)

    @staticmethod
    def backward(ctx, g):
        s, a = ctx.saved_tensors
        return g * torch.where((a * s).abs() < 1, a / 2, torch.zeros_like(s)), None


def _ln(v, gain, bias):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(var + EPS) * gain + bias


def _cell(layer, x, zu, h, c, zb, h_above, a, copy_boundary, layer_norm):
    """One layer-step from the equations. x: (B, I), zu, zb: (B,), h, c: (B, H), h_above: (B, Ha) or None."""
    H = h.shape[1]
    blocks = []  # f, i, o, g, then the boundary unit: each its own slice of the three weights
    for k in range(5 if h_above is not None else 4):
        rows = slice(k * H, (k + 1) * H) if k < 4 else slice(4 * H, 4 * H + 1)
        s = h @ layer.weight_hh[rows].T  # U h, never gated (eq. 5)
        if h_above is not None:
            s = s + zb[:, None] * (h_above @ layer.weight_td[rows].T)  # top-down, gated by z_{t-1}^l (eq. 6)
        s = s + zu[:, None] * (x @ layer.weight_ih[rows].T)  # bottom-up, gated by z_t^{l-1} (eq. 7)
        blocks.append(s)
    gates = torch.cat(blocks[:4], 1)
    if layer_norm:
        gates = _ln(gates, layer.ln_gates, layer.bias[: 4 * H])
    else:
        gates = gates + layer.bias[: 4 * H]
    f, i, o = (torch.sigmoid(gates[:, k * H:(k + 1) * H]) for k in range(3))
    g = torch.tanh(gates[:, 3 * H:])
    act = (lambda v: torch.tanh(_ln(v, layer.ln_cell_weight, layer.ln_cell_bias))) if layer_norm else torch.tanh
    w_flush = zb[:, None]
    w_update = ((1 - zb) * zu)[:, None]
    w_copy = ((1 - zb) * (1 - zu))[:, None]
    c_flush, c_update = i * g, f * c + i * g
    c_new = w_flush * c_flush + w_update * c_update + w_copy * c  # eq. 2
    h_new = w_flush * (o * act(c_flush)) + w_update * (o * act(c_update)) + w_copy * h  # eq. 3
    if h_above is None:
        return h_new, c_new, None
    z_tilde = _StraightThrough.apply(blocks[4][:, 0] + layer.bias[4 * H], a)
    if copy_boundary == "recompute":
        z_new = z_tilde
    else:  # hold: 0 on COPY, z~ on UPDATE and FLUSH
        z_new = z_tilde * (w_flush + w_update)[:, 0]
    return h_new, c_new, z_new


def transcribed_forward(model: HMLSTM, x, state: HMLSTMState, a):
    """The whole stack over T steps: returns every layer's h sequence (B, T, H_l) and z sequence (B, T)."""
    L = model.num_layers
    h, c, z = list(state.h), list(state.c), list(state.z)
    hs, zs = [[] for _ in range(L)], [[] for _ in range(L - 1)]
    for t in range(x.shape[1]):
        below, z_below = x[:, t], torch.ones_like(x[:, t, 0])  # z^0 = 1
        for l, layer in enumerate(model.layers):
            top = l == L - 1
            zb = torch.zeros_like(z_below) if top else z[l]  # the top layer has no boundary: never FLUSHes
            h[l], c[l], z_new = _cell(layer, below, z_below, h[l], c[l], zb, None if top else h[l + 1], a,
                                      model.copy_boundary, model.layer_norm)
            hs[l].append(h[l])
            if not top:
                z[l] = z_new
                zs[l].append(z_new)
            below, z_below = h[l], (z_new if not top else None)
    return [torch.stack(s, 1) for s in hs], [torch.stack(s, 1) for s in zs], HMLSTMState(tuple(h), tuple(c), tuple(z))


@pytest.mark.parametrize("copy_boundary", ["hold", "recompute"])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("slope", [1.0, 3.0])
def test_transcription_agrees_with_the_reference(copy_boundary, layer_norm, slope):
    torch.manual_seed(0)
    model = HMLSTM(6, (7, 5, 4), copy_boundary=copy_boundary, layer_norm=layer_norm, backend="reference").double()
    with torch.no_grad():  # a boundary bias near 0 and larger weights: all three operations occur
        for layer in model.layers:
            for p in layer.parameters():
                p.mul_(2.5)
    B, T = 4, 12
    x = torch.randn(B, T, 6, dtype=torch.float64, requires_grad=True)
    state = model.initial_state(B)
    state = HMLSTMState(tuple(torch.randn_like(t).requires_grad_() for t in state.h),
                        tuple(torch.randn_like(t).requires_grad_() for t in state.c),
                        tuple((torch.rand_like(t) > 0.5).double().requires_grad_() for t in state.z))
    ref = model(x, state, slope=slope)
    hs, zs, final = transcribed_forward(model, x, state, torch.tensor(slope, dtype=torch.float64))
    for a, b in zip(ref.h, hs):
        torch.testing.assert_close(a, b)
    for a, b in zip(ref.z, zs):
        torch.testing.assert_close(a, b)
    ops = torch.stack(zs).detach().mean()
    assert 0 < float(ops) < 1, "the case needs both boundary values"

    g = torch.Generator().manual_seed(1)
    up = [torch.randn(h.shape, generator=g, dtype=torch.float64) for h in hs]
    up_c = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in final.c]
    inputs = [x, *state.h, *state.c, *state.z, *model.parameters()]

    def grads(h_seq, c_final):
        loss = sum((h * u).sum() for h, u in zip(h_seq, up)) + sum((c * u).sum() for c, u in zip(c_final, up_c))
        return torch.autograd.grad(loss, inputs, allow_unused=True)

    names = ["x"] + [f"h0[{k}]" for k in range(3)] + [f"c0[{k}]" for k in range(3)] + [f"z0[{k}]" for k in range(2)] \
        + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, grads(ref.h, ref.state.c), grads(hs, final.c)):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        torch.testing.assert_close(a, b, msg=lambda m: f"gradient of {name}: {m}")
