"""`StackedLSTM`: the LSTM baseline, a stack of LSTM layers with the HM-LSTM's interface.

The comparison the paper makes (HM-LSTM against an LSTM of the same sizes) is one flag apart in the trainer
(`--model.cell lstm`): same embedding, gated output module, data, schedule and logs. Each layer is its own
module because the gated output module reads every layer's hidden sequence, which a multi-layer `nn.LSTM`
does not return.

- `layer_norm=False`: each layer is an `nn.LSTM` (oneDNN on the CPU, cuDNN on a GPU).
- `layer_norm=True`: each layer is a one-layer `HMLSTM` with layer norm, which is exactly an LN-LSTM with the
  HM-LSTM's placement of the normalization (the gate pre-activations' sum and the cell before its tanh; see
  `hmlstm.reference`): a one-layer HM-LSTM has no boundary detector and always UPDATEs. It runs on the fused
  backends, so the baseline with layer norm is as fast as the HM-LSTM's own kernels allow.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .model import HMLSTM
from .state import HMLSTMOutput, HMLSTMState


class StackedLSTM(nn.Module):
    """L LSTM layers, batch first, returning `HMLSTMOutput` with no boundaries (z = ()).

    Args:
        input_size: I.
        hidden_sizes: (H_1, ..., H_L).
        layer_norm: LN-LSTM layers (see the module docstring) instead of `nn.LSTM`.
        backend: the backend of the LN-LSTM layers (see `hmlstm.backends`); unused without layer norm.
    """

    def __init__(self, input_size: int, hidden_sizes: Sequence[int], *, layer_norm: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        hidden_sizes = tuple(hidden_sizes)
        if not hidden_sizes or any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive ints such as (512, 512, 512), got {hidden_sizes!r}")
        self.input_size = input_size
        self.hidden_sizes = hidden_sizes
        self.layer_norm = bool(layer_norm)
        sizes_in = (input_size,) + hidden_sizes[:-1]
        if self.layer_norm:
            self.layers = nn.ModuleList(HMLSTM(i, (h,), layer_norm=True, backend=backend)
                                        for i, h in zip(sizes_in, hidden_sizes))
        else:
            self.layers = nn.ModuleList(nn.LSTM(i, h, batch_first=True) for i, h in zip(sizes_in, hidden_sizes))

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)

    def initial_state(self, batch_size: int, device=None, dtype=None) -> HMLSTMState:
        """Zeros: h, c (B, H_l) per layer; no boundaries."""
        ref = next(self.parameters())
        device = device if device is not None else ref.device
        dtype = dtype if dtype is not None else ref.dtype
        zeros = tuple(torch.zeros(batch_size, h, device=device, dtype=dtype) for h in self.hidden_sizes)
        return HMLSTMState(zeros, tuple(torch.zeros_like(t) for t in zeros), ())

    def forward(self, x: Tensor, state: Optional[HMLSTMState] = None, slope: float | Tensor = 1.0, *,
                generator: Optional[torch.Generator] = None, probe: Optional[Tensor] = None) -> HMLSTMOutput:
        """x: (B, T, I) -> h: L x (B, T, H_l), c: L x (B, T, H_l) with layer norm, else L x (0,) (nn.LSTM
        returns no cell sequence), z: (), state. `slope`, `generator` and `probe` exist for the HM-LSTM's
        interface and are unused (there are no boundaries)."""
        if x.dim() != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"x must have shape (B, T, {self.input_size}) (batch first), got {tuple(x.shape)}")
        B = x.shape[0]
        state = state if state is not None else self.initial_state(B, x.device, x.dtype)
        if len(state.h) != self.num_layers or len(state.c) != self.num_layers:
            raise ValueError(f"state must hold {self.num_layers} h and c tensors, got {len(state.h)} and "
                             f"{len(state.c)}")
        hs, cs, hT, cT = [], [], [], []
        below = x
        for layer, h0, c0 in zip(self.layers, state.h, state.c):
            if self.layer_norm:
                out = layer(below, HMLSTMState((h0,), (c0,), ()))
                seq, c_seq, (h1,), (c1,) = out.h[0], out.c[0], out.state.h, out.state.c
            else:
                seq, (h1, c1) = layer(below, (h0.unsqueeze(0), c0.unsqueeze(0)))
                h1, c1, c_seq = h1[0], c1[0], x.new_zeros(0)
            hs.append(seq)
            cs.append(c_seq)
            hT.append(h1)
            cT.append(c1)
            below = seq
        return HMLSTMOutput(tuple(hs), tuple(cs), (), HMLSTMState(tuple(hT), tuple(cT), ()))
