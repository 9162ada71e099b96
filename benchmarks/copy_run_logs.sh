#!/usr/bin/env bash
# Copy training runs' logs into a committed results folder: bash benchmarks/copy_run_logs.sh SRC OUT NAME...
# For each NAME, from SRC/NAME (a folder that ran `hmlstm fit`, its command in cmd.txt) into OUT/NAME: the CSV
# logger's metrics.csv, config.yaml and hparams.yaml of the fit (version_0), cmd.txt, and where the test set was
# scored afterwards (`hmlstm test`, its command in cmd-test.txt, its own log folder version_1) that score as
# test-metrics.csv. Run from the repository root; benchmarks/quality.py reads the folders it writes.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 SRC OUT NAME..." >&2; exit 2; }
src=$1 out=$2
shift 2
for r in "$@"; do
  mkdir -p "$out/$r"
  v=$src/$r/lightning_logs/csv/version_0
  cp "$v/metrics.csv" "$v/config.yaml" "$v/hparams.yaml" "$src/$r/cmd.txt" "$out/$r/"
  if [ -f "$src/$r/cmd-test.txt" ]; then
    cp "$src/$r/cmd-test.txt" "$out/$r/"
    cp "$src/$r/lightning_logs/csv/version_1/metrics.csv" "$out/$r/test-metrics.csv"
  fi
done
