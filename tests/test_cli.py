"""The `hmlstm` command end to end on a tiny corpus: fit, validate, generate, boundaries, export. `fit` runs
through the console entry (`python -m hmlstm.cli`) in a subprocess, and so does one error, whose message must
come without a traceback; the other commands run in this process (tests/cli_run.py), which saves 10 s of
imports each."""

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from cli_run import assert_ok, run_cli
from hmlstm.cli import _with_configs, shipped_config
from hmlstm.training import HMLSTMLanguageModel

TINY_MODEL = ["--model.hidden_sizes", "[8, 8]", "--model.embed_size", "8", "--model.output_size", "16",
              "--model.layer_norm", "false", "--model.backend", "reference"]


def hmlstm(args, cwd):
    # one thread: the tiny model is fastest that way, and does not stall when other jobs share the cores
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "hmlstm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return proc.stdout.decode("utf-8")


def last_value(metrics_csv: Path, key: str) -> float:
    rows = [r for r in csv.DictReader(open(metrics_csv)) if r.get(key)]
    assert rows, f"{key} not logged in {metrics_csv}"
    return float(rows[-1][key])


def test_shipped_configs_and_default():
    for name in ("default.yaml", "ptb.yaml", "text8.yaml", "enwik8.yaml", "synthetic.yaml"):
        assert shipped_config(name) is not None, name
    assert shipped_config("ptb") == shipped_config("ptb.yaml")
    args = _with_configs(["fit", "--trainer.max_epochs", "1"])
    assert args[:3] == ["fit", "--config", str(shipped_config("default.yaml"))]
    args = _with_configs(["fit", "--config", "ptb.yaml"])
    assert args == ["fit", "--config", str(shipped_config("ptb.yaml"))]


def test_ptb_config_trains_with_its_measured_options_and_its_baseline_drops_the_reset(capsys):
    """ptb.yaml sets the three training options its README rows were measured with, and the LSTM baseline's
    documented command (`--model.cell lstm --model.state_reset 0`) gives the LN-LSTM those rows ran against."""
    def resolved(*extra):
        result = run_cli(["fit", "--config", "ptb.yaml", *extra, "--print_config"], capsys)
        return yaml.safe_load(assert_ok(result))["model"]

    hm = resolved()
    assert (hm["cell"], hm["loss_reduction"], hm["boundary_peaks"], hm["state_reset"]) == \
        ("hmlstm", "sum_time", [0.5, 0.0], 0.05)
    assert (hm["hidden_sizes"], hm["layer_norm"], hm["lr"], hm["lr_factor"]) == ([512, 512, 512], True, 0.002, 0.02)
    lstm = resolved("--model.cell", "lstm", "--model.state_reset", "0")
    assert (lstm["cell"], lstm["loss_reduction"], lstm["state_reset"]) == ("lstm", "sum_time", 0.0)
    paper = resolved("--model.loss_reduction", "mean", "--model.boundary_peaks", "0", "--model.state_reset", "0")
    assert (paper["loss_reduction"], paper["boundary_peaks"], paper["state_reset"]) == ("mean", 0.0, 0.0)
    assert HMLSTMLanguageModel(**hm)._peaks == [0.5, 0.0]  # the options build as resolved
    with pytest.warns(UserWarning, match="boundary_peaks=.* is unused"):  # said, not fatal
        assert HMLSTMLanguageModel(**lstm)._peaks == []


def test_synthetic_config_resolves_to_its_measured_options_and_its_lstm_command_runs_clean(capsys):
    """synthetic.yaml sets the options its README rows were measured with; the documented commands of the LSTM
    baseline and of the forced true boundaries turn off every option they do not use, so that they build without
    a warning."""
    def resolved(*extra):
        result = run_cli(["fit", "--config", "synthetic.yaml", *extra, "--print_config"], capsys)
        return yaml.safe_load(assert_ok(result))["model"]

    hm = resolved()
    assert (hm["boundary_cost"], hm["boundary_peaks"], hm["boundary_peaks_reach"], hm["boundary_rates"],
            hm["lr_patience"]) == ([0.05, 0.0], [1.0, 2.0], True, [None, [0.03, 0.12]], 2)
    assert HMLSTMLanguageModel(**hm)._peaks == [1.0, 2.0]
    lstm = resolved("--model.cell", "lstm", "--model.boundary_cost", "0", "--model.boundary_peaks", "0",
                    "--model.boundary_peaks_reach", "false", "--model.boundary_rates", "null")
    oracle = resolved("--model.oracle_boundaries", "true", "--model.backend", "reference", "--model.boundary_cost",
                      "0", "--model.boundary_peaks", "0", "--model.boundary_peaks_reach", "false",
                      "--model.boundary_rates", "null")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HMLSTMLanguageModel(**lstm)
        HMLSTMLanguageModel(**oracle)


