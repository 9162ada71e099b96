"""benchmarks/gpu_session.sh, the one-call GPU script, runs end to end on the CPU (DRY_RUN=1: tiny sizes, the
Triton interpreter, no build): every stage writes its output, in order, and the script finishes within its
budget. Its GPU figures come from a session that has a GPU."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from hmlstm.backends import unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.name == "nt", reason="a bash script")
def test_dry_run_writes_every_stage(tmp_path):
    if unavailable_reason("triton", __import__("torch").device("cpu")) is not None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), BUDGET_S="400")
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    log = (tmp_path / "session.log").read_text()
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert log.rstrip().endswith("done"), log
    stages = [line.split("] ", 1)[1].split(":")[0] for line in log.splitlines() if ": start" in line]
    assert stages == ["smoke", "ptb", "tests"], log
    assert "torch" in (tmp_path / "versions.txt").read_text()
    smoke = json.loads((tmp_path / "smoke.json").read_text())
    assert smoke["backends"] and all(r["ok"] for r in smoke["records"]), smoke
    assert {(r["backend"], r["dtype"]) for r in smoke["records"]} >= {("triton", "float32"), ("triton", "bfloat16")}
    recs = json.loads((tmp_path / "ptb.json").read_text())["records"]
    assert {r["provider"] for r in recs} == {"hmlstm-reference", "hmlstm-triton", "lstm"}
    assert all(r["median_s"] for r in recs), [r["error"] for r in recs if not r["median_s"]]
    assert (tmp_path / "ptb.md").exists()
    assert " passed" in (tmp_path / "tests.log").read_text()


def test_a_stage_without_time_is_skipped_and_said(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), BUDGET_S="20")
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0
    log = (tmp_path / "session.log").read_text()
    assert "smoke: skipped" in log and (tmp_path / "ptb.skipped").exists(), log
