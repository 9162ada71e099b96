#!/usr/bin/env bash
# Copy the fourth PTB pair's logs (seed 3, the fixed schedule) from runs/pair5/ into this folder and rebuild the
# tables, JSON and curves. The pair ran side by side from the same start, one thread each, so their walls compare.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
out=benchmarks/results/quality-2026-12-07-seed3
# each run's metrics, config and command, and its test score where it was scored after the stop
bash benchmarks/copy_run_logs.sh runs/pair5 $out hm lstm
cp runs/pair5/ptb.yaml $out/
# The pair: equal steps and equal wall time.
python benchmarks/quality.py HM-LSTM-s3=$out/hm LN-LSTM-s3=$out/lstm --compare --out $out/quality.json \
  --plot $out/curves.png | tee $out/pair.md
# Beside the three earlier pairs of the same settings at equal steps (seed 2 with the same fixed schedule, seeds
# 1234 and 1 with the plateau rule); walls compare only within a pair.
a=benchmarks/results/quality-2026-12-07-milestone
b=benchmarks/results/quality-2026-12-06-sumtime
c=benchmarks/results/quality-2026-12-06-seed1
python benchmarks/quality.py HM-LSTM-s3=$out/hm LN-LSTM-s3=$out/lstm HM-LSTM-s2=$a/hm LN-LSTM-s2=$a/lstm \
  HM-LSTM-s1234=$b/hm LN-LSTM-s1234=$b/lstm HM-LSTM-s1=$c/hm LN-LSTM-s1=$c/lstm --compare steps \
  --out $out/steps.json | tee $out/steps.md
