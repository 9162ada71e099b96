"""The reference HM-LSTM: one layer-step in plain PyTorch, written as docs/spec.md writes it.

This is the readable ground truth for values and gradients: every fused backend is tested against it.

Pre-activation of layer l (eq. 5-7), rows in the order f, i, o, g, z (z only for non-top layers):

    s = U h_{t-1}^l + z_{t-1}^l * V h_{t-1}^{l+1} + z_t^{l-1} * W h_t^{l-1} + b

Operations (eq. 2-3), chosen by zb = z_{t-1}^l (own previous boundary) and zu = z_t^{l-1} (boundary of
the layer below, 1 for the first layer):

    FLUSH  (zb = 1):          c = i * g
    UPDATE (zb = 0, zu = 1):  c = f * c_{t-1} + i * g
    COPY   (zb = 0, zu = 0):  c = c_{t-1}, h = h_{t-1}

The reference writes the choice arithmetically with z as a 0/1 float (docs/spec.md, "The
gradient"), so the straight-through gradient reaches every boundary through every branch and every
gated term. This dense gradient is what the fused ops must reproduce. The boundary itself is written so
that no branch carries z_{t-1} forward as a value:

    hold:       z_t = z~_t * (1 - (1 - z_{t-1}) * (1 - z_t^{l-1}))    (0 on COPY, z~_t otherwise)
    recompute:  z_t = z~_t on every step, from the full pre-activation (s = U h + b on COPY)

The earlier form z_t = z_{t-1} z~ + (1 - z_{t-1})(z^{l-1} z~ + (1 - z^{l-1}) z_{t-1}) has the same values but
dz_t/dz_{t-1} = 1 + z~ on a COPY step, which doubles the gradient carried back along z at every COPY step
whose boundary unit would fire (docs/spec.md, "The boundary gradient").

Layer normalization (the paper leaves the placement to the code; docs/spec.md). Decision: following Ba et al.'s
LN-LSTM, normalize the 4H gate pre-activations and the cell state before the tanh of h:

    s[:4H] = LN(U h + zb V h' + zu W x) * gamma + b[:4H],    h = o * tanh(LN(c) * gamma_c + beta_c)

We normalize the *sum* of the three terms rather than each term: a gated-off term is exactly zero, and
normalizing a zero vector would inject its LN bias where the paper has no term at all. The single
boundary unit is left out of the normalization: s_z = (U h + zb V h' + zu W x)[4H] + b[4H].
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .boundary import boundary
from .types import LN_EPS, CellConfig, LayerParams

def _cell_act(c: Tensor, p: LayerParams) -> Tensor:
    """tanh(c), or tanh(LN(c)) with layer norm on."""
    if p.ln_cell_w is None:
        return torch.tanh(c)
    return torch.tanh(F.layer_norm(c, c.shape[-1:], p.ln_cell_w, p.ln_cell_b, LN_EPS))


def naive_cell_step(
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
    """One step of one HM-LSTM layer (eq. 1-9), dense form.

    Args:
        x: (B, I) h_t^{l-1}, the input from below (the embedded character for l = 1).
        z_below: (B,) z_t^{l-1}; ones for the first layer.
        h, c: (B, H) h_{t-1}^l, c_{t-1}^l.
        z: (B,) z_{t-1}^l; zeros for the top layer.
        h_above: (B, Ha) h_{t-1}^{l+1}; (B, 0) for the top layer.
        p: the layer's weights (see LayerParams).
        slope: 0-dim tensor, hard sigmoid slope a > 0.
        noise: (B,) uniform samples in [0, 1) for boundary="sample", else None.
        cfg: the layer's static options.

    Returns:
        h_t: (B, H), c_t: (B, H), z_t: (B,) or None for a layer without boundary.
    """
    H = h.shape[-1]
    zb = z.unsqueeze(-1)  # (B, 1) own previous boundary: gates the top-down term, selects FLUSH
    zu = z_below.unsqueeze(-1)  # (B, 1) boundary from below: gates the bottom-up term, selects UPDATE
    pre = h @ p.U.t() + zb * (h_above @ p.V.t()) + zu * (x @ p.W.t())  # (B, G), no bias yet
    if p.ln_gates is None:
        gates = pre[:, : 4 * H] + p.b[: 4 * H]
    else:
        gates = F.layer_norm(pre[:, : 4 * H], (4 * H,), p.ln_gates, p.b[: 4 * H], LN_EPS)
    f = torch.sigmoid(gates[:, :H])
    i = torch.sigmoid(gates[:, H : 2 * H])
    o = torch.sigmoid(gates[:, 2 * H : 3 * H])
    g = torch.tanh(gates[:, 3 * H :])

    c_flush = i * g
    c_update = f * c + i * g
    h_flush = o * _cell_act(c_flush, p)
    h_update = o * _cell_act(c_update, p)
    c_new = zb * c_flush + (1 - zb) * (zu * c_update + (1 - zu) * c)  # keeps c's dtype (fp32 for half h)
    h_new = (zb * h_flush + (1 - zb) * (zu * h_update + (1 - zu) * h)).to(h.dtype)

    if not cfg.has_boundary:
        return h_new, c_new, None
    z_hat = boundary(pre[:, 4 * H] + p.b[4 * H], slope, cfg.boundary, noise)
    if cfg.copy_boundary == "recompute":
        # z~ from the full pre-activation on every step, no select on z (on COPY both gated terms are 0,
        # so s = U h + b): the gradient reaches z_{t-1} and z^{l-1} only through the gated products.
        return h_new, c_new, z_hat
    # "hold": the COPY branch's z is the constant 0 it equals, so no branch carries z_{t-1} forward as a
    # value (docs/spec.md, "the boundary gradient"): dz_t/dz_{t-1} on a COPY step is z~ (1 - z^{l-1}).
    z_new = z_hat * (1 - (1 - zb[:, 0]) * (1 - zu[:, 0]))
    return h_new, c_new, z_new
