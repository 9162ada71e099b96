"""Lightning training of the character-level HM-LSTM language model (PAPER.md, "Training setup").

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
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Vocabulary
from .lm import CharLM
from .metrics import operation_fractions, prf
from .state import HMLSTMOutput, HMLSTMState

LN2 = math.log(2)


class HMLSTMLanguageModel(pl.LightningModule):
    """The paper's character language model (embedding -> HM-LSTM -> gated output module -> softmax).

    Args:
        hidden_sizes: HM-LSTM layer sizes (PTB: 512, 512, 512).
        embed_size: input embedding (128 in the paper).
        output_size: output embedding of the gated output module (PTB 512, text8/enwik8 2048).
        boundary, copy_boundary, layer_norm, backend: passed to `HMLSTM`.
        lr: Adam learning rate (PTB 0.002, text8/enwik8 0.001).
        lr_factor: multiplies the learning rate when the validation NLL stops improving (paper: 1/50).
        lr_patience: epochs without improvement before that happens (0: the first one).
        vocab: the characters of the vocabulary. Leave it unset when training: it is taken from the data
            module and stored here, so that a checkpoint is self-contained.
        byte_level: the vocabulary's characters stand for bytes (enwik8); also filled from the data module.

    Logged every epoch, for stage in train/val/test: `{stage}/bpc`, `{stage}/nll`, `{stage}/boundary_rate_l{k}`,
    `{stage}/{update,copy,flush}_l{k}` (layers numbered from 1); in val/test the boundary precision, recall
    and F1 of each layer against each level of true boundaries, `{stage}/f1_l{k}_{level}`; in train
    `train/chars_per_sec` and `train/slope`.
    """

    def __init__(self, hidden_sizes: Sequence[int] = (512, 512, 512), embed_size: int = 128, output_size: int = 512,
                 boundary: str = "step", copy_boundary: str = "hold", layer_norm: bool = True, backend: str = "auto",
                 lr: float = 0.002, lr_factor: float = 1 / 50, lr_patience: int = 0, vocab: Optional[str] = None,
                 byte_level: bool = False) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 < lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1) (the paper divides by 50: 0.02), got {lr_factor}")
        self.save_hyperparameters()
        # The slope of the boundary detector's hard sigmoid; set by SlopeAnnealing at each epoch start. A
        # buffer, so validate/test/generate from a checkpoint use the slope the weights were trained with.
        self.register_buffer("slope", torch.tensor(1.0))
        self.net: Optional[CharLM] = None
        self.vocab: Optional[Vocabulary] = None
        if vocab is not None:
            self._build(Vocabulary(vocab))
        self._states: dict[str, Optional[HMLSTMState]] = {}
        self._f1: dict[str, dict[tuple[int, str], Tensor]] = {}
        self._chars = 0
        self._t0 = 0.0
        self.validated_at_step = -1  # global step of the last validation (-1: none yet)

    def _build(self, vocab: Vocabulary) -> None:
        hp = self.hparams
        self.vocab = vocab
        self.net = CharLM(len(vocab), tuple(hp.hidden_sizes), embed_size=hp.embed_size, output_size=hp.output_size,
                          boundary=hp.boundary, copy_boundary=hp.copy_boundary, layer_norm=hp.layer_norm,
                          backend=hp.backend)
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

    def forward(self, tokens: Tensor, state: Optional[HMLSTMState] = None):
        """tokens (B, T) -> LMOutput(logits (B, T, V), rnn) at the current slope."""
        return self.net(tokens, state=state, slope=self.slope)

    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        x, y = batch["input"], batch["target"]  # (B, T) each
        state = self._states.get(stage)
        out = self(x, state)
        self._states[stage] = out.rnn.state.detach()  # truncated BPTT: continue the streams, cut the graph
        nll = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        n = y.numel()
        self.log(f"{stage}/nll", nll, on_step=False, on_epoch=True, batch_size=n)
        self.log(f"{stage}/bpc", nll / LN2, on_step=False, on_epoch=True, batch_size=n, prog_bar=stage != "train")
        if stage == "train":
            self.log("train/bpc_step", nll.detach() / LN2, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        with torch.no_grad():
            self._log_operations(stage, out.rnn, state, n)
            if stage != "train":
                self._count_boundaries(stage, out.rnn.z, batch)
        return nll

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._chars += batch["target"].numel()
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """{"logprob": (B, T) log p of each target in nats, "z": (L-1, B, T) boundaries}."""
        out = self(batch["input"], self._states.get("predict"))
        self._states["predict"] = out.rnn.state.detach()
        logprob = out.logits.log_softmax(-1).gather(-1, batch["target"].unsqueeze(-1)).squeeze(-1)
        z = torch.stack(out.rnn.z) if out.rnn.z else logprob.new_zeros(0, *logprob.shape)
        return {"logprob": logprob, "z": z}

    # -- statistics -----------------------------------------------------------------------------------

    def _log_operations(self, stage: str, rnn: HMLSTMOutput, state: Optional[HMLSTMState], n: int) -> None:
        z_init = state.z if state is not None else tuple(torch.zeros_like(z[:, 0]) for z in rnn.z)
        for k, z in enumerate(rnn.z, start=1):
            self.log(f"{stage}/boundary_rate_l{k}", z.float().mean(), on_step=False, on_epoch=True, batch_size=n)
        for k, frac in enumerate(operation_fractions(rnn.z, z_init), start=1):
            for op, value in frac.items():
                self.log(f"{stage}/{op}_l{k}", value, on_step=False, on_epoch=True, batch_size=n)

    def _count_boundaries(self, stage: str, zs: Sequence[Tensor], batch: dict[str, Tensor]) -> None:
        counts = self._f1.setdefault(stage, {})
        for key, true in batch.items():
            if not key.startswith("boundary/"):
                continue
            level = key.split("/", 1)[1]
            for k, z in enumerate(zs, start=1):
                pred = z > 0.5
                c = torch.stack([(pred & true).sum(), pred.sum(), true.sum()]).double()
                counts[(k, level)] = counts.get((k, level), 0) + c

    def _log_f1(self, stage: str) -> None:
        for (k, level), c in sorted(self._f1.pop(stage, {}).items()):
            p, r, f1 = prf(*c.tolist())
            self.log(f"{stage}/f1_l{k}_{level}", f1)
            self.log(f"{stage}/precision_l{k}_{level}", p)
            self.log(f"{stage}/recall_l{k}_{level}", r)

    # -- epoch hooks: reset the carried state at each epoch start ---------------------------------------

    def on_train_epoch_start(self) -> None:
        self._states["train"] = None
        self._chars, self._t0 = 0, time.perf_counter()

    def on_train_epoch_end(self) -> None:
        self.log("train/chars_per_sec", self._chars / max(time.perf_counter() - self._t0, 1e-9))
        self.log("train/slope", self.slope)

    def on_validation_epoch_start(self) -> None:
        self._states["val"] = None
        self._f1.pop("val", None)

    def on_validation_epoch_end(self) -> None:
        self._log_f1("val")
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step

    def on_test_epoch_start(self) -> None:
        self._states["test"] = None
        self._f1.pop("test", None)

    def on_test_epoch_end(self) -> None:
        self._log_f1("test")

    def on_predict_epoch_start(self) -> None:
        self._states["predict"] = None

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=self.hparams.lr_factor,
                                                             patience=self.hparams.lr_patience)
        # strict=False: runs without validation (limit_val_batches=0) keep the learning rate instead of failing
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val/nll", "interval": "epoch",
                                                   "strict": False}}

    # -- using a trained model ------------------------------------------------------------------------

    def _require_vocab(self) -> Vocabulary:
        if self.net is None or self.vocab is None:
            raise RuntimeError("the model has no vocabulary yet: train it or load it from a checkpoint")
        return self.vocab

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """ids -> text; byte-level models decode their bytes as UTF-8 (invalid sequences replaced)."""
        text = self._require_vocab().decode(ids)
        if self.hparams.byte_level:
            return text.encode("latin-1", "replace").decode("utf-8", "replace")
        return text

    @torch.no_grad()
    def generate(self, prompt: str, length: int, temperature: float = 1.0,
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
        vocab = self._require_vocab()
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        if not temperature >= 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite float >= 0, got {temperature}")
        if self.hparams.byte_level:
            prompt = prompt.encode("utf-8").decode("latin-1")
        prompt = prompt or ("\n" if "\n" in vocab.chars else vocab.chars[0])
        was_training = self.training
        self.eval()
        try:
            tokens = vocab.encode(prompt).to(self.device).unsqueeze(0)  # (1, P)
            out = self(tokens)
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
                out = self(nxt, state)
                logits, state = out.logits[:, -1], out.rnn.state
        finally:
            self.train(was_training)
        return self.decode(ids)

    @torch.no_grad()
    def boundaries(self, text: str) -> list[Tensor]:
        """The boundaries z of each layer 1..L-1 over `text`: L-1 tensors (N,) of 0/1 floats (CPU)."""
        vocab = self._require_vocab()
        if not text:
            raise ValueError("text must not be empty")
        if self.hparams.byte_level:
            text = text.encode("utf-8").decode("latin-1")
        was_training = self.training
        self.eval()
        try:
            out = self(vocab.encode(text).to(self.device).unsqueeze(0))
        finally:
            self.train(was_training)
        return [z[0].float().cpu() for z in out.rnn.z]


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
