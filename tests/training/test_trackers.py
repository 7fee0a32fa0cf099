"""--log-with: a short run logs to a local MLflow store and to an offline W&B run, and what each holds, read
back through MLflow's own client and W&B's own record format, is what metrics.jsonl says; names and missing
packages are one sentence."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import ENV, TINY, make_folder, run_cli

from simclr_dali import training as train
from simclr_dali.errors import UserError
from simclr_dali.training import trackers


def wandb_history(run_file: Path) -> list[dict]:
    """The history records of an offline W&B run file: W&B's LevelDB-style log (a 7-byte file header,
    then 32 KiB blocks of records, each with a 7-byte header: CRC, length, full/first/middle/last) of
    wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunks, records = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind in (1, 4):
            records.append(chunks)
    history = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return history


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # MLflow's own SQLAlchemy use
def test_mlflow_and_wandb_offline_hold_the_logged_losses(tmp_path):
    import mlflow

    out = tmp_path / "run"
    r = run_cli("train.py", "--data", str(make_folder(tmp_path / "images", per_class=8)), "--epochs", "2",
                "--out", str(out), *TINY, "--log-with", "mlflow,wandb",
                env={**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 0, r.stderr
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {rec["step"]: rec["loss"] for rec in logged if rec["kind"] == "step"}
    assert len(steps) == 4  # 2 epochs of 2 steps (21 of the 24 images train: a folder keeps a tenth aside), each logged

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("simclr-dali").experiment_id])
    assert found.info.run_name == "run" and found.data.params["backbone"] == "test_resnet"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "step/loss")}
    assert history.keys() == steps.keys()
    assert all(history[s] == pytest.approx(steps[s], rel=1e-6) for s in steps)  # float64 -> text -> float

    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    rows = [row for row in wandb_history(run_file) if "step/loss" in row]
    assert {row["_step"]: row["step/loss"] for row in rows} == pytest.approx(steps)


def test_log_with_names_each_tracker_it_offers():
    cfg = train.parse_args(["--log-with", "tensorboard, mlflow,tensorboard"])
    assert cfg.log_with == "tensorboard,mlflow"  # each once, in the order given
    with pytest.raises(UserError, match=r"^--log-with 'comet' is not a tracker this trainer offers: choose from "
                                        r"tensorboard, mlflow, wandb"):
        train.parse_args(["--log-with", "comet"])


def test_a_missing_tracker_package_names_its_pip_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"^--log-with wandb needs the wandb package: pip install wandb$"):
        trackers.names("mlflow,wandb")
