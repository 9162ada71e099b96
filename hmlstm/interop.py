"""Moving weights between HM-LSTM layers and torch's LSTMs (nn.LSTMCell, nn.LSTM).

torch stores gate rows in the order i, f, g, o with two biases; an HM-LSTM layer stores f, i, o, g (then
the boundary row z) with one bias. Only the three terms an LSTM has map across: the bottom-up weight
W (weight_ih) and the recurrent weight U (weight_hh). The boundary row and the top-down weight stay.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .model import HMLSTMLayer

# torch's block k -> our block position: ours (f, i, o, g) = torch's (1, 0, 3, 2)
_TORCH_TO_OURS = (1, 0, 3, 2)


def _reorder(w: Tensor, hidden: int) -> Tensor:
    blocks = w.split(hidden, dim=0)
    return torch.cat([blocks[k] for k in _TORCH_TO_OURS], dim=0)


@torch.no_grad()
def load_lstm_weights(layer: HMLSTMLayer, weight_ih: Tensor, weight_hh: Tensor,
                      bias_ih: Tensor | None = None, bias_hh: Tensor | None = None) -> None:
    """Copy torch-ordered LSTM weights into the f, i, o, g rows of `layer`.

    Args:
        weight_ih: (4H, I), weight_hh: (4H, H), bias_ih/bias_hh: (4H,) or None, in torch's i, f, g, o order.
    """
    H = layer.hidden_size
    if tuple(weight_ih.shape) != (4 * H, layer.weight_ih.shape[1]):
        raise ValueError(f"weight_ih must have shape ({4 * H}, {layer.weight_ih.shape[1]}), "
                         f"got {tuple(weight_ih.shape)}")
    if tuple(weight_hh.shape) != (4 * H, H):
        raise ValueError(f"weight_hh must have shape ({4 * H}, {H}), got {tuple(weight_hh.shape)}")
    layer.weight_ih[: 4 * H].copy_(_reorder(weight_ih, H))
    layer.weight_hh[: 4 * H].copy_(_reorder(weight_hh, H))
    bias = torch.zeros(4 * H, dtype=weight_ih.dtype, device=weight_ih.device)
    for b in (bias_ih, bias_hh):
        if b is not None:
            bias = bias + b
    layer.bias[: 4 * H].copy_(_reorder(bias, H))


def from_lstm_cell(layer: HMLSTMLayer, cell: nn.LSTMCell) -> None:
    """Load an nn.LSTMCell's weights into `layer` (see load_lstm_weights)."""
    load_lstm_weights(layer, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)


def from_lstm(model, lstm: nn.LSTM) -> None:
    """Load each layer of a (unidirectional, batch-first or not) nn.LSTM into the matching HMLSTM layer."""
    if lstm.bidirectional or lstm.proj_size:
        raise ValueError("from_lstm supports unidirectional nn.LSTM without projections")
    if lstm.num_layers != model.num_layers:
        raise ValueError(f"lstm has {lstm.num_layers} layers, the HMLSTM has {model.num_layers}")
    for k, layer in enumerate(model.layers):
        g = lambda name: getattr(lstm, f"{name}_l{k}", None)  # noqa: E731
        load_lstm_weights(layer, g("weight_ih"), g("weight_hh"), g("bias_ih"), g("bias_hh"))
