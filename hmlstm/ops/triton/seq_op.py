"""The Triton backend over a whole sequence: `sequence_forward`, two `torch.library` ops with no host
synchronisation, two kernel launches per wavefront phase forward and two backward.

Layers, fla style: `hmlstm.sequence.stepwise_forward` over `hmlstm.reference.naive_cell_step` (the oracle) ->
`seq_fwd.py` / `seq_bwd.py` (the kernels; design in their docstrings) -> the launchers below, registered with
`torch.library.triton_op` -> `register_autograd` -> `sequence_forward`, the backend's whole-sequence function.

    hmlstm::triton_seq_fwd(x, h0, c0, z0, wall, slope, noise, probe, sizes, ...) -> (HS, CS, ZS, PRE)
    hmlstm::triton_seq_bwd(x, wall, slope, noise, HS, CS, ZS, PRE, grad_HS, grad_CS, grad_ZS, sizes, ...)
        -> [dx, dwall, *dh0, *dc0, *dz0, dprobe]

Memory layout (time first, every layer in one flat buffer per kind, so that one launch serves every layer
of a phase whatever their sizes):

* `wall`: every layer's weights flattened and concatenated, per layer W (G, I), U (G, H), V (G, Ha), b (G),
  then with layer norm ln_gates (4H), ln_cell_w (H), ln_cell_b (H). It is built outside the op (`torch.cat`,
  one copy per call), so autograd splits its gradient back into the parameters.
* HS, CS: per layer (T + 1, B, H_l), slot 0 the initial state, slot t + 1 the state after step t;
  ZS: per layer with a boundary (T + 1, B); PRE: per layer (T, B, G_l) pre-activations without bias (one
  (1, B, G_l) scratch slot without a gradient).
* META: int64 (L, 18), per layer its sizes and the element offsets of its pieces (META_COLUMNS), built on
  the host from shapes alone and cached per shape and device, so a CUDA-graph replay reads the same table.

Before the loop one GEMM gives layer 1's W x for all steps (XW, (T, B, G_1)); after it, each weight gradient
is one GEMM over all T x B rows, and layer 1's dx one more, as the C++ backend does.

Precision: fp64 in, fp64 compute; fp32 with IEEE fp32 dots, or TF32 when the user allows it
(`torch.backends.cuda.matmul.allow_tf32`); bf16/fp16 on tensor cores (`tl.dot` in the input dtype, fp32
accumulation), fp32 gate arithmetic, an fp32 cell state and fp32 saved pre-activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op

from ...state import HMLSTMOutput, HMLSTMState
from ...types import BOUNDARY_CODES, LN_EPS, CellConfig, LayerParams
from ..common import new_empty
from .runtime import _compute_dtype, _interpreted, _launch, _pow2, triton
from . import seq_bwd, seq_fwd

META_COLUMNS = ("I", "H", "HA", "G", "has_z", "W", "U", "V", "b", "ln_gates", "ln_cell_w", "ln_cell_b",
                "off_h", "off_c", "off_z", "off_pre", "off_dy", "off_dc")
assert len(META_COLUMNS) == seq_fwd.NF
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Layout:
    """Where everything of one call lives; from shapes alone (no device memory is read)."""

    sizes: tuple[int, ...]  # (I, H_1, ..., H_L)
    T: int
    B: int
    layer_norm: bool
    save: bool
    rows: tuple[tuple[int, ...], ...]  # META, one row per layer
    wall_numel: int
    hs_numel: int
    zs_numel: int
    pre_numel: int
    dy_numel: int
    dc_numel: int

    @property
    def L(self) -> int:
        return len(self.sizes) - 1

    def col(self, l: int, name: str) -> int:
        return self.rows[l][META_COLUMNS.index(name)]


def layout(sizes: tuple[int, ...], T: int, B: int, layer_norm: bool, save: bool) -> Layout:
    """The layout of a call with input size sizes[0] and layer sizes sizes[1:] (a few host integer operations
    per layer: not cached, so torch.compile traces it as plain Python)."""
    L = len(sizes) - 1
    rows = []
    w = hs = zs = pre = dy = dc = 0
    for l in range(L):
        I, H = sizes[l], sizes[l + 1]
        HA = sizes[l + 2] if l + 1 < L else 0
        has_z = int(l + 1 < L)
        G = 4 * H + has_z
        ow = w
        w += G * I
        ou = w
        w += G * H
        ov = w
        w += G * HA
        ob = w
        w += G
        olg = olw = olb = 0
        if layer_norm:
            olg, w = w, w + 4 * H
            olw, w = w, w + H
            olb, w = w, w + H
        rows.append((I, H, HA, G, has_z, ow, ou, ov, ob, olg, olw, olb, hs, hs, zs if has_z else 0,
                     pre, dy, dc))
        hs += (T + 1) * B * H
        zs += (T + 1) * B * has_z
        pre += (T if save else 1) * B * G
        dy += T * B * 4 * H
        dc += T * B * H
    return Layout(tuple(sizes), T, B, layer_norm, save, tuple(rows), w, hs, zs, pre, dy, dc)


_META: dict[tuple, Tensor] = {}


def _meta_tensor(lay: Layout, like: Tensor) -> Tensor:
    """The (L, 18) int64 table on `like`'s device: cached per layout and device, so that steady-state calls
    (and a CUDA graph captured after a warm-up call) copy nothing from the host."""
    if is_fake(like):  # traced (torch.compile, opcheck): a fresh tensor of the traced graph
        return torch.tensor(lay.rows, dtype=torch.int64, device=like.device)
    key = (lay, like.device)
    hit = _META.get(key)
    if hit is None:
        hit = _META[key] = torch.tensor(lay.rows, dtype=torch.int64, device=like.device)
    return hit


@dataclass(frozen=True)
class _Blocks:
    B: int  # rows of a tile
    H: int  # columns of a gate tile (pre kernel)
    K: int  # reduction step of the dots
    N: int  # columns of a backward product tile
    EH: int  # columns of the element-wise kernels' tiles (update, grad)
    ncb: int  # column blocks of the backward products: the partial-sum slots per (layer, step)
    warps: int  # of the backward products
    warps_pre: int  # of the pre kernel: 8 in fp32 (4 spills), 4 in bf16 (8 spills)
    warps_upd: int  # of the update kernel
    stages: int
    dot_f32: bool
    prec: str


def _blocks(lay: Layout, dtype: torch.dtype) -> _Blocks:
    """Tile sizes for every layer of the call, chosen so that no kernel spills registers or overflows an
    H100's 227 KB of shared memory at the PTB and text8 sizes (benchmarks/aot_sm90.py compiles every
    configuration for sm_90; tests/test_triton_aot.py runs it). The pre kernel holds four gate accumulators
    and four weight tiles at once: 16 x 32 tiles and a 32-wide reduction step keep them in registers; the
    element-wise kernels keep a dozen tiles live, over 8 warps.
    fp64 halves the tiles and does not pipeline (num_stages=1)."""
    hmax = max(lay.sizes[1:])
    wide = dtype != torch.float64
    interp = _interpreted()
    dot_f32 = interp or dtype in (torch.float32, torch.float64)
    allow_tf32 = dtype == torch.float32 and not interp and torch.backends.cuda.matmul.allow_tf32
    n = _pow2(hmax, 16, 64 if wide else 32)  # the backward products are H_l, H_{l-1} and H_{l+1} wide
    return _Blocks(B=16, H=_pow2(hmax, 16, 32 if wide else 16), K=_pow2(max(lay.sizes), 16, 32 if wide else 16),
                   N=n, EH=_pow2(hmax, 8, 32 if wide else 8), ncb=triton.cdiv(hmax, n), warps=8,
                   warps_pre=8 if dtype == torch.float32 else 4, warps_upd=8,
                   stages=2 if wide else 1, dot_f32=dot_f32, prec="tf32" if allow_tf32 else "ieee")


def _phases(lay: Layout) -> int:
    return 2 * lay.T + lay.L - 2


def _slots(lay: Layout) -> int:
    return (lay.L + 1) // 2


@triton_op("hmlstm::triton_seq_fwd", mutates_args=())
def triton_seq_fwd(
    x: Tensor, h0: list[Tensor], c0: list[Tensor], z0: list[Tensor], wall: Tensor, slope: Tensor,
    noise: Optional[Tensor], probe: Optional[Tensor], sizes: list[int], boundary: int, recompute: bool,
    layer_norm: bool, need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of L layers over T steps. x: (B, T, I); h0, c0: L x (B, H_l); z0: (L-1) x (B,); wall: see the
    module docstring; noise: (B, T, L-1) for boundary 1 ("sample"); probe: (L-1, B, T), never read (its
    gradient is dL/dz). Returns the flat HS, CS, ZS and PRE (empty without need_grad)."""
    B, T, _ = x.shape
    lay = layout(tuple(sizes), T, B, layer_norm, need_grad)
    L = lay.L
    meta = _meta_tensor(lay, x)
    blk = _blocks(lay, x.dtype)
    ct = _compute_dtype(x.dtype)
    HS = new_empty(lay.hs_numel, like=x)
    CS = new_empty(lay.hs_numel, like=c0[0])
    ZS = new_empty(max(lay.zs_numel, 1), like=x)
    PRE = new_empty(lay.pre_numel, like=x, dtype=ct)
    for l in range(L):
        oh, H = lay.col(l, "off_h"), lay.sizes[l + 1]
        HS[oh:oh + B * H].view(B, H).copy_(h0[l])
        CS[oh:oh + B * H].view(B, H).copy_(c0[l])
        if l + 1 < L:
            oz = lay.col(l, "off_z")
            ZS[oz:oz + B].copy_(z0[l])
    I0, G0 = lay.sizes[0], lay.col(0, "G")
    W0 = wall[:G0 * I0].view(G0, I0)
    # layer 1's bottom-up term for every step in one GEMM (z^0 = 1: it is never gated off)
    XW = torch.mm(x.transpose(0, 1).reshape(T * B, I0), W0.t())
    noise_arg = noise if noise is not None else ZS
    grid_pre = (_slots(lay), triton.cdiv(B, blk.B), triton.cdiv(max(lay.sizes[1:]), blk.H))
    grid_upd = (_slots(lay), triton.cdiv(B, blk.B))
    for p in range(_phases(lay)):
        _launch(seq_fwd._seq_pre_kernel, grid_pre, XW, HS, ZS, wall, meta, PRE, p, T, B, L,
                SAVE=need_grad, DOT_F32=blk.dot_f32, PREC=blk.prec, RECOMPUTE=recompute,
                BLOCK_B=blk.B, BLOCK_H=blk.H, BLOCK_K=blk.K, num_warps=blk.warps_pre, num_stages=blk.stages)
        _launch(seq_fwd._seq_update_kernel, grid_upd, HS, CS, ZS, wall, meta, PRE, slope, noise_arg,
                p, T, B, L, LN_EPS, SAVE=need_grad, LN=layer_norm, RECOMPUTE=recompute, BOUNDARY=boundary,
                BLOCK_B=blk.B, BLOCK_H=blk.EH, num_warps=blk.warps_upd, num_stages=blk.stages)
    if not need_grad:
        PRE = PRE.new_empty(0)
    return HS, CS, ZS, PRE


