"""Several processes : `hmlstm fit --trainer.strategy ddp --trainer.devices 2` on the CPU
(gloo) gives each process its own half of the streams and ends with the weights of one process training on
the same global batch."""

import os
import subprocess
import sys

import pytest
import torch

from cli_run import run_cli
from hmlstm.data import StreamBatches, StreamLoader

TINY_MODEL = ["--model.hidden_sizes", "[8, 8]", "--model.embed_size", "8", "--model.output_size", "16",
              "--model.layer_norm", "false", "--model.backend", "reference"]


def test_each_rank_takes_its_own_streams():
    ids = torch.arange(1, 201)
    data = StreamBatches(ids, batch_size=4, seq_len=5)
    full = list(StreamLoader(data))
    ranks = [list(StreamLoader(data, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(full)  # same number of steps on every process
    for k, batch in enumerate(full):
        assert ranks[0][k]["input"].shape == (2, batch["input"].shape[1])
        joined = torch.cat([ranks[0][k]["input"], ranks[1][k]["input"]])
        assert torch.equal(joined, batch["input"])  # rank 0: streams 0-1, rank 1: streams 2-3


def fit(tmp_path, name, *extra, capsys=None):
    """`hmlstm fit` of the tiny model in tmp_path/name: in this process when given capsys, else in a subprocess
    (ddp launches its second process by running the same command again). Returns the last checkpoint and the log."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("the cat sat on the mat. a dog ran to the cat. " * 60)
    run = tmp_path / name
    run.mkdir()
    args = ["fit", "--data", "hmlstm.data.TextDataModule", "--data.path", str(corpus), "--data.batch_size", "4",
            "--data.seq_len", "8", *TINY_MODEL, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5",
            "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", *extra]
    if capsys is not None:
        cwd = os.getcwd()
        os.chdir(run)
        try:
            res = run_cli(args, capsys)
        finally:
            os.chdir(cwd)
    else:
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        env.pop("MASTER_PORT", None)  # Lightning picks a free port
        res = subprocess.run([sys.executable, "-m", "hmlstm.cli", *args], cwd=run, env=env, capture_output=True,
                             text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = run / "lightning_logs" / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(ckpt, weights_only=False), res.stdout + res.stderr


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, capsys):
    # a rate band that acts on most steps runs under ddp (its rates are reduced over the processes) and leaves
    # the weights those of one process on the global batch
    band = ["--model.boundary_rates", "[[0.7,0.8]]", "--model.boundary_rate_step", "0.05"]
    one, _ = fit(tmp_path, "one", "--trainer.devices", "1", *band, capsys=capsys)
    two, log = fit(tmp_path, "two", "--trainer.strategy", "ddp", "--trainer.devices", "2", *band)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # really two processes
    assert one["global_step"] == two["global_step"] == 5
    for k, w in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], w, rtol=1e-5, atol=1e-6, msg=k)
    # the carried state of the global batch, gathered in rank order: 4 streams, not 2 x 4
    for group in ("h", "c", "z"):
        for a, b in zip(one["hmlstm"]["train_state"][group], two["hmlstm"]["train_state"][group]):
            assert b.shape[0] == 4
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the validation NLL (what ModelCheckpoint and the LR schedule watch) is reduced over both processes
    (score_one,), (score_two,) = ([c["current_score"] for k, c in ck["callbacks"].items() if "ModelCheckpoint" in k]
                                  for ck in (one, two))
    torch.testing.assert_close(score_two, score_one, rtol=1e-5, atol=1e-6)
