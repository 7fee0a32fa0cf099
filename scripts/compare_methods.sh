#!/usr/bin/env bash
# The four methods on one budget: train each on the built-in digits with the demo's backbone, image size,
# epochs and batch, every other setting at the method's own (paper) default, then evaluate.py each and
# print one table (kNN and probe top-1, random init beside them, training images/s).
#   bash scripts/compare_methods.sh [OUT] [extra train.py flags...]
# MoCo's queue is the one setting given: the paper's 65536 keys are more than digits' 1,437 images.
# --recipe imagenet and evaluate.py --crop 1: as docs/results.md's figures were measured, before recipes and
# the 87.5% evaluation crop existed (leave them out to measure with today's defaults).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/methods}
shift || true
BUDGET=(--data digits --backbone resnet10t --image-size 32 --epochs 8 --batch-size 64 --recipe imagenet)
mkdir -p "$OUT"
for method in simclr supcon moco byol; do
  extra=()
  [ "$method" = moco ] && extra=(--queue-size 256)
  rm -rf "${OUT:?}/$method"
  "$PY" train.py "${BUDGET[@]}" --method "$method" "${extra[@]}" --out "$OUT/$method" "$@" > "$OUT/$method.train.log"
  "$PY" evaluate.py --run "$OUT/$method" --crop 1 > "$OUT/$method.eval.log"
done
"$PY" - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'method':8} {'kNN top-1':>10} {'probe top-1':>12} {'random kNN':>11} {'random probe':>13} {'images/s':>9}")
for method in ("simclr", "supcon", "moco", "byol"):
    e = json.loads((out / method / "eval.json").read_text())
    steps = [json.loads(l) for l in (out / method / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in steps if r.get("kind") == "epoch" and "images_per_s" in r]
    r = e["random_init"]
    print(f"{method:8} {e['knn_top1']:10.2%} {e['linear_top1']:12.2%} {r['knn_top1']:11.2%} "
          f"{r['linear_top1']:13.2%} {statistics.median(rates) if rates else float('nan'):9.0f}")
EOF
