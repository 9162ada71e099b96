"""The C++ backend over a whole sequence: one autograd node for T steps of L layers.

Why: autograd over per-step ops forms each weight gradient as T products (G, B) @ (B, K) whose inner
dimension is only the batch, and adds them up one by one. At the paper's PTB size on 2 CPU cores that was
half of the training step (39 GFLOP/s, where one product with the same FLOPs runs at 180). Here the
backward runs the reverse time loop itself: `hmlstm::cell_bwd` gives the data gradients and `ds`, the
gradient of the step's pre-activation, and each weight gradient is one GEMM over the gated rows of many
steps (PAPER.md's dense straight-through gradient, as in `hmlstm.reference`):

    dU = sum_t ds_t^T h_{t-1}^l                    over the active rows (not COPY)
    dV = sum_t (z_{t-1}^l ds_t)^T h_{t-1}^{l+1}     over the rows with z_{t-1}^l != 0
    dW = sum_t (z_t^{l-1} ds_t)^T h_t^{l-1}         over the rows with z_t^{l-1} != 0

gathered in chunks of at most CHUNK_ROWS rows, so that memory stays bounded on long sequences.
The forward is `hmlstm::seq_fwd`: the loop of `hmlstm.sequence.stepwise_forward` in C++, over `hmlstm::cell_fwd`'s
kernels, into (T + 1, B, .) buffers that the backward reads its step inputs from.

In float32, the weights are reordered once per sequence into oneDNN's packed layout (and their transposes
once per backward), and every per-step product uses them (`packed` argument of the ops; see `rows_matmul` in
csrc/cell_cpu.cpp for the measured reason). USE_PACKED_WEIGHTS = False turns this off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..reference import CellConfig, LayerParams
from ..state import HMLSTMOutput, HMLSTMState
from .cpp import _MODES

# Rows of one weight-gradient GEMM (at least one step): large enough to run at full speed, small enough that
# its ds buffer (2048 x 2049 floats at PTB size, 17 MB) is reused by the allocator rather than mapped afresh.
CHUNK_ROWS = 2048
USE_PACKED_WEIGHTS = True
_N_PARAMS = len(LayerParams._fields)  # W, U, V, b, ln_gates, ln_cell_w, ln_cell_b
_B = 3  # index of b in LayerParams; W, U, V (the GEMM weights) come before it


@dataclass(frozen=True)
class _Spec:
    """Static options of one call (hashable: an autograd.Function argument that is not a tensor)."""

    L: int
    mode: int  # 0 step, 1 sample, 2 soft
    recompute: bool
    poison: bool


def _split(spec: _Spec, flat: Sequence[Optional[Tensor]]):
    L = spec.L
    h0, c0, z0 = flat[:L], flat[L:2 * L], flat[2 * L:3 * L - 1]
    p = flat[3 * L - 1:]
    return h0, c0, z0, [LayerParams(*p[k * _N_PARAMS:(k + 1) * _N_PARAMS]) for k in range(L)]


class _StepInputs:
    """The inputs of layer-step (l, t), read back from `hmlstm::seq_fwd`'s buffers: hs, cs L x (T+1, B, H_l),
    zs L-1 x (T+1, B), whose slot 0 is the initial state and slot t + 1 step t's output."""

    def __init__(self, x_t: Tensor, hs, cs, zs, noise_t: Optional[Tensor]):
        self.x_t, self.hs, self.cs, self.zs, self.noise_t = x_t, hs, cs, zs, noise_t
        self.L = len(hs)
        B = x_t.shape[1]
        self.ones = x_t.new_ones(B)
        self.zeros = x_t.new_zeros(B)
        self.no_above = x_t.new_zeros(B, 0)

    def __call__(self, l: int, t: int):
        top = l == self.L - 1
        below = self.x_t[t] if l == 0 else self.hs[l - 1][t + 1]
        z_below = self.ones if l == 0 else self.zs[l - 1][t + 1]
        z = self.zeros if top else self.zs[l][t]
        h_above = self.no_above if top else self.hs[l + 1][t]
        noise = self.noise_t[t, l] if (self.noise_t is not None and not top) else None
        return below, z_below, self.hs[l][t], self.cs[l][t], z, h_above, noise

    def span(self, l: int, t0: int, t1: int):
        """below, z_below, h, z, h_above of layer l over steps t0..t1-1, as ((t1 - t0) B, .) views."""
        flat = lambda a: a[t0 + 1:t1 + 1].flatten(0, 1) if a.dim() == 3 else a[t0 + 1:t1 + 1].flatten()  # noqa: E731
        prev = lambda a: a[t0:t1].flatten(0, 1) if a.dim() == 3 else a[t0:t1].flatten()  # noqa: E731
        n = (t1 - t0) * self.x_t.shape[1]
        top = l == self.L - 1
        below = self.x_t[t0:t1].flatten(0, 1) if l == 0 else flat(self.hs[l - 1])
        z_below = self.x_t.new_ones(n) if l == 0 else flat(self.zs[l - 1])
        z = self.x_t.new_zeros(n) if top else prev(self.zs[l])
        h_above = self.x_t.new_zeros(n, 0) if top else prev(self.hs[l + 1])
        return below, z_below, prev(self.hs[l]), z, h_above


