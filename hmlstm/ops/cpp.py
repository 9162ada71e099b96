"""The C++ backend: the fused layer-step `hmlstm::cell_fwd` / `hmlstm::cell_bwd` from `hmlstm._C`, and the
same kernels over a whole sequence, `hmlstm::seq_fwd` / `hmlstm::seq_bwd` (used by `hmlstm.ops.cpp_sequence`).

The schemas and CPU kernels live in csrc/ (ops.cpp, cell_cpu.cpp, cell_rows.h); this module registers what
torch.compile and autograd need on top of them, and exposes `fused_cell_step` with the signature and
semantics of `hmlstm.reference.naive_cell_step`.

Forward: rows in COPY (z_{t-1} == 0 and z_below == 0) do no gate work, and a gated term is multiplied only
for the rows whose gate is non-zero. With no gradient required nothing is saved; otherwise the op also
returns the bias-free pre-activation `pre` (B, G), from which the backward recomputes the gates.
Backward: the dense straight-through gradient of the reference (PAPER.md, "the reference gradient").

Precision: float32 and float64 natively. bfloat16 / float16 inputs run the kernels in float32 (fp32
accumulation) and return h and z in the input dtype and c in float32 (an fp32 cell state).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..reference import CellConfig, LayerParams
from ..sequence import stepwise_forward
from ..state import HMLSTMOutput, HMLSTMState
from .common import poison_enabled

BUILD_COMMAND = "pip install torch==2.13.0 && pip install --no-build-isolation -e ."

try:  # the extension is optional: without it the package runs on the other backends
    from .. import _C  # noqa: F401  (loading it registers torch.ops.hmlstm.cell_fwd / cell_bwd)

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # not built, or built against another torch (undefined symbols)
    _IMPORT_ERROR = e

_MODES = {"step": 0, "sample": 1, "soft": 2}
_HALF = (torch.float16, torch.bfloat16)
# The differentiable inputs of cell_fwd, in its argument order (and cell_bwd's output order).
_GRAD_INPUTS = ("x", "z_below", "h", "c", "z", "h_above", "W", "U", "V", "b", "ln_gates", "ln_cell_w",
                "ln_cell_b")


def unavailable_reason(device: torch.device | str) -> Optional[str]:
    """None when the C++ backend can run on `device`; otherwise why not and how to get it."""
    if _IMPORT_ERROR is not None:
        return (f"the C++ extension hmlstm._C is not built or does not load ({_IMPORT_ERROR}); build it "
                f"from the repository root with `{BUILD_COMMAND}` (needs a C++ compiler)")
    device = torch.device(device)
    if device.type != "cpu":
        return (f"the C++ backend runs on the CPU only, got device {device}; use backend='triton' or "
                f"'cuda' for GPU tensors, or move the model and input to the CPU")
    return None


if _IMPORT_ERROR is None:

    # Why: torch.compile and opcheck trace the op with FakeTensors, which need the output shapes
    # without running the kernel.
    @torch.library.register_fake("hmlstm::cell_fwd")
    def _cell_fwd_fake(x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, slope, noise,
                       boundary_mode, recompute, save, dense_copy, packed, poison):
        B, H = h.shape
        G = U.shape[0]
        has_z = G == 4 * H + 1
        pre = x.new_empty(B, G) if save else x.new_empty(0)
        return h.new_empty(B, H), c.new_empty(B, H), z.new_empty(B if has_z else 0), pre

    # Why: the backward op is traced as well when torch.compile builds the joint graph.
    @torch.library.register_fake("hmlstm::cell_bwd")
    def _cell_bwd_fake(grad_h, grad_c, grad_z, x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w,
                       ln_cell_b, slope, noise, pre, boundary_mode, recompute, dense_copy, output_mask, return_ds,
                       packed, poison):
        like = (x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b)
        grads = [t.new_empty(t.shape) if (need and t is not None) else x.new_empty(0)
                 for t, need in zip(like, output_mask)]
        B, G = pre.shape
        extra = [x.new_empty(B, G), x.new_empty(B)] if return_ds else [x.new_empty(0), x.new_empty(0)]
        return grads + extra

    # Why: opcheck (and any tracer) needs seq_fwd's output shapes without running the loop.
    @torch.library.register_fake("hmlstm::seq_fwd")
    def _seq_fwd_fake(x, h0, c0, z0, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, slope, noise, boundary_mode,
                      recompute, save, dense_copy, packed, poison):
        T, B, _ = x.shape
        hs = [x.new_empty(T + 1, B, h.shape[1]) for h in h0]
        cs = [x.new_empty(T + 1, B, h.shape[1]) for h in h0]
        zs = [x.new_empty(T + 1, B) for _ in z0]
        pres = [x.new_empty(T, B, u.shape[0]) if save else x.new_empty(0) for u in U]
        return hs, cs, zs, pres

    @torch.library.register_fake("hmlstm::seq_bwd")
    def _seq_bwd_fake(grad_h, grad_c, grad_z, grad_hT, grad_cT, grad_zT, x, hs, cs, zs, pres, W, U, V, b, ln_gates,
                      ln_cell_w, ln_cell_b, slope, noise, boundary_mode, recompute, dense_copy, needs, packed,
                      chunk_rows, poison):
        L = len(hs)
        dx = x.new_empty(x.shape) if needs[0] else x.new_empty(0)
        state = [s.new_empty(s.shape[1:]) for s in (*hs, *cs, *zs)]
        params = [p for layer in zip(W, U, V, b, ln_gates, ln_cell_w, ln_cell_b) for p in layer]
        flags = needs[1 + 3 * L - 1:]
        grads = [p.new_empty(p.shape) if (need and p is not None) else x.new_empty(0) for p, need in zip(params, flags)]
        dz_total = [x.new_empty(x.shape[0], x.shape[1]) for _ in zs]
        return [dx, *state, *grads, *dz_total]

    def _setup_context(ctx, inputs, output):
        (x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, slope, noise,
         boundary_mode, recompute, save, dense_copy, packed, poison) = inputs
        if not save:
            raise RuntimeError("hmlstm::cell_fwd was called with save=False on inputs that require grad; "
                               "call it through hmlstm.ops.cpp.fused_cell_step")
        ctx.save_for_backward(x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, slope,
                              noise, output[3])
        ctx.boundary_mode, ctx.recompute, ctx.dense_copy = boundary_mode, recompute, dense_copy
        ctx.n_packed = len(packed)

    def _backward(ctx, grad_h, grad_c, grad_z, _grad_pre):
        (x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, slope, noise,
         pre) = ctx.saved_tensors
        grad_h = grad_h if grad_h is not None else torch.zeros_like(h)
        grad_c = grad_c if grad_c is not None else torch.zeros_like(c)
        if grad_z is None:  # z_t unused downstream (always so for the top layer's empty z_t)
            grad_z = z.new_zeros(z.shape[0] if U.shape[0] == 4 * h.shape[1] + 1 else 0)
        mask = list(ctx.needs_input_grad[: len(_GRAD_INPUTS)])
        grads = torch.ops.hmlstm.cell_bwd(grad_h, grad_c, grad_z, x, z_below, h, c, z, h_above, W, U, V, b,
                                          ln_gates, ln_cell_w, ln_cell_b, slope, noise, pre, ctx.boundary_mode,
                                          ctx.recompute, ctx.dense_copy, mask, False, [], poison_enabled())
        grads = tuple(g if need else None for g, need in zip(grads[: len(_GRAD_INPUTS)], mask))
        # slope (annealed, not learned), noise, the static arguments, and the packed weights (a list: the
        # gradient's structure must match it)
        return grads + (None,) * 6 + ([None] * ctx.n_packed, None)

    # Why: cell_fwd is a C++ op without an Autograd kernel; this attaches the fused backward (cell_bwd)
    # so that autograd and torch.compile's AOTAutograd differentiate through it.
    torch.library.register_autograd("hmlstm::cell_fwd", _backward, setup_context=_setup_context)


def cpu_cache_info() -> dict[str, int]:
    """The C++ backend's cache of large CPU buffers (csrc/host_cache.h).

    The sequence ops take their large buffers (the per-step states, pre-activations and gradient chunks)
    from it and return them when the last tensor using them is gone, so repeated calls of one size reuse
    memory instead of faulting in fresh pages. Returns the bytes held in free blocks (`cached`), the bytes
    in blocks still in use (`in_use`), the number of `reuses` and of fresh `allocations`, and the `limit`
    on cached bytes (environment variable HMLSTM_CPU_CACHE_MB, default 2048; 0 turns the cache off).
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"backend='cpp' is not available: {unavailable_reason('cpu')}")
    cached, in_use, reuses, allocations, limit = torch.ops.hmlstm.cpu_cache_info()
    return {"cached": cached, "in_use": in_use, "reuses": reuses, "allocations": allocations, "limit": limit}


