"""benchmark.py's throughput sections at a tiny size: every figure is written; no timing is asserted."""
import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow  # every section of benchmark.py, in a process of its own


def test_all_sections_write_their_json_keys(tmp_path):
    out = tmp_path / "all.json"
    r = run_cli("benchmark.py", "all", "--image-size", "32", "--batch-size", "8", "--batches", "2",
                "--steps", "2", "--epochs", "2", "--workers", "1", "--repeats", "1", "--sizes", "32",
                "--dim", "16", "--backbone", "test_resnet", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.loads(out.read_text())
    rows = {row["section"]: row for row in payload["results"] if row["section"] != "loss"}
    pipeline, model, train = rows["pipeline"], rows["model"], rows["train"]
    for row, keys in ((pipeline, ("dali_images_per_s", "torchvision_images_per_s", "speedup")),
                      (model, ("model_images_per_s",)),
                      (train, ("train_images_per_s", "model_images_per_s", "efficiency"))):
        for key in keys:
            assert isinstance(row[key], float) and row[key] > 0, (key, row)
    assert pipeline["speedup"] == pipeline["dali_images_per_s"] / pipeline["torchvision_images_per_s"]
    assert train["efficiency"] == train["train_images_per_s"] / train["model_images_per_s"]
    assert len(train["model_runs"]) == 2 and train["model_images_per_s"] == sum(train["model_runs"]) / 2  # before, after
    loss = [row for row in payload["results"] if row["section"] == "loss"]
    assert {row["impl"] for row in loss} == {"reference", "tiled", "matmul"}  # matmul: the loss rows' ceiling
    assert all(row["fraction_of_matmul"] > 0 for row in loss if row["impl"] != "matmul")
    hw = payload["hardware"]
    assert hw["cpu_cores"] >= 1 and hw["versions"]["torch"] and hw["versions"]["nvidia-dali-cuda130"]
