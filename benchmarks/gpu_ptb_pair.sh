#!/usr/bin/env bash
# Issue 15's PTB comparison at the paper's size on a lent GPU, in ONE call of the device tool (BUDGET_S, default
# 570): `ptb.yaml` as shipped (3 x 512 layer-norm HM-LSTM, the authors' summed loss, layer 1's entropy-peak target)
# against the LN-LSTM baseline of the same sizes, loss and schedule (`--model.cell lstm --model.state_reset 0`).
# The two train one after the other, each alone on the GPU for the same wall time (Lightning's max_time, which
# stops cleanly), so that they compare at equal wall time and, over the steps both reached, at equal steps.
# Each stage writes to $OUT as it ends, so a call cut short still returns what it did:
#
#   versions.txt, wheels.log  GPU, CUDA, torch, triton; the carried wheels, installed for this call
#   warmup.log                a two-step fit of each cell: Triton compiles its kernels here, not in the timed runs
#   hm/, lstm/                each run's metrics.csv, config.yaml, hparams.yaml, cmd.txt and log.txt
#                             (checkpoints stay on the machine: a 3 x 512 one is too large to bring back)
#   pair.md, quality.json, curves.png   `benchmarks/quality.py --compare` over the two
#
# Prepare on this machine, from the repository root: `bash benchmarks/gpu_ptb_pair.sh prepare` copies the PTB files
# into the git-ignored .data/ptb (PTB_DIR) and downloads into the git-ignored .whl/ the wheels the CLI needs that the
# GPU image lacks (jsonargparse with its `signatures` extra; the image has Lightning, not these). Then the device
# tool's run with command "bash benchmarks/gpu_ptb_pair.sh" and carry [".data", ".whl"].
# FLAGS adds options to both runs (e.g. FLAGS="--seed_everything 1"), HM_FLAGS to the HM-LSTM's alone; VAL_EVERY
# (default 200) is the validation interval in training steps. DRY_RUN=1 runs every stage on the CPU with a tiny
# model (tests/test_gpu_ptb_pair.py, in CI).
set -uo pipefail
root=$(pwd)
# the image of the GPU machine has python3 (the one with PyTorch) and may have no `python` or `hmlstm` on the PATH
py=${PYTHON:-python3}
if [ "${1:-}" = "prepare" ]; then
  set -e
  mkdir -p .data/ptb .whl
  cp "${SHARED_PTB:-../shared/data/ptb}"/ptb.char.*.txt .data/ptb/
  # the versions installed here, as pure-Python wheels for the image's Python 3.12
  pkgs=$("$py" -c "from importlib.metadata import version as v; print(' '.join(f'{p}=={v(p)}' for p in ('jsonargparse', 'docstring_parser', 'typeshed_client')))")
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl $pkgs
  ls .data/ptb .whl
  exit 0
fi
out=${OUT:-benchmarks/results/gpu-ptb-pair}
data=${PTB_DIR:-.data/ptb}
work=${WORK_DIR:-$(mktemp -d)}
budget=${BUDGET_S:-570}
dry=${DRY_RUN:-0}
mkdir -p "$out"
out=$(cd "$out" && pwd)
data=$(cd "$data" 2>/dev/null && pwd) || { echo "gpu_ptb_pair: no PTB data at ${PTB_DIR:-.data/ptb}" >&2; exit 2; }
export PYTHONUNBUFFERED=1
start=$SECONDS
log() { echo "[gpu_ptb_pair $((SECONDS - start))s] $*" | tee -a "$out/session.log"; }
left() { echo $((budget - (SECONDS - start))); }

if [ "$dry" = "1" ]; then
  # the same stages at a size the CPU runs in seconds
  size=(--model.hidden_sizes "[8,8,8]" --model.embed_size 8 --model.output_size 8 --data.init_args.batch_size 2
        --data.init_args.seq_len 10)
  collect_s=20
  warm_s=120
  val_every=${VAL_EVERY:-50}
else
  size=()
  collect_s=30
  warm_s=240  # Triton compiles every kernel configuration of the sequence ops in the first steps
  val_every=${VAL_EVERY:-200}
