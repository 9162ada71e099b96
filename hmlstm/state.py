"""Typed containers for the recurrent state and the outputs of an HM-LSTM."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class HMLSTMState(NamedTuple):
    """State after (or before) a sequence; pass it back as `state=` to continue exactly.

    h: L tensors (B, H_l); c: L tensors (B, H_l); z: L-1 tensors (B,), the boundaries of layers 1..L-1
    (the top layer has no boundary detector).
    """

    h: tuple[Tensor, ...]
    c: tuple[Tensor, ...]
    z: tuple[Tensor, ...]

    def detach(self) -> "HMLSTMState":
        """The same values cut from the autograd graph (truncated BPTT between batches)."""
        return HMLSTMState(*(tuple(t.detach() for t in group) for group in self))


class HMLSTMOutput(NamedTuple):
    """What `HMLSTM.forward` returns.

    h: L tensors (B, T, H_l), every layer's hidden sequence.
    c: L tensors (B, T, H_l), every layer's cell sequence.
    z: L-1 tensors (B, T), the boundaries of layers 1..L-1 (float, 0/1 unless boundary="soft").
    state: the final state.
    """

    h: tuple[Tensor, ...]
    c: tuple[Tensor, ...]
    z: tuple[Tensor, ...]
    state: HMLSTMState
