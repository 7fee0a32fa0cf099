"""Sections `pipeline`, `model` and `train`: images per second through each part of the trainer."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, console, print_table, run_isolated


# -- data ---------------------------------------------------------------------------------------
def generated_jpegs(folder: Path, n: int, image_size: int, seed: int = 0) -> str:
    """`n` JPEGs of a realistic size for the run: 500x375 for large views, 32x32 for 32 px ones.
    Smooth random content with noise, so that they compress like photographs (about 40 KB at 500x375)."""
    from PIL import Image

    w, h = (500, 375) if image_size > 64 else (32, 32)
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"c{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
    return str(folder)


def bench_data(args, n: int, tmp: Path) -> str:
    return args.data or generated_jpegs(tmp / "images", n, args.image_size)


def _load(spec: str):
    from pipelines.sources import load_source

    return load_source(spec, "train", spec)  # every image: a folder keeps no test split here


# -- pipeline: DALI against torchvision ---------------------------------------------------------
def _rate(batches, batch_size: int, warmup: int = 1) -> float:
    """Images per second over the batches after `warmup` (queues fill and threads start there)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t, n = time.perf_counter(), 0
    for batch in it:
        n += batch_size
    return n / (time.perf_counter() - t)


def pipeline_measure(data: str, image_size: int, batch_size: int, workers: int, repeats: int,
                     gpu: bool = False) -> dict:
    """Two-view batches per second: our DALI pipeline (on the GPU when `gpu`) and torchvision on the
    same images, with as many DataLoader workers as DALI has threads. Median over `repeats` epochs."""
    import torch

    from pipelines.augment import Augment
    from pipelines.baseline import torchvision_loader
    from pipelines.loader import Shard, train_loader

    torch.set_num_threads(1)  # the main process only consumes batches; the work is in threads/workers
    source, aug = _load(data), Augment()
    dali = [_rate(train_loader(source, batch_size=batch_size, size=image_size, aug=aug, shard=Shard(), seed=0,
                               epoch=r, workers=workers, device_id=0 if gpu else None), batch_size)
            for r in range(repeats)]
    tv_loader = torchvision_loader(source, batch_size=batch_size, size=image_size, aug=aug, workers=workers)
    tv = [_rate(tv_loader, batch_size) for _ in range(repeats)]
    d, t = statistics.median(dali), statistics.median(tv)
    return {"dali_images_per_s": d, "torchvision_images_per_s": t, "speedup": d / t,
            "dali_runs": dali, "torchvision_runs": tv, "n_images": len(source)}


def pipeline_section(args) -> list[dict]:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        data = bench_data(args, args.batch_size * (args.batches + 1), Path(tmp))
        console.print(f"pipeline: DALI vs torchvision, {args.image_size} px, batch {args.batch_size}, "
                      f"{args.workers} threads/workers ...")
        row = run_isolated("bench.throughput:pipeline_measure", data=data, image_size=args.image_size,
                           batch_size=args.batch_size, workers=args.workers, repeats=args.repeats,
                           gpu=torch.cuda.is_available())
    row.update(image_size=args.image_size, batch_size=args.batch_size, workers=args.workers)
    print_table(f"Two-view augmentation throughput, {args.image_size} px (images/s, median of {args.repeats})",
                ["DALI", "torchvision", "speedup", "images"],
                [[row.get("dali_images_per_s"), row.get("torchvision_images_per_s"), row.get("speedup"),
                  row.get("n_images", row.get("reason"))]])
    return [row]


