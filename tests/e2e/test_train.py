"""train.py and evaluate.py run as a user runs them, on a tiny generated folder."""
import json

import pytest
import timm
import torch
from conftest import CUDA, make_folder, progress, run_cli
from safetensors.torch import load_file

from simclr_dali import training as train
from simclr_dali.errors import UserError

TINY = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--warmup-epochs", "1",
        "--log-every", "1", "--workers", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def two_epochs(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    r = run_cli("train.py", "--data", str(folder), "--epochs", "2", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
@pytest.mark.on_device  # on a GPU machine: DALI on the GPU, training on CUDA (scripts/gpu_check.sh)
def test_training_writes_every_output(two_epochs):
    out = two_epochs
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"] == "resnet18" and cfg["world_size"] == 1 and cfg["global_batch"] == 8
    assert cfg["n_train"] == 22 and cfg["steps_per_epoch"] == 2
    assert (cfg["dali_placement"], cfg["device"][:4]) == (("gpu", "cuda") if CUDA else ("cpu", "cpu"))
    assert cfg["loss_impl_resolved"] == "tiled" and cfg["aug"]["jitter_p"] == 0.8  # fp32 embeddings
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["step", "step", "epoch"] * 2
    for r in records:
        assert set(r) >= {"epoch", "step", "loss", "lr", "images_per_s"} and r["images_per_s"] > 0
        assert 0 < r["loss"] < 10
    assert records[-1]["step"] == 4 and records[-1]["epoch"] == 2
    assert {p.name for p in (out / "checkpoint").iterdir()} >= {"model.safetensors", "optimizer.bin",
                                                                 "config.json", "progress.json"}
    assert progress(out / "checkpoint") == {"epoch": 1, "step": 4}
    weights = load_file(str(out / "backbone.safetensors"))
    timm.create_model("resnet18", num_classes=0).load_state_dict(weights)  # strict: every key


@pytest.mark.slow
def test_resume_continues_from_the_saved_epoch_and_matches(folder, tmp_path, capsys):
    """In this process: a run straight through, one stopped after its first epoch and resumed (the
    signals, kills and other numbers of processes are tests/training/test_interruption.py's and test_elastic.py's)."""
    out, args = tmp_path / "resumed", ["--data", str(folder), "--epochs", "2", *TINY]
    assert train.main([*args, "--out", str(tmp_path / "straight")]) == 0
    assert train.main([*args, "--stop-after", "1", "--out", str(out)]) == 0
    assert "continue with --resume" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # refused before anything is written
        train.main([*args, "--out", str(out)])
    assert stop.value.code == 2 and "--resume" in capsys.readouterr().err
    assert train.main([*args, "--out", str(out), "--resume"]) == 0
    assert "resuming at epoch 2" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]
    # an epoch's data and augmentations depend only on (seed, epoch): resuming changes nothing
    resumed = load_file(str(out / "backbone.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "backbone.safetensors"))
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
@pytest.mark.on_device  # on a GPU machine: features, kNN and probe on CUDA
def test_evaluate_writes_every_key(two_epochs, folder):
    r = run_cli("evaluate.py", "--run", str(two_epochs), "--probe-epochs", "5", "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    result = json.loads((two_epochs / "eval.json").read_text())
    assert result["n_train"] == 22 and result["n_test"] == 2 and result["device"][:4] == ("cuda" if CUDA else "cpu")
    assert result["crop"] == 1.0  # a 32 px run is evaluated on whole images, as google-research/simclr does
    for scores in (result, result["random_init"]):
        for key in ("knn_top1", "linear_top1"):
            assert 0 <= scores[key] <= 1
    assert "random init" in r.stdout


@pytest.mark.parametrize("args,sentence", [
    (["--data", "/no/such/folder"], "data path /no/such/folder does not exist"),
    (["--data", "EMPTY"], "is empty"),
    (["--data", "NOIMAGES"], "holds no images"),
    (["--data", "FOLDER", "--batch-size", "64"], "--batch-size 64 is larger than the 22 training images"),
    (["--data", "FOLDER", "--batch-size", "8", "--temperature", "0"], "--temperature must be more than 0, got 0.0"),
    (["--data", "FOLDER", "--batch-size", "8", "--backbone", "resnet19x"], "unknown backbone 'resnet19x'"),
])
def test_cli_errors_are_one_sentence(args, sentence, folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimages").mkdir()
    (tmp_path / "noimages" / "readme.txt").write_text("no pictures here")
    subs = {"EMPTY": str(tmp_path / "empty"), "NOIMAGES": str(tmp_path / "noimages"), "FOLDER": str(folder)}
    args = [subs.get(a, a) for a in args]
    with pytest.raises(SystemExit) as stop:  # in this process: train.main as `python train.py` calls it
        train.main([*args, "--out", str(tmp_path / "out"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and sentence in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_mistake_is_one_line_from_the_process_too(tmp_path):
    """What the user sees from the command itself: one line on stderr, no traceback, exit 2."""
    r = run_cli("train.py", "--data", "/no/such/folder", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "data path /no/such/folder does not exist" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_evaluate_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    from simclr_dali.evaluation import evaluate
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--run", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "is not a training run" in err and len(err.strip().splitlines()) == 1, err


def test_batch_norm_is_global_where_several_cuda_processes_train():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    one = "per process (one process)"
    assert train.batch_norm(True, False, 1, cuda) == train.batch_norm(True, True, 1, cpu) == one
    assert train.batch_norm(True, False, 8, cuda) == "global (SyncBatchNorm over 8 processes)"  # the default
    assert train.batch_norm(False, True, 8, cuda) == "per process (--no-sync-bn)"
    assert train.batch_norm(True, False, 2, cpu) == "per process (2 CPU processes: SyncBatchNorm runs on GPUs only)"
    with pytest.raises(UserError, match="--sync-bn needs GPUs"):  # asked for where it cannot run
        train.batch_norm(True, True, 2, cpu)
    assert train.parse_args([]).sync_bn and not train.parse_args(["--no-sync-bn"]).sync_bn
