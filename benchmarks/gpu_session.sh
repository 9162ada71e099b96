#!/usr/bin/env bash
# The GPU work of a session with a lent GPU, in few full calls (each stage fits a 10-minute call):
#
#   bash benchmarks/gpu_session.sh build-test      # build the CUDA/C++ extension, GPU + Triton + C++ tests
#   bash benchmarks/gpu_session.sh bench-core      # PTB and text8 sizes, COPY-skipping sweep, fp32 + bf16
#   bash benchmarks/gpu_session.sh bench-sweeps    # batch, hidden and steps sweeps
#   bash benchmarks/gpu_session.sh bench-trained   # a trained PTB model's own boundaries (needs runs/gpu-carry)
#
# The bench-* stages need build-test first on the same warm machine (it installs the package there).
# bench-trained reads a weights-only checkpoint and the PTB text from runs/gpu-carry (git-ignored; 44 MiB, under
# the device tool's 64 MiB carry limit). Prepare it here, then pass carry=["runs/gpu-carry"] to the run:
#   hmlstm export --ckpt_path CKPT --out runs/gpu-carry/trained.ckpt
#   cp -r --no-preserve=mode ../shared/data/ptb runs/gpu-carry/
#
# Results land in $OUT (the device tool's output folder) or benchmarks/results/; commit the JSON and the
# report.py tables. The package is installed against the torch already on the machine (no downloads there).
set -uo pipefail
stage=${1:?usage: gpu_session.sh build-test|bench-core|bench-sweeps|bench-trained}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
day=$(date -u +%F)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
case "$stage" in
  build-test)
    nvidia-smi | tee "$out/nvidia-smi.txt"
    # -v: the compiler's output, and setup.py's warning if the CUDA kernels failed (then CPU kernels only)
    pip install -v --no-build-isolation --no-deps -e . > "$out/build-full.log" 2>&1
    { tail -5 "$out/build-full.log"; grep -n "hmlstm: WARNING\|error" "$out/build-full.log" | head -40; } \
      | tee "$out/build.log"
    python -c "import hmlstm; print('backends on cuda:', hmlstm.available_backends('cuda'))" | tee -a "$out/build.log"
    # The model, reference, op and benchmark tests; the CLI tests need jsonargparse, absent on the image.
    python -m pytest -q -rs tests/test_cuda.py tests/test_ops_triton.py tests/test_cpp.py tests/test_model.py \
      tests/test_reference.py tests/test_install.py 2>&1 | tee "$out/tests.log"
    ;;
  bench-core)
    python benchmarks/run.py --device cuda --suites ptb text8 copy --dtypes float32 bfloat16 --min-time 1 \
      --out "$out/gpu-$gpu-$day-core.json" 2>&1 | tee "$out/bench-core.log"
    python benchmarks/report.py "$out/gpu-$gpu-$day-core.json"
    ;;
  bench-sweeps)
    python benchmarks/run.py --device cuda --suites batch hidden steps --dtypes float32 --min-time 1 \
      --out "$out/gpu-$gpu-$day-sweeps.json" 2>&1 | tee "$out/bench-sweeps.log"
    python benchmarks/report.py "$out/gpu-$gpu-$day-sweeps.json"
    ;;
  bench-trained)
    carry=runs/gpu-carry
    for f in trained.ckpt ptb/ptb.char.train.txt ptb/ptb.char.valid.txt ptb/ptb.char.test.txt; do
      [ -f "$carry/$f" ] || { echo "bench-trained needs $carry/$f (see this script's header)" >&2; exit 2; }
    done
    python benchmarks/run.py --device cuda --suites trained ptb --dtypes float32 bfloat16 --min-time 1 \
      --trained-ckpt $carry/trained.ckpt --ptb-dir $carry/ptb --out "$out/gpu-$gpu-$day-trained.json" \
      2>&1 | tee "$out/bench-trained.log"
    python benchmarks/report.py "$out/gpu-$gpu-$day-trained.json"
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
