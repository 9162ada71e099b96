"""Training options that act on the boundary detectors (docs/training.md, "Training options beyond the paper").

None changes the forward equations: they set the detectors' initial weights (`init_detectors`), bound them after
each update (`cap_detector_norms`), hold each layer's boundary rate in a band by its bias (`steer_detector_rates`),
charge their boundaries in the loss (`boundary_charge`; `peak_charge` toward the
peaks of the model's own next-character entropy, `peak_targets`; `nesting_charge` against boundaries above none;
all three collected by `training_charges`), or replace their z by the data's true segment ends
(`oracle_boundaries`, a diagnostic).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from .model import HMLSTM, HMLSTMLayer
from .state import HMLSTMOutput, HMLSTMState
from .synthetic import LEVELS


def _detectors(rnn: HMLSTM) -> Iterator[tuple[HMLSTMLayer, int]]:
    """(layer, row) of every layer with a boundary unit; row is the unit's row in its weights and bias."""
    for layer in rnn.layers:
        if layer.has_boundary:
            yield layer, 4 * layer.hidden_size


@torch.no_grad()
def init_detectors(rnn: HMLSTM, bias: Optional[float | Sequence[Optional[float]]], zero_weights: bool) -> None:
    """Set the boundary units' biases (one value for every layer, or one per boundary layer; None leaves the
    uniform init) and, with zero_weights, zero their weight rows (input, recurrent, top-down) so that each starts at
    its bias at every step.

    Raises ValueError naming the argument for a list of the wrong length."""
    detectors = list(_detectors(rnn))
    biases = list(bias) if isinstance(bias, (list, tuple)) else [bias] * len(detectors)
    if len(biases) != len(detectors):
        raise ValueError(f"boundary_bias as a list needs one value (or null) per boundary layer (L - 1 = "
                         f"{len(detectors)}), got {len(biases)}: {biases}")
    for (layer, row), b in zip(detectors, biases):
        if b is not None:
            layer.bias[row] = b
        if zero_weights:
            for w in (layer.weight_ih, layer.weight_hh, layer.weight_td):
                w[row].zero_()


@torch.no_grad()
def cap_detector_norms(rnn: HMLSTM, cap: float) -> None:
    """Scale each boundary weight vector (its row of weight_ih, weight_hh, weight_td) longer than cap down to it."""
    for layer, row in _detectors(rnn):
        for w in (layer.weight_ih, layer.weight_hh, layer.weight_td):
            w[row].mul_((cap / w[row].norm().clamp_min(1e-12)).clamp(max=1.0))


def parse_rate_bands(bands: Optional[Sequence[Optional[Sequence[float]]]],
                     num_layers: int) -> list[Optional[tuple[float, float]]]:
    """boundary_rates (None, or one [lo, hi] or None per boundary layer) as one band or None per boundary layer;
    [] when off.

    Raises ValueError naming the argument for a list of the wrong length or a band that is not 0 <= lo <= hi <= 1."""
    if bands is None:
        return []
    bands = list(bands)
    if len(bands) != max(num_layers - 1, 0):
        raise ValueError(f"boundary_rates needs one [lo, hi] (or null) per boundary layer (L - 1 = {num_layers - 1}), "
                         f"got {len(bands)}: {bands}")
    out: list[Optional[tuple[float, float]]] = []
    for band in bands:
        if band is None:
            out.append(None)
            continue
        band = [float(b) for b in band]
        if len(band) != 2 or not 0 <= band[0] <= band[1] <= 1:
            raise ValueError(f"boundary_rates: each band is [lo, hi] with 0 <= lo <= hi <= 1 (boundaries per "
                             f"character), got {band}")
        out.append((band[0], band[1]))
    return out if any(b is not None for b in out) else []


@torch.no_grad()
def steer_detector_rates(rnn: HMLSTM, rates: Sequence[float], bands: Sequence[Optional[tuple[float, float]]],
                         step: float) -> None:
    """Move each boundary unit's bias by +step when its layer's rate (this batch's fraction of steps with z = 1)
    is below its band, by -step when above: a homeostatic threshold. No gradient is involved, so it reaches a
    detector whose hard sigmoid is saturated (a dead or an always-firing layer, which no gradient can move)."""
    for (layer, row), rate, band in zip(_detectors(rnn), rates, bands):
        if band is not None:
            lo, hi = band
            if rate < lo:
                layer.bias[row] += step
            elif rate > hi:
                layer.bias[row] -= step


