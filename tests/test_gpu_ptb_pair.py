"""benchmarks/gpu_ptb_pair.sh, the one-call PTB comparison at the paper's size for a lent GPU, runs end to end on
the CPU (DRY_RUN=1: a tiny model on a tiny PTB-format corpus, no build): the warmup, the two runs for the same
wall time, and the comparison, each writing what it made. Its figures come from a session that has a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_data import fake_ptb

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_ptb_pair.sh"


def _run(tmp_path: Path, data: Path, budget: int, **flags: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), PTB_DIR=str(data), WORK_DIR=str(tmp_path / "work"),
               BUDGET_S=str(budget), PYTHON=sys.executable, **flags)
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=budget + 300)
    return res, out


@pytest.mark.skipif(os.name == "nt", reason="a bash script")
def test_dry_run_trains_both_cells_for_the_same_time_and_compares_them(tmp_path):
    """FLAGS reach both runs; HM_FLAGS that fail (here a backend that does not exist, on the GPU a Triton
    failure) put the HM-LSTM on the reference backend, said in the log, and the comparison still runs."""
    data = tmp_path / "ptb"
    data.mkdir()
    res, out = _run(tmp_path, fake_ptb(data, lines=400), budget=150, FLAGS="--seed_everything 7",
                    HM_FLAGS="--model.backend no-such-backend")
    log = (out / "session.log").read_text()
    assert res.returncode == 0 and log.rstrip().endswith("done"), res.stdout[-2000:] + res.stderr[-2000:]
    stages = [line.split("] ", 1)[1].split(" (")[0] for line in log.splitlines() if ": start" in line]
    assert stages == ["warmup: start", "hm: start", "lstm: start", "collect: start"], log
    assert "warmup hm: rc 0" not in log and "warmup hm on the reference backend: rc 0" in log, log
    assert "warmup lstm: rc 0" in log and "hm: rc 0" in log and "lstm: rc 0" in log, log
    hm_cmd, lstm_cmd = ((out / cell / "cmd.txt").read_text().split() for cell in ("hm", "lstm"))
    # the same command but for each side's own flags, and the same time limit for both
    assert hm_cmd[:-6] == lstm_cmd[:-6] and hm_cmd[-2:] == lstm_cmd[-2:], (hm_cmd, lstm_cmd)
    # the failing flag kept, the fallback after it (the last one wins)
    assert hm_cmd[-6:-2] == ["--model.backend", "no-such-backend", "--model.backend", "reference"], hm_cmd
    assert lstm_cmd[-6:-2] == ["--model.cell", "lstm", "--model.state_reset", "0"], lstm_cmd
    assert hm_cmd[1:5] == ["-m", "hmlstm.cli", "fit", "--config"] and hm_cmd[5].endswith("configs/ptb.yaml")
    assert hm_cmd[-2] == "--trainer.max_time" and "--trainer.val_check_interval 50" in " ".join(hm_cmd)
    assert "--seed_everything 7" in " ".join(hm_cmd)
    hm_cmd = " ".join(hm_cmd)
    runs = json.loads((out / "quality.json").read_text())["runs"]
    assert set(runs) == {"HM-LSTM-512", "LN-LSTM-512"}, runs
    limit = int(hm_cmd.split("--trainer.max_time ")[1].split(":")[-1]) + 60 * int(hm_cmd.split(":")[-2])
    for name, run in runs.items():
        assert run["steps"] > 0 and run["val_bpc"] > 0, (name, run)
        assert run["wall_s"] <= limit + 5, (name, run["wall_s"], limit)  # max_time stopped it
    assert set(runs["HM-LSTM-512"]["rates"]) == {"1", "2"} and not runs["LN-LSTM-512"]["rates"]
    doc = json.loads((out / "quality.json").read_text())
    # both validated every 50 steps (counted within each epoch), so they share those steps from the first on
    steps = [row["step"] for row in doc["equal_steps"]]
    assert len(steps) >= 2 and steps[:2] == [49, 99], steps
    pair = (out / "pair.md").read_text()
    assert "HM-LSTM-512" in pair and "LN-LSTM-512" in pair and "At equal steps" in pair and "At the wall time" in pair
    assert (out / "curves.png").stat().st_size > 0 and "torch" in (out / "versions.txt").read_text()


def test_missing_data_is_refused_with_its_path(tmp_path):
    res, _ = _run(tmp_path, tmp_path / "no-such-folder", budget=30)
    assert res.returncode == 2 and "no PTB data at" in res.stderr and "no-such-folder" in res.stderr
