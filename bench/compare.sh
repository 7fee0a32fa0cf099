#!/usr/bin/env bash
# Ours (--recipe imagenet, --recipe small) against the peer (bench/peer.py: torchvision + lightly's
# NTXentLoss + SGD) on the same data, budget and machine: resnet18, 32 px, 10 epochs, batch 256; each
# scored by evaluate.py (kNN k = 200 and the linear probe on frozen features, the central 87.5%).
#   bash bench/compare.sh [OUT]      (the digits, and 5,000 generated shapes in OUT/shapes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/compare}
BUDGET=(--backbone resnet18 --image-size 32 --epochs 10 --batch-size 256)
"$PY" -c "import lightly" 2>/dev/null || "$PY" -m pip install -q lightly==1.6.0 --no-deps
mkdir -p "$OUT"
[ -d "$OUT/shapes" ] || "$PY" -m bench.shapes "$OUT/shapes" --per-class 500
for data in digits shapes; do
  spec=$data; [ "$data" = shapes ] && spec="$OUT/shapes"
  for run in imagenet small peer; do
    dir="$OUT/$data-$run"; rm -rf "$dir"
    start=$(date +%s.%N)
    if [ "$run" = peer ]; then
      "$PY" -m bench.peer --data "$spec" --out "$dir" "${BUDGET[@]}" > "$dir.train.log" 2>&1
    else
      "$PY" train.py --data "$spec" --out "$dir" --recipe "$run" "${BUDGET[@]}" > "$dir.train.log" 2>&1
    fi
    echo "$(date +%s.%N) - $start" | bc > "$dir.wall"
    "$PY" evaluate.py --run "$dir" --no-plots > "$dir.eval.log" 2>&1
  done
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'data':7} {'run':9} {'kNN top-1':>10} {'probe top-1':>12} {'random kNN':>11} {'random probe':>13} {'wall s':>7}")
for data in ("digits", "shapes"):
    for run in ("imagenet", "small", "peer"):
        e = json.loads((out / f"{data}-{run}" / "eval.json").read_text())
        wall = float((out / f"{data}-{run}.wall").read_text())
        r = e["random_init"]
        print(f"{data:7} {run:9} {e['knn_top1']:10.2%} {e['linear_top1']:12.2%} {r['knn_top1']:11.2%} "
              f"{r['linear_top1']:13.2%} {wall:7.1f}")
PYEOF
