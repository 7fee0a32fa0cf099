"""evaluate.py and probes.py: fine-tuning, eval.json, plots, embeddings, a frozen linear probe, and
train.py's online kNN monitor and tensorboard logging, on tiny generated folders."""
import contextlib
import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_folder, write_image
from PIL import Image
from support.error_bounds import feature_error, knn_fragile, unit_roundoff

from simclr_dali import training as train
from simclr_dali.evaluation import evaluate, plots
from simclr_dali.evaluation.backbone import load_backbone
from simclr_dali.evaluation.evaluate import EvalConfig, evaluate_backbone
from simclr_dali.evaluation.probes import balanced_subset, top_k_accuracy
from simclr_dali.models.features import extract, knn_top1
from simclr_dali.pipelines.loader import eval_loader
from simclr_dali.pipelines.sources import load_folder, load_source
from simclr_dali.training.monitor import KnnMonitor

CLASSES = ("ant", "bee", "cat", "dog", "eel")  # five, so that top-5 is reported
TINY = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--warmup-epochs", "1",
        "--log-every", "1", "--workers", "1"]
QUICK_EVAL = ["--batch-size", "8", "--workers", "1", "--probe-epochs", "5", "--knn-k", "10"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"train": make_folder(root / "train", CLASSES, per_class=8, seed=1),
            "test": make_folder(root / "test", CLASSES, per_class=4, seed=2)}


def printed(command) -> str:
    """What command() prints (the rich console writes to whatever sys.stdout is); it must return 0."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert command() == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    stdout = printed(lambda: train.main(["--data", str(data["train"]), "--epochs", "2", "--out", str(out),
                                         "--knn-every", "1", "--knn-train", "20", "--knn-test", "4",
                                         "--log-with", "tensorboard", *TINY]))
    return out, stdout


@pytest.fixture(scope="module")
def run(trained):
    return trained[0]


@pytest.fixture(scope="module")
def evaluated(run, data):
    stdout = printed(lambda: evaluate.main(["--run", str(run), "--test-data", str(data["test"]), "--finetune",
                                            "--label-fraction", "0.5", "--finetune-epochs", "1",
                                            "--finetune-min-steps", "2", "--finetune-batch-size", "8", *QUICK_EVAL]))
    return stdout, json.loads((run / "eval.json").read_text())


class Float64(torch.nn.Module):
    """A float64 copy of a backbone that takes the pipeline's float32 images: rounding ~1e-16, where the
    bugs these tests exist for (train-mode BN, other images, rows out of order) move a feature by O(1)."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(backbone).double()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images.double())


@torch.no_grad()
def features64(model: Float64, loader) -> torch.Tensor:
    return torch.cat([model(images) for images, _ in loader])


def backbone_and_loaders(run, data, batch_size=8):
    cfg = json.loads((run / "config.json").read_text())
    kwargs = dict(batch_size=batch_size, size=32, workers=1, device_id=None)
    train, test = load_source(str(data["train"]), "train"), load_source(str(data["train"]), "test")
    return load_backbone(cfg, run / "backbone.safetensors"), eval_loader(train, **kwargs), eval_loader(test, **kwargs)


# -- online monitoring ------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_logs_online_knn_and_tensorboard(trained):
    run, stdout = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if r["kind"] == "knn"]
    assert [(r["epoch"], r["step"]) for r in knn] == [(1, 4), (2, 8)]
    # 4 test images: count / 4 and back are exact in binary
    assert all(0 <= r["knn_top1"] <= 1 and r["knn_top1"] * 4 == round(r["knn_top1"] * 4) for r in knn)
    assert [r["kind"] for r in records if r["kind"] != "knn"] == ["step"] * 4 + ["epoch"] + ["step"] * 4 + ["epoch"]
    assert "kNN top-1" in stdout
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"step/loss", "step/lr", "epoch/images_per_s", "knn/knn_top1"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("knn/knn_top1")] == [4, 8]


