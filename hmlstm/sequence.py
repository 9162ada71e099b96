"""The time loop shared by every backend that provides a per-layer-step function."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .types import CellConfig, LayerParams
from .state import HMLSTMOutput, HMLSTMState

# step(x, z_below, h, c, z, h_above, params, slope, noise, cfg) -> (h_t, c_t, z_t or None),
# with the signature and shapes of `hmlstm.reference.naive_cell_step`.
StepFn = Callable[..., tuple[Tensor, Tensor, Optional[Tensor]]]


def stepwise_forward(
    step: StepFn,
    x: Tensor,
    params: Sequence[LayerParams],
    cfgs: Sequence[CellConfig],
    state: HMLSTMState,
    slope: Tensor,
    noise: Optional[Tensor],
    probe: Optional[Tensor] = None,
    forced: Optional[Tensor] = None,
) -> HMLSTMOutput:
    """Run L layers over T steps, bottom to top within a step.

    Args:
        step: the per-layer-step function of a backend.
        x: (B, T, I) input sequence.
        params, cfgs: one entry per layer, bottom first.
        state: the initial state (h, c per layer; z for layers 1..L-1).
        slope: 0-dim tensor.
        noise: (B, T, L-1) uniform samples for boundary="sample", else None.
        probe: None, or (L-1, B, T) whose gradient becomes dL/dz_t^l, the whole gradient reaching each
            boundary through every use of it (the training diagnostics). Its values are never read: it enters
            as probe - probe.detach(), which is zero.
        forced: None, or (L-1, B, T) 0/1 boundaries that replace the detectors' z_t^l (an oracle: the true
            segment ends). The cell equations use them as they would use z; no gradient reaches the detectors.
    """
    B, T, _ = x.shape
    L = len(params)
    h, c = list(state.h), list(state.c)
    # The top layer has no boundary: its z_{t-1} is constantly 0, so it never FLUSHes.
    z = list(state.z) + [x.new_zeros(B)]
    ones = x.new_ones(B)
    no_above = x.new_zeros(B, 0)
    hs: list[list[Tensor]] = [[] for _ in range(L)]
    cs: list[list[Tensor]] = [[] for _ in range(L)]
    zs: list[list[Tensor]] = [[] for _ in range(L - 1)]
    for t in range(T):
        below, z_below = x[:, t], ones  # z^0 = 1: the first layer never COPYs
        for l in range(L):
            # h_{t-1}^{l+1}: layer l+1 has not been updated yet at step t
            h_above = h[l + 1] if l + 1 < L else no_above
            n = noise[:, t, l] if (noise is not None and l + 1 < L) else None
            h[l], c[l], z_new = step(below, z_below, h[l], c[l], z[l], h_above, params[l], slope, n, cfgs[l])
            hs[l].append(h[l])
            cs[l].append(c[l])
            if z_new is not None:
                if forced is not None:
                    z_new = forced[l, :, t].to(z_new.dtype)
                if probe is not None:
                    z_new = z_new + (probe[l, :, t] - probe[l, :, t].detach()).to(z_new.dtype)
                z[l] = z_new
                zs[l].append(z_new)
            below, z_below = h[l], z[l]
    final = HMLSTMState(tuple(h), tuple(c), tuple(z[: L - 1]))
    return HMLSTMOutput(
        h=tuple(torch.stack(s, 1) for s in hs),
        c=tuple(torch.stack(s, 1) for s in cs),
        z=tuple(torch.stack(s, 1) for s in zs),
        state=final,
    )
