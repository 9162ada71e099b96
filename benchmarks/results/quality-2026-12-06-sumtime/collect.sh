#!/usr/bin/env bash
# Copy the summed-loss PTB pair's logs from runs/pair2/ into this folder and rebuild the tables, JSON and curves.
# The pair ran side by side from the same start, one thread each and never paused, so their walls compare.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
out=benchmarks/results/quality-2026-12-06-sumtime
# each run's metrics, config and command, and its test score where it was scored after the stop
bash benchmarks/copy_run_logs.sh runs/pair2 $out hm lstm
cp runs/pair2/ptb-ckpt100.yaml $out/
# The pair: equal steps and equal wall time.
python benchmarks/quality.py HM-LSTM-sum=$out/hm LN-LSTM-sum=$out/lstm --compare --out $out/quality.json \
  --plot $out/curves.png | tee $out/pair.md
# Against the ninth session's pair (the same two models, commands and seed with the per-character mean loss) at
# equal steps: what the summed loss moved. Their walls do not compare (another machine's session).
p=benchmarks/results/quality-2026-12-06-pair
python benchmarks/quality.py HM-LSTM-sum=$out/hm LN-LSTM-sum=$out/lstm HM-LSTM-mean=$p/w05 LN-LSTM-mean=$p/lstm \
  --compare steps --out $out/steps.json | tee $out/steps.md
