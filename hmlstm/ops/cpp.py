"""The C++ (CPU) backend: the fused layer-step `hmlstm::cell_fwd` / `hmlstm::cell_bwd` of `hmlstm._C`, and the
same kernels over a whole sequence, `hmlstm::seq_fwd` / `hmlstm::seq_bwd` (`hmlstm.ops.cpp_sequence`).

The schemas and CPU kernels live in csrc/ (ops.cpp, cell_cpu.cpp, seq_cpu.cpp, cell_rows.h); their fake kernels
and autograd are registered in `hmlstm.ops.extension`. This module exposes `fused_cell_step` with the
signature and semantics of `hmlstm.reference.naive_cell_step`, the whole-sequence `sequence_forward`, and the
CPU buffer cache's controls.

Forward: rows in COPY (z_{t-1} == 0 and z_below == 0) do no gate work, and a gated term is multiplied only
for the rows whose gate is non-zero. With no gradient required nothing is saved; otherwise the op also
returns the bias-free pre-activation `pre` (B, G), from which the backward recomputes the gates.
Backward: the dense straight-through gradient of the reference (docs/spec.md, "The gradient").

Precision: float32 and float64 natively. bfloat16 / float16 inputs run the kernels in float32 (fp32
accumulation) and return h and z in the input dtype and c in float32 (an fp32 cell state).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..sequence import stepwise_forward
from ..state import HMLSTMOutput, HMLSTMState
from ..types import CellConfig, LayerParams
from . import extension
from .common import poison_enabled
from .cpp_sequence import fused_sequence_forward
from .extension import BUILD_COMMAND, HALF, cell_step_op


def unavailable_reason(device: torch.device | str) -> Optional[str]:
    """None when the C++ backend can run on `device`; otherwise why not and how to get it."""
    if extension.IMPORT_ERROR is not None:
        return (f"the C++ extension hmlstm._C is not built or does not load ({extension.IMPORT_ERROR}); build it "
                f"from the repository root with `{BUILD_COMMAND}` (needs a C++ compiler)")
    device = torch.device(device)
    if device.type != "cpu":
        return (f"the C++ backend runs on the CPU only, got device {device}; use backend='triton' "
                f"for GPU tensors, or move the model and input to the CPU")
    return None


def cpu_cache_info() -> dict[str, int]:
    """The C++ backend's cache of large CPU buffers (csrc/host_cache.h).

    The sequence ops take their large buffers (the per-step states, pre-activations and gradient chunks)
    from it and return them when the last tensor using them is gone, so repeated calls of one size reuse
    memory instead of faulting in fresh pages. Returns the bytes held in free blocks (`cached`), the bytes
    in blocks still in use (`in_use`), the number of `reuses` and of fresh `allocations`, and the `limit`
    on cached bytes (environment variable HMLSTM_CPU_CACHE_MB, default 2048; 0 turns the cache off).
    """
    if extension.IMPORT_ERROR is not None:
        raise RuntimeError(f"backend='cpp' is not available: {unavailable_reason('cpu')}")
    cached, in_use, reuses, allocations, limit = torch.ops.hmlstm.cpu_cache_info()
    return {"cached": cached, "in_use": in_use, "reuses": reuses, "allocations": allocations, "limit": limit}


def empty_cpu_cache() -> None:
    """Free the cached CPU buffers not in use (see `cpu_cache_info`); blocks in use are kept. Without the
    extension there is no cache, and this does nothing."""
    if extension.IMPORT_ERROR is None:
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
    in_dtype = x.dtype
    if any(t.dtype in HALF for t in tensors):  # fp32 accumulation and an fp32 cell state, as fused_cell_step
        f32 = lambda t: t.float() if t is not None else None  # noqa: E731
        x, slope, noise = f32(x), f32(slope), f32(noise)
        state = HMLSTMState(*(tuple(f32(t) for t in group) for group in state))
        params = [LayerParams(*(f32(t) for t in p)) for p in params]
    with torch.autocast(x.device.type, enabled=False):
        out = fused_sequence_forward(x, params, cfgs, state, slope, noise, poison_enabled(),
                                     probe.float() if probe is not None and probe.dtype in HALF else probe)
    if in_dtype in HALF:
        cast = lambda ts: tuple(t.to(in_dtype) for t in ts)  # noqa: E731
        out = HMLSTMOutput(cast(out.h), out.c, cast(out.z),
                           HMLSTMState(cast(out.state.h), out.state.c, cast(out.state.z)))
    return out
