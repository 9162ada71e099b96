#!/usr/bin/env bash
# The training step of the default HM-LSTM (configs/default.yaml: 3 x 128, batch 64, 50 characters), with the
# epoch values summed on the device and logged once an epoch (commit 66eb039, hmlstm/epoch_stats.py) against the
# package as it was before (381c8bd: one Lightning `log` call per value per step), each alone on the two cores.
# The same benchmarks/train_step.py (this checkout's) times both: the package is switched by PYTHONPATH, the old one
# a worktree of 381c8bd with this checkout's compiled extension (csrc/ did not change between them). Four
# invocations, alternating new / old / new / old; each trains the same checkpoint (20 steps of the default) for
# 5 untimed and 30 timed steps, 2 rounds, on the default's text (`--pydoc`). Run from the repository root, the machine otherwise idle.
set -euo pipefail
out=benchmarks/results/cpu-2core-2026-12-07-epoch-stats
work=${WORK:-/tmp/epoch-stats}
rm -rf "$work" && mkdir -p "$work/ckpt"
git worktree add -f "$work/old" 381c8bd > /dev/null
cp hmlstm/_C*.so "$work/old/hmlstm/"
(cd "$work/ckpt" && hmlstm fit --trainer.max_steps 20 --trainer.limit_val_batches 0 \
  --trainer.enable_progress_bar false > fit.log 2>&1)
ckpt=$(ls "$work"/ckpt/lightning_logs/csv/version_0/checkpoints/last.ckpt)
for i in 1 2 3 4; do
  if ((i % 2)); then tag=new; pp=$PWD; else tag=old; pp=$work/old; fi
  PYTHONPATH=$pp python -c "import hmlstm; assert hmlstm.__file__.startswith('$pp/'), hmlstm.__file__"
  PYTHONPATH=$pp python benchmarks/train_step.py default-$tag=$ckpt --pydoc --threads 2 \
    --batch-size 64 --seq-len 50 --steps 30 --warmup 5 --rounds 2 --out $out/$tag-$i.json | tail -1
done
git worktree remove --force "$work/old"