@triton_op("hmlstm::triton_seq_bwd", mutates_args=())
def triton_seq_bwd(
    x: Tensor, wall: Tensor, slope: Tensor, noise: Optional[Tensor], HS: Tensor, CS: Tensor, ZS: Tensor,
    PRE: Tensor, grad_HS: Optional[Tensor], grad_CS: Optional[Tensor], grad_ZS: Optional[Tensor],
    sizes: list[int], boundary: int, recompute: bool, layer_norm: bool,
) -> list[Tensor]:
    """Gradients of triton_seq_fwd: [dx (B, T, I), dwall, *dh0 (L), *dc0 (L), *dz0 (L-1), dprobe (L-1, B, T)]."""
    B, T, I0 = x.shape
    lay = layout(tuple(sizes), T, B, layer_norm, True)
    L = lay.L
    meta = _meta_tensor(lay, x)
    blk = _blocks(lay, x.dtype)
    ct = PRE.dtype
    like = PRE
    DHR, DHB, DHT, DCR = (new_empty(lay.hs_numel, like=like) for _ in range(4))
    zs = max(lay.zs_numel, 1)
    DZBE, DZUE, DZTOT = (new_empty(zs, like=like) for _ in range(3))
    DZBP, DZUP = (new_empty(zs * blk.ncb, like=like) for _ in range(2))
    DPRE = new_empty(lay.pre_numel, like=like)
    if layer_norm:
        DY, DGAM = new_empty(lay.dy_numel, like=like), new_empty(lay.dy_numel, like=like)
        DCW, DCB = new_empty(lay.dc_numel, like=like), new_empty(lay.dc_numel, like=like)
    else:
        DY = DGAM = DCW = DCB = DPRE  # never touched without layer norm
    gh = grad_HS if grad_HS is not None else HS
    gc = grad_CS if grad_CS is not None else CS
    gz = grad_ZS if grad_ZS is not None else ZS
    noise_arg = noise if noise is not None else ZS
    grid_grad = (_slots(lay), triton.cdiv(B, blk.B))
    grid_prod = (3 * _slots(lay), triton.cdiv(B, blk.B), blk.ncb)
    for p in reversed(range(_phases(lay))):
        _launch(seq_bwd._seq_grad_kernel, grid_grad, HS, CS, ZS, wall, meta, PRE, slope, noise_arg, gh, gc, gz,
                DHR, DHB, DHT, DCR, DZBE, DZBP, DZUE, DZUP, DZTOT, DPRE, DY, DGAM, DCW, DCB,
                p, T, B, L, blk.ncb, LN_EPS,
                HAS_GH=grad_HS is not None, HAS_GC=grad_CS is not None, HAS_GZ=grad_ZS is not None,
                LN=layer_norm, RECOMPUTE=recompute, BOUNDARY=boundary,
                BLOCK_B=blk.B, BLOCK_H=blk.EH, BLOCK_N=blk.N, num_warps=8, num_stages=blk.stages)
        _launch(seq_bwd._seq_prod_kernel, grid_prod, HS, ZS, wall, meta, DPRE, DHR, DHB, DHT, DZBP, DZUP,
                p, T, B, L, blk.ncb, RECOMPUTE=recompute, DOT_F32=blk.dot_f32, PREC=blk.prec,
                BLOCK_B=blk.B, BLOCK_N=blk.N, BLOCK_K=blk.K, num_warps=blk.warps, num_stages=blk.stages)
    return _epilogue(lay, blk, x, wall, HS, ZS, DPRE, DY, DGAM, DCW, DCB, DHR, DHT, DCR, DZBE, DZBP, DZTOT, ct)


