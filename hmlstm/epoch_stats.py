"""Epoch values summed on the device, step by step, and handed to the logger once an epoch.

Lightning's `LightningModule.log(..., on_epoch=True)` does the same sums, but each call costs about a millisecond
on the CPU (it validates the call and moves its result object to the device every time), and the HM-LSTM's
training step logs 10-20 such values: boundary rates, UPDATE/COPY/FLUSH fractions, boundary-gradient norms. Here
each step costs two small tensor operations per value and the epoch one `log` call per value. The values reach
`trainer.callback_metrics` when the module's epoch-end hook logs them, after callbacks' own epoch-end hooks have
run: a callback that reads them there should do so at a later hook (on_validation_end, on_train_epoch_start)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Reduce = Literal["mean", "max"]


class EpochStats:
    """Per stage ("train", "val", "test"), a weighted mean or a maximum of each named value over the epoch's steps.

    `add` never synchronizes with the device; `compute` returns (name -> 0-d float32 tensor, the dtype Lightning
    sums in; float64 is missing on some devices). A mean weighs each step's value by its weight (the batch's
    character count, as Lightning's `batch_size`), so that it is the mean over every character of the epoch."""

    def __init__(self) -> None:
        self._values: dict[str, dict[str, tuple[Reduce, Tensor, float]]] = {}

    def reset(self, stage: str) -> None:
        self._values.pop(stage, None)

    def add(self, stage: str, name: str, value: Tensor, weight: float = 1.0, reduce: Reduce = "mean") -> None:
        """Accumulate a 0-d value: value * weight into a sum (reduce="mean") or into a running maximum."""
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        value = value.detach().to(torch.float32)
        if value.dim() != 0:
            raise ValueError(f"{name}: an epoch value is a 0-d tensor, got shape {tuple(value.shape)}")
        values = self._values.setdefault(stage, {})
        if name not in values:
            values[name] = (reduce, value * weight if reduce == "mean" else value, weight)
            return
        kind, acc, total = values[name]
        if kind != reduce:
            raise ValueError(f"{name} was accumulated with reduce={kind!r}, now {reduce!r}")
        values[name] = (kind, acc + value * weight if kind == "mean" else torch.maximum(acc, value), total + weight)

    def compute(self, stage: str) -> dict[str, Tensor]:
        """name -> the epoch's weighted mean or maximum so far (empty when nothing was added)."""
        return {name: acc / total if kind == "mean" else acc
                for name, (kind, acc, total) in self._values.get(stage, {}).items()}
