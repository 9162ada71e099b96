"""Forcing the boundaries of an HM-LSTM to a chosen update rate, for the COPY-skipping benchmark.

Every backend computes z inside its fused step, so the pattern is imposed through the weights and the
input rather than by overriding z:

- layer 1's boundary unit reads only input feature 0, which is +1 where z^1 should fire and -1 elsewhere
  (a Bernoulli(rate) pattern per row and step);
- unit 0 of each non-top layer copies the sign of its input's unit 0 (forget gate shut, input and output
  gates open, g = tanh(10 x_0)), so h^l_0 carries the same pattern upward;
- the boundary unit of layer l >= 2 reads only h^{l-1}_0: it fires where the pattern fires and the layer
  is not COPY-ing.

Layer l >= 2 then works at the steps where the layer below fired (UPDATE) or where it fired itself at the
step before (FLUSH): about twice the rate for small rates. `work_fractions` measures what actually ran.
Layer normalization would mix the forced gate rows with the others, so forced patterns need layer_norm=False.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hmlstm import HMLSTM, HMLSTMOutput
from hmlstm.metrics import layer_boundaries

BIG = 10.0


@torch.no_grad()
def force_boundaries(model: HMLSTM, x: Tensor, rate: float, seed: int = 0) -> Tensor:
    """Set `model`'s weights so that layer 1 fires with probability `rate` per row and step.

    Args:
        model: an HMLSTM with layer_norm=False (modified in place).
        x: (B, T, I) input; a copy with feature 0 replaced by the +-1 pattern is returned.
        rate: in (0, 1].
    Returns:
        (B, T, I) input that drives the pattern.
    """
    if model.layer_norm:
        raise ValueError("force_boundaries needs layer_norm=False: LN would mix the forced gate rows")
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    g = torch.Generator().manual_seed(seed)
    B, T, _ = x.shape
    fire = torch.rand(B, T, generator=g) < rate
    x = x.clone()
    x[..., 0] = torch.where(fire, 1.0, -1.0).to(x)
    for k, layer in enumerate(model.layers):
        if not layer.has_boundary:
            continue
        H = layer.hidden_size
        weights = [w for w in (layer.weight_ih, layer.weight_hh, layer.weight_td) if w is not None]
        for row in (0, H, 2 * H, 3 * H, 4 * H):  # unit 0's f, i, o, g rows and the boundary row
            for w in weights:
                w[row].zero_()
            layer.bias[row] = 0.0
        layer.bias[0], layer.bias[H], layer.bias[2 * H] = -BIG, BIG, BIG  # f shut, i and o open
        layer.weight_ih[3 * H, 0] = BIG  # g follows the input's unit 0
        layer.weight_ih[4 * H, 0] = BIG  # the boundary fires on a positive input unit 0
    return x


def work_fractions(model: HMLSTM, out: HMLSTMOutput, state_z: tuple[Tensor, ...] | None = None) -> dict:
    """Fractions of layer-steps that ran (not COPY), per layer, and the matmul work left.

    The work of a running row is G * (H + zb * H_above + zu * I) multiply-adds (gated-off terms are
    skipped); the ideal time fraction is this total over the all-UPDATE total G * (H + H_above + I).
    """
    if not out.z:  # one layer: always UPDATE, all the work
        return {"running": [1.0], "ideal_time_fraction": 1.0}
    init = state_z or tuple(torch.zeros_like(z[:, 0]) for z in out.z)
    running, done, full = [], 0.0, 0.0
    for layer, (zb, zu) in zip(model.layers, layer_boundaries(out.z, init)):
        G = 4 * layer.hidden_size + int(layer.has_boundary)
        I = layer.weight_ih.shape[1]
        Ha = layer.weight_td.shape[1] if layer.weight_td is not None else 0
        run = ((zb > 0) | (zu > 0)).float()
        running.append(run.mean().item())
        done += G * (run * (layer.hidden_size + zb * Ha + zu * I)).mean().item()
        full += G * (layer.hidden_size + Ha + I)
    return {"running": running, "ideal_time_fraction": done / full}
