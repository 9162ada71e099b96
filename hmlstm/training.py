"""Lightning training of the character-level HM-LSTM language model (docs/spec.md, "Training").

Run it from the command line (see `hmlstm.cli`):

    hmlstm fit                          # offline default: Python docs, small CPU model
    hmlstm fit --config ptb.yaml        # the paper's PTB setup

or from Python:

    dm = PydocDataModule(batch_size=32, seq_len=50)
    model = HMLSTMLanguageModel(hidden_sizes=(128, 128), output_size=256)
    pl.Trainer(max_epochs=5, gradient_clip_val=1.0, callbacks=[SlopeAnnealing()]).fit(model, dm)

Training follows the paper: Adam, gradient norm clipped at 1 (a Trainer setting), the learning rate
divided by 50 when the validation NLL stops improving, slope annealing of the boundary detector as a
callback, and truncated BPTT: the final state of a batch is the initial state of the next (detached),
reset at the start of every epoch.

Robustness: a NaN/Inf training loss stops the run with `NonFiniteLossError` naming the step and the first
layer state that went non-finite (or skips the batch: nonfinite="skip"); checkpoints carry the carried state
and the RNG, so a run killed mid-epoch resumes exactly (with `hmlstm.data.StreamLoader` restoring the stream
position); `AtomicCheckpointIO` makes checkpoint writes crash-safe; damaged or incompatible checkpoints
raise `CheckpointError`.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from . import generation
from ._version import __version__
from .callbacks import SlopeAnnealing
from .checkpoint import (
    CHECKPOINT_FORMAT,
    AtomicCheckpointIO,
    CheckpointError,
    describe_checkpoint_problem,
    export_weights,
    without_instantiator,
)
from .data import Vocabulary
from .boundary_options import (cap_detector_norms, detector_preactivations, init_detectors, oracle_boundaries,
                               steer_detector_rates, training_charges)
from .diagnostics import boundary_grad_norms, first_nonfinite
from .epoch_stats import EpochStats
from .lm import CharLM
from .metrics import BoundaryCounter, metric_name, operation_fractions, prf
from .options import check_options
from .run_state import ResumableRun
from .state import HMLSTMOutput, HMLSTMState

LN2 = math.log(2)
# Steps averaged by `train/bpc_100`: the loss-spike criterion reads the training BPC over 100 steps, and a
# single batch's BPC (`train/bpc_step`) varies by about 0.04 from one logged batch to the next on PTB.
BPC_WINDOW = 100
# Re-exported: the names users and the CLI import from here.
__all__ = ["HMLSTMLanguageModel", "NonFiniteLossError", "SlopeAnnealing", "AtomicCheckpointIO", "CheckpointError",
           "describe_checkpoint_problem", "export_weights", "CHECKPOINT_FORMAT"]


def reset_streams(state: HMLSTMState, p: float) -> HMLSTMState:
    """The carried state with each stream (batch row) set to zeros with probability p (torch's global RNG, which
    checkpoints carry, so a resumed run draws the same)."""
    keep = (torch.rand(state.h[0].shape[0], device=state.h[0].device) >= p).to(state.h[0].dtype)
    return HMLSTMState(h=tuple(t * keep[:, None] for t in state.h), c=tuple(t * keep[:, None] for t in state.c),
                       z=tuple(t * keep for t in state.z))


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step and where it started."""


