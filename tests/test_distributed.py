"""Two processes on the CPU over gloo, started as users start them: `accelerate launch`."""
import json

import pytest
from conftest import make_folder, run_cli

from pipelines.sources import load_folder
from pipelines.webdataset import write_shards

LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
TINY = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "4", "--warmup-epochs", "1",
        "--log-every", "1", "--workers", "1", "--epochs", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    folder = make_folder(root / "images", per_class=6)  # 18 images
    source = load_folder(str(folder), "all")
    write_shards(source.files, source.labels, root / "shards", shard_size=5)  # 4 shards: 5, 5, 5, 3
    return folder, str(root / "shards" / "shard-*.tar")


def test_two_processes_read_disjoint_shards_and_match_one_process(data):
    _, shards = data
    r = run_cli(*LAUNCH, "tests/dist_worker.py", shards)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["world"] == 2
    a, b = result["arrays"]
    assert len(a) == len(b) == 16 and not set(a) & set(b) and sorted(a + b) == list(range(32))
    # WebDataset: 18 samples, 9 per process, 2 full batches of 4 each; labels 0..2 by class folder
    a, b = result["wds"]
    assert len(a) == len(b) == 8
    assert sorted(set(a + b)) == [0, 1, 2]
    assert sum(result["rank_losses"]) / 2 == pytest.approx(result["single_loss"], rel=1e-5)
    assert result["worst_grad_rel_err"] < 1e-4


@pytest.mark.parametrize("source", ["folder", "wds"])
def test_two_process_training_writes_one_set_of_outputs(data, source, tmp_path):
    folder, shards = data
    spec = str(folder) if source == "folder" else f"wds:{shards}"
    out = tmp_path / "run"
    r = run_cli(*LAUNCH, "train.py", "--data", spec, "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["global_batch"] == 8
    n_train = 16 if source == "folder" else 15  # a test split aside: 10% of a folder, the last of 4 shards
    assert cfg["n_train"] == n_train and cfg["steps_per_epoch"] == (n_train // 2) // 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [rec["step"] for rec in records if rec["kind"] == "step"]
    assert steps == list(range(1, 2 * cfg["steps_per_epoch"] + 1))  # one writer: no line twice
    assert r.stdout.count("SimCLR run") == 1  # one console
    assert (out / "backbone.safetensors").is_file() and (out / "checkpoint" / "progress.json").is_file()


def test_sync_bn_on_cpu_is_a_clear_error(data, tmp_path):
    folder, _ = data
    r = run_cli(*LAUNCH, "train.py", "--data", str(folder), "--out", str(tmp_path / "x"), *TINY, "--sync-bn")
    assert r.returncode != 0 and "--sync-bn needs GPUs" in r.stderr
