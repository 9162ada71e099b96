"""The character vocabulary: characters <-> ids, id 0 for characters outside it."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..metrics import whitespace_run_starts


class Vocabulary:
    """Characters <-> ids. Id 0 is the unknown character; the known ones get 1..V-1 in code point order.

    Args:
        chars: the known characters (duplicates and order do not matter).
    """

    UNK = 0

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise ValueError("a vocabulary needs at least one character, got none")
        self._codes = torch.tensor([ord(c) for c in self.chars], dtype=torch.int64)
        self._space = torch.tensor([False] + [c.isspace() for c in self.chars])

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        return cls(set(text))

    def __len__(self) -> int:
        return len(self.chars) + 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} ids: unknown + {self.chars!r})"

    def encode(self, text: str) -> Tensor:
        """text -> (N,) int64 ids; characters outside the vocabulary map to `UNK`."""
        if not text:
            return torch.zeros(0, dtype=torch.int64)
        if max(text) <= "\xff":  # one byte per character: fast path (byte-level data, most ASCII text)
            codes = torch.frombuffer(bytearray(text.encode("latin-1")), dtype=torch.uint8).long()
        else:
            codes = torch.frombuffer(bytearray(text.encode("utf-32-le", "surrogatepass")), dtype=torch.int32).long()
        idx = torch.searchsorted(self._codes, codes).clamp_(max=len(self.chars) - 1)
        known = self._codes[idx] == codes
        return torch.where(known, idx + 1, torch.zeros_like(idx))

    def decode(self, ids: Iterable[int] | Tensor, unknown: str = "\ufffd") -> str:
        """ids -> text; `UNK` becomes `unknown`."""
        if isinstance(ids, Tensor):
            ids = ids.flatten().tolist()
        return "".join(self.chars[i - 1] if i > 0 else unknown for i in ids)

    def word_boundaries(self, ids: Tensor) -> Tensor:
        """(..., N) ids -> bool, True at whitespace that closes a word (see `hmlstm.metrics`)."""
        return whitespace_run_starts(self._space[ids])
