#!/usr/bin/env bash
# evaluate.py's peak host memory (/usr/bin/time -v, maximum resident set size) on a synthetic folder of N
# ImageNet-sized JPEGs (hard links to 500x375 images, 100 class folders; 10% held out as the test split),
# scored by a resnet50 run (F = 2048 features) at 32 px, against 2 x N x F bytes + 2 GB.
#   bash bench/eval_memory.sh [N] [ROOT]        (default 50000 in /tmp/eval-memory; PY=... another checkout's python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${1:-50000}
ROOT=${2:-/tmp/eval-memory}
mkdir -p "$ROOT"
"$PY" - "$ROOT" "$N" <<'PY'
import sys
from pathlib import Path
from simclr_dali.tools.benchmark.startup import make_folder
root, n = Path(sys.argv[1]), int(sys.argv[2])
make_folder(root, n, 100), make_folder(root, 64, 4)
PY
RUN="$ROOT/run"
[ -f "$RUN/backbone.safetensors" ] || "$PY" train.py --data "$ROOT/images-64-4" --out "$RUN" --backbone resnet50 \
  --image-size 32 --epochs 1 --batch-size 16 --workers 2 > "$ROOT/train.log" 2>&1
/usr/bin/time -v "$PY" evaluate.py --run "$RUN" --data "$ROOT/images-$N-100" --no-plots --probe-epochs 10 \
  --workers 2 > "$ROOT/eval.log" 2> "$ROOT/time.txt"
peak_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$ROOT/time.txt")
wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$ROOT/time.txt")
"$PY" -c "
n, f, peak = $N, 2048, $peak_kb * 1024
print(f'N = {n}, F = {f}: peak {peak / 2**30:.2f} GiB; 2 x N x F + 2 GB = {(2 * n * f + 2 * 2**30) / 2**30:.2f} GiB; wall $wall')"
