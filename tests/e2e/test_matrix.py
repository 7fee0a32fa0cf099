"""The configuration matrix: the paths users run, each at the size they run it, on tiny data made here.

A cell is a command line of train.py and the data it reads. The fast tier builds each cell's pipeline, draws one
batch and takes it through the method's networks and loss (make test-fast); the slow tier trains each cell for an
epoch in this process (two processes: accelerate launch) and asserts that it trained (finite losses, the step
count) and what config.json resolved. The values asserted are written here by hand from the papers and the
README, not read from the code's tables. At 224 px also: evaluate.py, the preview and `benchmark.py pipeline`.
"""
import io
import json
import math
import random
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_folder, run_cli, write_cifar

from simclr_dali import training as train
from simclr_dali.pipelines.loader import Shard, train_loader
from simclr_dali.pipelines.sources import load_source

BATCH = 4  # images per step (two views each)
SMALL = {"aug.jitter_strength": 0.5, "aug.blur_p": 0.0, "temperature": 0.2, "lr": 1.0, "weight_decay": 1e-4}
IMAGENET = {"aug.jitter_strength": 1.0, "aug.blur_p": 0.5, "temperature": 0.1, "lr": 0.3, "weight_decay": 1e-6}
# (training images, steps of BATCH) of each data kind: 12 images in 3 classes; a folder or a list keeps 1 aside,
# pack a stratified tenth (1 per class); CIFAR batches of 2 images (5 training batches); foreign shards keep none
DATA = {"folder": (11, 2), "list": (11, 2), "cifar": (10, 2), "pack": (9, 2), "webdataset": (12, 3), "tar": (12, 3)}


@dataclass(frozen=True)
class Cell:
    name: str
    flags: tuple[str, ...] = ()
    data: str = "folder"
    size: int = 224
    expect: dict = field(default_factory=dict)  # config.json's values ("aug.x": the augmentation's)
    env: dict = field(default_factory=dict)

    def argv(self, data: dict, out: Path) -> list[str]:
        return ["--data", data[self.data], "--out", str(out), "--backbone", "test_resnet", "--image-size",
                str(self.size), "--batch-size", str(BATCH), "--epochs", "1", "--log-every", "1", "--workers", "1",
                *self.flags]


CELLS = [
    # every image size under each recipe
    *[Cell(f"{size}px-{recipe}", ("--recipe", recipe), size=size,
           expect={"recipe_resolved": recipe, **(SMALL if recipe == "small" else IMAGENET)})
      for size in (32, 96, 224) for recipe in ("small", "imagenet")],
    Cell("224px-auto", expect={"recipe_resolved": "imagenet", **IMAGENET, "loss_impl_resolved": "tiled"}),
    # each method, its views as its paper defines them
    Cell("supcon", ("--method", "supcon"), expect={"method": "supcon", "temperature": 0.1, "lr": 0.4}),
    Cell("moco", ("--method", "moco", "--queue-size", "4"),
         expect={"method": "moco", "optimizer": "momentum", "lr": 0.03, "aug.crop_min_area": 0.2,
                 "aug.jitter_strength": 0.5, "aug.blur_p": 0.5}),
    Cell("byol", ("--method", "byol"),
         expect={"method": "byol", "proj_dim": 256, "aug.jitter_saturation": 0.4, "aug.blur_p": [1.0, 0.1],
                 "aug.solarize_p": [0.0, 0.2]}),
    # each data kind
    *[Cell(kind, data=kind) for kind in ("list", "cifar", "pack", "webdataset", "tar")],
    # each loss implementation that runs on the CPU (Triton under its interpreter)
    *[Cell(f"loss-{impl}", ("--loss-impl", impl), expect={"loss_impl_resolved": impl})
      for impl in ("reference", "tiled", "triton")],
    # a ViT and a ConvNeXt beside the ResNet; AdamW with its own defaults
    Cell("vit", ("--backbone", "test_vit", "--optimizer", "adamw"),
         expect={"backbone": "test_vit", "lr": 1.5e-4, "weight_decay": 0.1}),
    Cell("convnext", ("--backbone", "test_convnext"), expect={"backbone": "test_convnext"}),
    # memory format, compilation, bf16
    Cell("channels-last", ("--channels-last", "on"), expect={"channels_last_resolved": True}),
    Cell("compile", ("--compile",), expect={"compile": True}),
    Cell("bf16", env={"ACCELERATE_MIXED_PRECISION": "bf16"},
         expect={"mixed_precision": "bf16", "loss_operands": "bfloat16", "loss_impl_resolved": "tiled"}),
]
IDS = [c.name for c in CELLS]