@pytest.mark.slow
def test_cli_fit_validate_generate_boundaries(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the cat sat on the mat. a dog ran to the cat. " * 120)  # 5,520 characters
    data = ["--data", "hmlstm.data.TextDataModule", "--data.path", str(corpus), "--data.batch_size", "4",
            "--data.seq_len", "10"]
    # the nested-list option parses from the command line (a band that rarely acts: the run stays the plain one)
    out = hmlstm(["fit", *data, *TINY_MODEL, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
                  "--trainer.enable_progress_bar", "false", "--model.boundary_rates", "[[0.0001,0.9999]]"], tmp_path)
    assert "validation BPC" in out and "unigram entropy" in out
    assert "  layer 1: boundary rate " in out and "F1 against word ends" in out  # the boundary summary

    run = tmp_path / "lightning_logs" / "csv" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert yaml.safe_load((run / "hparams.yaml").read_text())["boundary_rates"] == [[0.0001, 0.9999]]
    fit_bpc = last_value(run / "metrics.csv", "val/bpc")

    # the rest in this process, in the same folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HMLSTM_TRACEBACK", raising=False)

    # validate from the checkpoint: the model's arguments come from the checkpoint, not the command line
    assert_ok(run_cli(["validate", *data, "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false"],
                      capsys))
    val_bpc = last_value(tmp_path / "lightning_logs" / "csv" / "version_1" / "metrics.csv", "val/bpc")
    assert val_bpc == pytest.approx(fit_bpc, rel=1e-5)
    assert last_value(run / "metrics.csv", "train/grad_norm_max") > 0

    # export: the model alone validates to the same BPC; resuming training from it fails with a one-line error
    weights = tmp_path / "weights.ckpt"
    assert "wrote" in assert_ok(run_cli(["export", "--ckpt_path", str(ckpt), "--out", str(weights)], capsys))
    assert_ok(run_cli(["validate", *data, "--ckpt_path", str(weights), "--trainer.enable_progress_bar", "false"],
                      capsys))
    exported_bpc = last_value(tmp_path / "lightning_logs" / "csv" / "version_2" / "metrics.csv", "val/bpc")
    assert exported_bpc == pytest.approx(fit_bpc, rel=1e-5)
    refused = run_cli(["fit", *data, "--ckpt_path", str(weights), "--trainer.max_epochs", "3",
                       "--trainer.enable_progress_bar", "false"], capsys)
    assert refused.returncode != 0 and "cannot resume training" in refused.stderr, refused.stderr[-2000:]

    text = assert_ok(run_cli(["generate", "--ckpt_path", str(ckpt), "--prompt", "the ", "--length", "37",
                              "--temperature", "0.7"], capsys))
    assert text.startswith("the ") and text.endswith("\n")
    assert len(text) == len("the ") + 37 + 1

    png = tmp_path / "b.png"
    out = assert_ok(run_cli(["boundaries", "--ckpt_path", str(ckpt), "--text", "the cat sat on the mat", "--out",
                             str(png)], capsys))
    assert "layer 1" in out and "F1" in out
    assert "tolerance 0:" in out and "tolerance 1:" in out  # the headline and the one beside it
    with_periods = assert_ok(run_cli(["boundaries", "--ckpt_path", str(ckpt), "--text", "the cat. sat on the mat.",
                                      "--out", str(png), "--separators", " ."], capsys))
    assert "24 characters, 6 word boundaries" in with_periods  # the two periods count: whitespace alone gives 5
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 100


def test_cli_errors_are_clear(tmp_path, capsys):
    # through the interpreter: a bad value that fails inside Lightning's instantiation (a ValueError) ends the
    # process with a one-line message, no traceback
    proc = subprocess.run([sys.executable, "-m", "hmlstm.cli", "fit", "--slope.start", "-1", "--trainer.logger",
                           "false"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "HMLSTM_TRACEBACK"})
    assert proc.returncode != 0 and "hmlstm: error" in proc.stderr, proc.stderr[-2000:]
    assert "slope start must be > 0, got -1.0" in proc.stderr and "Traceback" not in proc.stderr
    missing = run_cli(["generate", "--ckpt_path", str(tmp_path / "no.ckpt")], capsys)
    assert missing.returncode != 0 and "no such checkpoint file" in missing.stderr


def test_boundary_summary_reads_each_layer_and_level():
    from hmlstm.cli import boundary_summary
    m = {"val/bpc": 1.2, "val/boundary_rate_l1": 0.25, "val/boundary_rate_l2": 0.1, "val/f1_l1_word": 0.83,
         "val/f1_tol1_l1_word": 0.84, "val/f1_l1_phrase": 0.2, "val/f1_tol1_l1_phrase": 0.3, "val/f1_l2_word": 0.5}
    assert boundary_summary(m) == [
        "  layer 1: boundary rate 0.250, F1 against word ends 0.830 (0.840 at tolerance 1), "
        "F1 against phrase ends 0.200 (0.300 at tolerance 1)",
        "  layer 2: boundary rate 0.100, F1 against word ends 0.500"]
    assert boundary_summary({"val/bpc": 1.0}) == []  # an LSTM: no boundaries
    assert boundary_summary(m, "test") == []
