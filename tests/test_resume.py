"""Interruption : a run killed with SIGKILL in the middle of an epoch resumes from its last
checkpoint and ends exactly where an uninterrupted run ends; a kill during a checkpoint write leaves the
previous checkpoint usable. Both kill a real subprocess."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

WORKER = textwrap.dedent('''
    import json, os, sys, time, warnings
    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from hmlstm.data import SyntheticDataModule
    from hmlstm.training import AtomicCheckpointIO, HMLSTMLanguageModel, SlopeAnnealing

    out, mode, stop_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            row = [trainer.global_step, trainer.current_epoch, batch_idx, float(outputs["loss"]), float(module.slope),
                   trainer.optimizers[0].param_groups[0]["lr"], float(module._states["train"].h[1].sum())]
            with open(os.path.join(out, "steps.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\\n")
            if mode == "stop" and trainer.global_step == stop_at:
                open(os.path.join(out, "stopped"), "w").close()
                time.sleep(600)  # the test kills us here

    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    dm = SyntheticDataModule(seed=0, train_chars=600, val_chars=200, test_chars=200, batch_size=3, seq_len=8)
    model = HMLSTMLanguageModel(hidden_sizes=(8, 8), embed_size=8, output_size=16, layer_norm=False,
                                backend="reference", lr=0.02, lr_patience=0, lr_factor=0.5,
                                boundary="sample")  # the RNG must resume too
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=3, save_last=True)
    trainer = pl.Trainer(max_epochs=3, limit_val_batches=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=0.5, plugins=[AtomicCheckpointIO()],
                         callbacks=[SlopeAnnealing(1.0, 0.5, 5.0), ckpt, Record()], deterministic=True)
    resume = os.path.join(out, "ckpt", "last.ckpt") if mode == "resume" else None
    trainer.fit(model, dm, ckpt_path=resume)
    torch.save(model.state_dict(), os.path.join(out, "final.pt"))
''')

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def run_worker(script: Path, out: Path, mode: str, stop_at: int = -1) -> None:
    out.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(script), str(out), mode, str(stop_at)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def steps(out: Path) -> list:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # 600 characters in 3 streams of 200: 25 batches of 8 per epoch; 3 epochs = 75 steps
    full = tmp_path / "full"
    run_worker(script, full, "full")

    killed = tmp_path / "killed"
    killed.mkdir()
    stop_at = 40  # epoch 1, batch 14; the last checkpoint is at step 39 (every 3 steps), mid-epoch
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "stop", str(stop_at)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(killed / "stopped", proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(killed / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 39 and ckpt["epoch"] == 1
    assert ckpt["hmlstm"]["train_position"] == 14 and ckpt["hmlstm"]["train_state"] is not None

    before_kill = [row for row in steps(killed) if row[0] <= 39]
    run_worker(script, killed, "resume")
    resumed = before_kill + [row for row in steps(killed)[len(steps(killed)) - (75 - 39):]]
    expected = steps(full)
    assert [r[:3] for r in resumed] == [r[:3] for r in expected]  # step, epoch, batch index: same stream position
    # losses, slope, learning rate and the carried state continue exactly
    assert resumed == expected
    a, b = torch.load(full / "final.pt"), torch.load(killed / "final.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


KILL_DURING_WRITE = textwrap.dedent('''
    import sys, time, torch
    from hmlstm.training import AtomicCheckpointIO

    path = sys.argv[1]
    io = AtomicCheckpointIO()
    io.save_checkpoint({"version": 1, "w": torch.arange(1000.0)}, path)

    real_save = torch.save
    def slow_save(obj, f, *args, **kwargs):
        f.write(b"PK\\x03\\x04 half of a checkpoint")  # what a killed torch.save leaves: a partial file
        f.flush()
        print("writing", flush=True)
        time.sleep(600)
    torch.save = slow_save
    io.save_checkpoint({"version": 2, "w": torch.zeros(1000)}, path)
''')


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILL_DURING_WRITE)
    path = tmp_path / "ckpts" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    leftovers = [p for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.")  # the interrupted write
    ckpt = torch.load(path)
    assert ckpt["version"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))


def test_paper_configs_checkpoint_mid_epoch_into_last(tmp_path):
    """The two checkpoint callbacks of ptb/text8/enwik8.yaml share last.ckpt, which always holds the newest state."""
    import warnings

    import pytorch_lightning as pl
    import yaml
    from pytorch_lightning.callbacks import ModelCheckpoint

    from hmlstm.cli import shipped_config
    from hmlstm.data import SyntheticDataModule
    from hmlstm.training import AtomicCheckpointIO, HMLSTMLanguageModel

    specs = [c for c in yaml.safe_load(shipped_config("ptb.yaml").read_text())["trainer"]["callbacks"]
             if c["class_path"].endswith("ModelCheckpoint")]
    assert [s["init_args"].get("every_n_train_steps") for s in specs] == [None, 500]
    periodic = {"every_n_train_steps": 3}  # 500 in the config
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt",
                                 **(s["init_args"] | (periodic if "every_n_train_steps" in s["init_args"] else {})))
                 for s in specs]
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    dm = SyntheticDataModule(seed=0, train_chars=400, val_chars=200, test_chars=200, batch_size=3, seq_len=8)
    model = HMLSTMLanguageModel(hidden_sizes=(8, 8), embed_size=8, output_size=16, backend="reference")
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=7, limit_val_batches=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         plugins=[AtomicCheckpointIO()])
    trainer.fit(model, dm)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "last.ckpt" in names and not any(n.startswith("last-v") for n in names), names
    # steps 3 and 6 by the periodic callback, then step 7 after validation by the other one
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 7


def test_cli_last_checkpoint_is_the_newest_state_when_validation_does_not_improve(tmp_path, capsys, monkeypatch):
    """The CLI's last.ckpt holds the newest state even when the monitored metric stopped improving (Lightning's
    save_last alone would leave it at the best step), and when a fit stops between validations (max_steps)."""
    import yaml
    from cli_run import assert_ok, run_cli

    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the cat sat on the mat. a dog ran to the cat. " * 40)
    # monitoring "step" in mode min: only the first validation is ever the best
    config = {"trainer": {"callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                         "init_args": {"monitor": "step", "mode": "min", "save_last": True}}]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    common = ["--config", str(tmp_path / "config.yaml"), "--data", "hmlstm.data.TextDataModule", "--data.path",
              str(corpus), "--data.batch_size", "4", "--data.seq_len", "10", "--model.hidden_sizes", "[8, 8]",
              "--model.embed_size", "8", "--model.output_size", "16", "--model.backend", "reference",
              "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
              "--trainer.enable_progress_bar", "false"]
    monkeypatch.chdir(tmp_path)

    def last_step(version: int) -> tuple[int, list[str]]:
        folder = tmp_path / "lightning_logs" / "csv" / f"version_{version}" / "checkpoints"
        return (torch.load(folder / "last.ckpt", weights_only=False)["global_step"],
                sorted(p.name for p in folder.iterdir()))

    assert_ok(run_cli(["fit", *common, "--trainer.max_epochs", "3"], capsys))
    step, names = last_step(0)
    assert step == 9 and "epoch=0-step=3.ckpt" in names, (step, names)  # best at step 3, newest at 9
    assert not any(n.startswith("last-v") for n in names), names  # one last.ckpt, not a versioned second

    # resumed from it, the run goes on from step 9, not from the best checkpoint's step 3
    last = tmp_path / "lightning_logs" / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert_ok(run_cli(["fit", *common, "--trainer.max_epochs", "4", "--ckpt_path", str(last)], capsys))
    assert last_step(1)[0] == 12

    # stopped between validations: the final state is written when the fit ends
    assert_ok(run_cli(["fit", *common, "--trainer.max_epochs", "3", "--trainer.max_steps", "5"], capsys))
    assert last_step(2)[0] == 5
