"""Run by tests/training/test_elastic.py, alone or under `accelerate launch --multi_gpu --num_processes 2` on the
CPU: train.main, recording the labels of every batch this process trains on (the test's images each
have a class of their own, so labels name images), a line per batch in $RECORD/seen_$TAG_RANK.jsonl
(written at once: a launcher may end the other processes as soon as one exits); with $STOP_AT, rank 0
sends itself SIGTERM while it computes that step's loss."""
import json
import os
import signal
import sys
from pathlib import Path

from simclr_dali import training as train
from simclr_dali.models import ntxent
from simclr_dali.pipelines import loader

RANK, STOP_AT = int(os.environ.get("RANK", "0")), int(os.environ.get("STOP_AT", "0"))
RECORD, calls = Path(os.environ["RECORD"]) / f"seen_{os.environ['TAG']}_{RANK}.jsonl", {"n": 0}
real_iter, real_loss = loader.Loader.__iter__, ntxent.nt_xent_loss


def recording_iter(self):
    for batch in real_iter(self):
        with open(RECORD, "a") as f:
            f.write(json.dumps([self.feeder.epoch, batch[-1].view(-1).tolist()]) + "\n")
        yield batch


def loss(*args, **kwargs):
    calls["n"] += 1
    if RANK == 0 and calls["n"] == STOP_AT:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_loss(*args, **kwargs)


loader.Loader.__iter__, ntxent.nt_xent_loss = recording_iter, loss
sys.exit(train.main(sys.argv[1:]))