def parse_costs(boundary_cost: float | Sequence[float], num_layers: int, name: str = "boundary_cost") -> list[float]:
    """boundary_cost (one value, or one per boundary layer) as one value per boundary layer; [] when all are 0.

    Raises ValueError naming the argument for a negative value or a list of the wrong length."""
    one = isinstance(boundary_cost, (int, float))
    costs = [float(boundary_cost)] * max(num_layers - 1, 0) if one else [float(c) for c in boundary_cost]
    if not one and len(costs) != max(num_layers - 1, 0):
        raise ValueError(f"{name} as a list needs one value per boundary layer (L - 1 = {num_layers - 1}), "
                         f"got {len(costs)}: {costs}")
    if any(not c >= 0 for c in costs):
        raise ValueError(f"{name} must be >= 0 (nats per boundary and character), got {boundary_cost}")
    return costs if any(c != 0 for c in costs) else []


def boundary_charge(zs: Sequence[Tensor], costs: Sequence[float]) -> Tensor:
    """sum_l cost_l * mean(z^l): zs are the (B, T) boundaries of each layer, costs from `parse_costs`."""
    return sum(c * z.mean() for c, z in zip(costs, zs))


@torch.no_grad()
def next_char_entropy(logits: Tensor) -> Tensor:
    """(B, T) entropy, in nats, of each step's prediction of the next character, from logits (B, T, V)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def entropy_peaks(logits: Tensor) -> Tensor:
    """(B, T) bool: the steps whose predictive entropy (of the next character, from logits (B, T, V)) is a local
    peak (above the step before, not below the step after) and above the batch's mean entropy."""
    h = next_char_entropy(logits)
    lo = torch.full_like(h[:, :1], -float("inf"))
    before, after = torch.cat([lo, h[:, :-1]], 1), torch.cat([h[:, 1:], lo], 1)
    return (h > before) & (h >= after) & (h > h.mean())


@torch.no_grad()
def peak_targets(logits: Tensor, zs: Sequence[Tensor]) -> list[Tensor]:
    """(B, T) bool targets, one per boundary layer: layer 1's are `entropy_peaks`; layer k's are the boundaries of
    layer k-1 (zs[k-2]) whose entropy is above the mean entropy of those boundaries (the larger peaks)."""
    h = next_char_entropy(logits)
    targets = [entropy_peaks(logits)]
    for below in zs[:-1]:
        fired = below.detach() > 0.5
        mean = h[fired].mean() if fired.any() else h.new_tensor(float("inf"))
        targets.append(fired & (h > mean))
    return targets


def peak_charge(zs: Sequence[Tensor], weights: Sequence[float], targets: Sequence[Tensor]) -> Tensor:
    """sum_l w_l / 2 * (mean(z^l (1 - y^l)) / (1 - p_l) - mean(z^l y^l) / p_l), y^l the layer's targets (from
    `peak_targets`) and p_l their fraction: boundaries on targets earn, boundaries off them cost, balanced so that
    firing everywhere and firing nowhere both come to 0. The charge moves where a detector fires, not how often:
    the language model loss (and `boundary_cost`) keep deciding that."""
    total = zs[0].new_zeros(())
    for w, z, y in zip(weights, zs, targets):
        if w:
            y = y.to(z.dtype)
            p = y.mean().clamp(1e-6, 1 - 1e-6)
            total = total + w / 2 * ((z * (1 - y)).mean() / (1 - p) - (z * y).mean() / p)
    return total


def nesting_charge(zs: Sequence[Tensor], weight: float) -> Tensor:
    """weight * sum_{l >= 2} mean(z^l (1 - z^{l-1})): a boundary of layer l where layer l-1 has none costs weight
    (such a boundary can only come on a FLUSH step, right after the layer's own boundary)."""
    return sum(weight * (hi * (1 - lo.detach())).mean() for lo, hi in zip(zs[:-1], zs[1:]))