class _WeightGrads:
    """Accumulates one layer's dW, dU, dV over the steps of the backward, one GEMM per chunk of steps.

    The GEMMs' operands are views: the inputs over the chunk's steps in the forward's buffers, and ds in a
    chunk buffer that each step's ds is copied into. Why: concatenating each chunk's ds instead cost a fresh
    52 MB copy per layer at PTB size (49 ms of a 1.6 s training step); the buffer is allocated once per layer
    and backward, and a small one (CHUNK_ROWS rows) comes back from the allocator without new page faults.
    """

    def __init__(self, p: LayerParams, recompute: bool, l: int, inputs: _StepInputs):
        self.dW, self.dU, self.dV = (torch.zeros_like(w) for w in (p.W, p.U, p.V))
        self.recompute_row = 4 * p.U.shape[1] if (recompute and l < inputs.L - 1) else None
        self.l, self.inputs = l, inputs
        T, B = inputs.x_t.shape[:2]
        self.ds = p.U.new_empty(max(1, min(T, CHUNK_ROWS // B)), B, p.U.shape[0])  # steps t_low + n - 1, ..., t_low
        self.ds_copy = p.U.new_empty(self.ds.shape[:2])
        self.n = 0  # steps held
        self.t_low = 0

    def add(self, t: int, ds: Tensor, ds_copy: Tensor) -> None:
        """ds (B, G), ds_copy (B,) of step t; the backward adds the steps in decreasing order."""
        k = self.ds.shape[0] - 1 - self.n  # filled from the end: the buffer ends up in increasing t
        self.ds[k].copy_(ds)
        self.ds_copy[k].copy_(ds_copy)
        self.n += 1
        self.t_low = t
        if self.n == self.ds.shape[0]:
            self.flush()

    def flush(self) -> None:
        if self.n == 0:
            return
        t0, t1, first = self.t_low, self.t_low + self.n, self.ds.shape[0] - self.n
        ds, ds_copy = self.ds[first:].flatten(0, 1), self.ds_copy[first:].flatten()
        self.n = 0
        below, z_below, h, z, h_above = self.inputs.span(self.l, t0, t1)
        _gated_outer(self.dU, ds, h, (z != 0) | (z_below != 0), None)
        if self.dV.shape[1] > 0:
            _gated_outer(self.dV, ds, h_above, z != 0, z)
        if self.dW.shape[1] > 0:
            _gated_outer(self.dW, ds, below, z_below != 0, z_below)
        if self.recompute_row is not None:
            self.dU[self.recompute_row].addmv_(h.t(), ds_copy)


def _gated_outer(acc: Tensor, ds: Tensor, inp: Tensor, on: Tensor, gate: Optional[Tensor]) -> None:
    """acc += (gate * ds)^T inp over the rows where `on`; a GEMM on the gathered rows only."""
    n_on = int(on.sum())
    if n_on == 0:
        return
    if n_on < on.numel():
        idx = on.nonzero().squeeze(1)
        ds, inp = ds.index_select(0, idx), inp.index_select(0, idx)
        gate = gate.index_select(0, idx) if gate is not None else None
    if gate is not None and not bool((gate == 1).all()):  # soft boundaries: scale the rows
        inp = inp * gate.unsqueeze(1)
    acc.addmm_(ds.t(), inp)


def _can_pack(x: Tensor) -> bool:
    return (USE_PACKED_WEIGHTS and x.dtype == torch.float32 and x.device.type == "cpu"
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _pack(params: Sequence[LayerParams], rows: int, transpose: bool) -> list[list[Optional[Tensor]]]:
    """Per layer [W, U, V] in oneDNN's packed layout, for products of `rows` rows: for the forward
    (cell_fwd) their 4H gate rows, for the backward (cell_bwd) the whole transposes."""
    def one(w: Tensor, gates: int) -> Optional[Tensor]:
        if w.numel() == 0:
            return None
        w = w.detach()
        w = w.t().contiguous() if transpose else w[:gates].contiguous()
        return torch.ops.mkldnn._reorder_linear_weight(w, rows)
    return [[one(w, 4 * p.U.shape[1]) for w in (p.W, p.U, p.V)] for p in params]


def _forward_loop(spec: _Spec, x: Tensor, slope: Tensor, noise: Optional[Tensor], h0, c0, z0,
                  params: Sequence[LayerParams], save: bool):
    """The time loop (`hmlstm::seq_fwd`, in C++); returns its step-input reader (which holds every step's
    outputs), the L (T, B, G_l) `pre` (when save) and whether COPY rows kept U h."""
    L = spec.L
    x_t = x.transpose(0, 1).contiguous()  # (T, B, I): each step's rows contiguous
    noise_t = noise.permute(1, 2, 0).contiguous() if noise is not None else None  # (T, L-1, B)
    packed = [w for layer in _pack(params, x.shape[0], False) for w in layer] if _can_pack(x) else []
    dense_copy = save and L > 1  # the boundaries need gradients (PAPER.md): COPY rows keep U h in `pre`
    field = lambda k: [p[k] for p in params]  # noqa: E731
    hs, cs, zs, pres = torch.ops.hmlstm.seq_fwd(
        x_t, list(h0), list(c0), list(z0), *(field(k) for k in range(_N_PARAMS)), slope, noise_t, spec.mode,
        spec.recompute, save, dense_copy, packed, spec.poison)
    return _StepInputs(x_t, hs, cs, zs, noise_t), pres, dense_copy


def _outputs(hs, cs, zs, clone_final: bool) -> list[Tensor]:
    """(B, T, .) views of steps 1..T of the (T + 1, B, .) buffers (not contiguous, as nn.LSTM's batch_first
    output), and the final state (cloned for the backward, which reads the buffers: they must stay unmodified)."""
    final = (lambda t: t.clone()) if clone_final else (lambda t: t)  # noqa: E731
    return ([s[1:].transpose(0, 1) for s in (*hs, *cs, *zs)]
            + [final(s[-1]) for s in hs] + [final(s[-1]) for s in cs] + [final(s[-1]) for s in zs])


class FusedSequence(torch.autograd.Function):
    """forward(spec, x, slope, noise, *h0, *c0, *z0, *params) -> (*h, *c, *z, *h_T, *c_T, *z_T).

    x: (B, T, I); h0, c0: L x (B, H_l); z0: (L-1) x (B,); params: L x the 7 fields of LayerParams.
    Returns h, c: L x (B, T, H_l), z: (L-1) x (B, T) and the final state.
    """

    @staticmethod
    def forward(ctx, spec: _Spec, x: Tensor, slope: Tensor, noise: Optional[Tensor], *flat):
        h0, c0, z0, params = _split(spec, flat)
        inputs, pres, dense_copy = _forward_loop(spec, x, slope, noise, h0, c0, z0, params, save=True)
        # the per-step tensors (and x, noise laid out per step) that the backward reads its inputs from
        ctx.spec, ctx.dense_copy, ctx.inputs, ctx.pres = spec, dense_copy, inputs, pres
        ctx.save_for_backward(x, slope, noise, *flat)
        ctx.set_materialize_grads(False)
        # the final state is cloned: the backward reads the per-step tensors, which must stay unmodified
        return tuple(_outputs(inputs.hs, inputs.cs, inputs.zs, clone_final=True))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        spec = ctx.spec
        L = spec.L
        x, slope, noise, *flat = ctx.saved_tensors  # unpacking checks that no input was modified in place
        h0, c0, z0, params = _split(spec, flat)
        needs = ctx.needs_input_grad
        B, T, _ = x.shape
        inputs = ctx.inputs
        gH, gC, gZ = grads[:L], grads[L:2 * L], grads[2 * L:3 * L - 1]
        gHT, gCT, gZT = grads[3 * L - 1:4 * L - 1], grads[4 * L - 1:5 * L - 1], grads[5 * L - 1:]
        per_step = lambda g: g.transpose(0, 1).contiguous() if g is not None else None  # noqa: E731  (T, B, ...)
        gH, gC, gZ = [per_step(g) for g in gH], [per_step(g) for g in gC], [per_step(g) for g in gZ]
        # pending[l]: the gradient reaching layer l's h, c (and z) of the step the loop is about to process
        gh = [g.clone() if g is not None else torch.zeros_like(h) for g, h in zip(gHT, h0)]
        gc = [g.clone() if g is not None else torch.zeros_like(c) for g, c in zip(gCT, c0)]
        gz = [g.clone() if g is not None else torch.zeros_like(z) for g, z in zip(gZT, z0)]
        p_off = 4 + 3 * L - 1  # forward's inputs: spec, x, slope, noise, the 3L-1 state tensors, the parameters
        need_p = [needs[p_off + k * _N_PARAMS:p_off + (k + 1) * _N_PARAMS] for k in range(L)]
        wgrads = [_WeightGrads(params[l], spec.recompute, l, inputs) for l in range(L)]
        packed = _pack(params, B, True) if _can_pack(x) else [[] for _ in range(L)]
        small = [[None] * _N_PARAMS for _ in range(L)]  # b and the LN vectors, summed per step
        dx = torch.empty_like(inputs.x_t) if needs[1] else None
        for t in reversed(range(T)):
            for l in reversed(range(L)):
                below, z_below, h, c, z, h_above, n = inputs(l, t)
                p = params[l]
                g_h = gh[l] + gH[l][t] if gH[l] is not None else gh[l]
                g_c = gc[l] + gC[l][t] if gC[l] is not None else gc[l]
                if l < L - 1:
                    g_z = gz[l] + gZ[l][t] if gZ[l] is not None else gz[l]
                else:
                    g_z = x.new_zeros(0)
                top = l == L - 1
                mask = [l > 0 or needs[1], l > 0, True, True, not top, not top, False, False, False,
                        *(bool(need_p[l][k]) and p[k] is not None for k in range(_B, _N_PARAMS))]
                out = torch.ops.hmlstm.cell_bwd(
                    g_h, g_c, g_z, below, z_below, h, c, z, h_above, p.W, p.U, p.V, p.b, p.ln_gates,
                    p.ln_cell_w, p.ln_cell_b, slope, n, ctx.pres[l][t], spec.mode, spec.recompute,
                    ctx.dense_copy, mask, True, packed[l], spec.poison)
                d_below, d_zbelow, d_h, d_c, d_z, d_above = out[:6]
                for k in range(_B, _N_PARAMS):
                    if mask[9 + k - _B]:
                        small[l][k] = out[6 + k] if small[l][k] is None else small[l][k] + out[6 + k]
                if any(need_p[l][:3]):
                    wgrads[l].add(t, out[13], out[14])
                # route each gradient to the pending slot of the tensor it belongs to (see _StepInputs)
                if l == 0:
                    if dx is not None:
                        dx[t] = d_below
                else:
                    gh[l - 1] = gh[l - 1] + d_below
                    gz[l - 1] = gz[l - 1] + d_zbelow
                gh[l], gc[l] = d_h, d_c
                if not top:
                    gz[l] = d_z
                    gh[l + 1] = gh[l + 1] + d_above
        param_grads: list[Optional[Tensor]] = []
        for l in range(L):
            wg = wgrads[l]
            wg.flush()
            for k in range(_N_PARAMS):
                if not need_p[l][k]:
                    param_grads.append(None)
                elif k < _B:
                    param_grads.append((wg.dW, wg.dU, wg.dV)[k])
                else:
                    param_grads.append(small[l][k])
        dx = dx.transpose(0, 1) if dx is not None else None
        state_grads = [g if need else None for g, need in zip(gh + gc + gz, needs[4:4 + 3 * L - 1])]
        return (None, dx, None, None, *state_grads, *param_grads)



def fused_sequence_forward(x: Tensor, params: Sequence[LayerParams], cfgs: Sequence[CellConfig],
                           state: HMLSTMState, slope: Tensor, noise: Optional[Tensor],
                           poison: bool) -> HMLSTMOutput:
    """`stepwise_forward` of the C++ op: one autograd node when a gradient is needed (fp32/fp64, CPU).

    x: (B, T, I); params, cfgs: one per layer; state: h, c L x (B, H_l), z (L-1) x (B,);
    slope: 0-dim; noise: (B, T, L-1) for boundary="sample", else None.
    """
    L = len(params)
    spec = _Spec(L, _MODES[cfgs[0].boundary], cfgs[0].copy_boundary == "recompute", poison)
    flat = [*state.h, *state.c, *state.z, *(t for p in params for t in p)]
    noise = noise if spec.mode == 1 else None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [x, *flat]):
        outs = FusedSequence.apply(spec, x, slope, noise, *flat)
    else:  # inference: nothing saved, COPY rows cost nothing
        h0, c0, z0, params = _split(spec, flat)
        inputs, _, _ = _forward_loop(spec, x, slope, noise, h0, c0, z0, params, save=False)
        outs = _outputs(inputs.hs, inputs.cs, inputs.zs, clone_final=False)
    h, c, z = outs[:L], outs[L:2 * L], outs[2 * L:3 * L - 1]
    hT, cT, zT = outs[3 * L - 1:4 * L - 1], outs[4 * L - 1:5 * L - 1], outs[5 * L - 1:]
    return HMLSTMOutput(tuple(h), tuple(c), tuple(z), HMLSTMState(tuple(hT), tuple(cT), tuple(zT)))
