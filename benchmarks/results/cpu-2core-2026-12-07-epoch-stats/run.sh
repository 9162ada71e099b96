#!/usr/bin/env bash
# The training step of the default HM-LSTM (configs/default.yaml: 3 x 128, batch 64, 50 characters), with the
# epoch values summed on the device and logged once an epoch (commit 66eb039, hmlstm/epoch_stats.py) against the
# module as it was before (hmlstm/training.py of 381c8bd: one Lightning `log` call per value per step; no other
# file it imports changed in between), each alone on the two cores. The same benchmarks/train_step.py times both;
# for the old one the old training.py is put in place (the editable install reads this checkout) and restored
# after. Eight invocations, new / old / new / old / old / new / old / new; each trains the same checkpoint (20 steps of the
# default) for 5 untimed and 30 timed steps, 2 rounds, on the default's text (`--pydoc`). Run from the
# repository root, with a clean hmlstm/training.py, the machine otherwise idle.
set -euo pipefail
out=benchmarks/results/cpu-2core-2026-12-07-epoch-stats
work=${WORK:-/tmp/epoch-stats}
git diff --quiet -- hmlstm/training.py || { echo "hmlstm/training.py has changes: commit them first" >&2; exit 1; }
trap 'git checkout -- hmlstm/training.py' EXIT
rm -rf "$work" && mkdir -p "$work/ckpt"
(cd "$work/ckpt" && hmlstm fit --trainer.max_steps 20 --trainer.limit_val_batches 0 \
  --trainer.enable_progress_bar false > fit.log 2>&1)
ckpt=$work/ckpt/lightning_logs/csv/version_0/checkpoints/last.ckpt
for i in 1 2 3 4 5 6 7 8; do
  if [[ " 1 3 6 8 " == *" $i "* ]]; then  # new old new old, then old new old new
    tag=new; git checkout -- hmlstm/training.py
  else
    tag=old; git show 381c8bd:hmlstm/training.py > hmlstm/training.py
  fi
  python benchmarks/train_step.py default-$tag=$ckpt --pydoc --threads 2 --batch-size 64 --seq-len 50 \
    --steps 30 --warmup 5 --rounds 2 --out $out/$tag-$i.json | tail -1
done
