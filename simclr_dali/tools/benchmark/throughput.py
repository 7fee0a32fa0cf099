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

from simclr_dali.settings import Check, checked
from simclr_dali.tools.benchmark.common import console, print_table, run_isolated, same_code_env


# -- data ---------------------------------------------------------------------------------------
def _write_jpeg(job: tuple[str, int, int, int, int]) -> None:
    from PIL import Image

    path, w, h, seed, i = job
    rng = np.random.default_rng([seed, i])
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def generated_jpegs(folder: Path, n: int, image_size: int, seed: int = 0) -> str:
    """`n` JPEGs of a realistic size for the run: 500x375 for large views, 32x32 for 32 px ones, in 10
    class folders. Smooth random content with noise, so that they compress like photographs (about 40 KB
    at 500x375). Written by one process per core; image i depends only on (seed, i)."""
    from concurrent.futures import ProcessPoolExecutor

    w, h = (500, 375) if image_size > 64 else (32, 32)
    for c in range(min(n, 10)):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"c{i % 10}" / f"{i:06d}.jpg"), w, h, seed, i) for i in range(n)]
    with ProcessPoolExecutor(max(1, min(os.cpu_count() or 1, n // 64 or 1))) as pool:
        list(pool.map(_write_jpeg, jobs, chunksize=64))
    return str(folder)


def bench_data(args, n: int, tmp: Path, image_size: int | None = None) -> str:
    size = args.image_size if image_size is None else image_size
    return args.data or generated_jpegs(tmp / f"images{size}", n, size)


def _load(spec: str):
    from simclr_dali.pipelines.sources import load_source

    return load_source(spec, "train", spec)  # every image: a folder keeps no test split here


# -- pipeline: DALI against torchvision ---------------------------------------------------------
def _rate(batches, batch_size: int, warmup: int = 1, device: str = "cpu") -> float:
    """Images per second over the batches after `warmup` (queues fill and threads start there), each
    batch on `device` (a CPU loader's batches are copied there, as training would)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    sync()
    t, n = time.perf_counter(), 0
    for batch in it:
        for view in batch[:2]:
            view.to(device, non_blocking=True)
        n += batch_size
    sync()
    return n / (time.perf_counter() - t)


def fixed_cost(source, image_size: int, aug, workers: int, gpu: bool, sizes=(8, 16, 32, 64),
               runs: int = 10) -> tuple[float | None, float | None]:
    """(ms per batch whatever its size, ms per image) of the training pipeline: at each batch size in `sizes`, the
    time per batch of pipe.run() over `runs` batches in a row (after 3 that fill its queues), the fastest of three
    such stretches; then the least-squares line through those times against the size. Small batches, where the
    part that does not grow with the batch is a large share of the time; the sizes whose 3 `runs` + 5 batches the
    data holds (None, None where fewer than two)."""
    from simclr_dali.pipelines.loader import Shard, train_pipeline

    sizes = [b for b in sizes if b * (3 * runs + 5) <= len(source)]  # and the prefetch queue's 2
    if len(sizes) < 2:
        return None, None
    times = []
    for b in sizes:
        pipe = train_pipeline(source, batch_size=b, size=image_size, aug=aug, shard=Shard(), seed=0, epoch=0,
                              workers=workers, device_id=0 if gpu else None)[0]
        for _ in range(3):
            pipe.run()
        took = []
        for _ in range(3):  # three stretches of `runs` batches each: the fastest stretch's time per batch
            t = time.perf_counter()
            for _ in range(runs):
                pipe.run()
            took.append((time.perf_counter() - t) / runs)
        times.append(min(took))
    per_image, fixed = np.polyfit(np.array(sizes, float), np.array(times), 1)
    return fixed * 1e3, per_image * 1e3


def pipeline_measure(data: str, image_size: int, batch_size: int, workers: int, repeats: int,
                     gpu: bool = False) -> dict:
    """Two-view batches per second: our DALI pipeline (on the GPU when `gpu`) and torchvision on the
    same images, with as many DataLoader workers as DALI has threads, its batches copied to the GPU from
    pinned memory. torchvision is measured in each of its styles (baseline.STYLES) and the faster is the
    baseline. Median over `repeats` epochs. Also DALI's graph (its operators) and its fixed cost per batch
    (fixed_cost)."""
    import torch

    from simclr_dali.pipelines.augment import Augment
    from simclr_dali.pipelines.baseline import STYLES, torchvision_loader
    from simclr_dali.pipelines.loader import Shard, graph_operators, train_loader, train_pipeline

    torch.set_num_threads(1)  # the main process only consumes batches; the work is in threads/workers
    source, aug, device = _load(data), Augment(), "cuda" if gpu else "cpu"

    def dali(size: int, r: int) -> float:
        return _rate(train_loader(source, batch_size=size, size=image_size, aug=aug, shard=Shard(), seed=0, epoch=r,
                                  workers=workers, device_id=0 if gpu else None), size, device=device)

    rates = [dali(batch_size, r) for r in range(repeats)]
    d = statistics.median(rates)
    fixed, per_image = fixed_cost(source, image_size, aug, workers, gpu)
    built = train_pipeline(source, batch_size=batch_size, size=image_size, aug=aug, shard=Shard(), seed=0, epoch=0,
                           workers=workers, device_id=0 if gpu else None)[0]  # built, never run
    graph = {"dali_operators": graph_operators(built), "fixed_ms_per_batch": fixed, "ms_per_image": per_image}
    if source.shards is not None:  # torchvision's loader reads files: tar shards (disk or bucket) are DALI's alone
        return {"dali_images_per_s": d, "torchvision_images_per_s": None, "speedup": None, "dali_device": device,
                "dali_runs": rates, "torchvision_runs": [], "n_images": len(source), **graph}
    runs = {}
    for style in STYLES:
        tv_loader = torchvision_loader(source, batch_size=batch_size, size=image_size, aug=aug, workers=workers,
                                       pin_memory=gpu, style=style)
        runs[style] = [_rate(tv_loader, batch_size, device=device) for _ in range(repeats)]
        del tv_loader  # its persistent workers end before the next style's start
    best = max(STYLES, key=lambda style: statistics.median(runs[style]))
    t = statistics.median(runs[best])
    return {"dali_images_per_s": d, "torchvision_images_per_s": t, "speedup": d / t, "dali_device": device,
            "dali_runs": rates, "torchvision_runs": runs[best], "torchvision_style": best,
            "torchvision_by_style": {style: statistics.median(r) for style, r in runs.items()},
            "n_images": len(source), **graph}


def pipeline_section(args) -> list[dict]:
    """One measurement per side in --image-size (32 and 224 px unless told), each on its own generated data (or
    --data), in one table."""
    import torch

    rows = []
    for size in args.image_size if isinstance(args.image_size, list) else [args.image_size]:
        with tempfile.TemporaryDirectory() as tmp:
            data = bench_data(args, args.batch_size * (args.batches + 1), Path(tmp), size)
            console.print(f"pipeline: DALI vs torchvision, {size} px, batch {args.batch_size}, "
                          f"{args.workers} threads/workers ...")
            row = run_isolated("simclr_dali.tools.benchmark.throughput:pipeline_measure", data=data, image_size=size,
                               batch_size=args.batch_size, workers=args.workers, repeats=args.repeats,
                               gpu=torch.cuda.is_available())
        row.update(image_size=size, batch_size=args.batch_size, workers=args.workers)
        rows.append(row)
    print_table(f"Two-view augmentation throughput (images/s, median of {args.repeats})",
                ["side", "DALI", "torchvision (its faster style)", "speedup", "DALI operators", "fixed ms/batch",
                 "images"],
                [[r["image_size"], r.get("dali_images_per_s"), r.get("torchvision_images_per_s") and
                  f"{r['torchvision_images_per_s']:.3g} ({r['torchvision_style']})", r.get("speedup"),
                  r.get("dali_operators"), r.get("fixed_ms_per_batch"), r.get("n_images", r.get("reason"))]
                 for r in rows])
    return rows


# -- model: the ceiling the data path must feed ---------------------------------------------------
def model_flags(args) -> list[str]:
    """The train.py flags that shape the model's step, the same on both sides of the comparison."""
    return (["--backbone", args.backbone, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
             "--channels-last", args.channels_last] + (["--small-stem"] if args.small_stem else [])
            + (["--compile"] if args.compile else []))


def model_measure(flags: list[str], repeats: int, budget_s: float, mixed_precision: str = "no") -> dict:
    """Forward + NT-Xent + backward + optimiser step on synthetic views already on the device, the model
    prepared as train.py prepares it (memory format, compilation, accelerate: under bf16 the same autocast
    and fp32 outputs). The optimiser steps without train.py's non-finite guard, whose cost therefore
    counts against train.py's efficiency."""
    import torch

    from simclr_dali.models.ntxent import nt_xent_loss
    from simclr_dali.tools.benchmark.common import time_fn
    from simclr_dali.training import (
        build_model,
        build_optimizer,
        make_accelerator,
        memory_format_and_compile,
        parse_args,
    )

    os.environ["ACCELERATE_MIXED_PRECISION"] = mixed_precision  # what `accelerate launch` sets for train.py
    accelerator = make_accelerator()
    cfg = parse_args(flags)
    model, channels_last = memory_format_and_compile(build_model(cfg).train(), cfg, accelerator.device)
    optimizer, _ = build_optimizer(cfg, model, cfg.lr, steps_per_epoch=100)
    model, optimizer = accelerator.prepare(model, optimizer)
    views = torch.randn(2 * cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=accelerator.device)
    if channels_last:
        views = views.contiguous(memory_format=torch.channels_last)

    def step():
        z = model(views)
        accelerator.backward(nt_xent_loss(*z.chunk(2), cfg.temperature, impl=cfg.loss_impl))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = accelerator.device.type == "cuda"
    timing = time_fn(step, warmup=2, repeats=repeats, budget_s=budget_s,
                     sync=torch.cuda.synchronize if cuda else None)
    return {"model_images_per_s": cfg.batch_size / timing["median_s"], **timing, "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision, "channels_last": channels_last, "compile": cfg.compile}


def model_section(args) -> list[dict]:
    console.print(f"model: {args.backbone} forward+backward+step, {args.image_size} px, batch {args.batch_size}, "
                  f"mixed precision {args.mixed_precision} ...")
    row = run_isolated("simclr_dali.tools.benchmark.throughput:model_measure", flags=model_flags(args),
                       repeats=args.repeats, budget_s=args.budget, mixed_precision=args.mixed_precision)
    row.update(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size)
    print_table(f"{args.backbone} + head + NT-Xent + step on synthetic views (images/s)",
                ["images/s", "median s/step", "device", "precision"],
                [[row.get("model_images_per_s"), row.get("median_s"), row.get("device", row.get("reason")),
                  row.get("mixed_precision")]])
    return [row]


# -- train: end to end through train.py, against the model alone ---------------------------------
def train_measure(data: str, flags: list[str], workers: int, epochs: int, mixed_precision: str = "no") -> dict:
    """train.py itself on `data`; images/s of the epochs after the first (start-up and warm-up)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "simclr_dali.training", "--data", data, "--test-data", data, "--out", out, *flags,
               "--workers", str(workers), "--epochs", str(epochs), "--warmup-epochs", "1", "--log-every", "1000000"]
        env = same_code_env(ACCELERATE_MIXED_PRECISION=mixed_precision)  # as `accelerate launch` sets it
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"status": "failed", "reason": last.removeprefix("error: ")}
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((Path(out) / "config.json").read_text())
    rates = [r["images_per_s"] for r in records if r["kind"] == "epoch"]
    rates = rates[1:] or rates  # the first epoch holds start-up, unless it is the only one
    return {"train_images_per_s": statistics.median(rates), "train_epochs": rates, "device": config["device"],
            "mixed_precision": config["mixed_precision"], "dali_placement": config["dali_placement"],
            "channels_last": config["channels_last_resolved"], "compile": config["compile"]}


def train_section(args) -> list[dict]:
    """train.py against the model alone, which is measured right before and right after it: on a
    machine whose speed drifts over minutes (a shared 2-core VM drifts by 20%), the mean of the two
    brackets the stretch train.py ran in."""
    with tempfile.TemporaryDirectory() as tmp:
        data = bench_data(args, args.batch_size * args.steps, Path(tmp))
        before = model_section(args)[0]
        console.print(f"train: train.py end to end, {args.epochs} epochs, mixed precision {args.mixed_precision} ...")
        row = run_isolated("simclr_dali.tools.benchmark.throughput:train_measure", data=data, flags=model_flags(args),
                           workers=args.workers, epochs=args.epochs, mixed_precision=args.mixed_precision)
        after = model_section(args)[0]
    models = [m["model_images_per_s"] for m in (before, after) if "model_images_per_s" in m]
    if "train_images_per_s" in row and len(models) == 2:
        same = ("device", "mixed_precision", "channels_last", "compile")
        if [row[k] for k in same] != [before[k] for k in same]:
            row.update(status="failed", reason=f"train.py ran with {[row[k] for k in same]}, the model alone with "
                       f"{[before[k] for k in same]} ({', '.join(same)})")
        row.update(model_images_per_s=statistics.mean(models), model_runs=models,
                   efficiency=row["train_images_per_s"] / statistics.mean(models))
    row.update(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size)
    print_table("End-to-end training against the model alone (images/s)",
                ["train", "model (before, after)", "efficiency"],
                [[row.get("train_images_per_s", row.get("reason")),
                  " / ".join(f"{m:.0f}" for m in models), row.get("efficiency")]])
    return [row]


def add_throughput_args(p, sides: bool = False) -> None:
    """The sections' flags; with `sides`, --image-size takes several sides (pipeline: one measurement each)."""
    p.add_argument("--data", default="", help="a source as train.py takes it (default: generated JPEGs of a "
                   "realistic size: 500x375 for views over 64 px, else 32x32)")
    if sides:
        checked(p, "--image-size", type=int, nargs="+", default=[32, 224], check=Check(low=8),
                help="sides of the augmented views, one measurement each")
    else:
        checked(p, "--image-size", type=int, default=32, check=Check(low=8), help="side of the augmented views")
    checked(p, "--batch-size", type=int, default=256, check=Check(low=1), help="images per batch")
    checked(p, "--workers", type=int, default=os.cpu_count() or 1, check=Check(low=1),
            help="DALI threads, and torchvision DataLoader workers")
    p.add_argument("--backbone", default="resnet18", help="timm model name")
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem without max-pool")
    checked(p, "--batches", type=int, default=8, check=Check(low=1), help="pipeline: timed batches per repeat")
    checked(p, "--steps", type=int, default=8, check=Check(low=1), help="train: steps per epoch (generated data)")
    checked(p, "--epochs", type=int, default=3, check=Check(low=1), help="train: epochs (the first is not counted)")
    checked(p, "--mixed-precision", default="no", check=Check(choices=("no", "bf16", "fp16")),
            help="model and train: accelerate's mixed precision, the same on both sides")
    checked(p, "--channels-last", default="auto", check=Check(choices=("auto", "on", "off")),
            help="model and train: train.py's --channels-last, the same on both sides")
    p.add_argument("--compile", action="store_true", help="model and train: train.py's --compile on both sides")
