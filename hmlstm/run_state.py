"""The run state a training checkpoint carries beyond Lightning's own, for an exact resume, also mid-epoch:
the hidden state carried between batches (truncated BPTT) of every stream, the position in the epoch, the
random-number state, the skipped-batch count and the training wall time. Mixed into `HMLSTMLanguageModel`."""

from __future__ import annotations

from typing import Any, Optional

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from ._version import __version__
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, hmlstm_meta
from .state import HMLSTMState


class ResumableRun:
    """Checkpoint hooks of a LightningModule that keeps `_states["train"]` (the carried state), `_train_position`,
    `skipped_batches`, `_wall_s()` / `_wall_offset` and `_resume` (the checkpoint's state until its epoch starts)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self._states.get("train")
        carried = None
        if state is not None and self._trainer is not None and self.trainer.state.fn == "fit":
            # plain lists (weights_only loading accepts them); with several processes, the global batch's
            # streams in rank order: every process calls this hook, rank 0 writes the file
            carried = {name: [self._gather_rows(t).cpu() for t in group] for name, group in zip(("h", "c", "z"), state)}
        checkpoint["hmlstm"] = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "epoch": self.current_epoch,
            "train_position": self._train_position,
            "train_state": carried,
            "skipped_batches": self.skipped_batches,
            "wall_s": self._wall_s(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def _gather_rows(self, t: Tensor) -> Tensor:
        if not self._distributed:
            return t
        return self.all_gather(t).flatten(0, 1)  # (W, B/W, ...) -> (B, ...)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = hmlstm_meta(checkpoint)
        self.skipped_batches = int(meta.get("skipped_batches", 0))
        self._wall_offset = float(meta.get("wall_s", 0.0) or 0.0)
        if meta.get("weights_only") and self._trainer is not None and self.trainer.state.fn == "fit":
            raise CheckpointError("this checkpoint was written by `hmlstm export`: it holds the model only (no "
                                  "optimizer, scheduler, loop or carried state) and cannot resume training; resume "
                                  "from the training checkpoint it was exported from (e.g. last.ckpt)")
        if self._trainer is None or self.trainer.state.fn != "fit" or meta.get("format", 0) < 1:
            return  # loading weights, evaluating, or an old checkpoint: no run state to restore
        self._resume = {"epoch": meta["epoch"], "position": meta["train_position"], "state": meta["train_state"]}
        torch.set_rng_state(meta["rng"]["torch"])
        if meta["rng"]["cuda"] and torch.cuda.is_available() and len(meta["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(meta["rng"]["cuda"])

    def _resumed_state(self) -> Optional[HMLSTMState]:
        """The checkpoint's carried state if training resumes in the middle of the epoch it was saved in."""
        resume, self._resume = self._resume, None
        self._train_position = 0
        if resume is None or resume["state"] is None or resume["epoch"] != self.current_epoch:
            return None
        loader = self.trainer.train_dataloader
        position = getattr(loader, "position", None)
        if position is None:
            rank_zero_warn("resuming in the middle of an epoch with a training loader that cannot start there (not "
                           "a hmlstm.data.StreamLoader): the carried state restarts from zeros")
            return None
        if position != resume["position"] or position == 0:
            return None  # the loader restarts the epoch: so do the streams
        self._train_position = position
        rows = getattr(loader, "rows", slice(None))
        groups = [tuple(t[rows].to(self.device) for t in resume["state"][name]) for name in ("h", "c", "z")]
        return HMLSTMState(*groups)
