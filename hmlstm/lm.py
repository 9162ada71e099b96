"""The gated output module (eq. 10-12) and the character language model built on HMLSTM."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lstm import StackedLSTM
from .model import HMLSTM
from .state import HMLSTMOutput, HMLSTMState


CELLS = ("hmlstm", "lstm")


class GatedOutput(nn.Module):
    """h^e_t = ReLU(sum_l g^l_t W^e_l h^l_t) with g^l_t = sigm(w^l . [h^1_t; ...; h^L_t]) (eq. 11-12).

    Parameters: gate.weight (L, sum H_l), row l is w^l; proj[l].weight (E, H_l) is W^e_l. No biases:
    the paper writes none.
    """

    def __init__(self, hidden_sizes: Sequence[int], embed_size: int) -> None:
        super().__init__()
        self.gate = nn.Linear(sum(hidden_sizes), len(hidden_sizes), bias=False)
        self.proj = nn.ModuleList(nn.Linear(h, embed_size, bias=False) for h in hidden_sizes)

    def forward(self, hs: Sequence[Tensor]) -> Tensor:
        """hs: L tensors (B, T, H_l) -> (B, T, E)."""
        g = torch.sigmoid(self.gate(torch.cat(tuple(hs), dim=-1)))  # (B, T, L)
        mixed = sum(g[..., l : l + 1] * proj(h) for l, (proj, h) in enumerate(zip(self.proj, hs)))
        return F.relu(mixed)


class LMOutput(NamedTuple):
    """logits: (B, T, V); rnn: the HMLSTM's output (hidden and boundary sequences, final state)."""

    logits: Tensor
    rnn: HMLSTMOutput


class CharLM(nn.Module):
    """Character language model of the paper: embedding (no non-linearity) -> HMLSTM -> gated output
    module -> logits over the vocabulary.

    Args:
        vocab_size: V.
        hidden_sizes: HMLSTM layer sizes, e.g. (512, 512, 512) for PTB.
        embed_size: input embedding, 128 in the paper.
        output_size: E, the output embedding (512 for PTB, 2048 for text8/enwik8).
        cell: "hmlstm" (the paper's model) or "lstm" (the baseline: `hmlstm.lstm.StackedLSTM` of the same sizes,
            which takes layer_norm and backend only).
        **hmlstm_options: boundary, copy_boundary, layer_norm, backend (see HMLSTM).
    """

    def __init__(self, vocab_size: int, hidden_sizes: Sequence[int] = (512, 512, 512), embed_size: int = 128,
                 output_size: int = 512, cell: str = "hmlstm", **hmlstm_options) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size}")
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_size)
        if cell == "lstm":
            extra = sorted(set(hmlstm_options) - {"layer_norm", "backend"})
            if extra:
                raise ValueError(f"cell='lstm' has no boundaries: {', '.join(extra)} apply to cell='hmlstm' only")
            self.rnn = StackedLSTM(embed_size, hidden_sizes, **hmlstm_options)
        else:
            self.rnn = HMLSTM(embed_size, hidden_sizes, **hmlstm_options)
        self.output = GatedOutput(self.rnn.hidden_sizes, output_size)
        self.head = nn.Linear(output_size, vocab_size)

    def forward(self, tokens: Tensor, state: Optional[HMLSTMState] = None, slope: float | Tensor = 1.0,
                generator: Optional[torch.Generator] = None, probe: Optional[Tensor] = None,
                boundaries: Optional[Tensor] = None) -> LMOutput:
        """tokens: (B, T) int64 ids in [0, V) -> logits (B, T, V) predicting the next character.
        probe: see `HMLSTM.forward` (its gradient is dL/dz); boundaries: (L-1, B, T) forced boundaries, ditto."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (B, T), got dtype {tokens.dtype} "
                             f"and shape {tuple(tokens.shape)}")
        if boundaries is not None and not isinstance(self.rnn, HMLSTM):
            raise ValueError("boundaries: cell='lstm' has no boundary detectors to replace")
        extra = {} if boundaries is None else {"boundaries": boundaries}
        rnn = self.rnn(self.embed(tokens), state=state, slope=slope, generator=generator, probe=probe, **extra)
        return LMOutput(self.head(self.output(rnn.h)), rnn)
