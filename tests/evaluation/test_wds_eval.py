"""A run trained on tar shards evaluates on its own test shards: those `pipelines.pack --holdout` wrote
beside the training shards (a stratified share of every class), with the labels that come with the
samples (.cls); samples without one are refused in one sentence, and a shard set without test shards
is evaluated only with --test-data."""
import json

import numpy as np
import pytest
from conftest import make_folder, train_here

from simclr_dali.evaluation import evaluate
from simclr_dali.pipelines import pack
from simclr_dali.pipelines.sources import load_folder, load_source
from simclr_dali.pipelines.webdataset import write_shards

pytestmark = pytest.mark.slow  # trains on shards

QUICK_EVAL = ["--batch-size", "8", "--workers", "1", "--probe-epochs", "3", "--knn-k", "5", "--no-plots"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    folder = make_folder(root / "images", per_class=10)  # 30 images, 3 classes
    make_folder(root / "flat", classes=("all",), per_class=30)
    for name, src in (("labelled", folder), ("unlabelled", root / "flat" / "all")):
        assert pack.main([str(src), str(root / name), "--shard-size", "5", "--workers", "1"]) == 0  # 27 + 3
    source = load_folder(str(folder), "all")
    write_shards(source.files, source.labels, root / "foreign", shard_size=5)  # class order, no test shards
    return {kind: f"wds:{root / kind / 'shard-*.tar'}" for kind in ("labelled", "unlabelled", "foreign")}


def test_the_test_shards_are_the_test_split(shards):
    train, test = load_source(shards["labelled"], "train"), load_source(shards["labelled"], "test")
    assert len(train) == 27 and len(test) == 3 and not set(train.shards) & set(test.shards)
    assert [s.rsplit("/", 1)[1] for s in test.shards] == ["test-000000.tar"]
    assert len(load_source(shards["labelled"], "train", shards["labelled"])) == 27  # --test-data: every shard


def test_a_run_on_shards_evaluates_on_its_test_shards(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_here("--data", shards["labelled"], "--out", str(out), "--epochs", "1") == 0
    assert json.loads((out / "config.json").read_text())["n_train"] == 27
    assert evaluate.main(["--run", str(out), *QUICK_EVAL]) == 0  # no --data: the run's shards
    result = json.loads((out / "eval.json").read_text())
    assert (result["n_train"], result["n_test"], result["data"]) == (27, 3, shards["labelled"])
    assert 0 <= result["knn_top1"] <= 1 and 0 <= result["linear_top1"] <= 1
    # a labelled folder's images as --test-data of a shard run, and shards as --test-data
    assert evaluate.main(["--run", str(out), "--test-data", shards["foreign"], *QUICK_EVAL]) == 0
    assert json.loads((out / "eval.json").read_text())["n_test"] == 30


def test_samples_without_a_label_are_one_sentence(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_here("--data", shards["unlabelled"], "--out", str(out), "--epochs", "1") == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--run", str(out), *QUICK_EVAL])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err == (f"error: evaluation needs labels, but 27 of the 27 samples in the train split of "
                   f"{shards['unlabelled']} have no .cls label")


def test_shards_without_test_shards_train_on_all_and_evaluate_only_with_test_data(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_here("--data", shards["foreign"], "--out", str(out), "--epochs", "1") == 0
    assert json.loads((out / "config.json").read_text())["n_train"] == 30  # nothing kept aside
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--run", str(out), *QUICK_EVAL])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err == (
        f"error: {shards['foreign']} has no test shards (test-NNNNNN.tar beside its shards, which 'python -m "
        f"simclr_dali.pipelines.pack' writes with --holdout): evaluate it with --test-data")
    assert evaluate.main(["--run", str(out), "--test-data", shards["labelled"].replace("shard-", "test-"),
                          *QUICK_EVAL]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (result["n_train"], result["n_test"]) == (30, 3)
    assert np.isfinite(result["knn_top1"])