def _epilogue(lay: Layout, blk: _Blocks, x, wall, HS, ZS, DPRE, DY, DGAM, DCW, DCB, DHR, DHT, DCR, DZBE, DZBP,
              DZTOT, ct) -> list[Tensor]:
    """After the loop: every weight gradient as one GEMM over all T x B rows, layer 1's dx, the gradients of
    the initial state and of the probe. O(L) torch ops, none per step."""
    T, B, L = lay.T, lay.B, lay.L
    TB = T * B
    mm_dtype = wall.dtype if wall.dtype in HALF else ct  # half weights: tensor-core GEMMs, fp32 accumulation

    def seq(buf, off, width, first):  # slots first .. first + T - 1 of a (T + 1, B, width) region, as (TB, width)
        return buf[off + first * B * width: off + (first + T) * B * width].view(TB, width)

    pieces, dh0, dc0, dz0, dprobe = [], [], [], [], []
    for l in range(L):
        I, H, HA, G = (lay.col(l, k) for k in ("I", "H", "HA", "G"))
        D = DPRE[lay.col(l, "off_pre"): lay.col(l, "off_pre") + TB * G].view(TB, G)
        Dm = D.to(mm_dtype)
        oh = lay.col(l, "off_h")
        if l == 0:
            X = x.transpose(0, 1).reshape(TB, I)
            dW = Dm.t() @ X.to(mm_dtype)
        else:
            zu = seq(ZS, lay.col(l - 1, "off_z"), 1, 1).to(ct)
            dW = (zu * D).to(mm_dtype).t() @ seq(HS, lay.col(l - 1, "off_h"), I, 1).to(mm_dtype)
        dU = Dm.t() @ seq(HS, oh, H, 0).to(mm_dtype)
        pieces += [dW.reshape(-1), dU.reshape(-1)]
        if HA > 0:
            zb = seq(ZS, lay.col(l, "off_z"), 1, 0).to(ct)
            dV = (zb * D).to(mm_dtype).t() @ seq(HS, lay.col(l + 1, "off_h"), HA, 0).to(mm_dtype)
            pieces.append(dV.reshape(-1))
        if lay.layer_norm:
            oy, od = lay.col(l, "off_dy"), lay.col(l, "off_dc")
            pieces += [DY[oy:oy + TB * 4 * H].view(TB, 4 * H).sum(0), D[:, 4 * H:].sum(0),
                       DGAM[oy:oy + TB * 4 * H].view(TB, 4 * H).sum(0),
                       DCW[od:od + TB * H].view(TB, H).sum(0), DCB[od:od + TB * H].view(TB, H).sum(0)]
        else:
            pieces.append(D.sum(0))
        first = slice(oh, oh + B * H)
        dh = DHR[first] + DHT[first] if l > 0 else DHR[first].clone()  # outputs may not alias one another
        dh0.append(dh.view(B, H))
        dc0.append(DCR[first].clone().view(B, H))
        if HA > 0:
            oz = lay.col(l, "off_z")
            n_cb = triton.cdiv(HA, blk.N)
            zp = DZBP[oz * blk.ncb: oz * blk.ncb + n_cb * B].view(n_cb, B).sum(0)
            dz0.append(DZBE[oz:oz + B] + zp)
            dprobe.append(DZTOT[oz + B: oz + (T + 1) * B].view(T, B).t())
    D0 = DPRE[:TB * lay.col(0, "G")].view(TB, lay.col(0, "G"))
    W0 = wall[:lay.col(0, "G") * lay.sizes[0]].view(lay.col(0, "G"), lay.sizes[0])
    dx = (D0.to(mm_dtype) @ W0.to(mm_dtype)).view(T, B, -1).transpose(0, 1).contiguous()
    dwall = torch.cat([t.to(wall.dtype) for t in pieces])
    probe = torch.stack(dprobe) if dprobe else x.new_zeros(0, B, T, dtype=ct)
    return [dx.to(x.dtype), dwall] + dh0 + dc0 + dz0 + [probe]