@pytest.mark.slow
def test_knn_monitor_matches_an_offline_knn_and_restores_train_mode(run, data):
    backbone, *_ = backbone_and_loaders(run, data)
    train, test = load_source(str(data["train"]), "train"), load_source(str(data["train"]), "test")
    monitor = KnnMonitor(train, test, per_class=2, n_train=20, n_test=4, size=32, batch_size=8, workers=1,
                         device_id=None)  # 5 classes: 4 of each vote
    backbone = Float64(backbone).train()  # batches of 8 here, of 5 below: float64, so that they agree to ~1e-16
    first = monitor(backbone, torch.device("cpu"))
    assert backbone.training and all(m.training for m in backbone.modules())
    assert monitor(backbone, torch.device("cpu")) == first  # the kept pipeline re-reads the same images
    kwargs = dict(batch_size=5, size=32, workers=1, device_id=None)
    tx, ty = extract(backbone, eval_loader(monitor.bank.source, **kwargs), torch.device("cpu"))
    qx, qy = extract(backbone, eval_loader(monitor.test.source, **kwargs), torch.device("cpu"))
    assert len(tx) == 20 and len(qx) == 4 and np.bincount(ty.numpy()).tolist() == [4] * 5
    # extract keeps each float64 feature in float16 (u16 |f| each), the two passes differ by <= 2 x the
    # float64 error; as a fraction of a 2-norm, sqrt(dim) times that of the largest entry
    feature_rel = tx.shape[1] ** 0.5 * (2 * feature_error(backbone, torch.float64) + 2 * unit_roundoff(torch.float16))
    # a query within both computations' errors of a tie may go either way (none here: the closest decision
    # is 20 x its bound away; over 20 other backbones, at least 7 x)
    fragile = knn_fragile(tx, ty, qx, monitor.k, 0.1, feature_rel)  # T: knn_top1's default, as the monitor's
    assert abs(first - knn_top1(tx, ty, qx, qy)) * len(qx) <= fragile


def test_knn_every_needs_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(12):  # a flat folder: no classes
        write_image(tmp_path / "flat" / f"{i}.png", rng)
    with pytest.raises(SystemExit) as stop:  # before any training
        train.main(["--data", str(tmp_path / "flat"), "--out", str(tmp_path / "out"), "--epochs", "1",
                    "--knn-every", "1", *TINY])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--knn-every needs labelled images" in err and len(err.strip().splitlines()) == 1


# -- evaluate.py: eval.json, the table, the plots ----------------------------------------------------
@pytest.mark.slow
def test_eval_json_keeps_old_keys_and_adds_finetune(evaluated, data):
    stdout, result = evaluated
    assert result["n_train"] == 40 and result["n_test"] == 20
    for scores in (result, result["random_init"]):
        assert 0 <= scores["knn_top1"] <= 1 and 0 <= scores["linear_top1"] <= 1
    ft = result["finetune"]
    assert ft["label_fraction"] == 0.5 and ft["n_labelled"] == 20 and ft["per_class"] == 4
    assert ft["epochs"] == 1 and ft["batch_size"] == 8 and "flip" in ft["augment"]
    for scores in (ft, ft["random_init"]):
        assert 0 <= scores["top1"] <= scores["top5"] <= 1  # five classes: top-5 is reported
        # a count over 20, in float32 (the mean: <= 2 roundings) then times 20 in float64; up to 0.33 of it seen
        count, u32, u64 = round(scores["top1"] * 20), unit_roundoff(torch.float32), unit_roundoff(torch.float64)
        assert abs(scores["top1"] * 20 - count) <= count * (2 * u32 + u64)
    assert "fine-tune, 50% labels (20 images) top-1" in stdout and "top-5" in stdout
    assert "random init" in stdout


@pytest.mark.slow
def test_evaluate_draws_every_plot(evaluated, run):
    _, result = evaluated
    assert set(result["plots"]) == {"curves", "embeddings", "retrieval"}
    rows = min(max(len(CLASSES), 6), 10)  # retrieval queries
    expected = {"curves": (plots.CURVE_PANEL[0] * 4, plots.CURVE_PANEL[1]),  # loss, lr, images/s, kNN
                "embeddings": plots.MAP_SIZE,
                "retrieval": (plots.CELL * (plots.NEIGHBOURS + 1.25) + 0.3, plots.CELL * rows + 0.6)}
    for key, (w, h) in expected.items():
        path = run / result["plots"][key]
        assert path.parent == run and path.suffix == ".png"
        with Image.open(path) as im:
            im.load()  # decodes the whole file
            assert im.size == (int(w * plots.DPI), int(h * plots.DPI)), key
            assert np.asarray(im.convert("L")).std() > 10  # not a blank canvas


@pytest.mark.slow
def test_finetune_and_embed_refuse_bad_flags(run, tmp_path, capsys):
    for args, sentence in ([["--finetune", "--label-fraction", "2"], "--label-fraction must be in (0, 1]"],
                           [["--embed", str(tmp_path)], "--embed needs --to"],
                           [["--embed", str(tmp_path), "--to", str(tmp_path / "x.csv")], "must name a .npy"]):
        with pytest.raises(SystemExit) as stop:
            evaluate.main(["--run", str(run), *args])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and sentence in err and len(err.strip().splitlines()) == 1, err