# -- model: the ceiling the data path must feed ---------------------------------------------------
def model_measure(backbone: str, small_stem: bool, image_size: int, batch_size: int, repeats: int,
                  budget_s: float) -> dict:
    """Forward + NT-Xent + backward + optimiser step on synthetic views already on the device."""
    import torch

    from bench.common import time_fn
    from models.ntxent import nt_xent_loss
    from train import build_model, build_optimizer, parse_args

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = parse_args(["--backbone", backbone, "--image-size", str(image_size), "--batch-size", str(batch_size)]
                     + (["--small-stem"] if small_stem else []))
    model = build_model(cfg).to(device).train()
    optimizer, _ = build_optimizer(cfg, model, cfg.lr, steps_per_epoch=100)
    views = torch.randn(2 * batch_size, 3, image_size, image_size, device=device)

    def step():
        z = model(views)
        nt_xent_loss(*z.chunk(2), cfg.temperature, impl=cfg.loss_impl).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_fn(step, warmup=2, repeats=repeats, budget_s=budget_s,
                     sync=torch.cuda.synchronize if device == "cuda" else None)
    return {"model_images_per_s": batch_size / timing["median_s"], **timing, "device": device}


def model_section(args) -> list[dict]:
    console.print(f"model: {args.backbone} forward+backward+step, {args.image_size} px, batch {args.batch_size} ...")
    row = run_isolated("bench.throughput:model_measure", backbone=args.backbone, small_stem=args.small_stem,
                       image_size=args.image_size, batch_size=args.batch_size, repeats=args.repeats,
                       budget_s=args.budget)
    row.update(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size)
    print_table(f"{args.backbone} + head + NT-Xent + step on synthetic views (images/s)",
                ["images/s", "median s/step", "device"],
                [[row.get("model_images_per_s"), row.get("median_s"), row.get("device", row.get("reason"))]])
    return [row]


# -- train: end to end through train.py, against the model alone ---------------------------------
def train_measure(data: str, backbone: str, small_stem: bool, image_size: int, batch_size: int,
                  workers: int, epochs: int) -> dict:
    """train.py itself on `data`; images/s of the epochs after the first (start-up and warm-up)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "train.py"), "--data", data, "--test-data", data, "--out", out,
               "--backbone", backbone, "--image-size", str(image_size), "--batch-size", str(batch_size),
               "--workers", str(workers), "--epochs", str(epochs), "--warmup-epochs", "1",
               "--log-every", "1000000"] + (["--small-stem"] if small_stem else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            return {"status": "failed", "reason": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if r["kind"] == "epoch"]
    rates = rates[1:] or rates  # the first epoch holds start-up, unless it is the only one
    return {"train_images_per_s": statistics.median(rates), "train_epochs": rates}


def train_section(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        data = bench_data(args, args.batch_size * args.steps, Path(tmp))
        console.print(f"train: train.py end to end, {args.epochs} epochs of {args.steps} steps ...")
        row = run_isolated("bench.throughput:train_measure", data=data, backbone=args.backbone,
                           small_stem=args.small_stem, image_size=args.image_size, batch_size=args.batch_size,
                           workers=args.workers, epochs=args.epochs)
    model = model_section(args)[0]
    if "train_images_per_s" in row and "model_images_per_s" in model:
        row.update(model_images_per_s=model["model_images_per_s"],
                   efficiency=row["train_images_per_s"] / model["model_images_per_s"])
    row.update(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size)
    print_table("End-to-end training against the model alone (images/s)", ["train", "model", "efficiency"],
                [[row.get("train_images_per_s", row.get("reason")), row.get("model_images_per_s"),
                  row.get("efficiency")]])
    return [row]


def add_throughput_args(p) -> None:
    p.add_argument("--data", default="", help="a source as train.py takes it (default: generated JPEGs of a "
                   "realistic size: 500x375 for views over 64 px, else 32x32)")
    p.add_argument("--image-size", type=int, default=32, help="side of the augmented views")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="DALI threads, and torchvision DataLoader workers")
    p.add_argument("--backbone", default="resnet18", help="timm model name")
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem without max-pool")
    p.add_argument("--batches", type=int, default=8, help="pipeline: timed batches per repeat")
    p.add_argument("--steps", type=int, default=8, help="train: steps per epoch (generated data)")
    p.add_argument("--epochs", type=int, default=3, help="train: epochs (the first is not counted)")