def _setup_context(ctx, inputs, output):
    x, h0, c0, z0, wall, slope, noise, probe, sizes, boundary, recompute, layer_norm, need_grad = inputs
    HS, CS, ZS, PRE = output
    ctx.static = (list(sizes), boundary, recompute, layer_norm)
    ctx.need_grad = need_grad
    ctx.dtypes = ([t.dtype for t in h0], [t.dtype for t in c0], [t.dtype for t in z0])
    ctx.has_probe = probe is not None
    ctx.save_for_backward(x, wall, slope, noise, HS, CS, ZS, PRE)


def _backward(ctx, grad_HS, grad_CS, grad_ZS, _grad_PRE):
    if not ctx.need_grad:
        raise RuntimeError("hmlstm::triton_seq_fwd was called with need_grad=False: it saved nothing to "
                           "differentiate; call it with need_grad=True (sequence_forward does this when a "
                           "gradient is required)")
    x, wall, slope, noise, HS, CS, ZS, PRE = ctx.saved_tensors
    sizes, boundary, recompute, layer_norm = ctx.static
    L = len(sizes) - 1
    outs = torch.ops.hmlstm.triton_seq_bwd(x, wall, slope, noise, HS, CS, ZS, PRE, grad_HS, grad_CS, grad_ZS,
                                           sizes, boundary, recompute, layer_norm)
    dx, dwall = outs[0], outs[1]
    hd, cd, zd = ctx.dtypes
    dh0 = [g.to(d) for g, d in zip(outs[2:2 + L], hd)]
    dc0 = [g.to(d) for g, d in zip(outs[2 + L:2 + 2 * L], cd)]
    dz0 = [g.to(d) for g, d in zip(outs[2 + 2 * L:1 + 3 * L], zd)]
    dprobe = outs[1 + 3 * L].to(x.dtype) if ctx.has_probe else None
    return dx, dh0, dc0, dz0, dwall, None, None, dprobe, None, None, None, None, None