class HMLSTMLanguageModel(ResumableRun, pl.LightningModule):
    """The paper's character language model (embedding -> HM-LSTM -> gated output module -> softmax).

    Args:
        hidden_sizes: HM-LSTM layer sizes (PTB: 512, 512, 512).
        embed_size: input embedding (128 in the paper).
        output_size: output embedding of the gated output module (PTB 512, text8/enwik8 2048).
        boundary, copy_boundary, layer_norm, backend: passed to `HMLSTM` (boundary and copy_boundary default to
            "step" and "hold"; with cell="lstm" only layer_norm and backend apply).
        lr: Adam learning rate (PTB 0.002, text8/enwik8 0.001).
        lr_factor: multiplies the learning rate when the validation NLL stops improving (paper: 1/50), or at
            each of lr_milestones when given.
        lr_patience: epochs without improvement before that happens (0: the first one).
        lr_milestones: epochs after which the learning rate is multiplied by lr_factor, in place of the plateau
            rule (e.g. [5]: once, after the fifth epoch). A fixed schedule: two models compared at equal steps
            then drop at the same step, which the plateau rule does not promise.
        vocab: the characters of the vocabulary. Leave it unset when training: it is taken from the data
            module and stored here, so that a checkpoint is self-contained.
        byte_level: the vocabulary's characters stand for bytes (enwik8); also filled from the data module.
        nonfinite: what a NaN or Inf training loss does: "raise" (stop with `NonFiniteLossError`, naming the
            global step and the first layer whose h or c went non-finite, and at which time step) or "skip"
            (skip that batch's update, restart the carried state, count it in `train/skipped_batches`).
        cell: "hmlstm", or "lstm" for the baseline of the same sizes (`hmlstm.lstm.StackedLSTM`) with the same
            embedding, output module and training; it refuses the HM-only options boundary, copy_boundary,
            boundary_norm_cap and oracle_boundaries, and warns that boundary_bias (which default.yaml sets),
            boundary_cost, boundary_peaks and boundary_peaks_reach (which synthetic.yaml sets), boundary_peaks_warmup,
            boundary_nesting and boundary_rates are unused.
        loss_reduction: "mean" (the per-character NLL is what is clipped and minimized) or "sum_time" (the NLL
            summed over the T steps and averaged over the batch, as the authors' code: a gradient T times larger
            meets the same clip, so nearly every step is clipped to the same norm). The logged nll/bpc are per
            character either way.
        boundary_norm_cap: after every update, scale each of a boundary unit's weight vectors (its row of
            weight_ih, weight_hh, weight_td) down to this norm where it is longer (the authors' code: 1.9365).
        boundary_bias: initial bias of the boundary units (None: the uniform initialization of every bias); one value
            for every layer, or a list with one per boundary layer (null leaves that layer's).
        boundary_zero_init: start the boundary units' weight rows (input, recurrent, top-down) at 0, so that every
            detector starts at the same pre-activation (its bias) at every step and the gradient, not the random
            initialization, decides where it fires first.
        adam_beta2, weight_decay: Adam's beta2 (the authors' code: 0.99) and L2 weight decay.
        boundary_cost: a charge, in nats per character, for every boundary a detector fires during training:
            the loss adds sum_l cost_l * mean(z^l), whose straight-through gradient pushes every detector toward
            firing less, so that a boundary survives only where it lowers the NLL by more than it costs (an
            update budget; not in the paper, whose forward it leaves unchanged). One float for every layer, or a
            list with one per boundary layer (L - 1); 0 turns it off.
        boundary_peaks: a self-supervised target for where a detector fires (not in the paper; the forward is
            unchanged). Layer 1's targets are the steps whose predictive entropy (of the next character, from the
            model's own logits, no gradient) is a local peak above the batch mean: the steps after which the text
            is hard to predict, the ends of words. Layer k's are the boundaries of layer k-1 whose entropy is above
            their mean: the larger peaks. The loss adds, per layer, w/2 * (mean(z (1 - y)) / (1 - p) - mean(z y) / p)
            (y the targets, p their fraction): boundaries on targets earn, others cost, balanced so that firing
            everywhere or nowhere costs nothing: it moves where a layer fires, not how often
            (`hmlstm.boundary_options.peak_charge`). One float for every layer, or one per boundary layer; 0: off.
        boundary_peaks_reach: the peak charge's straight-through gradient goes on outside the hard sigmoid's window, at
            its slope a/2, on the steps where a detector disagrees with its target (not in the paper; the forward and
            the language model's gradient are unchanged). The targets are the model's own entropy peaks, noise
            in the first steps; charged then, a detector can be pushed out of the window on the steps where the
            peaks will be (the synthetic language's periods, in the first 15 steps at seed 2), and the paper's
            estimator gives it no gradient there to come back (`hmlstm.boundary_options.reach_saturated`; the
            pre-activations are recomputed from the run's outputs, one weight row per layer).
        boundary_peaks_warmup: training steps at the start with the peak charge off (0: from the first step): the
            targets are the model's own entropy peaks, noise before it has learned anything.
        boundary_nesting: a charge, in nats, for every boundary of layer l >= 2 on a step where layer l-1 has none
            (possible only on a FLUSH step, right after the layer's own boundary): it keeps each layer's boundaries
            among those of the layer below, as segments of a hierarchy nest. 0 turns it off.
        state_reset: the probability that a training stream starts a batch from zeros instead of the state the
            previous batch left (0: the paper's truncated BPTT, every stream carried through the epoch). Validation
            starts from zeros and runs streams far shorter than an epoch's; a model trained only on long streams
            can come to rely on a state that only they build (docs/results.md: the top layer's cell, which never
            flushes, grows over a training stream).
        boundary_rates: a band [lo, hi] of boundaries per character for each boundary layer (null: none), held by
            a homeostatic threshold rather than a gradient: after every update a layer whose rate in that batch was
            below lo has its boundary unit's bias raised by boundary_rate_step, above hi lowered by it. It reaches a
            detector no gradient moves (a dead layer, or one firing on every step: both are outside the hard
            sigmoid's window). Not in the paper; the forward is unchanged (`steer_detector_rates`).
        boundary_rate_step: the bias change per update of boundary_rates.
        oracle_boundaries: the true segment ends replace the boundary detectors' z in every stage (layer k gets
            level k of the data's boundaries, `hmlstm.synthetic.LEVELS`: words, then phrases). A diagnostic, not
            the paper's model: the BPC an HM-LSTM would reach if its layers found the structure, to hold a learned
            run against. Runs the reference loop (slow); the logged F1 is 1 by construction.

    Logged every epoch, for stage in train/val/test: `{stage}/bpc`, `{stage}/nll`, `{stage}/boundary_rate_l{k}`,
    `{stage}/{update,copy,flush}_l{k}` (layers numbered from 1); in val/test the boundary precision, recall
    and F1 of each layer against each level of true boundaries, `{stage}/f1_l{k}_{level}`; in train
    `train/chars_per_sec`, `train/slope` and `train/grad_norm_max` (the largest gradient norm before clipping).
    Logged per step: `train/bpc_step` (this batch), `train/bpc_100` (the mean of the last 100 training steps'
    BPC, fewer after a start or a resume), `train/grad_norm`. F1 at tolerance 1 beside the exact one:
    `{stage}/f1_tol1_l{k}_{level}` (alignment: `hmlstm.metrics`).
    Boundary-gradient diagnostics (HM-LSTM): `train/dz_norm_l{k}` per step, the 2-norm over the batch and its
    steps of dL/dz_t^k, the whole gradient reaching layer k's boundaries, in units of the per-character mean
    NLL whatever `loss_reduction` is; `train/dz_norm_max_l{k}` and `train/dz_norm_mean_l{k}` per epoch.
    A layer whose boundaries stop receiving gradient, or a path that explodes, shows there while it happens.

    Checkpoints carry what an exact mid-epoch resume needs beyond Lightning's own state (step, epoch,
    optimizer, LR scheduler, the loader's position): the carried TBPTT state of every stream and the RNG state.
    """

    def __init__(self, hidden_sizes: Sequence[int] = (512, 512, 512), embed_size: int = 128, output_size: int = 512,
                 boundary: Optional[str] = None, copy_boundary: Optional[str] = None, layer_norm: bool = True,
                 backend: str = "auto", lr: float = 0.002, lr_factor: float = 1 / 50, lr_patience: int = 0,
                 lr_milestones: Optional[list[int]] = None, vocab: Optional[str] = None, byte_level: bool = False,
                 nonfinite: str = "raise", cell: str = "hmlstm",
                 loss_reduction: str = "mean", boundary_norm_cap: Optional[float] = None,
                 boundary_bias: Optional[float | list[Optional[float]]] = None, adam_beta2: float = 0.999,
                 weight_decay: float = 0.0,
                 boundary_cost: float | list[float] = 0.0, oracle_boundaries: bool = False,
                 boundary_zero_init: bool = False, boundary_peaks: float | list[float] = 0.0,
                 boundary_peaks_reach: bool = False, boundary_peaks_warmup: int = 0,
                 boundary_nesting: float = 0.0, state_reset: float = 0.0,
                 boundary_rates: Optional[list[Optional[list[float]]]] = None,
                 boundary_rate_step: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        # one per boundary layer, [] when off (and with the LSTM); a bad argument fails here, before training
        self._costs, self._peaks, self._bands = check_options(self.hparams)
        self._rates: Optional[list[float]] = None  # this training step's boundary rates, for the band controller
        # The slope of the boundary detector's hard sigmoid; set by SlopeAnnealing at each epoch start. A
        # buffer, so validate/test/generate from a checkpoint use the slope the weights were trained with.
        self.register_buffer("slope", torch.tensor(1.0))
        self.net: Optional[CharLM] = None
        self.vocab: Optional[Vocabulary] = None
        if vocab is not None:
            self._build(Vocabulary(vocab))
        self._states: dict[str, Optional[HMLSTMState]] = {}
        self._f1: dict[str, BoundaryCounter] = {}
        self._epoch = EpochStats()  # epoch values logged once an epoch (`_log_epoch`)
        self._chars = 0
        self._t0 = 0.0
        self.validated_at_step = -1  # global step of the last validation (-1: none yet)
        self.skipped_batches = 0  # training batches skipped for a non-finite loss (nonfinite="skip")
        self._train_position = 0  # batches of the current epoch trained on
        self._resume: Optional[dict[str, Any]] = None  # the carried state of a checkpoint, until its epoch starts
        self._probe: Optional[Tensor] = None  # this training step's boundary probe, until on_after_backward
        self._wall_offset = 0.0  # training seconds before this run (from the checkpoint it resumed)
        self._recent_bpc: deque[Tensor] = deque(maxlen=BPC_WINDOW)  # detached: no host sync per step on a GPU

    def _build(self, vocab: Vocabulary) -> None:
        hp = self.hparams
        self.vocab = vocab
        cell = hp.get("cell", "hmlstm")
        options = {"layer_norm": hp.layer_norm, "backend": hp.backend}
        if cell == "hmlstm":
            options.update(boundary=hp.boundary or "step", copy_boundary=hp.copy_boundary or "hold")
        self.net = CharLM(len(vocab), tuple(hp.hidden_sizes), embed_size=hp.embed_size, output_size=hp.output_size,
                          cell=cell, **options)
        if cell == "hmlstm":
            init_detectors(self.net.rnn, hp.get("boundary_bias"), hp.get("boundary_zero_init", False))
        hp.vocab = vocab.chars

    def configure_model(self) -> None:
        """Build the network from the data module's vocabulary, or hand the checkpoint's vocabulary to it."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.net is None:
            if dm is None or not hasattr(dm, "vocab"):
                raise RuntimeError("HMLSTMLanguageModel has no vocabulary: pass vocab=... or train with a "
                                   "hmlstm.data.CharDataModule, which provides one")
            self.hparams.byte_level = bool(getattr(dm, "byte_level", False))
            self._build(dm.vocab)
        elif dm is not None and hasattr(dm, "set_vocab"):
            dm.set_vocab(self.vocab)

    # -- the shared step ------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, state: Optional[HMLSTMState] = None, probe: Optional[Tensor] = None,
                boundaries: Optional[Tensor] = None):
        """tokens (B, T) -> LMOutput(logits (B, T, V), rnn) at the current slope (probe, boundaries: see
        `HMLSTM.forward`)."""
        if self.net is None:
            self.require_vocab()
        if tokens.numel() and not tokens.is_floating_point():
            lo, hi = torch.stack(torch.aminmax(tokens)).tolist()
            if lo < 0 or hi >= self.net.vocab_size:
                # caught here: an embedding lookup out of range is an opaque IndexError (a device assert on GPU)
                raise ValueError(f"token ids must be in [0, {self.net.vocab_size}) for this vocabulary of "
                                 f"{self.net.vocab_size}, got ids from {lo} to {hi}; encode text with the model's "
                                 f"vocabulary (model.vocab.encode)")
        return self.net(tokens, state=state, slope=self.slope, probe=probe, boundaries=boundaries)

    @property
    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def _shared_step(self, batch: dict[str, Tensor], stage: str, batch_idx: int = 0) -> Optional[Tensor]:
        x, y = batch["input"], batch["target"]  # (B, T) each
        state = self._states.get(stage)
        if stage == "train" and state is not None and self.hparams.get("state_reset", 0.0):
            state = reset_streams(state, self.hparams.state_reset)
        self._probe = None
        if stage == "train" and self.net is not None and self.net.rnn.num_layers > 1 and torch.is_grad_enabled() \
                and self.hparams.get("cell", "hmlstm") == "hmlstm":
            # its gradient is dL/dz (HMLSTM.forward): the diagnostics read it in on_after_backward
            self._probe = torch.zeros(self.net.rnn.num_layers - 1, *x.shape, device=x.device, requires_grad=True)
        forced = None
        if self.hparams.get("oracle_boundaries", False):
            forced = oracle_boundaries(batch, self.net.rnn.num_layers)
        out = self(x, state, probe=self._probe, boundaries=forced)
        self._states[stage] = out.rnn.state.detach()  # truncated BPTT: continue the streams, cut the graph
        logits = out.logits.float() if out.logits.dtype in (torch.float16, torch.bfloat16) else out.logits
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if stage == "train" and not self._all_finite(nll):
            where = first_nonfinite(state, out.rnn, self.named_parameters())
            msg = (f"non-finite training loss ({float(nll.detach())}) at global step {self.global_step} (epoch "
                   f"{self.current_epoch}, batch {batch_idx} of the epoch): {where}")
            if self.hparams.nonfinite == "raise":
                raise NonFiniteLossError(msg + ". Lower the learning rate or clip gradients (--trainer."
                                         "gradient_clip_val), or skip such batches with --model.nonfinite skip")
            self.skipped_batches += 1
            self._states[stage] = None  # the streams restart from zeros rather than from a broken state
            self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False,
                     batch_size=y.numel())
            rank_zero_warn(f"skipped a batch (nonfinite='skip'): {msg}")
            return None  # Lightning skips the backward pass and the optimizer step
        n = y.numel()
        sync = self._distributed  # epoch values (val/nll drives the LR schedule) must agree across processes
        self.log(f"{stage}/nll", nll, on_step=False, on_epoch=True, batch_size=n, sync_dist=sync)
        self.log(f"{stage}/bpc", nll / LN2, on_step=False, on_epoch=True, batch_size=n, prog_bar=stage != "train",
                 sync_dist=sync)
        if stage == "train":
            bpc = nll.detach() / LN2
            self.log("train/bpc_step", bpc, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
            self._recent_bpc.append(bpc)
            self.log("train/bpc_100", torch.stack(tuple(self._recent_bpc)).mean(), on_step=True, on_epoch=False,
                     batch_size=n)
        with torch.no_grad():
            self._log_operations(stage, out.rnn, state, n)
            if stage != "train":
                self._count_boundaries(stage, out.rnn.z, batch)
        loss = nll
        if stage == "train" and self._bands:
            rates = torch.stack([(z.detach() > 0.5).float().mean() for z in out.rnn.z])  # (L - 1,)
            if self._distributed:  # one band decision for every process, or their biases would drift apart
                rates = self.trainer.strategy.reduce(rates, reduce_op="mean")
            self._rates = rates.tolist()
        if stage == "train" and self.hparams.get("cell", "hmlstm") == "hmlstm":
            # the targets are the model's own entropy peaks: noise until it has learned something (warmup)
            peaks = self._peaks if self.global_step >= self.hparams.get("boundary_peaks_warmup", 0) else []
            reach = None
            if peaks and self.hparams.get("boundary_peaks_reach", False) and forced is None:
                preacts = detector_preactivations(self.net.rnn, self.net.embed(x), out.rnn, state)
                reach = (preacts, self.slope, self.net.rnn.copy_boundary == "hold",
                         state.z if state is not None else None)
            charges = training_charges(out.rnn.z, logits, self._costs, peaks,
                                       self.hparams.get("boundary_nesting", 0.0), reach)
            for name, charged in charges.items():
                self._epoch.add("train", f"train/{name}", charged, n)
                loss = loss + charged
        if stage == "train" and self.hparams.get("loss_reduction", "mean") == "sum_time":
            return loss * y.shape[1]  # summed over the steps, averaged over the batch (the authors' loss)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Optional[Tensor]:
        self._chars += batch["target"].numel()
        loss = self._shared_step(batch, "train", batch_idx)
        # comparisons at equal wall time (HM-LSTM against the LSTM baseline) read it beside the step
        self.log("train/wall_s", self._wall_s(), on_step=True, on_epoch=False, batch_size=1)
        # the stream position a checkpoint records: this batch is done (the loader runs a batch ahead)
        self._train_position = batch_idx + 1
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if hasattr(loader, "advance_to"):
            loader.advance_to(batch_idx + 1)
        return loss

    def on_after_backward(self) -> None:
        """Log the boundary-gradient diagnostics from the probe's gradient (see the class docstring)."""
        probe, self._probe = getattr(self, "_probe", None), None
        if probe is None or probe.grad is None:
            return
        scale = probe.shape[2] if self.hparams.get("loss_reduction", "mean") == "sum_time" else 1
        norms = boundary_grad_norms(probe.grad, scale)
        for k, v in enumerate(norms, start=1):
            self.log(f"train/dz_norm_l{k}", v, on_step=True, on_epoch=False, batch_size=1)
            self._epoch.add("train", f"train/dz_norm_max_l{k}", v, reduce="max")
            self._epoch.add("train", f"train/dz_norm_mean_l{k}", v)

    def optimizer_step(self, *args, **kwargs) -> None:
        """Lightning's step, then the boundary weight-norm cap (`boundary_norm_cap`) when it is set."""
        super().optimizer_step(*args, **kwargs)
        cap = self.hparams.get("boundary_norm_cap")
        if cap is not None and self.net is not None and self.hparams.get("cell", "hmlstm") == "hmlstm":
            cap_detector_norms(self.net.rnn, cap)
        rates, self._rates = getattr(self, "_rates", None), None
        if rates is not None and self._bands and self.net is not None:
            steer_detector_rates(self.net.rnn, rates, self._bands, self.hparams.get("boundary_rate_step", 0.01))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the 2-norm of all gradients before clipping (Lightning clips after this hook, and unscales AMP
        gradients before it): `train/grad_norm` per step (kept every `log_every_n_steps`) and
        `train/grad_norm_max`, the largest of the epoch, which a short spike between logged steps cannot escape.

        The straight-through gradient can grow exponentially over a sequence (docs/history.md);
        clipping hides that from the loss curve, so every run records it. Each parameter's norm is taken in
        float64: squares of fp32 gradients above 1e19 overflow fp32, and this is the case worth seeing. Under
        `16-mixed`, steps that the gradient scaler skips for overflow log inf or nan here: that is the scaler
        probing its scale, not the model.
        """
        norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in self.parameters() if p.grad is not None]
        if norms:
            total = torch.linalg.vector_norm(torch.stack(norms)).float()
            self.log("train/grad_norm", total, on_step=True, on_epoch=False, batch_size=1)
            self._epoch.add("train", "train/grad_norm_max", total, reduce="max")

    # -- non-finite values ----------------------------------------------------------------------------

    def _all_finite(self, loss: Tensor) -> bool:
        finite = bool(torch.isfinite(loss))
        if self._distributed:  # every process must take the same branch, or DDP's all-reduce would hang
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", batch_idx)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """{"logprob": (B, T) log p of each target in nats, "z": (L-1, B, T) boundaries}."""
        out = self(batch["input"], self._states.get("predict"))
        self._states["predict"] = out.rnn.state.detach()
        logprob = out.logits.log_softmax(-1).gather(-1, batch["target"].unsqueeze(-1)).squeeze(-1)
        z = torch.stack(out.rnn.z) if out.rnn.z else logprob.new_zeros(0, *logprob.shape)
        return {"logprob": logprob, "z": z}

    # -- statistics -----------------------------------------------------------------------------------

    def _log_operations(self, stage: str, rnn: HMLSTMOutput, state: Optional[HMLSTMState], n: int) -> None:
        if not rnn.z:  # an LSTM baseline (or a one-layer model): no boundaries, every step an UPDATE
            return
        z_init = state.z if state is not None else tuple(torch.zeros_like(z[:, 0]) for z in rnn.z)
        for k, z in enumerate(rnn.z, start=1):
            self._epoch.add(stage, f"{stage}/boundary_rate_l{k}", z.float().mean(), n)
        for k, frac in enumerate(operation_fractions(rnn.z, z_init), start=1):
            for op, value in frac.items():
                self._epoch.add(stage, f"{stage}/{op}_l{k}", value, n)

    def _count_boundaries(self, stage: str, zs: Sequence[Tensor], batch: dict[str, Tensor]) -> None:
        counter = self._f1.setdefault(stage, BoundaryCounter())
        for key, true in batch.items():
            if key.startswith("boundary/"):
                for k, z in enumerate(zs, start=1):
                    counter.add(k, key.split("/", 1)[1], z > 0.5, true)

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch values of `stage` summed by `self._epoch` (one `log` call each) and start over."""
        for name, value in self._epoch.compute(stage).items():
            self.log(name, value)
        self._epoch.reset(stage)

    def _log_f1(self, stage: str) -> None:
        counter = self._f1.pop(stage, None)
        if counter is None:
            return
        for (k, level, tol), c in counter.counts.items():
            if self._distributed:  # each process counted its own streams
                c = self.trainer.strategy.reduce(c.to(self.device), reduce_op="sum").cpu()
            for kind, value in zip(("precision", "recall", "f1"), prf(*c.tolist())):
                self.log(f"{stage}/{metric_name(k, level, tol, kind)}", value)

    # -- epoch hooks: reset the carried state at each epoch start ---------------------------------------

    def on_train_start(self) -> None:
        # a resume in the middle of an epoch continues it without calling on_train_epoch_start
        self._states["train"] = self._resumed_state()
        self._epoch.reset("train")  # a resumed epoch sums from its resumption, as Lightning's own epoch values do
        self._fit_t0 = time.perf_counter()

    def _wall_s(self) -> float:
        """Training wall time so far, seconds, over every run that resumed this one."""
        t0 = getattr(self, "_fit_t0", None)
        return self._wall_offset + (time.perf_counter() - t0 if t0 is not None else 0.0)

    def on_train_epoch_start(self) -> None:
        self._states["train"] = None
        self._epoch.reset("train")
        self._train_position = 0
        self._chars, self._t0 = 0, time.perf_counter()

    def on_train_epoch_end(self) -> None:
        self.log("train/chars_per_sec", self._chars / max(time.perf_counter() - self._t0, 1e-9))
        self.log("train/slope", self.slope)
        self._log_epoch("train")

    def on_validation_epoch_start(self) -> None:
        self._states["val"] = None
        self._f1.pop("val", None)
        self._epoch.reset("val")

    def on_validation_epoch_end(self) -> None:
        self._log_f1("val")
        self._log_epoch("val")
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step

    def on_test_epoch_start(self) -> None:
        self._states["test"] = None
        self._f1.pop("test", None)
        self._epoch.reset("test")

    def on_test_epoch_end(self) -> None:
        self._log_f1("test")
        self._log_epoch("test")

    def on_predict_epoch_start(self) -> None:
        self._states["predict"] = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs) -> "HMLSTMLanguageModel":
        """Lightning's loader, with a clear `CheckpointError` for a missing, truncated or incompatible file."""
        if isinstance(checkpoint_path, (str, os.PathLike)):
            problem = describe_checkpoint_problem(checkpoint_path)
            if problem is not None:
                raise CheckpointError(problem)
            checkpoint_path = without_instantiator(checkpoint_path)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except (KeyError, RuntimeError) as e:
            if isinstance(e, KeyError) or "state_dict" in str(e):
                raise CheckpointError(f"{checkpoint_path} does not fit this hmlstm {__version__} "
                                      f"HMLSTMLanguageModel (written by another version or another model class?): "
                                      f"{type(e).__name__}: {str(e)[:500]}") from e
            raise

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=(0.9, hp.get("adam_beta2", 0.999)),
                               weight_decay=hp.get("weight_decay", 0.0))
        milestones = hp.get("lr_milestones")
        if milestones:
            # stepped once per epoch end: after epoch m (counted from 1) the rate is multiplied by lr_factor
            fixed = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=hp.lr_factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": fixed, "interval": "epoch"}}
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=self.hparams.lr_factor,
                                                             patience=self.hparams.lr_patience)
        # strict=False: runs without validation (limit_val_batches=0) keep the learning rate instead of failing
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val/nll", "interval": "epoch",
                                                   "strict": False}}

    # -- using a trained model ------------------------------------------------------------------------

    def require_vocab(self) -> Vocabulary:
        if self.net is None or self.vocab is None:
            raise RuntimeError("the model has no vocabulary yet: train it or load it from a checkpoint")
        return self.vocab

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """ids -> text; byte-level models decode their bytes as UTF-8 (invalid sequences replaced)."""
        text = self.require_vocab().decode(ids)
        if self.hparams.byte_level:
            return text.encode("latin-1", "replace").decode("utf-8", "replace")
        return text

    def generate(self, prompt: str, length: int, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> str:
        """Sample `length` characters (bytes, for byte-level models) after `prompt` (`hmlstm.generation`)."""
        return generation.generate(self, prompt, length, temperature, generator)

    def boundaries(self, text: str) -> list[Tensor]:
        """The boundaries z of each layer 1..L-1 over `text`: L-1 tensors (N,) of 0/1 floats (CPU)."""
        return generation.boundaries(self, text)
