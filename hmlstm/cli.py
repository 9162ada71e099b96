"""The `hmlstm` command: train, evaluate and use character-level HM-LSTMs.

    hmlstm fit                                   # offline default: Python docs, small CPU model (configs/default.yaml)
    hmlstm fit --config ptb.yaml                 # the paper's PTB setup (also text8.yaml, enwik8.yaml, synthetic.yaml)
    hmlstm fit --config ptb.yaml --ckpt_path last.ckpt      # resume, also mid-epoch, exactly
    hmlstm fit --trainer.strategy ddp --trainer.devices 2  # several GPUs (or CPU processes): streams split
    hmlstm validate --ckpt_path CKPT             # also test, predict; same data options as fit
    hmlstm generate --ckpt_path CKPT --prompt "The " --length 200 --temperature 0.8
    hmlstm boundaries --ckpt_path CKPT --text "the cat sat on the mat" --out boundaries.png
    hmlstm export --ckpt_path CKPT --out model.ckpt  # weights only: a third of the size, cannot resume

fit/validate/test/predict are LightningCLI subcommands (`hmlstm fit --help` lists every option). Without
--config they read the shipped default config; a --config name that is not a file is looked up among the
shipped configs (`hmlstm.configs`), so `--config ptb.yaml` works from any directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.cli import LightningCLI

from .callbacks import LatestCheckpoint
from .data import CharDataModule
from .metrics import TOLERANCES, BoundaryCounter, metric_name, word_boundaries
from .training import (AtomicCheckpointIO, CheckpointError, HMLSTMLanguageModel, NonFiniteLossError, SlopeAnnealing,
                       export_weights)

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_CONFIG = "default.yaml"


def boundary_summary(metrics: dict, stage: str = "val") -> list[str]:
    """One line per boundary layer from a validation's logged metrics: its boundary rate and, where the data
    has true boundaries, its F1 against each level at tolerance 0 (tolerance 1 in parentheses). Empty for an
    LSTM baseline. What a user reads at the end of `hmlstm fit` to see whether the layers found the structure."""
    lines = []
    k = 1
    while f"{stage}/boundary_rate_l{k}" in metrics:
        parts = [f"boundary rate {float(metrics[f'{stage}/boundary_rate_l{k}']):.3f}"]
        prefix = f"{stage}/{metric_name(k, '', 0)}"
        for name in sorted((n for n in metrics if n.startswith(prefix)), key=lambda n: (not n.endswith("_word"), n)):
            level = name[len(prefix):]
            tol1 = metrics.get(f"{stage}/{metric_name(k, level, 1)}")
            parts.append(f"F1 against {level} ends {float(metrics[name]):.3f}"
                         + (f" ({float(tol1):.3f} at tolerance 1)" if tol1 is not None else ""))
        lines.append(f"  layer {k}: " + ", ".join(parts))
        k += 1
    return lines


def shipped_config(name: str) -> Optional[Path]:
    """The path of a config shipped in hmlstm.configs ("ptb" or "ptb.yaml"), or None."""
    for candidate in (name, f"{name}.yaml"):
        path = resources.files("hmlstm.configs") / candidate
        if path.is_file():
            return Path(str(path))
    return None


def _with_configs(argv: list[str]) -> list[str]:
    """Resolve --config names against the shipped configs; add the default config when none is given."""
    out, has_config = [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        has_config = True
        if not Path(value).exists() and shipped_config(value) is not None:
            value = str(shipped_config(value))
        out += ["--config", value]
    if not has_config and argv and argv[0] in LIGHTNING_SUBCOMMANDS and not any(a in ("-h", "--help") for a in argv):
        out[1:1] = ["--config", str(shipped_config(DEFAULT_CONFIG))]
    return out


def default_loggers() -> list[dict]:
    """CSV logs always, TensorBoard logs when tensorboard is installed, both under lightning_logs/ (as
    class specs, so the saved config.yaml records them)."""
    loggers = [{"class_path": "pytorch_lightning.loggers.CSVLogger",
                "init_args": {"save_dir": "lightning_logs", "name": "csv"}}]
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        loggers.append({"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "lightning_logs", "name": "tensorboard",
                                      "default_hp_metric": False}})
    return loggers


class HMLSTMCLI(LightningCLI):
    """LightningCLI with the slope-annealing callback always present (configured under --slope.*) and a
    summary line after fit: validation BPC next to the unigram entropy of the validation text."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SlopeAnnealing, "slope")

    def instantiate_trainer(self, **kwargs):
        """The Trainer, writing checkpoints atomically unless --trainer.plugins names another CheckpointIO, and keeping
        last.ckpt at the newest state (`LatestCheckpoint`)."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(LatestCheckpoint())  # last.ckpt is the newest state, improved or not
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted or trainer.limit_val_batches == 0:
            return
        metrics = trainer.callback_metrics
        if "val/bpc" not in metrics or getattr(self.model, "validated_at_step", -1) != trainer.global_step:
            # stopped where no validation ran (max_steps, val_check_interval): validate the final weights
            metrics = trainer.validate(self.model, datamodule=self.datamodule, verbose=False)[0]
        if not trainer.is_global_zero:
            return
        dm = self.datamodule
        entropy = dm.unigram_entropy("val") if isinstance(dm, CharDataModule) else float("nan")
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or "-"
        print(f"\nhmlstm: validation BPC {float(metrics['val/bpc']):.4f} after {trainer.global_step} steps; "
              f"unigram entropy of the validation text {entropy:.4f} bits/char; best checkpoint: {best}")
        for line in boundary_summary(metrics, "val"):
            print(line)


def lightning_main(argv: list[str]) -> HMLSTMCLI:
    # the loaders have no workers on purpose (ordered streams); and `args` is how main() passes argv
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended.*")
    return HMLSTMCLI(
        HMLSTMLanguageModel,
        CharDataModule,
        subclass_mode_data=True,
        seed_everything_default=1234,
        trainer_defaults={"gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm", "logger": default_loggers()},
        parser_kwargs={"description": "Train and evaluate HM-LSTM language models. Also: `hmlstm generate -h`, "
                                      "`hmlstm boundaries -h`, `hmlstm export -h`."},
        args=_with_configs(argv),
    )


def _require_file(ckpt_path: str) -> None:
    if not Path(ckpt_path).is_file():
        raise SystemExit(f"--ckpt_path: no such checkpoint file: {ckpt_path}")


def _load(ckpt_path: str, backend: Optional[str]) -> HMLSTMLanguageModel:
    _require_file(ckpt_path)
    try:
        model = HMLSTMLanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu",
                                                         **({"backend": backend} if backend else {}))
    except CheckpointError as e:
        raise SystemExit(f"--ckpt_path: {e}") from None
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def generate_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="hmlstm generate", description="Sample text from a trained model.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by hmlstm fit")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--length", type=int, default=200, help="number of characters (bytes for byte-level) to sample")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--backend", default=None, help="override the model's backend (auto, reference, cpp, ...)")
    a = p.parse_args(argv)
    if a.length < 0:
        p.error(f"--length must be >= 0, got {a.length}")
    if a.temperature < 0:
        p.error(f"--temperature must be >= 0, got {a.temperature}")
    model = _load(a.ckpt_path, a.backend)
    gen = torch.Generator(device=model.device).manual_seed(a.seed)
    text = model.generate(a.prompt, a.length, a.temperature, generator=gen)
    sys.stdout.write(a.prompt + text + "\n")


def boundaries_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="hmlstm boundaries",
                                description="Draw each layer's boundaries over a text and score them against "
                                            "word boundaries (whitespace, or --separators).")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by hmlstm fit")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to read")
    src.add_argument("--text_file", help="read the text from this file instead")
    p.add_argument("--out", default="boundaries.png", help="image file to write (.png, .pdf, .svg)")
    p.add_argument("--width", type=int, default=64, help="characters per row of the figure")
    p.add_argument("--tolerance", type=int, nargs="+", default=list(TOLERANCES),
                   help="count a boundary within this many positions as a hit, one-to-one (default: 0, the headline, "
                        "and 1 beside it)")
    p.add_argument("--backend", default=None, help="override the model's backend")
    p.add_argument("--separators", default=None,
                   help="the characters that end a word (default: any whitespace; ' .' for the synthetic language, "
                        "whose phrases end with a period)")
    a = p.parse_args(argv)
    if a.separators == "":
        p.error("--separators is empty: give the characters that end a word, or leave it out for whitespace")
    text = a.text if a.text is not None else Path(a.text_file).read_text(encoding="utf-8")
    if not text:
        p.error("the text is empty")
    model = _load(a.ckpt_path, a.backend)
    zs = model.boundaries(text)
    if model.hparams.byte_level:  # one symbol per byte: score and draw the bytes
        text = text.encode("utf-8").decode("latin-1")
    true = word_boundaries(text, a.separators)
    from .plot import plot_boundaries

    plot_boundaries(text, zs, a.out, true=true, width=a.width,
                    title=f"HM-LSTM boundaries ({Path(a.ckpt_path).name}, slope {float(model.slope):.2f})")
    print(f"{len(text)} characters, {int(true.sum())} word boundaries; figure: {a.out}")
    if any(t < 0 for t in a.tolerance):
        p.error(f"--tolerance must be >= 0, got {a.tolerance}")
    counter = BoundaryCounter(a.tolerance)  # the same counts as the training logs (hmlstm.metrics)
    for k, z in enumerate(zs, start=1):
        counter.add(k, "word", z > 0.5, true)
    scores = counter.scores()
    for k, z in enumerate(zs, start=1):
        parts = [f"tolerance {t}: precision {scores[(k, 'word', t)].precision:.3f}  recall "
                 f"{scores[(k, 'word', t)].recall:.3f}  F1 {scores[(k, 'word', t)].f1:.3f}" for t in a.tolerance]
        print(f"layer {k}: boundary rate {float(z.mean()):.3f}  vs word boundaries, " + ";  ".join(parts))
    if not zs:
        print("the model has a single layer: no boundary detector")


def export_main(argv: Sequence[str]) -> None:
    """`hmlstm export`: a checkpoint's model without its run state (`hmlstm.training.export_weights`)."""
    p = argparse.ArgumentParser(prog="hmlstm export",
                                description="Write a checkpoint's model without its run state (optimizer, carried "
                                            "state, random-number state): for sharing, generating and evaluating; "
                                            "it cannot resume training.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by hmlstm fit")
    p.add_argument("--out", required=True, help="file to write")
    a = p.parse_args(argv)
    _require_file(a.ckpt_path)
    if Path(a.out).exists() and os.path.samefile(a.out, a.ckpt_path):
        p.error("--out must differ from --ckpt_path (the training checkpoint is kept)")
    size = export_weights(a.ckpt_path, a.out)
    print(f"wrote {a.out}: {size / 1e6:.1f} MB (from {Path(a.ckpt_path).stat().st_size / 1e6:.1f} MB)")


EXTRA_SUBCOMMANDS = {"generate": generate_main, "boundaries": boundaries_main, "export": export_main}


# Errors that carry a complete message for the user: shown without a traceback (HMLSTM_TRACEBACK=1 shows it).
USER_ERRORS = (CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the `hmlstm` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in EXTRA_SUBCOMMANDS:
            EXTRA_SUBCOMMANDS[argv[0]](argv[1:])
        else:
            lightning_main(argv)
    except USER_ERRORS as e:
        if os.environ.get("HMLSTM_TRACEBACK"):
            raise
        raise SystemExit(f"hmlstm: error: {type(e).__name__}: {e}\n"
                         f"(set HMLSTM_TRACEBACK=1 for the traceback)") from None


if __name__ == "__main__":
    main()
