"""Checkpoint files: crash-safe writes, clear errors for damaged or incompatible files, and weights-only export.

`AtomicCheckpointIO` writes a temporary file, fsyncs it and renames it into place, so a kill at any moment
leaves a usable checkpoint; `describe_checkpoint_problem` and `CheckpointError` name what is wrong with a file;
`export_weights` drops the run state (`hmlstm export`).
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ._version import __version__

# Bumped when a checkpoint written by this version cannot be read by an older one; a checkpoint with a
# larger format than this is refused with a message (rather than a KeyError deep in Lightning).
CHECKPOINT_FORMAT = 1
class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: truncated, corrupt, or from an incompatible version."""


def describe_checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """Why `path` is not a readable checkpoint (missing, empty, truncated), or None if it reads."""
    path = Path(path)
    if not path.is_file():
        return f"no such checkpoint file: {path}"
    size = path.stat().st_size
    # torch.save writes a zip archive whose directory is at the end: a cut-off file has none
    if size == 0 or not zipfile.is_zipfile(path):
        return (f"checkpoint {path} ({size} bytes) is truncated or not a PyTorch checkpoint; if a run was "
                f"killed while writing it, resume from an earlier one (checkpoints written through "
                f"hmlstm.training.AtomicCheckpointIO are never left half-written)")
    return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a crash cannot corrupt: write a temporary file in the same directory, fsync it,
    rename it over the target (atomic on POSIX and Windows), fsync the directory. A kill at any moment leaves
    either the previous checkpoint or the new one, complete. Loads that fail on a damaged file raise
    `CheckpointError` saying so. The `hmlstm` command uses it by default; with a Trainer:
    `pl.Trainer(plugins=[AtomicCheckpointIO()])`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        problem = describe_checkpoint_problem(path) if Path(path).exists() else None
        if problem is not None:
            raise CheckpointError(problem)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def without_instantiator(path: str | os.PathLike) -> str | os.PathLike | io.BytesIO:
    """The checkpoint at `path`, minus the `_instantiator` that LightningCLI records in its hyperparameters.

    Why: with it, Lightning rebuilds the module through jsonargparse, which reads the vocabulary string as
    YAML, where " #" starts a comment: PTB's vocabulary ("\\n #$&'*...") came back as None. The init
    arguments are plain values, so the module is built from them directly. Returns `path` itself when the
    checkpoint has no instantiator, else the edited checkpoint in memory.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hparams = ckpt.get(pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY)
    if not isinstance(hparams, dict) or hparams.pop("_instantiator", None) is None:
        return path
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    return buf


def hmlstm_meta(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hmlstm metadata ({"format": 0} for checkpoints older than it); a `CheckpointError` if a
    newer hmlstm wrote it in a format this one cannot read."""
    meta = checkpoint.get("hmlstm", {"format": 0, "version": "< 0.1"})
    if meta.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"the checkpoint was written by hmlstm {meta.get('version')} in checkpoint format "
                              f"{meta.get('format')}; this is hmlstm {__version__}, which reads formats up to "
                              f"{CHECKPOINT_FORMAT}: upgrade hmlstm to load it")
    return meta


# What a weights-only checkpoint keeps: enough for load_from_checkpoint, generate, boundaries, validate and test.
_WEIGHTS_KEYS = ("state_dict", pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY, "pytorch-lightning_version", "epoch",
                 "global_step")


def export_weights(ckpt_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Write the model of a training checkpoint without its run state; returns the new file's size in bytes.

    The optimizer's moments, the scheduler, the carried hidden state and the random-number state are dropped
    (a PTB checkpoint: 102 MB -> 34 MB), so the result loads with `HMLSTMLanguageModel.load_from_checkpoint`
    and `hmlstm generate | boundaries | validate | test`; `hmlstm fit --ckpt_path` on it raises
    `CheckpointError` (it cannot resume training). Written atomically.
    """
    problem = describe_checkpoint_problem(ckpt_path)
    if problem is not None:
        raise CheckpointError(problem)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # as LightningCLI loads it
    missing = [k for k in ("state_dict", pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY) if k not in ckpt]
    if missing:
        raise CheckpointError(f"{ckpt_path} has no {' or '.join(missing)}: not a checkpoint of HMLSTMLanguageModel")
    out = {k: ckpt[k] for k in _WEIGHTS_KEYS if k in ckpt}
    out[pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY] = {
        k: v for k, v in ckpt[pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY].items() if k != "_instantiator"}
    meta = dict(hmlstm_meta(ckpt))
    # no run state; the mark makes `fit --ckpt_path` on this file fail with a clear error (on_load_checkpoint)
    meta.update(train_state=None, rng=None, weights_only=True)
    out["hmlstm"] = meta
    AtomicCheckpointIO().save_checkpoint(out, out_path)
    return Path(out_path).stat().st_size
