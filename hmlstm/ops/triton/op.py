"""The Triton backend: `fused_cell_step`, one HM-LSTM layer-step as two `torch.library` ops.

Layers, fla style: `hmlstm.reference.naive_cell_step` (the oracle) -> `cell_fwd.py` / `cell_bwd.py` in this
package (the @triton.jit kernels, design in their docstrings; shared helpers in `jit.py`) -> the launchers below, registered
as ops with `torch.library.triton_op` so that `torch.compile` traces through them and sees the kernels
(`wrap_triton`) -> `register_autograd` -> `fused_cell_step`, the public function with the signature of
the reference.

Ops (namespace `hmlstm`, shared with the C++ backend; the names carry the prefix `triton_`):

    hmlstm::triton_cell_fwd(...) -> (h_t, c_t, z_t, pre)
        One launch per layer-step without layer norm, two with it. `pre` (B, G) is what the backward
        needs beyond the outputs; it is computed and returned only when need_grad (empty otherwise).
        COPY rows do no gate work, and with need_grad only the U term (under copy_boundary="recompute"
        their boundary unit's whole pre-activation, docs/spec.md, the boundary rule).
    hmlstm::triton_cell_bwd(...) -> every input gradient
        One fused element-wise kernel producing d(pre-activation) per row and the element-wise parts of
        the boundary gradients, then dense matmuls (torch) for the weight and input gradients, the gated
        terms' boundary gradients as <dpre W, x> and <dpre V, h_above>, and batch sums for the biases.

Rows are sorted by operation (FLUSH rows first, COPY rows last) with a device-side argsort and count, so
neither op synchronises with the host and a program can skip a term, or all gate work, for its block.

Precision: fp64 in, fp64 out (tests); fp32 with IEEE fp32 dots (no tf32); bf16/fp16 inputs with fp32
accumulation, fp32 gate arithmetic and fp32 saved pre-activations, outputs in the input dtype.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from ...types import BOUNDARY_CODES, BOUNDARY_MODES, LN_EPS, CellConfig, LayerParams
from ..common import new_empty

try:
    import triton
    from . import cell_bwd, cell_fwd

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # the other backends keep working without triton
    _IMPORT_ERROR = e

def _interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import time)."""
    return not hasattr(cell_fwd._cell_pre_kernel, "run") or type(cell_fwd._cell_pre_kernel).__name__ == \
        "InterpretedFunction"


def unavailable_reason(device: torch.device | str) -> Optional[str]:
    """None if the Triton backend can run on `device`, else why not and how to fix it."""
    if _IMPORT_ERROR is not None:
        return f"triton could not be imported ({_IMPORT_ERROR}); install it with `pip install triton`"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1" and _interpreted():
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after hmlstm's Triton kernels were imported; set it before "
                    "importing hmlstm")
        return ("Triton kernels run on CUDA devices; use a CUDA device, or set TRITON_INTERPRET=1 before "
                "importing hmlstm to run them on the CPU in Triton's (slow) interpreter")
    return f"the Triton backend runs on cuda (or cpu with TRITON_INTERPRET=1), not {device.type}"


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch through wrap_triton, which makes the kernel visible to torch.compile and to fake tracing.

    Under TRITON_INTERPRET=1 torch cannot trace interpreted kernels (wrap_triton hands them back as
    plain callables), so when the op is traced with fake tensors there (opcheck, make_fx) the launch is
    skipped: the op's outputs are allocated before the launch, which is all a shape-only run needs.
    """
    if _interpreted() and any(isinstance(a, Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_order(z: Tensor, z_below: Tensor) -> tuple[Tensor, Tensor]:
    """Row permutation grouping (zb, zu) = (1, 0), (1, 1), (0, 1), (0, 0): the terms a block needs change
    at most three times, and COPY rows come last. Returns (perm int32 (B,), number of non-COPY rows (1,))."""
    zb, zu = z != 0, z_below != 0
    key = torch.where(zb, zu.to(torch.int32), 3 - zu.to(torch.int32))
    perm = torch.argsort(key, stable=True).to(torch.int32)
    n_act = (key < 3).sum().to(torch.int32).reshape(1)
    return perm, n_act


@triton_op("hmlstm::triton_cell_fwd", mutates_args=())
def triton_cell_fwd(
    x: Tensor, z_below: Tensor, h: Tensor, c: Tensor, z: Tensor, h_above: Tensor,
    W: Tensor, U: Tensor, V: Tensor, b: Tensor,
    ln_gates: Optional[Tensor], ln_cell_w: Optional[Tensor], ln_cell_b: Optional[Tensor],
    slope: Tensor, noise: Optional[Tensor], boundary: str, copy_boundary: str, has_boundary: bool, need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of one layer-step; see the module docstring. Inputs contiguous, one floating dtype."""
    B, HD = h.shape
    I, HAD = x.shape[1], h_above.shape[1]
    G = 4 * HD + int(has_boundary)
    ln = ln_gates is not None
    recompute = has_boundary and copy_boundary == "recompute"
    ct = _compute_dtype(h.dtype)
    h_new = new_empty(B, HD, like=h)
    c_new = new_empty(B, HD, like=c)
    z_new = new_empty(B if has_boundary else 0, like=z)
    pre = new_empty(B if (need_grad or ln) else 0, G, like=h, dtype=ct)
    perm, n_act = _row_order(z, z_below)
    BLOCK_B = _pow2(B, 16, 32)
    BLOCK_H = _pow2(HD, 16, 64)
    BLOCK_K = _pow2(max(I, HD, HAD), 16, 64)
    dot_f32 = _interpreted() or h.dtype in (torch.float32, torch.float64)
    _launch(cell_fwd._cell_pre_kernel, (triton.cdiv(B, BLOCK_B), triton.cdiv(HD, BLOCK_H)),
        x, z_below, h, c, z, h_above, W, U, V, b, slope, noise if noise is not None else z, perm, n_act,
        h_new, c_new, z_new, pre,
        B, I, HD, HAD,
        BOUNDARY=BOUNDARY_CODES[boundary], RECOMPUTE=recompute, HAS_Z=int(has_boundary), LN=ln, SAVE=need_grad,
        DOT_F32=dot_f32, PREC="ieee", BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K,
    )
    if ln:
        _launch(cell_fwd._cell_ln_update_kernel, (triton.cdiv(B, BLOCK_B),),
            z_below, h, c, z, b, ln_gates, ln_cell_w, ln_cell_b, perm, n_act, pre, h_new, c_new,
            B, HD, LN_EPS, HAS_Z=int(has_boundary), BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H,
        )
    if not need_grad:
        pre = pre.new_empty(0, G)
    return h_new, c_new, z_new, pre