fi
# The package runs from this checkout (no install: the GPU path is Triton, compiled at run time, and the C++
# extension is the CPU's), so the config is named by its path. Validation every val_every training steps, the
# same steps for both runs, so that they compare at equal steps however few minutes they get (an epoch of PTB
# is about 800 steps). FLAGS: more options for both runs, HM_FLAGS for the HM-LSTM's alone (word-split, e.g.
# FLAGS="--seed_everything 1").
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
read -r -a both <<< "${FLAGS:-}"
fit=("$py" -m hmlstm.cli fit --config "$root/configs/ptb.yaml" --data.data_dir "$data"
     --trainer.val_check_interval "$val_every" --trainer.enable_progress_bar false "${size[@]}" "${both[@]}")
read -r -a hm <<< "${HM_FLAGS:-}"
lstm=(--model.cell lstm --model.state_reset 0)

{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null
  [ "$dry" != "1" ] && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
} > "$out/versions.txt" 2>&1
log "versions: $(tr '\n' ' ' < "$out/versions.txt")"

if [ "$dry" != "1" ]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      > "$out/wheels.log" 2>&1
    log "wheels: rc $? ($(ls .whl | tr '\n' ' '))"
    export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
fi

warm() {  # warm NAME FLAGS...: a two-step fit, its output appended to warmup.log; returns its exit status
  local name=$1
  shift
  mkdir -p "$work/warmup-$name"
  (cd "$work/warmup-$name" && timeout "$warm_s" "${fit[@]}" "$@" --trainer.max_steps 2 \
    --trainer.limit_val_batches 2) >> "$out/warmup.log" 2>&1
}
log "warmup: start"
for cell in hm lstm; do
  declare -n flags=$cell  # the cell's own flags: hm or lstm
  warm $cell "${flags[@]}"
  rc=$?
  log "warmup $cell: rc $rc"
  if ((rc != 0)); then
    # the Triton backend has not run on a GPU before (the LN-LSTM runs on it too: one-layer HM-LSTMs without
    # boundaries): a failure is reported (warmup.log), and the reference backend still gives the comparison at
    # equal steps (its wall time is then not the fused kernels'). Appended, so that it wins over any other.
    flags+=(--model.backend reference)
    warm $cell-reference "${flags[@]}"
    log "warmup $cell on the reference backend: rc $?; the $cell run uses it"
  fi
  unset -n flags
done

# each run gets half of what is left after the collection's margin and each run's start and end (imports, the
# last validation and checkpoint), which max_time does not count
each=$(( ($(left) - collect_s - 2 * 20) / 2 ))
if ((each < 20)); then
  log "runs: skipped, ${each}s each is too little"
  exit 0
fi
max_time=$(printf '00:%02d:%02d:%02d' $((each / 3600)) $((each % 3600 / 60)) $((each % 60)))
for cell in hm lstm; do
  declare -n flags=$cell
  mkdir -p "$work/$cell" "$out/$cell"
  cmd=("${fit[@]}" "${flags[@]}" --trainer.max_time "$max_time")
  unset -n flags
  echo "${cmd[*]}" > "$out/$cell/cmd.txt"
  log "$cell: start (max_time $max_time)"
  # max_time stops training; the guard stops a run that hangs past it (the last validation or save), within
  # what the call has left for the run after this one and the collection
  guard=$((each + 60))
  [ $cell = hm ] && rest=$((each + 20 + collect_s)) || rest=$collect_s
  (( $(left) - rest < guard )) && guard=$(( $(left) - rest ))
  (cd "$work/$cell" && timeout "$guard" "${cmd[@]}") > "$out/$cell/log.txt" 2>&1
  log "$cell: rc $?"
  v=$work/$cell/lightning_logs/csv/version_0
  cp "$v/metrics.csv" "$v/config.yaml" "$v/hparams.yaml" "$out/$cell/" 2>> "$out/session.log"
  tail -2 "$out/$cell/log.txt" | tee -a "$out/session.log"
done

log "collect: start"
"$py" "$root/benchmarks/quality.py" HM-LSTM-512="$out/hm" LN-LSTM-512="$out/lstm" --compare \
  --out "$out/quality.json" --plot "$out/curves.png" > "$out/pair.md" 2>> "$out/session.log"
log "collect: rc $?"
log "done"
