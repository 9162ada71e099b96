#!/usr/bin/env bash
# Copy the second-seed PTB pair's logs from runs/pair3/ into this folder and rebuild the tables, JSON and curves.
# The pair ran side by side from the same start, one thread each and never paused, so their walls compare.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
out=benchmarks/results/quality-2026-12-06-seed1
# each run's metrics, config and command, and its test score where it was scored after the stop
bash benchmarks/copy_run_logs.sh runs/pair3 $out hm lstm
cp runs/pair3/ptb-ckpt100.yaml $out/
# The pair: equal steps and equal wall time.
python benchmarks/quality.py HM-LSTM-s1=$out/hm LN-LSTM-s1=$out/lstm --compare --out $out/quality.json \
  --plot $out/curves.png | tee $out/pair.md
# Against the tenth session's pair (the same commands at seed 1234) at equal steps: the spread between seeds.
# Their walls do not compare (another session's machine load).
p=benchmarks/results/quality-2026-12-06-sumtime
python benchmarks/quality.py HM-LSTM-s1=$out/hm LN-LSTM-s1=$out/lstm HM-LSTM-s1234=$p/hm LN-LSTM-s1234=$p/lstm \
  --compare steps --out $out/steps.json | tee $out/steps.md
