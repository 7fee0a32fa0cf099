"""A peer to measure against: SimCLR the way most users write it, with torchvision transforms in a
DataLoader, a timm backbone with a projection head, lightly's NTXentLoss, and SGD with warmup and
cosine. It writes a run folder that `evaluate.py --run OUT` scores exactly as it scores ours.

    pip install lightly==1.6.0 --no-deps   # its NTXentLoss needs torch alone (bench/compare.sh does this)
    python -m bench.peer --data digits --out runs/peer --epochs 10 --batch-size 256

The recipe is that of lightly's own CIFAR-10 benchmark script (cifar10_benchmark.py in its docs): crop
0.08-1, flip, colour jitter of strength 0.5 with probability 0.8, grayscale 0.2, no blur (lightly's
SimCLRTransform with cj_strength=0.5, gaussian_blur=0.0), a Linear-BN-ReLU-Linear head to 128,
NTXentLoss at its default temperature 0.5, SGD momentum 0.9, lr 0.06 x B/128, weight decay 5e-4, here
with a one-epoch linear warmup before the cosine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


class TwoViews(torch.utils.data.Dataset):
    """The images of one of our Sources (the same data our runs read), each as two augmented views."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        from PIL import Image
        if self.source.images is not None:
            image = Image.fromarray(self.source.images[i])
        else:
            image = Image.open(self.source.files[i]).convert("RGB")
        return self.transform(image), self.transform(image)


def transform(size: int):
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                      T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def main(argv: list[str] | None = None) -> int:
    import timm
    from lightly.loss import NTXentLoss
    from safetensors.torch import save_file

    from simclr_dali.pipelines.sources import load_source

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.06, help="SGD learning rate per 128 images (lightly's 0.06)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    source = load_source(args.data, "train")
    loader = torch.utils.data.DataLoader(TwoViews(source, transform(args.image_size)), batch_size=args.batch_size,
                                         shuffle=True, drop_last=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)
    backbone = timm.create_model(args.backbone, pretrained=False, num_classes=0)
    width = backbone.num_features
    model = nn.Sequential(backbone, nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 128))
    criterion = NTXentLoss(temperature=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * args.batch_size / 128, momentum=0.9,
                                weight_decay=5e-4)
    steps, warmup = args.epochs * len(loader), len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    records, seen = [], 0
    for epoch in range(args.epochs):
        model.train()
        t0, total = time.perf_counter(), 0.0
        for x0, x1 in loader:
            loss = criterion(model(x0), model(x1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
            seen += x0.shape[0]
        rate = len(loader) * args.batch_size / (time.perf_counter() - t0)
        records.append({"kind": "epoch", "epoch": epoch + 1, "loss": total / len(loader), "images_per_s": rate})
        print(f"epoch {epoch + 1}: loss {total / len(loader):.4f}, {rate:.0f} images/s", flush=True)

    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(out / "backbone.safetensors"))
    wall = time.perf_counter() - start
    config = {"backbone": args.backbone, "image_size": args.image_size, "data": args.data, "test_data": "",
              "small_stem": False, "method": "peer: torchvision + lightly NTXentLoss + SGD", "epochs": args.epochs,
              "batch_size": args.batch_size, "n_train": len(source), "wall_s": wall,
              "median_images_per_s": float(np.median([r["images_per_s"] for r in records]))}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"peer: {seen} images in {wall:.1f} s -> {out / 'backbone.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