def training_charges(zs: Sequence[Tensor], logits: Tensor, costs: Sequence[float], peaks: Sequence[float],
                     nesting: float,
                     reach: Optional[tuple[Sequence[Tensor], Tensor, bool, Optional[Sequence[Tensor]]]] = None
                     ) -> dict[str, Tensor]:
    """The boundary terms of the training loss by name (`boundary_cost`, `peak_charge`, `nesting_charge`), each
    only when its option is on: zs the (B, T) boundaries of each layer, logits (B, T, V) the same step's. reach:
    (pre-activations, slope, hold, z0) to charge the peaks through `reach_saturated` (boundary_peaks_reach)."""
    terms = {}
    if costs:
        terms["boundary_cost"] = boundary_charge(zs, costs)
    if peaks:
        targets = peak_targets(logits.detach(), zs)
        charged = zs if reach is None else reach_saturated(zs, reach[0], reach[1], targets, *reach[2:])
        terms["peak_charge"] = peak_charge(charged, peaks, targets)
    if nesting and len(zs) > 1:
        terms["nesting_charge"] = nesting_charge(zs, nesting)
    return terms


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


def detector_preactivations(rnn: HMLSTM, x: Tensor, out: HMLSTMOutput, state: Optional[HMLSTMState]) -> list[Tensor]:
    """The (B, T) boundary pre-activation s_t of each boundary layer, recomputed from a run's outputs (eq. 6's
    boundary row, which layer normalization leaves alone): s_t = U h_{t-1} + z_{t-1} V h^{l+1}_{t-1} +
    z^{l-1}_t W h^{l-1}_t + b, one row of each weight. The fused ops do not return it; its sign is the step
    function's z (`boundary="step"`) on every step but a COPY step under copy_boundary "hold" (z = 0 there).

    Args:
        rnn: the HMLSTM that ran.
        x: (B, T, I) its input (the embedded characters).
        out: its output for x.
        state: the state it started from (None: zeros)."""
    B, T = x.shape[:2]
    below, z_below = x, x.new_ones(B, T)  # layer 1 reads the input on every step
    preacts = []
    for k, (layer, row) in enumerate(_detectors(rnn)):
        p = layer.params()
        h, above = out.h[k], out.h[k + 1]
        h0 = state.h[k] if state is not None else h.new_zeros(B, h.shape[-1])
        above0 = state.h[k + 1] if state is not None else above.new_zeros(B, above.shape[-1])
        z0 = state.z[k] if state is not None else h.new_zeros(B)
        h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], 1)  # (B, T, H): h_{t-1}
        above_prev = torch.cat([above0.unsqueeze(1), above[:, :-1]], 1)
        z_prev = torch.cat([z0.unsqueeze(1), out.z[k][:, :-1]], 1)
        preacts.append(h_prev @ p.U[row] + z_prev * (above_prev @ p.V[row]) + z_below * (below @ p.W[row])
                       + p.b[row])
        below, z_below = h, out.z[k]
    return preacts


def reach_saturated(zs: Sequence[Tensor], preacts: Sequence[Tensor], slope: Tensor, targets: Sequence[Tensor],
                    hold: bool = True, z0: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """Each layer's z, equal in value, whose straight-through gradient goes on outside the hard sigmoid's window
    (|s| >= 1/a, where the paper's estimator gives 0) at the window's slope a/2, on the steps where the detector
    disagrees with its target (a target it does not fire on, a boundary that is no target): for the peak charge,
    so that it can pull back a detector that left the window before its targets meant anything. A step whose
    boundary agrees with its target gets nothing more (a push there would never stop). Under copy_boundary
    "hold" a COPY step's z is the constant 0 and gets none either.

    zs, preacts, targets: (B, T) per boundary layer (`detector_preactivations`, `peak_targets`); slope: the a of
    the hard sigmoid; z0: (B,) per boundary layer, the boundaries before the first step (a carried state's z;
    None: zeros), which the hold gate of the first step reads."""
    out = []
    for k, (z, s, y) in enumerate(zip(zs, preacts, targets)):
        wrong = (z.detach() > 0.5) != y
        outside = (s.detach().abs() >= 1 / slope) & wrong
        gate = torch.ones_like(z)
        if hold:  # z_t = z~_t (1 - (1 - z_{t-1}) (1 - z^{l-1}_t)): no gradient on a COPY step
            first = z0[k].unsqueeze(1) if z0 is not None else torch.zeros_like(z[:, :1])
            z_prev = torch.cat([first, z[:, :-1]], 1).detach()
            z_below = zs[k - 1].detach() if k else torch.ones_like(z)
            gate = 1 - (1 - z_prev) * (1 - z_below)
        out.append(z + gate * outside.to(s.dtype) * slope / 2 * (s - s.detach()))
    return out