triton_seq_fwd.register_autograd(_backward, setup_context=_setup_context)


def sequence_forward(
    x: Tensor,
    params: Sequence[LayerParams],
    cfgs: Sequence[CellConfig],
    state: HMLSTMState,
    slope: Tensor,
    noise: Optional[Tensor],
    probe: Optional[Tensor] = None,
) -> HMLSTMOutput:
    """L layers over T steps in Triton; the signature of `hmlstm.sequence.stepwise_forward` minus `step`.

    x: (B, T, I); params, cfgs: one per layer; state: h, c L x (B, H_l), z (L-1) x (B,); slope: 0-dim;
    noise: (B, T, L-1) for boundary="sample", else None; probe: None or (L-1, B, T) (its gradient is dL/dz).
    Returns h, c: L x (B, T, H_l) and z: (L-1) x (B, T) (views of the op's time-first buffers, as nn.LSTM's
    batch_first output) and the final state.
    """
    B, T, I0 = x.shape
    L = len(params)
    dtype = x.dtype
    for t in [*state.h, *state.z, *(w for p in params for w in p if w is not None)]:
        if t.dtype != dtype or t.device != x.device:
            raise ValueError(f"backend='triton': the weights and the state must be {dtype} on {x.device} like x "
                             f"(the cell state may also be float32), got one {t.dtype} on {t.device}")
    cfg = cfgs[0]
    sizes = [I0] + [p.U.shape[1] for p in params]
    wall = torch.cat([w.reshape(-1) for p in params for w in p if w is not None])
    mode = BOUNDARY_CODES[cfg.boundary]
    noise = noise.contiguous() if (noise is not None and mode == 1 and L > 1) else None
    probe = probe if L > 1 else None
    tensors = [x, wall, *state.h, *state.c, *state.z] + ([probe] if probe is not None else [])
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    HS, CS, ZS, _ = torch.ops.hmlstm.triton_seq_fwd(
        x.contiguous(), [t.contiguous() for t in state.h], [t.contiguous() for t in state.c],
        [t.contiguous() for t in state.z], wall, slope.reshape(()), noise, probe, sizes, mode,
        cfg.copy_boundary == "recompute", cfg.layer_norm, need_grad)
    lay = layout(tuple(sizes), T, B, cfg.layer_norm, need_grad)
    hs, cs, zs, hT, cT, zT = [], [], [], [], [], []
    for l in range(L):
        oh, H = lay.col(l, "off_h"), sizes[l + 1]
        for buf, seqs, finals in ((HS, hs, hT), (CS, cs, cT)):
            region = buf[oh:oh + (T + 1) * B * H].view(T + 1, B, H)
            seqs.append(region[1:].transpose(0, 1))
            finals.append(region[T].clone())  # small; lets the (T + 1)-slot buffer go with the graph
        if l + 1 < L:
            oz = lay.col(l, "off_z")
            region = ZS[oz:oz + (T + 1) * B].view(T + 1, B)
            zs.append(region[1:].t())
            zT.append(region[T].clone())
    return HMLSTMOutput(tuple(hs), tuple(cs), tuple(zs), HMLSTMState(tuple(hT), tuple(cT), tuple(zT)))