def tiny_jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Each data kind, 12 images in 3 classes: a folder (80 x 60 JPEGs and PNGs), its image list from
    pipelines.verify, CIFAR pickles, shards from pipelines.pack, from the webdataset library's TarWriter, and from
    the `tar` command with upper-case .JPEG members in a shuffled order (a sample's image and label apart)."""
    import webdataset

    from simclr_dali.pipelines import pack, verify

    root = tmp_path_factory.mktemp("matrix")
    folder = make_folder(root / "images", per_class=4, size=(80, 60))
    assert verify.main([str(folder), "--out", str(root / "images.tsv"), "--workers", "1"]) == 0
    assert pack.main([str(folder), str(root / "packed"), "--shard-size", "5", "--workers", "1"]) == 0
    rng = np.random.default_rng(0)
    (root / "wds").mkdir()
    for shard in range(2):
        with webdataset.TarWriter(str(root / "wds" / f"part-{shard}.tar")) as sink:
            for i in range(6):
                sink.write({"__key__": f"s{shard}{i:03d}", "jpg": tiny_jpeg(rng), "cls": str(i % 3)})
    members = root / "members"
    members.mkdir()
    for i in range(12):
        (members / f"{i:03d}.JPEG").write_bytes(tiny_jpeg(rng))
        (members / f"{i:03d}.cls").write_text(str(i % 3))
    names = sorted(p.name for p in members.iterdir())
    random.Random(0).shuffle(names)
    (root / "tar").mkdir()
    subprocess.run(["tar", "-C", str(members), "-cf", str(root / "tar" / "images.tar"), "--no-recursion", ".",
                    *names], check=True)
    with tarfile.open(root / "tar" / "images.tar") as tar:
        order = tar.getnames()
    assert order[0] == "." and order[1].split(".")[0] != order[2].split(".")[0]  # out of order, as `tar` wrote it
    return {"folder": str(folder), "list": str(root / "images.tsv"),
            "cifar": f"cifar10:{write_cifar(root / 'cifar', n=2)}", "pack": f"wds:{root / 'packed' / 'shard-*.tar'}",
            "webdataset": f"wds:{root / 'wds' / '*.tar'}", "tar": f"wds:{root / 'tar' / '*.tar'}"}


def resolved(cfg: dict, key: str):
    return cfg["aug"][key[4:]] if key.startswith("aug.") else cfg[key]


# -- fast: each cell's pipeline, one batch, the networks and the loss ------------------------------------------------
@pytest.mark.parametrize("cell", CELLS, ids=IDS)
def test_a_cells_batch_goes_through_its_pipeline_networks_and_loss(cell, data, tmp_path, monkeypatch):
    from simclr_dali.models.loss_core import resolve_impl

    for name, value in cell.env.items():
        monkeypatch.setenv(name, value)
    cfg = train.parse_args(cell.argv(data, tmp_path / "run"))
    expect = {k: v for k, v in cell.expect.items() if "." in k or k in ("method", "lr", "temperature", "backbone")}
    for key, value in expect.items():  # the settings that config.json would record
        got = getattr(cfg.aug, key[4:]) if key.startswith("aug.") else getattr(cfg, key)
        assert list(got) == value if isinstance(got, tuple) else got == value, key
    source = load_source(cfg.data, "train")
    assert len(source) == DATA[cell.data][0]
    channels_last = cfg.channels_last == "on"
    loader = train_loader(source, batch_size=BATCH, size=cell.size, aug=cfg.aug, shard=Shard(), seed=0, epoch=0,
                          workers=1, device_id=None, channels_last=channels_last)
    view1, view2, labels = next(iter(loader))
    assert view1.shape == view2.shape == (BATCH, 3, cell.size, cell.size) and labels.shape[0] == BATCH
    assert torch.isfinite(view1).all() and torch.isfinite(view2).all() and not torch.equal(view1, view2)
    assert view1.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.manual_seed(0)
    model = train.build_model(cfg).train()
    bf16 = cell.env.get("ACCELERATE_MIXED_PRECISION") == "bf16"
    operands = torch.bfloat16 if bf16 else torch.float32
    model.loss_options = {"impl": resolve_impl(cfg.loss_impl, "cpu", operands), "operands": operands}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        outputs = model(torch.cat([view1, view2]))
    loss = model.loss(outputs, labels.view(-1))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.backbone.parameters() if p.grad is not None)


