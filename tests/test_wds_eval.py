"""A run trained on tar shards evaluates on its own shards: the last tenth of the shards is its test
split, labels come with the samples (.cls), and samples without one are refused in one sentence."""
import json

import numpy as np
import pytest
from conftest import make_folder, train_here

import evaluate
from pipelines.sources import load_folder, load_source
from pipelines.webdataset import write_shards

pytestmark = pytest.mark.slow  # trains on shards

QUICK_EVAL = ["--batch-size", "8", "--workers", "1", "--probe-epochs", "3", "--knn-k", "5", "--no-plots"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    folder = load_folder(str(make_folder(root / "images", per_class=10)), "all")  # 30 images, 3 classes
    write_shards(folder.files, folder.labels, root / "labelled", shard_size=5)  # 6 shards
    write_shards(folder.files, np.full(len(folder), -1), root / "unlabelled", shard_size=5)
    return {kind: f"wds:{root / kind / 'shard-*.tar'}" for kind in ("labelled", "unlabelled")}


def test_the_last_tenth_of_the_shards_is_the_test_split(shards):
    train, test = load_source(shards["labelled"], "train"), load_source(shards["labelled"], "test")
    assert len(train) == 25 and len(test) == 5 and not set(train.shards) & set(test.shards)
    assert test.shards[0].endswith("shard-000005.tar")
    assert len(load_source(shards["labelled"], "train", shards["labelled"])) == 30  # --test-data: every shard


def test_a_run_on_shards_evaluates_on_them(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_here("--data", shards["labelled"], "--out", str(out), "--epochs", "1") == 0
    assert json.loads((out / "config.json").read_text())["n_train"] == 25
    assert evaluate.main(["--run", str(out), *QUICK_EVAL]) == 0  # no --data: the run's shards
    result = json.loads((out / "eval.json").read_text())
    assert (result["n_train"], result["n_test"], result["data"]) == (25, 5, shards["labelled"])
    assert 0 <= result["knn_top1"] <= 1 and 0 <= result["linear_top1"] <= 1
    # a labelled folder's images as --test-data of a shard run, and shards as --test-data
    assert evaluate.main(["--run", str(out), "--test-data", shards["labelled"], *QUICK_EVAL]) == 0
    assert json.loads((out / "eval.json").read_text())["n_test"] == 30


def test_samples_without_a_label_are_one_sentence(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_here("--data", shards["unlabelled"], "--out", str(out), "--epochs", "1") == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--run", str(out), *QUICK_EVAL])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err == (f"error: evaluation needs labels, but 25 of the 25 samples in the train split of "
                   f"{shards['unlabelled']} have no .cls label")