# -- embeddings ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embed_writes_one_row_per_image_equal_to_extract(run, data, tmp_path, capsys):
    folder = tmp_path / "catalogue"
    shutil.copytree(data["test"], folder)
    good = load_folder(str(folder), "all")
    (folder / "eel" / "broken.jpg").write_bytes((folder / "eel" / "001.jpg").read_bytes()[:200])  # truncated
    to = tmp_path / "emb" / "test.npy"
    assert evaluate.main(["--run", str(run), "--embed", str(folder), "--to", str(to), "--batch-size", "8",
                          "--workers", "1"]) == 0
    assert "1 undecodable file(s) left out" in capsys.readouterr().out
    emb = np.load(to)
    paths = (tmp_path / "emb" / "test.paths.txt").read_text().splitlines()
    source = good
    assert emb.shape == (len(source), 512) and emb.dtype == np.float32 and paths == source.files
    backbone, *_ = backbone_and_loaders(run, data)
    batches = eval_loader(source, batch_size=3, size=32, workers=1, device_id=None)  # (--embed: of 8)
    ref, _ = extract(backbone, batches, "cpu")  # float32
    exact = features64(Float64(backbone).eval(), batches)  # the same pipeline, read again
    # each image's bound is absolute, from its largest feature: also where a feature is exactly 0 (a ReLU
    # output), which float32 can miss only where a pre-activation is within its error of 0
    scale = exact.abs().amax(1, keepdim=True)
    bound = (feature_error(backbone, torch.float32) + feature_error(backbone, torch.float64)) * scale
    for got in (torch.from_numpy(emb), ref):  # largest observed: 0.0002 of the bound; rows swapped: 38 x it
        assert ((got.double() - exact).abs() <= bound).all(), ((got.double() - exact).abs() / bound).max()


# -- protocols --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_linear_probe_leaves_the_backbone_frozen(run, data):
    backbone, train, test = backbone_and_loaders(run, data)
    before = copy.deepcopy(backbone.state_dict())  # weights and BatchNorm running statistics
    backbone.train()  # evaluation must switch to eval mode itself
    scores = evaluate_backbone(backbone, train, test, EvalConfig(probe_epochs=3, knn_k=10), torch.device("cpu"))
    assert 0 <= scores["linear_top1"] <= 1
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert all(p.grad is None for p in backbone.parameters())
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    # eval-mode BatchNorm treats images independently: the batch size does not change a feature
    _, _, test_small = backbone_and_loaders(run, data, batch_size=1)
    wide, one = (features64(Float64(backbone), loader) for loader in (test, test_small))  # in the mode left
    # two computations; absolute per image (from its largest feature), as for --embed below, zeros included
    bound = 2 * feature_error(backbone, torch.float64) * wide.abs().amax(1, keepdim=True)
    # largest observed: 2e-5 of the bound (0 with one thread); train-mode BN would be 1e11 x it
    assert ((wide - one).abs() <= bound).all(), ((wide - one).abs() / bound).max()
    # and the check above can fail: one forward pass in train mode moves the running statistics
    backbone.train()
    with torch.no_grad():
        backbone(next(iter(test))[0])
    assert not torch.equal(before["bn1.running_mean"], backbone.state_dict()["bn1.running_mean"])


def test_balanced_subset_is_equal_per_class_and_seeded():
    labels = np.repeat(np.arange(4), [50, 30, 20, 100])  # 200 images, unbalanced
    picked = balanced_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[picked]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(picked, balanced_subset(labels, 0.1, seed=0)) and np.all(np.diff(picked) > 0)
    assert not np.array_equal(picked, balanced_subset(labels, 0.1, seed=1))
    assert np.bincount(labels[balanced_subset(labels, 0.001)]).tolist() == [1, 1, 1, 1]  # at least one
    assert np.bincount(labels[balanced_subset(labels, 0.9)]).tolist() == [20] * 4  # at most the smallest class
    assert len(balanced_subset(labels, 1.0)) == 200  # 100% = every label, as in the paper
    with pytest.raises(Exception, match="label-fraction"):
        balanced_subset(labels, 0.0)


def test_top_k_accuracy_against_a_loop():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(50) % 7
    for k in (1, 3, 5):
        ranks = [(row > row[y]).sum().item() for row, y in zip(logits, labels)]
        expected = np.mean([r < k for r in ranks])  # the same count: a float32 mean (<= 2 roundings), a float64 one
        # 0 for a count of 0; up to 0.47 of it seen over 40 draws (torch divides once: half the allowance)
        bound = (2 * unit_roundoff(torch.float32) + unit_roundoff(torch.float64)) * expected
        assert abs(top_k_accuracy(logits, labels, k) - expected) <= bound, k
    assert top_k_accuracy(logits[:, :4], labels % 4, 5) is None
