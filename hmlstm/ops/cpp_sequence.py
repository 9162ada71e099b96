"""The C++ backend over a whole sequence: one autograd node for T steps of L layers.

Why: autograd over per-step ops forms each weight gradient as T products (G, B) @ (B, K) whose inner
dimension is only the batch, and adds them up one by one. At the paper's PTB size on 2 CPU cores that was
half of the training step (39 GFLOP/s, where one product with the same FLOPs runs at 180). Here both time
loops run in C++ (csrc/cell_cpu.cpp):

- `hmlstm::seq_fwd`: the loop of `hmlstm.sequence.stepwise_forward` over `hmlstm::cell_fwd`'s kernels, into
  (T + 1, B, .) buffers (slot 0: the initial state);
- `hmlstm::seq_bwd`: the reverse loop over `hmlstm::cell_bwd`'s kernels, which give the data gradients and
  `ds`, the gradient of the step's pre-activation; each weight gradient is one GEMM over the gated rows of
  many steps (the dense straight-through gradient of docs/spec.md, as in `hmlstm.reference`):

      dU = sum_t ds_t^T h_{t-1}^l                    over the active rows (not COPY)
      dV = sum_t (z_{t-1}^l ds_t)^T h_{t-1}^{l+1}     over the rows with z_{t-1}^l != 0
      dW = sum_t (z_t^{l-1} ds_t)^T h_t^{l-1}         over the rows with z_t^{l-1} != 0

  in chunks of about CHUNK_ROWS rows, so that memory stays bounded on long sequences; the step inputs are
  views of seq_fwd's buffers and ds a reused chunk buffer.

In float32, the weights are reordered once per sequence into oneDNN's packed layout (and their transposes
once per backward), and every per-step product uses them (`packed` argument of the ops; see `rows_matmul` in
csrc/cell_cpu.cpp for the measured reason). USE_PACKED_WEIGHTS = False turns this off.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..state import HMLSTMOutput, HMLSTMState
from ..types import BOUNDARY_CODES, CellConfig, LayerParams
from . import extension  # noqa: F401  (loads hmlstm._C: the seq_fwd / seq_bwd ops and their fake kernels)

# Rows of one weight-gradient GEMM (whole steps, at least one): large enough to run at full speed, small
# enough that the ds buffer stays small (2048 x 2049 floats at PTB size, 17 MB; a fresh 52 MB per layer once
# cost 49 ms of a 1.6 s training step, before csrc/host_cache.h reused buffers) and long sequences stay bounded.
CHUNK_ROWS = 2048
USE_PACKED_WEIGHTS = True
_N_PARAMS = len(LayerParams._fields)  # W, U, V, b, ln_gates, ln_cell_w, ln_cell_b


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


def _fields(params: Sequence[LayerParams]) -> list[list[Optional[Tensor]]]:
    """The ops' per-field lists: [W per layer], [U per layer], ..., [ln_cell_b per layer]."""
    return [[p[k] for p in params] for k in range(_N_PARAMS)]


