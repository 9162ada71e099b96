#!/usr/bin/env bash
# Copy the fixed-schedule PTB pair's logs from runs/pair4/ into this folder and rebuild the tables, JSON and curves.
# The pair ran side by side from the same start, one thread each and never paused, so their walls compare.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
out=benchmarks/results/quality-2026-12-07-milestone
# each run's metrics, config and command, and its test score where it was scored after the stop
bash benchmarks/copy_run_logs.sh runs/pair4 $out hm lstm
cp runs/pair4/ptb.yaml $out/
# The pair: equal steps and equal wall time.
python benchmarks/quality.py HM-LSTM-s2=$out/hm LN-LSTM-s2=$out/lstm --compare --out $out/quality.json \
  --plot $out/curves.png | tee $out/pair.md
# Beside the two plateau-schedule pairs with the same settings (seeds 1234 and 1) at equal steps; their walls do
# not compare (other sessions' machine load).
a=benchmarks/results/quality-2026-12-06-sumtime
b=benchmarks/results/quality-2026-12-06-seed1
python benchmarks/quality.py HM-LSTM-s2=$out/hm LN-LSTM-s2=$out/lstm HM-LSTM-s1234=$a/hm LN-LSTM-s1234=$a/lstm \
  HM-LSTM-s1=$b/hm LN-LSTM-s1=$b/lstm --compare steps --out $out/steps.json | tee $out/steps.md
# The HM-LSTM's test score at the LN-LSTM's best step (5684), from a copy of that validation checkpoint kept
# aside during the run (save_top_k=1 deletes it): the test set at equal steps.
cp runs/pair4/hm/cmd-test-5684.txt $out/hm/
cp runs/pair4/hm/lightning_logs/csv/version_2/metrics.csv $out/hm/test-metrics-5684.csv
