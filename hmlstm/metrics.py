"""Boundary and operation statistics of an HM-LSTM, and the unigram baseline of a text.

Alignment (one definition for the logs, `hmlstm boundaries` and the benchmarks): a boundary detector should
fire on the *last character of a segment, its closing separator included*. For text that separates words with
whitespace that is the first whitespace character after the word (the space of "the "), not the word's last
letter; where a segment has no separator (the glued words inside a synthetic phrase) it is the segment's last
character. Why: z_t^l is computed after reading x_t, and z_t^l = 1 hands h_t^l up to layer l+1 and flushes
layer l at t+1. A word of real text is known to be over only once its space has been read, and the paper
reports the same placement for its trained PTB model ("z^1 tends to be turned on when it sees a space or after
it sees a space", section 4.1, figure 2). The headline F1 counts exact hits (tolerance 0); tolerance 1, beside
it, also counts a boundary one character early or late (one-to-one), which separates "misplaced by one" from
"not found".
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor


TOLERANCES = (0, 1)  # the headline (exact) and the one beside it


class BoundaryScore(NamedTuple):
    """Precision, recall and F1 of predicted boundaries, with the counts they come from."""

    precision: float
    recall: float
    f1: float
    true_positives: int
    num_predicted: int
    num_true: int


def prf(tp: float, num_pred: float, num_true: float) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts; each is 0 where its denominator is 0."""
    p = tp / num_pred if num_pred > 0 else 0.0
    r = tp / num_true if num_true > 0 else 0.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f1


def _match_with_tolerance(pred: list[int], true: list[int], tolerance: int) -> int:
    """Greedy one-to-one matching of sorted positions: a prediction matches the earliest unmatched true
    boundary within `tolerance` positions. Returns the number of matches."""
    matched, j = 0, 0
    for p in pred:
        while j < len(true) and true[j] < p - tolerance:
            j += 1
        if j < len(true) and abs(true[j] - p) <= tolerance:
            matched += 1
            j += 1
    return matched


def boundary_counts(pred: Tensor, true: Tensor, tolerance: int = 0) -> tuple[int, int, int]:
    """(true positives, number predicted, number true) of boundary masks.

    Args:
        pred, true: bool (or 0/1) tensors of the same shape (..., T); the last dimension is time, leading
            dimensions are independent sequences (matches never cross them).
        tolerance: a prediction within this many positions of an unmatched true boundary counts (one-to-one).
    """
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {tuple(pred.shape)} and {tuple(true.shape)}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    pred, true = pred.bool(), true.bool()
    n_pred, n_true = int(pred.sum()), int(true.sum())
    if tolerance == 0:
        return int((pred & true).sum()), n_pred, n_true
    p_rows = pred.reshape(-1, pred.shape[-1]) if pred.dim() > 0 else pred.reshape(1, 1)
    t_rows = true.reshape(-1, true.shape[-1]) if true.dim() > 0 else true.reshape(1, 1)
    tp = sum(_match_with_tolerance(p.nonzero().flatten().tolist(), t.nonzero().flatten().tolist(), tolerance)
             for p, t in zip(p_rows, t_rows))
    return tp, n_pred, n_true


def boundary_f1(pred: Tensor, true: Tensor, tolerance: int = 0) -> BoundaryScore:
    """Precision / recall / F1 of predicted boundaries `pred` against `true` (see `boundary_counts`).

    Example:
        >>> boundary_f1(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1, 0])).f1
        0.5
    """
    tp, n_pred, n_true = boundary_counts(pred, true, tolerance)
    return BoundaryScore(*prf(tp, n_pred, n_true), tp, n_pred, n_true)


def word_boundaries(text: str, separators: Optional[str] = None) -> Tensor:
    """(N,) bool: True at each separator character that follows a non-separator one (a word ends there).
    separators: the characters that end a word (None: any whitespace; " ." for the synthetic language, whose
    phrases end with a period)."""
    is_sep = str.isspace if separators is None else (lambda c: c in separators)
    space = torch.tensor([is_sep(c) for c in text], dtype=torch.bool)
    return whitespace_run_starts(space)


def whitespace_run_starts(space: Tensor) -> Tensor:
    """(..., N) bool whitespace mask -> True at the first whitespace of each run that follows a word."""
    prev = torch.zeros_like(space)
    prev[..., 1:] = space[..., :-1]
    # the first position counts when it is whitespace: a word may have ended just before the text starts
    return space & ~prev


