"""Training options that act on the boundary detectors (docs/training.md, "Training options beyond the paper").

None changes the forward equations: they set the detectors' initial weights (`init_detectors`), bound them after
each update (`cap_detector_norms`), charge their boundaries in the loss (`boundary_charge`), or replace their z by
the data's true segment ends (`oracle_boundaries`, a diagnostic).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from .model import HMLSTM, HMLSTMLayer
from .synthetic import LEVELS


def _detectors(rnn: HMLSTM) -> Iterator[tuple[HMLSTMLayer, int]]:
    """(layer, row) of every layer with a boundary unit; row is the unit's row in its weights and bias."""
    for layer in rnn.layers:
        if layer.has_boundary:
            yield layer, 4 * layer.hidden_size


@torch.no_grad()
def init_detectors(rnn: HMLSTM, bias: Optional[float], zero_weights: bool) -> None:
    """Set every boundary unit's bias (None: leave the uniform init) and, with zero_weights, zero its weight rows
    (input, recurrent, top-down) so that it starts at its bias at every step."""
    for layer, row in _detectors(rnn):
        if bias is not None:
            layer.bias[row] = bias
        if zero_weights:
            for w in (layer.weight_ih, layer.weight_hh, layer.weight_td):
                w[row].zero_()


@torch.no_grad()
def cap_detector_norms(rnn: HMLSTM, cap: float) -> None:
    """Scale each boundary weight vector (its row of weight_ih, weight_hh, weight_td) longer than cap down to it."""
    for layer, row in _detectors(rnn):
        for w in (layer.weight_ih, layer.weight_hh, layer.weight_td):
            w[row].mul_((cap / w[row].norm().clamp_min(1e-12)).clamp(max=1.0))


def parse_costs(boundary_cost: float | Sequence[float], num_layers: int) -> list[float]:
    """boundary_cost (one value, or one per boundary layer) as one value per boundary layer; [] when all are 0.

    Raises ValueError naming the argument for a negative value or a list of the wrong length."""
    one = isinstance(boundary_cost, (int, float))
    costs = [float(boundary_cost)] * max(num_layers - 1, 0) if one else [float(c) for c in boundary_cost]
    if not one and len(costs) != max(num_layers - 1, 0):
        raise ValueError(f"boundary_cost as a list needs one value per boundary layer (L - 1 = {num_layers - 1}), "
                         f"got {len(costs)}: {costs}")
    if any(not c >= 0 for c in costs):
        raise ValueError(f"boundary_cost must be >= 0 (nats per boundary and character), got {boundary_cost}")
    return costs if any(c != 0 for c in costs) else []


def boundary_charge(zs: Sequence[Tensor], costs: Sequence[float]) -> Tensor:
    """sum_l cost_l * mean(z^l): zs are the (B, T) boundaries of each layer, costs from `parse_costs`."""
    return sum(c * z.mean() for c, z in zip(costs, zs))


def oracle_boundaries(batch: dict[str, Tensor], num_layers: int) -> Tensor:
    """(L-1, B, T) float true boundaries of the batch: layer k gets level k of `LEVELS` (words, then phrases).

    Raises ValueError naming the missing levels when the data module provides no such labels."""
    wanted = [f"boundary/{LEVELS[k]}" if k < len(LEVELS) else f"boundary/(level {k + 1})"
              for k in range(num_layers - 1)]
    missing = [k for k in wanted if k not in batch]
    if missing:
        raise ValueError(f"oracle_boundaries needs the batch to carry {', '.join(wanted)} (a data module with "
                         f"true boundaries, such as SyntheticDataModule); missing: {', '.join(missing)}")
    return torch.stack([batch[k] for k in wanted]).float()
