#!/usr/bin/env bash
# Copy the runs of benchmarks/seeds.py from runs/v8/SET/seed-S into SET-sS/ here, with each setting's summary
# (SET.json, seeds.py's), and the two solo runs (runs/v8/shipped-solo, runs/v8/noreach-solo) with their timings.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
out=benchmarks/results/quality-2026-12-07-reach
for set in R P2x W60 R1 S05 Z; do
  [ -d runs/v8/$set ] || continue
  for run in runs/v8/$set/seed-*; do
    [ -f $run/done.txt ] || continue
    dst=$out/$set-s${run##*seed-}
    mkdir -p $dst
    v=$run/lightning_logs/csv/version_0
    cp $v/metrics.csv $v/config.yaml $v/hparams.yaml $run/cmd.txt $dst/
  done
  [ -f runs/v8/$set.json ] && cp runs/v8/$set.json $out/
done
# the two solo runs: today's synthetic.yaml and the same without the reach, each alone on the machine
for solo in shipped-solo noreach-solo shipped-solo2 noreach-solo2; do
  [ -f runs/v8/$solo/time.txt ] || continue
  mkdir -p $out/$solo
  v=runs/v8/$solo/lightning_logs/csv/version_0
  cp $v/metrics.csv $v/config.yaml $v/hparams.yaml runs/v8/$solo/cmd.txt runs/v8/$solo/time.txt $out/$solo/
done
