#!/usr/bin/env bash
# NT-Xent on a CUDA machine: the tests with CUDA tensors (Triton kernels compiled for the GPU, fp32 /
# bf16 / fp16), then the loss benchmark. Needs python3 with torch, triton, rich, numpy, pytest; no DALI,
# no network. About 3-4 minutes on an H100. Results go to $OUT (default /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/gpu.txt"

# tests/test_ntxent.py parametrises its device: CUDA tensors when CUDA is available (the Triton path
# then runs compiled, not interpreted); the two-process test stays on the CPU (gloo).
timeout 180 "$PY" -m pytest -q -p no:cacheprovider --durations=5 \
    tests/test_ntxent.py tests/test_ntxent_distributed.py 2>&1 | tee "$OUT/pytest_gpu.txt"
status=$(( status | ${PIPESTATUS[0]} ))

# fp32 inputs: reference (skipped where its full matrix does not fit), tiled, triton
timeout 240 "$PY" benchmark.py loss --sizes 4096 16384 65536 --repeats 5 --budget 10 \
    --json "$OUT/loss_gpu.json" 2>&1 | tee "$OUT/loss_gpu.txt"
status=$(( status | ${PIPESTATUS[0]} ))

# bf16 inputs, as under accelerate's mixed precision: the kernels read 16-bit operands
timeout 120 "$PY" benchmark.py loss --sizes 16384 65536 --dtypes bfloat16 --impls tiled triton \
    --repeats 5 --budget 10 --json "$OUT/loss_gpu_bf16.json" 2>&1 | tee "$OUT/loss_gpu_bf16.txt"
status=$(( status | ${PIPESTATUS[0]} ))

echo "gpu_check exit status: $status"
exit "$status"
