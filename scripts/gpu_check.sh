#!/usr/bin/env bash
# The GPU acceptance run: every GPU path of the trainer exercised and measured, offline, in one command.
#   bash scripts/gpu_check.sh [--out DIR]     on a machine with a CUDA GPU (full sizes)
#   bash scripts/gpu_check.sh --dry-run       every step at toy sizes on the CPU (the test suite runs it)
# Steps, sizes and outputs: scripts/gpu_check.py. Python: $PYTHON, else the project's .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
exec "$py" -m scripts.gpu_check "$@"
