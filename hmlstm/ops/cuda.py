"""The CUDA backend: the CUDA kernels of `hmlstm::cell_fwd` / `hmlstm::cell_bwd` (csrc/cell_cuda.cu).

The ops, their fake kernels and their autograd formula are registered once for every device
(`hmlstm.ops.extension`), and the dispatcher picks the CUDA kernels for CUDA tensors. This module only
checks that those kernels were built and runs the layer-steps one by one (`stepwise_forward`); each
step's backward is the fused `cell_bwd`.

The kernels are built when `pip install` finds nvcc and a CUDA build of torch (setup.py). They classify
the rows on the host (one small device-to-host copy per layer-step), so they are a correct fused op
first; the Triton backend is the one that aims at cuDNN's speed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..sequence import stepwise_forward
from ..state import HMLSTMOutput, HMLSTMState
from ..types import CellConfig, LayerParams
from . import extension
from .extension import cell_step_op

BUILD_COMMAND = "pip install --no-build-isolation --no-deps -e ."


def has_cuda_kernels() -> bool:
    """Whether hmlstm._C was built with its CUDA kernels (registered for the CUDA dispatch key)."""
    return _KERNELS_BUILT


# Looked up once (the registrations happen when hmlstm._C loads, before this module is imported), so that
# torch.compile traces a constant instead of a dispatcher query.
_KERNELS_BUILT = extension.IMPORT_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("hmlstm::cell_fwd",
                                                                                              "CUDA")


def unavailable_reason(device: torch.device | str) -> Optional[str]:
    """None when the CUDA backend can run on `device`; otherwise why not and how to get it."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"the CUDA backend runs on CUDA devices only, got device {device}; use backend='cpp' on the "
                f"CPU")
    if extension.IMPORT_ERROR is not None:
        return (f"the extension hmlstm._C is not built or does not load ({extension.IMPORT_ERROR}); build it from "
                f"the repository root with `{BUILD_COMMAND}` on a machine with nvcc and a CUDA build of torch")
    if not has_cuda_kernels():
        return ("hmlstm._C was built without its CUDA kernels (csrc/cell_cuda.cu: no nvcc, a CPU-only torch, or "
                f"the CUDA compile failed; see the install log); rebuild with `{BUILD_COMMAND}` where nvcc and a "
                "CUDA torch are present (HMLSTM_FORCE_CUDA_BUILD=1 when no GPU is visible at build time)")
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    return None


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
    """One step of one HM-LSTM layer on a CUDA device, fused; `hmlstm.reference.naive_cell_step`'s semantics.

    x: (B, I); z_below, z: (B,); h, c: (B, H); h_above: (B, Ha) ((B, 0) for the top layer); slope: 0-dim;
    noise: (B,) or None. Returns h_t (B, H), c_t (B, H) and z_t (B,) (None without a boundary row).
    bf16/fp16 inputs run in float32 inside, with an fp32 cell state (as the C++ backend).
    """
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"backend='cuda' is not available: {reason}")
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
    """L layers over T steps; the signature of `hmlstm.sequence.stepwise_forward` minus `step`.

    x: (B, T, I); state: h, c L x (B, H_l), z (L-1) x (B,); noise: (B, T, L-1) or None.
    """
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"backend='cuda' is not available: {reason}")
    return stepwise_forward(fused_cell_step, x, params, cfgs, state, slope, noise, probe)
