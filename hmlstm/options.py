"""The language model's arguments, checked once, before anything is built (`HMLSTMLanguageModel.__init__`).

A bad value raises ValueError naming the argument and what it accepts; an HM-LSTM option given to the LSTM
baseline is refused when it would change what is built, and said to be unused (a warning) when it is a training
charge or an initialization that a shared config sets for the HM-LSTM, so that the baseline stays one flag apart.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

from pytorch_lightning.utilities import rank_zero_warn

from .boundary_options import parse_costs, parse_rate_bands
from .lm import CELLS

NONFINITE_MODES = ("raise", "skip")
LOSS_REDUCTIONS = ("mean", "sum_time")
# Options that build or force the boundary detectors: the LSTM has none, so giving one is an error.
HM_ONLY = ("boundary", "copy_boundary", "boundary_norm_cap", "oracle_boundaries", "boundary_zero_init")
# Options that only charge or steer the boundaries in training: unused by the LSTM, said and ignored.
HM_TRAINING = ("boundary_bias", "boundary_cost", "boundary_peaks", "boundary_peaks_reach", "boundary_peaks_warmup",
               "boundary_nesting", "boundary_rates")


class BoundaryCharges(NamedTuple):
    """Per boundary layer (L - 1 entries), or [] when off or when the cell has no boundaries."""
    costs: list[float]  # boundary_cost
    peaks: list[float]  # boundary_peaks
    bands: list[Optional[tuple[float, float]]]  # boundary_rates


def check_options(hp: Mapping[str, Any]) -> BoundaryCharges:
    """Check `HMLSTMLanguageModel`'s arguments (`hp`: its hyperparameters by name) and parse the charges.

    Raises ValueError naming the first bad argument."""
    cell, layers = hp["cell"], len(hp["hidden_sizes"])
    if hp["nonfinite"] not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {hp['nonfinite']!r}")
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    if hp["loss_reduction"] not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {hp['loss_reduction']!r}")
    cap = hp["boundary_norm_cap"]
    if cap is not None and not cap > 0:
        raise ValueError(f"boundary_norm_cap must be > 0 or None (the authors' code: 1.9365), got {cap}")
    if not 0 <= hp["adam_beta2"] < 1 or hp["weight_decay"] < 0:
        raise ValueError(f"adam_beta2 must be in [0, 1) and weight_decay >= 0, got {hp['adam_beta2']} and "
                         f"{hp['weight_decay']}")
    given = [k for k in HM_ONLY if hp[k] is not None and hp[k] is not False]
    if cell == "lstm" and given:
        one = len(given) == 1
        raise ValueError(f"--model.cell lstm has no boundary detector: {', '.join(given)} "
                         f"{'applies' if one else 'apply'} to cell='hmlstm' only; drop {'it' if one else 'them'}")
    costs = parse_costs(hp["boundary_cost"], layers)
    if not 0 <= hp["state_reset"] < 1:
        raise ValueError(f"state_reset must be in [0, 1) (a probability per stream and batch), got {hp['state_reset']}")
    if not hp["lr"] > 0:
        raise ValueError(f"lr must be > 0, got {hp['lr']}")
    if not 0 < hp["lr_factor"] < 1:
        raise ValueError(f"lr_factor must be in (0, 1) (the paper divides by 50: 0.02), got {hp['lr_factor']}")
    milestones = hp["lr_milestones"]
    if milestones is not None and (not milestones or any(int(m) != m or m < 1 for m in milestones)
                                   or list(milestones) != sorted(set(milestones))):
        raise ValueError(f"lr_milestones must be None or a non-empty increasing list of epoch counts >= 1, "
                         f"e.g. [5], got {milestones}")
    peaks = parse_costs(hp["boundary_peaks"], layers, "boundary_peaks")
    warmup = hp["boundary_peaks_warmup"]
    if int(warmup) != warmup or warmup < 0:
        raise ValueError(f"boundary_peaks_warmup must be an int >= 0 (training steps), got {warmup}")
    if not hp["boundary_nesting"] >= 0:
        raise ValueError(f"boundary_nesting must be >= 0 (nats per boundary and character), got {hp['boundary_nesting']}")
    bands = parse_rate_bands(hp["boundary_rates"], layers)
    if not hp["boundary_rate_step"] > 0:
        raise ValueError(f"boundary_rate_step must be > 0 (bias change per step), got {hp['boundary_rate_step']}")
    if cell == "lstm":
        # default.yaml and synthetic.yaml set some of these for the HM-LSTM: said, not fatal
        given_charges = {"boundary_bias": hp["boundary_bias"] is not None, "boundary_cost": bool(costs),
                "boundary_peaks": bool(peaks), "boundary_peaks_reach": bool(hp["boundary_peaks_reach"]),
                "boundary_peaks_warmup": bool(warmup), "boundary_nesting": bool(hp["boundary_nesting"]),
                "boundary_rates": bool(bands)}
        for name in HM_TRAINING:
            if given_charges[name]:
                rank_zero_warn(f"{name}={hp[name]} is unused: cell='lstm' has no boundaries")
        return BoundaryCharges([], [], [])
    if not peaks and (hp["boundary_peaks_reach"] or warmup):
        rank_zero_warn("boundary_peaks_reach and boundary_peaks_warmup act on the peak charge, which "
                       f"boundary_peaks={hp['boundary_peaks']} turns off: they are unused")
    return BoundaryCharges(costs, peaks, bands)
