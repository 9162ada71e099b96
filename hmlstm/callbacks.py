"""Training callbacks: the slope schedule of the boundary detector."""

from __future__ import annotations

import pytorch_lightning as pl


class SlopeAnnealing(pl.Callback):
    """Sets the boundary detector's slope at the start of every training epoch:

        a = min(max_slope, start + rate * epoch)        (epoch counted from 0)

    Defaults: the paper's PTB schedule min(5, 1 + 0.04 epoch). `rate=0` keeps a = start throughout: the
    step-function-only setting (text8, enwik8). The slope depends only on the epoch number, and the module
    keeps it as a buffer, so it continues correctly when training resumes from a checkpoint.
    """

    def __init__(self, start: float = 1.0, rate: float = 0.04, max_slope: float = 5.0) -> None:
        if not start > 0:
            raise ValueError(f"slope start must be > 0, got {start}")
        if rate < 0:
            raise ValueError(f"slope rate must be >= 0, got {rate}")
        if max_slope < start:
            raise ValueError(f"max_slope must be >= start ({start}), got {max_slope}")
        self.start, self.rate, self.max_slope = float(start), float(rate), float(max_slope)

    def slope_at(self, epoch: int) -> float:
        return min(self.max_slope, self.start + self.rate * epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.slope.fill_(self.slope_at(trainer.current_epoch))