@triton_op("hmlstm::triton_cell_bwd", mutates_args=())
def triton_cell_bwd(
    x: Tensor, z_below: Tensor, h: Tensor, c: Tensor, z: Tensor, h_above: Tensor,
    W: Tensor, U: Tensor, V: Tensor, b: Tensor,
    ln_gates: Optional[Tensor], ln_cell_w: Optional[Tensor], ln_cell_b: Optional[Tensor],
    slope: Tensor, noise: Optional[Tensor], pre: Tensor,
    grad_h: Tensor, grad_c: Tensor, grad_z: Optional[Tensor],
    boundary: str, copy_boundary: str, has_boundary: bool,
) -> list[Tensor]:
    """Gradients of one layer-step w.r.t. (x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w,
    ln_cell_b); the last three are empty without layer norm."""
    B, HD = h.shape
    G = 4 * HD + int(has_boundary)
    ln = ln_gates is not None
    recompute = has_boundary and copy_boundary == "recompute"
    ct = pre.dtype
    dpre = new_empty(B, G, like=pre)
    dy = new_empty(B, 4 * HD, like=pre) if ln else dpre
    dgam = new_empty(B, 4 * HD, like=pre) if ln else dpre
    dcw = new_empty(B, HD, like=pre) if ln else dpre
    dcb = new_empty(B, HD, like=pre) if ln else dpre
    dc_prev = new_empty(B, HD, like=pre)
    dh_dir = new_empty(B, HD, like=pre)
    dzb = new_empty(B, like=pre)
    dzu = new_empty(B, like=pre)
    if grad_z is None or grad_z.numel() == 0:
        grad_z = z.new_zeros(B)
    BLOCK_B = _pow2(B, 16, 32)
    BLOCK_H = _pow2(HD, 16, 64)
    _launch(cell_bwd._cell_bwd_kernel, (triton.cdiv(B, BLOCK_B),),
        pre, h, c, z, z_below, noise if noise is not None else z, slope, b,
        ln_gates if ln else b, ln_cell_w if ln else b, ln_cell_b if ln else b,
        grad_h.contiguous(), grad_c.contiguous(), grad_z.contiguous(),
        dpre, dy, dgam, dcw, dcb, dc_prev, dh_dir, dzb, dzu,
        B, HD, LN_EPS,
        BOUNDARY=BOUNDARY_CODES[boundary], RECOMPUTE=recompute, HAS_Z=int(has_boundary), LN=ln,
        BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H,
    )
    xc, hc, hac = x.to(ct), h.to(ct), h_above.to(ct)
    Wc, Uc, Vc = W.to(ct), U.to(ct), V.to(ct)
    zb, zu = z.to(ct).unsqueeze(1), z_below.to(ct).unsqueeze(1)
    # "recompute" sets dpre's boundary column on COPY rows too (z = z~ there as well): the products below
    # take it to U, h and b, and through the gated terms to zb and zu (docs/spec.md, the boundary rule)
    p_w = dpre @ Wc  # (B, I): gated by zu for x, and <dpre W, x> is the bottom-up term's share of dzu
    p_v = dpre @ Vc  # (B, Ha): likewise for the top-down term and zb
    grad_x = zu * p_w
    grad_ha = zb * p_v
    grad_zu = dzu + (p_w * xc).sum(1)
    grad_zb = dzb + (p_v * hac).sum(1)
    grad_hprev = dh_dir + dpre @ Uc
    grad_W = (zu * dpre).t() @ xc
    grad_V = (zb * dpre).t() @ hac
    grad_U = dpre.t() @ hc
    if ln:
        grad_b = torch.cat([dy.sum(0), dpre[:, 4 * HD:].sum(0)])
        grads_ln = [dgam.sum(0).to(ln_gates.dtype), dcw.sum(0).to(ln_cell_w.dtype), dcb.sum(0).to(ln_cell_b.dtype)]
    else:
        grad_b = dpre.sum(0)
        grads_ln = [b.new_empty(0), b.new_empty(0), b.new_empty(0)]
    return [grad_x.to(x.dtype), grad_zu.to(z_below.dtype), grad_hprev.to(h.dtype), dc_prev.to(c.dtype),
            grad_zb.to(z.dtype), grad_ha.to(h_above.dtype), grad_W.to(W.dtype), grad_U.to(U.dtype),
            grad_V.to(V.dtype), grad_b.to(b.dtype)] + grads_ln