def empty_cpu_cache() -> None:
    """Free the cached CPU buffers not in use (see `cpu_cache_info`); blocks in use are kept. Without the
    extension there is no cache, and this does nothing."""
    if _IMPORT_ERROR is None:
        torch.ops.hmlstm.cpu_cache_clear()


def fused_cell_step(
    x: Tensor,
    z_below: Tensor,
    h: Tensor,
    c: Tensor,
    z: Tensor,
    h_above: Tensor,
    p: LayerParams,
    slope: Tensor,
    noise: Optional[Tensor],
    cfg: CellConfig,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One step of one HM-LSTM layer on the CPU, fused; `hmlstm.reference.naive_cell_step`'s semantics.

    Args:
        x: (B, I) h_t^{l-1}; z_below: (B,) z_t^{l-1} (ones for the first layer).
        h, c: (B, H) h_{t-1}^l, c_{t-1}^l; z: (B,) z_{t-1}^l (zeros for the top layer).
        h_above: (B, Ha) h_{t-1}^{l+1}, (B, 0) for the top layer.
        p: the layer's weights (W (G, I), U (G, H), V (G, Ha), b (G,), optional LN gains and bias).
        slope: 0-dim tensor, the hard sigmoid's slope (no gradient flows to it).
        noise: (B,) uniform samples for boundary="sample", else None.
        cfg: the layer's static options.

    Returns:
        h_t (B, H), c_t (B, H), z_t (B,) or None when cfg.has_boundary is False.

    Example:
        >>> h1, c1, z1 = fused_cell_step(x, ones, h, c, z, h_above, layer.params(), slope, None, CellConfig())
    """
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"backend='cpp' is not available: {reason}")
    return cell_step_op(x, z_below, h, c, z, h_above, p, slope, noise, cfg)


def cell_step_op(x: Tensor, z_below: Tensor, h: Tensor, c: Tensor, z: Tensor, h_above: Tensor, p: LayerParams,
                 slope: Tensor, noise: Optional[Tensor], cfg: CellConfig) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """`fused_cell_step` on whichever device the tensors are (the op dispatches on it), without the
    backend check: the CPU and CUDA backends (`hmlstm.ops.cuda`) both call it. Shapes as `fused_cell_step`."""
    if cfg.boundary not in _MODES:
        raise ValueError(f"cfg.boundary must be one of {tuple(_MODES)}, got {cfg.boundary!r}")
    if cfg.copy_boundary not in ("hold", "recompute"):
        raise ValueError(f"cfg.copy_boundary must be 'hold' or 'recompute', got {cfg.copy_boundary!r}")
    in_dtype = x.dtype
    tensors = (x, z_below, h, c, z, h_above, *p, slope, noise)
    if in_dtype in _HALF or c.dtype in _HALF or p.U.dtype in _HALF:
        # fp32 accumulation: the kernels run in float32 (cast back below, except the cell state)
        x, z_below, h, c, z, h_above, *pp, slope, noise = (None if t is None else t.float() for t in tensors)
        p = LayerParams(*pp)
    if noise is not None and cfg.boundary != "sample":
        noise = None
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    # COPY rows need U h_{t-1} only for the gradients of the boundaries (PAPER.md, the reference gradient)
    dense_copy = grad and (z.requires_grad or z_below.requires_grad)
    # Autocast off: the kernel's own matmuls must stay in the inputs' dtype (bf16 under autocast would not
    # match the kernel's fp32 buffers); half inputs were already cast to fp32 above.
    with torch.autocast(x.device.type, enabled=False):
        h_t, c_t, z_t, _ = torch.ops.hmlstm.cell_fwd(
            x, z_below, h, c, z, h_above, p.W, p.U, p.V, p.b, p.ln_gates, p.ln_cell_w, p.ln_cell_b, slope,
            noise, _MODES[cfg.boundary], cfg.copy_boundary == "recompute", grad, dense_copy, [], poison_enabled())
    if in_dtype in _HALF:
        h_t, z_t = h_t.to(in_dtype), z_t.to(in_dtype)
    return h_t, c_t, (z_t if cfg.has_boundary else None)


def sequence_forward(
    x: Tensor,
    params: Sequence[LayerParams],
    cfgs: Sequence[CellConfig],
    state: HMLSTMState,
    slope: Tensor,
    noise: Optional[Tensor],
    probe: Optional[Tensor] = None,
) -> HMLSTMOutput:
    """L layers over T steps on the CPU; the signature of `hmlstm.sequence.stepwise_forward` minus `step`.

    x: (B, T, I); state: h, c L x (B, H_l), z (L-1) x (B,); noise: (B, T, L-1) or None.
    The time loop runs in `hmlstm.ops.cpp_sequence`: with a gradient required the whole sequence is one
    autograd node whose backward forms each weight gradient as one GEMM over many steps, and float32
    products use pre-packed weights. While torch.compile traces, the per-step op (what it can see
    through) runs in `stepwise_forward` instead.
    """
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"backend='cpp' is not available: {reason}")
    tensors = [x, *state.h, *state.c, *state.z, *(t for p in params for t in p if t is not None)]
    if torch.compiler.is_compiling():
        return stepwise_forward(fused_cell_step, x, params, cfgs, state, slope, noise, probe)
    from .cpp_sequence import fused_sequence_forward

    in_dtype = x.dtype
    if any(t.dtype in _HALF for t in tensors):  # fp32 accumulation and an fp32 cell state, as fused_cell_step
        f32 = lambda t: t.float() if t is not None else None  # noqa: E731
        x, slope, noise = f32(x), f32(slope), f32(noise)
        state = HMLSTMState(*(tuple(f32(t) for t in group) for group in state))
        params = [LayerParams(*(f32(t) for t in p)) for p in params]
    with torch.autocast(x.device.type, enabled=False):
        out = fused_sequence_forward(x, params, cfgs, state, slope, noise, poison_enabled(),
                                     probe.float() if probe is not None and probe.dtype in _HALF else probe)
    if in_dtype in _HALF:
        cast = lambda ts: tuple(t.to(in_dtype) for t in ts)  # noqa: E731
        out = HMLSTMOutput(cast(out.h), out.c, cast(out.z),
                           HMLSTMState(cast(out.state.h), out.state.c, cast(out.state.z)))
    return out