def _can_pack(x: Tensor) -> bool:
    return (USE_PACKED_WEIGHTS and x.dtype == torch.float32 and x.device.type == "cpu"
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


# Forward-packed weights of inference calls, per (id(weight), rows, transpose): reused while the weight is the
# same tensor with the same storage and version counter (an optimizer step or load_state_dict bumps it), so that
# the batches of an evaluation or of generation pack once. Why: packing the PTB model's weights costs about
# 24 ms, 5% of its forward. Training changes the weights every step, so its calls do not use this.
_PACKED: dict[tuple[int, int, bool], tuple[weakref.ref, int, int, Tensor]] = {}


def _pack_one(w: Tensor, rows: int, gates: int, transpose: bool, reuse: bool) -> Optional[Tensor]:
    if w.numel() == 0:
        return None
    key = (id(w), rows, transpose)
    if reuse:
        hit = _PACKED.get(key)
        if hit is not None and hit[0]() is w and hit[1] == w._version and hit[2] == w.data_ptr():
            return hit[3]
    d = w.detach()
    d = d.t().contiguous() if transpose else d[:gates].contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(d, rows)
    if reuse:
        # the entry goes when the weight does (its id may then be reused by another tensor)
        _PACKED[key] = (weakref.ref(w, lambda _, k=key: _PACKED.pop(k, None)), w._version, w.data_ptr(), packed)
    return packed


def _pack(params: Sequence[LayerParams], rows: int, transpose: bool,
          reuse: bool = False) -> list[list[Optional[Tensor]]]:
    """Per layer [W, U, V] in oneDNN's packed layout, for products of `rows` rows: for the forward
    (cell_fwd) their 4H gate rows, for the backward (cell_bwd) the whole transposes. `reuse`: take and
    keep them in _PACKED (forward only)."""
    return [[_pack_one(w, rows, 4 * p.U.shape[1], transpose, reuse) for w in (p.W, p.U, p.V)] for p in params]


def _packed_flat(params: Sequence[LayerParams], x: Tensor, transpose: bool,
                 reuse: bool = False) -> list[Optional[Tensor]]:
    """The ops' `packed` argument: [W, U, V] of every layer in turn, or [] (no packing)."""
    if not _can_pack(x):
        return []
    return [w for layer in _pack(params, x.shape[0], transpose, reuse and not transpose) for w in layer]


def _forward_loop(spec: _Spec, x_t: Tensor, slope: Tensor, noise_t: Optional[Tensor], h0, c0, z0,
                  params: Sequence[LayerParams], save: bool):
    """`hmlstm::seq_fwd` on x_t (T, B, I), noise_t (T, L-1, B): returns hs, cs L x (T+1, B, H_l), zs L-1 x
    (T+1, B) (slot 0: the initial state), pres L x (T, B, G_l) (when save) and whether COPY rows kept U h."""
    dense_copy = save and spec.L > 1  # the boundaries need gradients (docs/spec.md): COPY rows keep U h in `pre`
    hs, cs, zs, pres = torch.ops.hmlstm.seq_fwd(
        x_t, list(h0), list(c0), list(z0), *_fields(params), slope, noise_t, spec.mode, spec.recompute, save,
        dense_copy, _packed_flat(params, x_t[0], False, reuse=not save), spec.poison)
    return hs, cs, zs, pres, dense_copy


def _outputs(hs, cs, zs, clone_final: bool) -> list[Tensor]:
    """(B, T, .) views of steps 1..T of the (T + 1, B, .) buffers (not contiguous, as nn.LSTM's batch_first
    output), and the final state (cloned for the backward, which reads the buffers: they must stay unmodified)."""
    final = (lambda t: t.clone()) if clone_final else (lambda t: t)  # noqa: E731
    return ([s[1:].transpose(0, 1) for s in (*hs, *cs, *zs)]
            + [final(s[-1]) for s in hs] + [final(s[-1]) for s in cs] + [final(s[-1]) for s in zs])


def _time_first(x: Tensor, noise: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """x (B, T, I) -> (T, B, I) and noise (B, T, L-1) -> (T, L-1, B), contiguous: each step's rows together."""
    return x.transpose(0, 1).contiguous(), (noise.permute(1, 2, 0).contiguous() if noise is not None else None)


class FusedSequence(torch.autograd.Function):
    """forward(spec, x, slope, noise, probe, *h0, *c0, *z0, *params) -> (*h, *c, *z, *h_T, *c_T, *z_T).

    x: (B, T, I); probe: None or (L-1, B, T), whose values are not read and whose gradient is dL/dz (see
    `hmlstm.sequence.stepwise_forward`); h0, c0: L x (B, H_l); z0: (L-1) x (B,); params: L x the 7 fields of
    LayerParams. Returns h, c: L x (B, T, H_l), z: (L-1) x (B, T) and the final state.
    """

    @staticmethod
    def forward(ctx, spec: _Spec, x: Tensor, slope: Tensor, noise: Optional[Tensor], probe: Optional[Tensor],
                *flat):
        h0, c0, z0, params = _split(spec, flat)
        x_t, noise_t = _time_first(x, noise)
        hs, cs, zs, pres, dense_copy = _forward_loop(spec, x_t, slope, noise_t, h0, c0, z0, params, save=True)
        # the buffers (and x, noise laid out per step) that the backward reads its step inputs from
        ctx.spec, ctx.dense_copy, ctx.buffers = spec, dense_copy, (x_t, noise_t, hs, cs, zs, pres)
        ctx.save_for_backward(x, slope, noise, *flat)
        ctx.set_materialize_grads(False)
        return tuple(_outputs(hs, cs, zs, clone_final=True))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        spec = ctx.spec
        L = spec.L
        x, slope, noise, *flat = ctx.saved_tensors  # unpacking checks that no input was modified in place
        h0, c0, z0, params = _split(spec, flat)
        x_t, noise_t, hs, cs, zs, pres = ctx.buffers
        needs = ctx.needs_input_grad
        gH, gC, gZ = grads[:L], grads[L:2 * L], grads[2 * L:3 * L - 1]
        gHT, gCT, gZT = grads[3 * L - 1:4 * L - 1], grads[4 * L - 1:5 * L - 1], grads[5 * L - 1:]
        # (T, B, ...) views: seq_bwd reads one step of them at a time, so a contiguous copy would only cost
        per_step = lambda g: g.transpose(0, 1) if g is not None else None  # noqa: E731
        final = lambda gs, like: [g if g is not None else torch.zeros_like(t) for g, t in zip(gs, like)]  # noqa: E731
        # forward's inputs: spec, x, slope, noise, probe, then the 3L - 1 state tensors and the parameters
        flags = [int(n) for n in (needs[1], *needs[5:])]
        outs = torch.ops.hmlstm.seq_bwd(
            [per_step(g) for g in gH], [per_step(g) for g in gC], [per_step(g) for g in gZ], final(gHT, h0),
            final(gCT, c0), final(gZT, z0), x_t, hs, cs, zs, pres, *_fields(params), slope, noise_t, spec.mode,
            spec.recompute, ctx.dense_copy, flags, _packed_flat(params, x_t[0], True), CHUNK_ROWS, spec.poison)
        dx = outs[0].transpose(0, 1) if needs[1] else None
        n_rest = len(needs) - 5
        rest = [g if need else None for g, need in zip(outs[1:1 + n_rest], needs[5:])]
        d_probe = torch.stack(outs[1 + n_rest:]).transpose(1, 2) if needs[4] else None  # (L-1, T, B) -> (L-1, B, T)
        return (None, dx, None, None, d_probe, *rest)


def fused_sequence_forward(x: Tensor, params: Sequence[LayerParams], cfgs: Sequence[CellConfig],
                           state: HMLSTMState, slope: Tensor, noise: Optional[Tensor],
                           poison: bool, probe: Optional[Tensor] = None) -> HMLSTMOutput:
    """`stepwise_forward` of the C++ op: one autograd node when a gradient is needed (fp32/fp64, CPU).

    x: (B, T, I); params, cfgs: one per layer; state: h, c L x (B, H_l), z (L-1) x (B,);
    slope: 0-dim; noise: (B, T, L-1) for boundary="sample", else None; probe: None or (L-1, B, T) (its gradient
    is dL/dz).
    """
    L = len(params)
    spec = _Spec(L, BOUNDARY_CODES[cfgs[0].boundary], cfgs[0].copy_boundary == "recompute", poison)
    flat = [*state.h, *state.c, *state.z, *(t for p in params for t in p)]
    noise = noise if spec.mode == 1 else None
    if L == 1:
        probe = None  # no boundaries
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [x, probe, *flat]):
        outs = FusedSequence.apply(spec, x, slope, noise, probe, *flat)
    else:  # inference: nothing saved, COPY rows cost nothing
        h0, c0, z0, params = _split(spec, flat)
        x_t, noise_t = _time_first(x, noise)
        hs, cs, zs, _, _ = _forward_loop(spec, x_t, slope, noise_t, h0, c0, z0, params, save=False)
        outs = _outputs(hs, cs, zs, clone_final=False)
    h, c, z = outs[:L], outs[L:2 * L], outs[2 * L:3 * L - 1]
    hT, cT, zT = outs[3 * L - 1:4 * L - 1], outs[4 * L - 1:5 * L - 1], outs[5 * L - 1:]
    return HMLSTMOutput(tuple(h), tuple(c), tuple(z), HMLSTMState(tuple(hT), tuple(cT), tuple(zT)))
