"""Run by tests/training/test_steps.py under `accelerate launch --multi_gpu --num_processes 2` on the CPU:
train.main with rank 1's loss NaN at its second step (rank 0's stays finite). Each rank writes
$DIGESTS/rank{R}.json with a digest of its final weights."""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from simclr_dali.models import ntxent
from simclr_dali.training import loop as train

RANK, calls, models_built = int(os.environ["RANK"]), {"n": 0}, []
real_loss, real_build = ntxent.nt_xent_loss, train.build_model


def loss(*args, **kwargs):
    calls["n"] += 1
    value = real_loss(*args, **kwargs)
    return value * float("nan") if RANK == 1 and calls["n"] == 2 else value


def build_model(cfg):
    models_built.append(real_build(cfg))
    return models_built[-1]


ntxent.nt_xent_loss, train.build_model = loss, build_model
code = train.main(sys.argv[1:])
weights = torch.cat([p.detach().reshape(-1) for p in models_built[0].parameters()])
digest = {"rank": RANK, "code": code, "finite": bool(torch.isfinite(weights).all()),
          "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}
(Path(os.environ["DIGESTS"]) / f"rank{RANK}.json").write_text(json.dumps(digest))
sys.exit(code)
