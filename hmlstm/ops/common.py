"""Helpers shared by the fused backends."""

from __future__ import annotations

import os

import torch

POISON_ENV = "HMLSTM_POISON_OUTPUTS"


def poison_enabled() -> bool:
    """True when fused ops must fill fresh output buffers with NaN (tests set HMLSTM_POISON_OUTPUTS=1),
    so that an element a kernel forgets to write fails the comparison instead of passing as zero."""
    return os.environ.get(POISON_ENV, "0") == "1"


def new_empty(*shape: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.empty on `like`'s device (and dtype unless given), NaN-filled when poisoning is on."""
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if poison_enabled() and out.is_floating_point():
        out.fill_(float("nan"))
    return out
