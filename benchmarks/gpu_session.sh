#!/usr/bin/env bash
# The GPU work of a session with a lent GPU, in ONE call that fits 9 minutes on an H100/H200. Most important
# first; every stage writes its result to $OUT as it finishes, so a call cut short still returns what it did:
#
#   1. versions.txt        GPU, driver, CUDA, torch, triton
#   2. build.log           pip install against the torch already there (the C++ CPU extension; Triton compiles
#                          its kernels at run time), TORCH_CUDA_ARCH_LIST and MAX_JOBS set
#   3. smoke.json          each GPU backend against the reference, fp32 and bf16 (benchmarks/gpu_smoke.py)
#   4. ptb.json            the PTB size (B 64, T 100, 3 x 512): fp32 and bf16, inference and training step,
#                          hmlstm-triton, its CUDA-graph replay, the reference, nn.LSTM (cuDNN) and its replay
#   5. tests.log           the GPU tests (Triton against the reference on the full matrix, bf16, inductor)
#   6. copy.json, text8.json, sweeps.json   as the remaining time allows
#
# Run from the repository root through the device tool:   bash benchmarks/gpu_session.sh
# DRY_RUN=1 runs the same stages on the CPU with tiny sizes and the Triton interpreter (tests/test_gpu_session.py
# does this in CI). BUDGET_S (default 540) is the whole call's time; each stage gets what is left, minus a margin.
set -uo pipefail
# the image of the GPU machine has python3 (the one with PyTorch) and may have no `python`
py=${PYTHON:-python3}
out=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
budget=${BUDGET_S:-540}
start=$SECONDS
dry=${DRY_RUN:-0}
log() { echo "[gpu_session $((SECONDS - start))s] $*" | tee -a "$out/session.log"; }
left() { echo $((budget - (SECONDS - start) - 15)); }

# stage NAME MIN_SECONDS CMD...: runs CMD under the time left (skipped when less than MIN_SECONDS is left)
stage() {
  local name=$1 need=$2
  shift 2
  local t
  t=$(left)
  if ((t < need)); then
    log "$name: skipped, ${t}s left"
    echo "skipped: ${t}s left" > "$out/$name.skipped"
    return 0
  fi
  log "$name: start (limit ${t}s)"
  timeout "$t" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  log "$name: rc $rc"
  tail -3 "$out/$name.log" | tee -a "$out/session.log"
  return 0
}

if [ "$dry" = "1" ]; then
  device=cpu
  export TRITON_INTERPRET=1
  bench=(--suites smoke --min-time 0.01 --modes fwbw --dtypes float32 --providers hmlstm-reference hmlstm-triton lstm)
  smoke_sizes="2,2,16x12"
  tests=("tests/test_triton_launches.py::test_two_launches_per_phase_forward_and_backward[1-noln]")
else
  device=cuda
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  bench=(--suites ptb --min-time 1 --dtypes float32 bfloat16 \
    --providers hmlstm-triton hmlstm-triton-graph hmlstm-reference lstm lstm-graph)
  smoke_sizes="5,7,64x33x20"
  tests=(tests/test_ops_triton.py tests/test_triton_launches.py tests/test_model.py tests/test_reference.py)
fi

{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null
  [ "$device" = cuda ] && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
} > "$out/versions.txt" 2>&1
log "versions: $(tr '\n' ' ' < "$out/versions.txt")"

if [ "$dry" = "1" ]; then
  log "build: skipped in a dry run (the checkout is installed)"
else
  stage build 60 "$py" -m pip install --no-build-isolation --no-deps -e .
fi
stage smoke 20 "$py" benchmarks/gpu_smoke.py --device "$device" --sizes "$smoke_sizes" --out "$out/smoke.json"
stage ptb 30 "$py" benchmarks/run.py --device "$device" "${bench[@]}" --out "$out/ptb.json"
[ -f "$out/ptb.json" ] && "$py" benchmarks/report.py "$out/ptb.json" > "$out/ptb.md" 2>&1
stage tests 60 "$py" -m pytest -q -rs -x "${tests[@]}"
if [ "$dry" != "1" ]; then
  stage copy 60 "$py" benchmarks/run.py --device cuda --suites copy --min-time 0.5 \
    --providers hmlstm-triton hmlstm-triton-graph lstm --dtypes float32 bfloat16 --out "$out/copy.json"
  stage text8 60 "$py" benchmarks/run.py --device cuda --suites text8 --min-time 0.5 \
    --providers hmlstm-triton hmlstm-triton-graph lstm lstm-graph --dtypes float32 bfloat16 --out "$out/text8.json"
  stage sweeps 60 "$py" benchmarks/run.py --device cuda --suites batch hidden steps --min-time 0.3 \
    --providers hmlstm-triton-graph lstm-graph --out "$out/sweeps.json"
fi
log "done"
