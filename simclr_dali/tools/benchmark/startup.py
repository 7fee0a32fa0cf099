"""`benchmark.py startup`: what a start costs as the data grows, on a synthetic ImageNet-like folder of N images
(hard links to a few 500x375 JPEGs, in 1,000 class folders): the listing, the first image check, the cached
check, the training pipeline's build with its first batch (what an epoch boundary costs), and train.py's time
from launch to its first step, started again (the verdicts cached) and resumed. Each figure is also given per file."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from simclr_dali.settings import Check, checked
from simclr_dali.tools.benchmark.common import print_table

LINKS_PER_SOURCE = 50_000  # ext4 allows 65,000 hard links to one file


def add_startup_args(p) -> None:
    checked(p, "--sizes", type=int, nargs="+", default=[10_000], check=Check(low=1),
            help="images in the synthetic folder, one measurement per size")
    checked(p, "--classes", type=int, default=1000, check=Check(low=1), help="class folders")
    p.add_argument("--root", default="", help="where the synthetic folders go (default: a temporary folder, "
                   "removed after); a folder made before for the same size is used again")
    checked(p, "--workers", type=int, default=len(os.sched_getaffinity(0)), check=Check(low=1),
            help="threads of the image check and of DALI")
    checked(p, "--image-size", type=int, default=224, check=Check(low=8), help="side of the augmented views")
    checked(p, "--batch-size", type=int, default=64, check=Check(low=1), help="images per batch")
    p.add_argument("--no-train", dest="train", action="store_false",
                   help="leave out train.py's time to its first step (fresh and resumed)")


def make_folder(root: Path, n: int, classes: int) -> Path:
    """N hard links to generated 500x375 JPEGs (8 at least, about 70 KB each), spread over `classes` folders."""
    from PIL import Image

    folder = root / f"images-{n}-{classes}"
    done = folder / ".complete"
    if done.exists():
        return folder
    (root / f"sources-{n}").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sources, count = [], max(8, -(-n // LINKS_PER_SOURCE))
    for k in range(count):
        coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        noise = rng.integers(0, 40, (375, 500, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)) // 2 + noise
        buf = io.BytesIO()
        Image.fromarray(image.astype(np.uint8)).save(buf, "JPEG", quality=90)
        sources.append(root / f"sources-{n}" / f"source-{k}.jpg")  # beside the folder, not in it
        sources[-1].write_bytes(buf.getvalue())
    for c in range(classes):
        (folder / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = folder / f"n{i % classes:08d}" / f"img_{i:08d}.JPEG"
        if not target.exists():
            os.link(sources[i % count], target)
    done.touch()
    return folder


def first_step_seconds(args: list[str], out: Path) -> float:
    """Seconds from launching train.py with `args` to its first logged step; then SIGTERM (it saves and exits)."""
    metrics = out / "metrics.jsonl"
    seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "simclr_dali.training", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        while child.poll() is None:
            lines = metrics.read_text().splitlines()[seen:] if metrics.exists() else []
            if any(json.loads(line).get("kind") == "step" for line in lines if line.strip()):
                elapsed = time.perf_counter() - t0
                child.send_signal(signal.SIGTERM)
                child.wait(timeout=600)
                return elapsed
            time.sleep(0.05)
        raise RuntimeError(f"train.py ended before its first step: {child.stderr.read()[-2000:]}")
    finally:
        if child.poll() is None:
            child.kill()


def measure(folder: Path, args) -> dict:
    from simclr_dali.pipelines.augment import Augment
    from simclr_dali.pipelines.loader import Shard, train_loader
    from simclr_dali.pipelines.sources import list_images, load_source
    from simclr_dali.pipelines.verify import Screening

    row: dict = {"n": 0}
    t0 = time.perf_counter()
    files = list_images(folder)
    row["n"], row["listing_s"] = len(files), time.perf_counter() - t0
    for name in ("first_check_s", "cached_check_s"):  # the second start finds the first one's verdicts
        t0 = time.perf_counter()
        Screening("skip", args.workers)(files, folder)
        row[name] = time.perf_counter() - t0
    source = load_source(str(folder), "train", str(folder))
    t0 = time.perf_counter()
    loader = train_loader(source, batch_size=args.batch_size, size=args.image_size, aug=Augment(), shard=Shard(),
                          seed=0, epoch=0, workers=args.workers, device_id=None)
    next(iter(loader))
    row["pipeline_build_s"] = time.perf_counter() - t0
    del loader
    if args.train:
        with tempfile.TemporaryDirectory() as out:
            flags = ["--data", str(folder), "--test-data", str(folder), "--out", out, "--backbone", "test_resnet",
                     "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs", "1",
                     "--log-every", "1", "--workers", str(args.workers)]
            row["second_start_first_step_s"] = first_step_seconds(flags, Path(out))  # the verdicts are cached
            row["resume_first_step_s"] = first_step_seconds([*flags, "--resume"], Path(out))
    for key in [k for k in row if k.endswith("_s")]:
        row[key[:-2] + "_us_per_file"] = row[key] / row["n"] * 1e6
    return row


def startup_section(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root or scratch)
        cache = Path(scratch) / "cache"  # the verdicts of this measurement only: the first check decodes all
        previous = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = str(cache)
        try:
            for n in args.sizes:
                t0 = time.perf_counter()
                folder = make_folder(root, n, args.classes)
                print(f"{n} files in {folder} ({time.perf_counter() - t0:.0f} s to link)", flush=True)
                rows.append(measure(folder, args))
                shutil.rmtree(cache, ignore_errors=True)
        finally:
            if previous is None:
                os.environ.pop("XDG_CACHE_HOME", None)
            else:
                os.environ["XDG_CACHE_HOME"] = previous
    stages = ["listing", "first_check", "cached_check", "pipeline_build", "second_start_first_step",
              "resume_first_step"]
    table = [[r["n"], stage, r.get(f"{stage}_s"), r.get(f"{stage}_us_per_file")]
             for r in rows for stage in stages if f"{stage}_s" in r]
    print_table(f"startup: a folder of N 500x375 JPEGs in {args.classes} classes, {args.workers} threads",
                ["n", "stage", "seconds", "µs per file"], table)
    return rows
