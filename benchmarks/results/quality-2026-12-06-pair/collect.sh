#!/usr/bin/env bash
# Copy the PTB pair's logs from runs/pair/ into this folder and rebuild the tables, JSON and curves.
# The pair ran side by side from the same start, one thread each and never paused, so their walls compare.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
out=benchmarks/results/quality-2026-12-06-pair
# each run's metrics, config and command, and its test score where it was scored after the stop
bash benchmarks/copy_run_logs.sh runs/pair $out w05 lstm
cp runs/pair/ptb-ckpt100.yaml $out/
# The W = 0.2 run of the seventh and eighth sessions was logged in two launches: join them (the second resumed at
# step 3900, its first row is step 3919's validation, after the first launch's last row).
peaks=benchmarks/results/quality-2026-12-06-peaks/ptb-bal
python - $peaks/metrics.csv $peaks/metrics-resumed.csv $out/w02-joined.csv <<'PY'
import csv, sys
parts = [list(csv.DictReader(open(f))) for f in sys.argv[1:3]]
fields = list(dict.fromkeys(k for rows in parts for k in rows[0]))
with open(sys.argv[3], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for rows in parts:
        w.writerows(rows)
PY
# The pair: equal steps and equal wall time.
python benchmarks/quality.py HM-LSTM-W0.5=$out/w05 LN-LSTM=$out/lstm --compare --out $out/quality.json \
  --plot $out/curves.png | tee $out/pair.md
# Against the earlier PTB runs of the same model, seed and data at equal steps (their walls do not compare: they
# ran beside other runs).
v3=benchmarks/results/quality-2026-12-01-ptb-v3
python benchmarks/quality.py W0.5=$out/w05 "LN-LSTM (now)"=$out/lstm \
  "HM-LSTM shipped"=$v3/hm/metrics-joined-pauses-removed.csv "LN-LSTM (2026-12-01)"=$v3/lstm/metrics-joined-pauses-removed.csv \
  W0.2=$out/w02-joined.csv --compare steps --out $out/steps.json | tee $out/steps.md
