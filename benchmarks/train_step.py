"""Seconds per training step of `hmlstm fit` checkpoints, each alone on the machine.

    python benchmarks/train_step.py HM-LSTM=runs/a/last.ckpt LN-LSTM=runs/b/last.ckpt \
        --data-dir ../shared/data/ptb --threads 1 --steps 20 --rounds 3 --out benchmarks/results/train-step.json
    python benchmarks/train_step.py reach=runs/a/last.ckpt plain=runs/a/last.ckpt --set plain:boundary_peaks_reach=false ...

`--pydoc` instead of `--data-dir` trains on the text of the offline default (`hmlstm fit`'s checkpoints).

Two trainings that share the cores slow each other by different amounts (an HM-LSTM runs its layers step by
step, an LSTM one layer at a time over the sequence, and they use the caches differently), so the wall times of
runs trained side by side say little about what each costs alone. This times the step they train with: each
checkpoint's model, with its trained weights (so its boundaries fall where training put them) and its own
hyperparameters, is trained by Lightning as `hmlstm fit` trains it (the data module's training streams, Adam,
gradient clipping at `--clip`, the per-step logs and the boundary-gradient diagnostics; no validation, no
checkpoints) for `--warmup` untimed steps and then `--steps` timed ones. The checkpoints take turns over
`--rounds` rounds (the order reversed every round, so that a drifting machine biases them alike), and each
reports its median step over all rounds. `--set NAME:KEY=VALUE` trains run NAME with one hyperparameter changed
(the same checkpoint twice, with and without a training option, gives that option's cost). JSON out: the machine
header of `run.py`, per checkpoint its step, boundary rates, the hyperparameters it was set to (read back from
the loaded model) and every round's step times.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import header  # noqa: E402

from hmlstm import HMLSTM, backends  # noqa: E402
from hmlstm.data import PTBDataModule, PydocDataModule  # noqa: E402
from hmlstm.training import HMLSTMLanguageModel  # noqa: E402


class StepTimer(pl.Callback):
    """Wall time of every training batch, from its start hook to its end hook (forward, backward, clipping,
    optimizer step and logging all fall between them)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)


def backend_of(net: torch.nn.Module) -> Optional[str]:
    """The backend the net's HMLSTM layers run on (an LN-LSTM's layers are one-layer HMLSTMs); None for
    nn.LSTM (oneDNN)."""
    for m in net.modules():
        if isinstance(m, HMLSTM):
            return backends.resolve(m.backend, torch.device("cpu"))
    return None


def time_steps(ckpt: str, data_dir: Optional[str], steps: int, warmup: int, clip: float, batch_size: int,
               seq_len: int, overrides: Optional[dict] = None) -> tuple[list[float], dict]:
    """Train a fresh copy of the checkpoint's model for warmup + steps steps -> (timed step seconds, info).
    data_dir: PTB's files; None: the offline default's text (`hmlstm.data.PydocDataModule`). overrides:
    hyperparameters that replace the checkpoint's (training options such as boundary_peaks_reach)."""
    model = HMLSTMLanguageModel.load_from_checkpoint(ckpt, map_location="cpu", **(overrides or {}))
    if data_dir is None:
        dm = PydocDataModule(batch_size=batch_size, seq_len=seq_len)
    else:
        dm = PTBDataModule(data_dir, download=False, batch_size=batch_size, seq_len=seq_len)
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps, gradient_clip_val=clip,
                         limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(model, datamodule=dm)
    if len(timer.times) != warmup + steps:
        raise RuntimeError(f"{ckpt}: timed {len(timer.times)} steps, expected {warmup + steps}")
    rates = {k: float(v) for k, v in trainer.logged_metrics.items() if "boundary_rate" in k}
    info = {"cell": model.hparams.get("cell", "hmlstm"), "hidden_sizes": list(model.hparams.hidden_sizes),
            "backend": backend_of(model.net), "boundary_rates": rates,
            "overrides": {k: model.hparams[k] for k in (overrides or {})},  # read back: what the model took
            # the boundary terms its loss carried (logged when charged): an option that acts shows here
            "charged": sorted(k for k in trainer.logged_metrics
                              if k.split("/")[-1] in ("boundary_cost", "peak_charge", "nesting_charge"))}
    return timer.times[warmup:], info


def parse_value(text: str):
    """A --set value as YAML, except that a number YAML leaves a string (1e-3: YAML 1.1 wants 1.0e-3) is a float."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=CKPT", help="checkpoints of `hmlstm fit` on PTB")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-dir", help="holds ptb.char.{train,valid,test}.txt")
    data.add_argument("--pydoc", action="store_true", help="train on the offline default's text (`hmlstm fit`)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them, every round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient_clip_val, as in ptb.yaml")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="train run NAME with hyperparameter KEY set to VALUE (YAML), e.g. to time one checkpoint "
                             "with and without a training option; repeatable")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            parser.error(f"each run is NAME=CHECKPOINT with an existing checkpoint file, got {spec!r}")
        runs.append((name, path))
    overrides: dict[str, dict] = {name: {} for name, _ in runs}
    # Lightning's loader drops a keyword the model does not take without a word: refuse it here, by name
    known = set(inspect.signature(HMLSTMLanguageModel.__init__).parameters) - {"self", "vocab"}
    for spec in args.set:
        name, _, assignment = spec.partition(":")
        key, eq, value = assignment.partition("=")
        if name not in overrides or not key or not eq:
            parser.error(f"--set takes NAME:KEY=VALUE with NAME one of {sorted(overrides)}, got {spec!r}")
        if key not in known:
            parser.error(f"--set {spec!r}: {key!r} is not a hyperparameter of HMLSTMLanguageModel")
        overrides[name][key] = parse_value(value)
    for n, v in (("--steps", args.steps), ("--rounds", args.rounds), ("--threads", args.threads)):
        if v < 1:
            parser.error(f"{n} must be at least 1, got {v}")
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    head = header(torch.device("cpu"))  # before the rounds: its load average is the machine's, not this run's
    trained = {name: int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
               for name, path in runs}
    rounds: dict[str, list[list[float]]] = {name: [] for name, _ in runs}
    infos: dict[str, dict] = {}
    for r in range(args.rounds):
        for name, path in (runs if r % 2 == 0 else runs[::-1]):
            times, infos[name] = time_steps(path, args.data_dir, args.steps, args.warmup, args.clip,
                                            args.batch_size, args.seq_len, overrides[name])
            rounds[name].append(times)
            print(f"round {r + 1}/{args.rounds} {name}: median {statistics.median(times):.3f} s/step", flush=True)
    result = {"header": head, "settings": vars(args) | {"runs": dict(runs)}, "runs": {}}
    for name, path in runs:
        flat = [t for ts in rounds[name] for t in ts]
        result["runs"][name] = infos[name] | {"checkpoint": path, "trained_steps": trained[name], "median_s": statistics.median(flat),
                                              "round_medians_s": [statistics.median(ts) for ts in rounds[name]],
                                              "step_s": rounds[name]}
    base = result["runs"][runs[-1][0]]["median_s"]
    for name, _ in runs:
        m = result["runs"][name]["median_s"]
        print(f"{name}: {m:.3f} s/step ({m / base:.3f}x {runs[-1][0]})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
