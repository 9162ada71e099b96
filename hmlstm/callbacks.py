"""Training callbacks: the slope schedule of the boundary detector, and a `last.ckpt` that is always the newest."""

from __future__ import annotations

import os
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn


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


class LatestCheckpoint(Checkpoint):
    """Writes `last.ckpt`, in the folder of the trainer's first ModelCheckpoint, after every validation of a fit,
    at every epoch's end and when the fit ends, so that it always holds the newest state (what `--ckpt_path
    .../last.ckpt` resumes).

    Why: Lightning's `ModelCheckpoint(save_last=True)` writes last.ckpt only at a step where that callback saved a
    checkpoint of its own; with a monitored metric and save_top_k=1 that is a step where the metric improved, so
    after a validation that did not improve, last.ckpt is the best epoch's state, not the newest.

    A ModelCheckpoint saves after the validation (mid-epoch validations) or at the epoch's end (one validation
    per epoch); this callback writes at both points, and runs after the ModelCheckpoints it follows in the
    callback list (a Checkpoint subclass: Lightning keeps them last, in order), so the copy kept is the newest
    state with their bookkeeping updated. It tells them the shared file is theirs too (`last_model_path`), or their
    version counter would write last-v1.ckpt beside it. It writes nothing without a ModelCheckpoint (nowhere to
    write), during sanity checks, or outside `fit`. The `hmlstm` CLI adds it.
    """

    FILENAME = "last.ckpt"

    def __init__(self) -> None:
        self._saved_step: Optional[int] = None

    @staticmethod
    def path(trainer: pl.Trainer) -> Optional[str]:
        """Where it writes: last.ckpt beside the first ModelCheckpoint's files, or None without one."""
        callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        dirpath = getattr(callback, "dirpath", None)
        return None if dirpath is None else os.path.join(dirpath, LatestCheckpoint.FILENAME)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        path = self.path(trainer)  # the ModelCheckpoints have resolved their folders: their setup ran first
        if stage != "fit" or path is None:
            return
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and not callback.last_model_path \
                    and callback.dirpath is not None and os.path.join(callback.dirpath, self.FILENAME) == path:
                callback.last_model_path = path

    def _save(self, trainer: pl.Trainer, again: bool = False) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or trainer.fast_dev_run:
            return
        path = self.path(trainer)
        if path is None or (self._saved_step == trainer.global_step and not again):
            return
        trainer.save_checkpoint(path)  # every process calls it; the strategy writes once
        self._saved_step = trainer.global_step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # again at a step just written: a ModelCheckpoint saving at the epoch's end has updated its state since
        self._save(trainer, again=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a fit stopped by max_steps or max_time ends where no validation ran
        self._save(trainer)