# -- slow: each cell trains, and config.json says what it resolved ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=IDS)
def test_a_cell_trains_and_records_what_it_resolved(cell, data, tmp_path, monkeypatch, fresh_accelerate):
    for name, value in cell.env.items():
        monkeypatch.setenv(name, value)
    if cell.name == "compile":  # Dynamo traces and wraps the model as under any backend; inductor's code
        # generation (45 s on this CPU for a model that trains in a second) is torch's, not this cell's point
        compile_in_place = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_in_place(self, **kw, backend="eager"))
    out = tmp_path / "run"
    assert train.main(cell.argv(data, out)) == 0
    cfg = json.loads((out / "config.json").read_text())
    n_train, steps = DATA[cell.data]
    assert (cfg["image_size"], cfg["n_train"], cfg["steps_per_epoch"]) == (cell.size, n_train, steps)
    for key, value in cell.expect.items():
        assert resolved(cfg, key) == value, key
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "step"]
    assert len(losses) == steps and all(math.isfinite(v) and v > 0 for v in losses)
    assert records[-1]["kind"] == "epoch" and records[-1]["step"] == steps
    assert (out / "backbone.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_train_at_224_px(data, tmp_path):
    out = tmp_path / "run"
    r = run_cli("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "train.py",
                *Cell("two").argv(data, out)[:-6], "--batch-size", "2", "--epochs", "1", "--log-every", "1",
                "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["world_size"], cfg["global_batch"], cfg["image_size"], cfg["steps_per_epoch"]) == (2, 4, 224, 2)
    assert cfg["recipe_resolved"] == "imagenet" and cfg["aug"]["blur_p"] == 0.5
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


# -- at 224 px: evaluate.py, the preview, benchmark.py pipeline ------------------------------------------------------
@pytest.mark.slow
def test_evaluate_scores_a_224_px_run(data, tmp_path):
    from simclr_dali.evaluation import evaluate

    out = tmp_path / "run"
    assert train.main(Cell("224").argv(data, out)) == 0
    assert evaluate.main(["--run", str(out), "--batch-size", "4", "--workers", "1", "--probe-epochs", "3",
                          "--knn-k", "5", "--no-plots"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (result["n_train"], result["n_test"], result["crop"]) == (11, 1, 0.875)
    for scores in (result, result["random_init"]):
        assert 0 <= scores["knn_top1"] <= 1 and 0 <= scores["linear_top1"] <= 1


@pytest.mark.slow
def test_the_preview_draws_224_px_views_of_each_method(data, tmp_path, capsys):
    from simclr_dali.tools import preview

    for method in ("simclr", "byol"):
        png = tmp_path / f"{method}.png"
        assert preview.main(["--data", data["folder"], "--image-size", "224", "--n", "3", "--pairs", "1",
                             "--method", method, "--out", str(png)]) == 0
        assert png.stat().st_size > 10_000 and capsys.readouterr().out.strip() == str(png)


@pytest.mark.slow
def test_benchmark_pipeline_at_224_px(data, tmp_path):
    from simclr_dali.tools.benchmark import command as benchmark

    result = tmp_path / "pipeline.json"
    assert benchmark.main(["pipeline", "--data", data["folder"], "--image-size", "224", "--batch-size", "4",
                           "--workers", "1", "--repeats", "1", "--json", str(result)]) == 0
    [row] = json.loads(result.read_text())["results"]
    assert row["image_size"] == 224 and row["dali_device"] == "cpu"
    assert row["dali_images_per_s"] > 0 and row["torchvision_images_per_s"] > 0
