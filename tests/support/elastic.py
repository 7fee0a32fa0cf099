"""A short run launched on one or two processes (support/dist_elastic.py), which records the labels each
process trained on per epoch (`seen_per_epoch`)."""
from __future__ import annotations

import json
from collections import Counter

from conftest import ROOT, run_cli

LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
RUN = ["--backbone", "test_resnet", "--image-size", "32", "--warmup-epochs", "1", "--workers", "1",
       "--log-every", "1", "--epochs", "3"]


def launch(processes: int, folder, out, tmp_path, tag: str, *args: str, stop_at: int = 0):
    env = {"RECORD": str(tmp_path), "TAG": tag, **({"STOP_AT": str(stop_at)} if stop_at else {})}
    prefix = LAUNCH if processes == 2 else []
    return run_cli(*prefix, "tests/support/dist_elastic.py", "--data", str(folder), "--out", str(out), *RUN, *args,
                   cwd=ROOT, env=env)


def seen_per_epoch(tmp_path) -> dict[int, Counter]:
    epochs: dict[int, Counter] = {}
    for path in tmp_path.glob("seen_*.jsonl"):
        for epoch, labels in map(json.loads, path.read_text().splitlines()):
            epochs.setdefault(epoch, Counter()).update(labels)
    return epochs
