#!/usr/bin/env bash
# Copy the two PTB runs with the peak charge's reach from runs/reach-ptb/ into this folder and rebuild the tables
# and JSON: each beside the run without the reach at the same seed and settings (an earlier session's pair, whose
# LN-LSTM is in the table too), at equal steps. Their walls do not compare (other sessions, other neighbours).
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
out=benchmarks/results/quality-2026-12-07-reach-ptb
# each run's metrics, config and command, and its test score where it was scored after the stop
bash benchmarks/copy_run_logs.sh runs/reach-ptb $out s1234 s2m
cp runs/reach-ptb/ptb.yaml $out/
a=benchmarks/results/quality-2026-12-06-sumtime
b=benchmarks/results/quality-2026-12-07-milestone
python benchmarks/quality.py reach-s1234=$out/s1234 noreach-s1234=$a/hm LN-LSTM-s1234=$a/lstm \
  --compare steps --out $out/s1234.json --plot $out/s1234-curves.png | tee $out/s1234.md
python benchmarks/quality.py reach-s2=$out/s2m noreach-s2=$b/hm LN-LSTM-s2=$b/lstm \
  --compare steps --out $out/s2.json --plot $out/s2-curves.png | tee $out/s2.md