# The forward's tensor inputs, in order (then four static options): the backward finds the LN weights by name.
_FWD_TENSORS = ("x", "z_below", "h", "c", "z", "h_above", "W", "U", "V", "b", "ln_gates", "ln_cell_w", "ln_cell_b",
                "slope", "noise")
_N_STATIC = 4  # boundary, copy_boundary, has_boundary, need_grad
_LN = slice(_FWD_TENSORS.index("ln_gates"), _FWD_TENSORS.index("ln_cell_b") + 1)


def _setup_context(ctx, inputs, output):
    # what the backward recomputes from: the inputs, and the pre-activations the forward saved
    *tensors, boundary, copy_boundary, has_boundary, need_grad = inputs
    _, _, _, pre = output
    ctx.cfg = (boundary, copy_boundary, has_boundary)
    ctx.need_grad = need_grad
    ctx.save_for_backward(*tensors, pre)


def _backward(ctx, grad_h, grad_c, grad_z, _grad_pre):
    if not ctx.need_grad:
        raise RuntimeError("hmlstm::triton_cell_fwd was called with need_grad=False: it saved nothing to "
                           "differentiate; call it with need_grad=True (fused_cell_step does this when a "
                           "gradient is required)")
    saved = ctx.saved_tensors
    grads = torch.ops.hmlstm.triton_cell_bwd(*saved, grad_h, grad_c, grad_z, *ctx.cfg)
    # the weights' gradients, then one per LN tensor that was given (none for slope, noise and the options)
    out = list(grads[:_LN.start]) + [g if t is not None else None for g, t in zip(grads[_LN], saved[_LN])]
    return tuple(out) + (None,) * (len(_FWD_TENSORS) + _N_STATIC - len(out))


triton_cell_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_cell_step(
    x: Tensor, z_below: Tensor, h: Tensor, c: Tensor, z: Tensor, h_above: Tensor,
    p: LayerParams, slope: Tensor, noise: Optional[Tensor], cfg: CellConfig,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One HM-LSTM layer-step in Triton, with the signature and results of `naive_cell_step`.

    Args:
        x: (B, I) input from below; z_below: (B,) its boundary (ones for the first layer).
        h, c: (B, H) previous hidden and cell state; z: (B,) previous boundary (zeros on the top layer).
        h_above: (B, Ha) previous hidden state of the layer above ((B, 0) on the top layer).
        p: the layer's weights (`LayerParams`); slope: 0-dim tensor; noise: (B,) for boundary="sample".
        cfg: the layer's `CellConfig`.

    Returns:
        h_t (B, H), c_t (B, H), z_t (B,) or None for a layer without boundary.

    Example:
        >>> h1, c1, z1 = fused_cell_step(x, ones, h0, c0, z0, h_above, layer.params(), slope, None, cfg)
    """
    if cfg.boundary not in BOUNDARY_MODES:
        raise ValueError(f"cfg.boundary must be one of {BOUNDARY_MODES}, got {cfg.boundary!r}")
    if cfg.boundary == "sample" and cfg.has_boundary and noise is None:
        raise ValueError("boundary='sample' needs `noise`: a (B,) tensor of uniform samples in [0, 1)")
    tensors = (x, z_below, h, c, z, h_above, *p, slope, noise)
    dtype, device = h.dtype, h.device
    for t in tensors:
        # a half-precision layer may carry its cell state in float32 (HMLSTM.initial_state does)
        fp32_cell = t is c and dtype in (torch.float16, torch.bfloat16) and t.dtype == torch.float32
        if t is not None and ((t.dtype != dtype and not fp32_cell) or t.device != device):
            raise ValueError(f"fused_cell_step: every tensor must be {dtype} on {device} like h "
                             f"(c may also be float32), got one {t.dtype} on {t.device}")
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    args = [t.contiguous() if t is not None else None for t in tensors]
    noise_arg = args[-1] if cfg.boundary == "sample" and cfg.has_boundary else None
    h_new, c_new, z_new, _ = torch.ops.hmlstm.triton_cell_fwd(
        *args[:-1], noise_arg, cfg.boundary, cfg.copy_boundary, cfg.has_boundary, need_grad)
    return h_new, c_new, (z_new if cfg.has_boundary else None)