def layer_boundaries(z: Sequence[Tensor], z_init: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """The two boundaries that choose each layer's operation, as float (B, T) tensors (docs/spec.md, eq. 2).

    Args:
        z: L-1 tensors (B, T), the boundaries of layers 1..L-1 (`HMLSTMOutput.z`); at least one.
        z_init: L-1 tensors (B,), the boundaries before the first step (`HMLSTMState.z` of the input state).

    Returns:
        L pairs (zb, zu), bottom layer first: zb = z_{t-1}^l (zeros for the top layer, which has no boundary
        detector), zu = z_t^{l-1} (ones for the first layer: z^0 = 1).
    """
    if len(z) != len(z_init):
        raise ValueError(f"z and z_init must both hold L-1 tensors, got {len(z)} and {len(z_init)}")
    zs = [z_l.float() for z_l in z]
    own = [torch.cat([z0.float().unsqueeze(1), z_l[:, :-1]], dim=1) for z0, z_l in zip(z_init, zs)]
    return list(zip(own + [torch.zeros_like(zs[0])], [torch.ones_like(zs[0])] + zs))


def operation_fractions(z: Sequence[Tensor], z_init: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """Fraction of UPDATE, COPY and FLUSH steps of every layer (docs/spec.md, eq. 2).

    Args:
        z: L-1 tensors (B, T), the boundaries of layers 1..L-1 (`HMLSTMOutput.z`).
        z_init: L-1 tensors (B,), the boundaries before the first step (`HMLSTMState.z` of the input state).

    Returns:
        L dicts {"update", "copy", "flush"} of 0-dim tensors (summing to 1), bottom layer first. The first
        layer never COPYs (z^0 = 1); the top layer never FLUSHes (no boundary detector).
    """
    if len(z) != len(z_init):
        raise ValueError(f"z and z_init must both hold L-1 tensors, got {len(z)} and {len(z_init)}")
    if not z:  # one layer: a plain LSTM, always UPDATE
        one = torch.ones(())
        return [{"update": one, "copy": one * 0, "flush": one * 0}]
    return [{"update": ((1 - zb) * zu).mean(), "copy": ((1 - zb) * (1 - zu)).mean(), "flush": zb.mean()}
            for zb, zu in layer_boundaries(z, z_init)]


def unigram_entropy(ids: Tensor, num_symbols: int | None = None) -> float:
    """Entropy in bits per symbol of the empirical distribution of integer `ids` (any shape): the BPC of
    the best model that ignores context, the bar a language model must clear."""
    ids = ids.flatten().long()
    if ids.numel() == 0:
        raise ValueError("unigram_entropy needs at least one symbol, got an empty tensor")
    counts = torch.bincount(ids, minlength=num_symbols or 0).double()
    p = counts[counts > 0] / ids.numel()
    return float(-(p * p.log()).sum() / math.log(2))


class BoundaryCounter:
    """Accumulates boundary counts over batches, per (layer, level, tolerance), for `TOLERANCES`.

    Example:
        >>> counter = BoundaryCounter()
        >>> counter.add(1, "word", z > 0.5, true_word)      # (B, T) masks; call once per batch
        >>> counter.scores()[(1, "word", 0)].f1
    """

    def __init__(self, tolerances: Sequence[int] = TOLERANCES) -> None:
        self.tolerances = tuple(tolerances)
        self.counts: dict[tuple[int, str, int], Tensor] = {}

    def add(self, layer: int, level: str, pred: Tensor, true: Tensor) -> None:
        """Add one batch: pred, true (..., T) bool masks (rows are independent sequences)."""
        for tol in self.tolerances:
            c = torch.tensor(boundary_counts(pred, true, tol), dtype=torch.float64)
            key = (layer, level, tol)
            self.counts[key] = self.counts[key] + c if key in self.counts else c

    def scores(self) -> dict[tuple[int, str, int], BoundaryScore]:
        """(layer, level, tolerance) -> BoundaryScore of everything added."""
        return {k: BoundaryScore(*prf(*c.tolist()), *(int(v) for v in c.tolist())) for k, c in sorted(self.counts.items())}


def metric_name(layer: int, level: str, tolerance: int, kind: str = "f1") -> str:
    """The logged name: f1_l1_word (tolerance 0, the headline) or f1_tol1_l1_word."""
    return f"{kind}_l{layer}_{level}" if tolerance == 0 else f"{kind}_tol{tolerance}_l{layer}_{level}"
