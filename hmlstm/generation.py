"""Using a trained language model: sampling text and reading its boundaries over a text."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .data import Vocabulary

if TYPE_CHECKING:
    from .training import HMLSTMLanguageModel


@torch.no_grad()
def generate(model: "HMLSTMLanguageModel", prompt: str, length: int, temperature: float = 1.0,
         generator: Optional[torch.Generator] = None) -> str:
    """Sample `length` characters (bytes, for byte-level models) after `prompt`.

    Args:
        prompt: conditioning text (may be empty: generation then starts after a newline).
        length: number of symbols to sample (>= 0).
        temperature: softmax temperature (> 0); 0 takes the most likely symbol.
        generator: random source.

    Returns:
        the sampled continuation (without the prompt).
    """
    vocab = model.require_vocab()
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    if not temperature >= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature}")
    if model.hparams.byte_level:
        prompt = prompt.encode("utf-8").decode("latin-1")
    prompt = prompt or ("\n" if "\n" in vocab.chars else vocab.chars[0])
    was_training = model.training
    model.eval()
    try:
        tokens = vocab.encode(prompt).to(model.device).unsqueeze(0)  # (1, P)
        out = model(tokens)
        logits, state = out.logits[:, -1], out.rnn.state  # (1, V)
        ids = []
        for _ in range(length):
            logits = logits.float()
            logits[:, Vocabulary.UNK] = -math.inf  # never emit the unknown symbol
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (1, 1)
            ids.append(int(nxt))
            out = model(nxt, state)
            logits, state = out.logits[:, -1], out.rnn.state
    finally:
        model.train(was_training)
    return model.decode(ids)

@torch.no_grad()
def boundaries(model: "HMLSTMLanguageModel", text: str) -> list[Tensor]:
    """The boundaries z of each layer 1..L-1 over `text`: L-1 tensors (N,) of 0/1 floats (CPU)."""
    vocab = model.require_vocab()
    if not text:
        raise ValueError("text must not be empty")
    if model.hparams.byte_level:
        text = text.encode("utf-8").decode("latin-1")
    was_training = model.training
    model.eval()
    try:
        out = model(vocab.encode(text).to(model.device).unsqueeze(0))
    finally:
        model.train(was_training)
    return [z[0].float().cpu() for z in out.rnn.z]
