"""The boundary detector: hard sigmoid with slope, binarized, with a straight-through gradient.

The paper's eq. 9 and section 3.3 (docs/spec.md):

    hard_sigm(x) = max(0, min(1, (a * x + 1) / 2))
    z = 1 if hard_sigm(x) > 0.5 else 0          (`step`, the default)
    z ~ Bernoulli(hard_sigm(x))                 (`sample`)
    z = hard_sigm(x)                            (`soft`)

Backward of `step` and `sample` is the straight-through estimator: dz/dx is the hard sigmoid's
derivative, a/2 where |x| < 1/a and 0 elsewhere.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .types import BOUNDARY_MODES


def hard_sigmoid(x: Tensor, slope: Tensor | float) -> Tensor:
    """hard_sigm(x) = clamp((slope * x + 1) / 2, 0, 1), elementwise."""
    return ((slope * x + 1.0) * 0.5).clamp(0.0, 1.0)


def straight_through_grad(x: Tensor, slope: Tensor | float) -> Tensor:
    """d hard_sigm / dx: slope/2 where |x| < 1/slope, else 0 (same shape as x)."""
    inside = (slope * x).abs() < 1.0
    return torch.where(inside, 0.5 * slope * torch.ones_like(x), torch.zeros_like(x))


class BinaryBoundary(torch.autograd.Function):
    """z = step(x) (noise is None) or z = [noise < hard_sigm(x)] (sampling), straight-through backward.

    Forward `x > 0` is exactly `hard_sigm(x) > 0.5` for slope > 0, written without the rounding of
    (a*x + 1)/2 so that every backend can reproduce it bit for bit.
    """

    @staticmethod
    def forward(ctx, x: Tensor, slope: Tensor, noise: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, slope)
        if noise is None:
            return (x > 0).to(x.dtype)
        return (noise < hard_sigmoid(x, slope)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_z: Tensor):  # type: ignore[override]
        x, slope = ctx.saved_tensors
        return grad_z * straight_through_grad(x, slope), None, None


def boundary(x: Tensor, slope: Tensor, mode: str, noise: Optional[Tensor] = None) -> Tensor:
    """Boundary value z from the boundary pre-activation.

    Args:
        x: (B,) pre-activation of the boundary unit.
        slope: 0-dim tensor, the hard sigmoid's slope a > 0.
        mode: "step", "sample" (needs `noise`) or "soft".
        noise: (B,) uniform samples in [0, 1), used by "sample" only.

    Returns:
        z: (B,), in {0, 1} for "step"/"sample", in [0, 1] for "soft".
    """
    if mode == "step":
        return BinaryBoundary.apply(x, slope, None)
    if mode == "sample":
        if noise is None:
            raise ValueError("boundary='sample' needs `noise`: a (B,) tensor of uniform samples in [0, 1)")
        return BinaryBoundary.apply(x, slope, noise)
    if mode == "soft":
        return hard_sigmoid(x, slope)
    raise ValueError(f"boundary must be one of {BOUNDARY_MODES}, got {mode!r}")
