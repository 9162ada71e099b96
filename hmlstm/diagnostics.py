"""What the training logs when something goes wrong or is about to: where a non-finite value started, and the
norm of the gradient reaching each layer's boundaries."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .state import HMLSTMOutput, HMLSTMState


def first_nonfinite(state: Optional[HMLSTMState], rnn: HMLSTMOutput, named_parameters) -> str:
    """Where the non-finite values started: the carried state, a layer's h or c, or past the HM-LSTM."""
    if state is not None:
        for name, group in (("h", state.h), ("c", state.c)):
            for k, t in enumerate(group, start=1):
                if not bool(torch.isfinite(t).all()):
                    return f"the carried state was already non-finite at the batch start (layer {k}'s {name})"
    first = None  # (time step, layer, "h" or "c"); within a step layer 1 is computed first
    for k, (h, c) in enumerate(zip(rnn.h, rnn.c), start=1):
        for name, seq in (("h", h), ("c", c)):  # (B, T, H)
            if seq.dim() != 3:  # nn.LSTM layers of the baseline return no cell sequence
                continue
            bad = (~torch.isfinite(seq)).flatten(2).any(-1).any(0)  # (T,)
            if bool(bad.any()):
                t = int(bad.nonzero()[0])
                if first is None or t < first[0]:
                    first = (t, k, name)
    params = [n for n, p in named_parameters if not bool(torch.isfinite(p).all())]
    where = f"; non-finite parameters: {', '.join(params[:5])}" if params else ""
    if first is None:
        return "every layer's h and c stayed finite: the output module or the logits overflowed" + where
    t, k, name = first
    return f"layer {k}'s {name} went non-finite first, at time step {t} of the batch" + where


def boundary_grad_norms(probe_grad: Tensor, scale: float = 1.0) -> Tensor:
    """(L-1,) float32: the 2-norm over the batch and the steps of dL/dz^l for each layer, divided by `scale`.

    probe_grad: (L-1, B, T), the gradient of the probe passed to `HMLSTM.forward`.
    """
    return torch.linalg.vector_norm(probe_grad.flatten(1), dim=1, dtype=torch.float64).float() / scale
