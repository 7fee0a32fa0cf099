"""Evaluation protocols: frozen features (kNN, linear probe), semi-supervised fine-tuning on a
class-balanced fraction of the labels. (The online kNN monitor of training is training/monitor.py.)

Frozen protocols never give the backbone a gradient and run it in eval mode, so neither its weights
nor its BatchNorm running statistics change (tests/evaluation/test_evaluate.py checks both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simclr_dali.errors import UserError
from simclr_dali.models.features import extract


# -- frozen features --------------------------------------------------------------------------
def linear_probe_top1(train_x, train_y, test_x, test_y, *, epochs: int = 100, lr: float = 1e-3,
                      weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0,
                      device: torch.device | str | None = None) -> float:
    """A linear layer trained on standardised frozen features (the backbone never sees a gradient), on
    `device` (default: where the features are). Each batch is standardised as it is read, so the features are
    never copied whole on the host (16-bit features stay 16-bit; the probe's host memory is theirs plus a few
    batches). The initial weights and batch order come from `seed` alone, drawn on the CPU, whatever the
    device."""
    device = torch.device(device or train_x.device)
    gen = torch.Generator().manual_seed(seed)
    mean, std = column_stats(train_x)
    mean, std = mean.to(device), std.to(device)
    train_x, test_x = train_x.to(device), test_x.to(device)
    train_y, test_y = train_y.to(device), test_y.to(device)
    standard = lambda x: (x.float() - mean) / std  # noqa: E731
    classes = int(max(train_y.max(), test_y.max())) + 1
    layer = torch.nn.Linear(train_x.shape[1], classes)
    torch.nn.init.normal_(layer.weight, std=0.01, generator=gen)
    torch.nn.init.zeros_(layer.bias)
    layer.to(device)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(train_x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x), generator=gen).to(device).split(batch_size):
            loss = F.cross_entropy(layer(standard(train_x[idx])), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        right = sum((layer(standard(test_x[i:i + 4096])).argmax(1) == test_y[i:i + 4096]).sum().item()
                    for i in range(0, len(test_x), 4096))
    return right / len(test_x)


def column_stats(x: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's mean and standard deviation (n - 1 in the denominator, at least 1e-6) as float32,
    summed in float64 a block of rows at a time (no float32 copy of the whole)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), rows):
        block = x[i:i + rows].to("cpu", torch.float64)
        total += block.sum(0)
        squares += block.square().sum(0)
    n = len(x)
    mean = total / n
    var = ((squares - n * mean.square()) / max(1, n - 1)).clamp_min(0)
    return mean.float(), var.sqrt().float().clamp_min(1e-6)


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float | None:
    """Fraction of rows whose label is among the k largest logits; None with fewer than k classes."""
    if logits.shape[1] < k:
        return None
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()


# -- semi-supervised fine-tuning (SimCLR paper, section 6 / appendix B.5) -----------------------
def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced `fraction` of the labelled images: the same number per class
    (fraction * N / classes, at least 1, at most the smallest class), drawn with the seed. A fraction
    of 1 keeps every image, as the paper's 100% row does."""
    if not 0 < fraction <= 1:
        raise UserError(f"--label-fraction must be in (0, 1], got {fraction}")
    if fraction >= 1:
        return np.arange(len(labels))
    classes = np.unique(labels)
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    per_class = min(per_class, min(int((labels == c).sum()) for c in classes))
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(picked))


@dataclass
class FinetuneSettings:
    epochs: int  # passes over the labelled subset
    batch_size: int  # images per step
    lr: float  # SGD (Nesterov momentum 0.9) learning rate, cosine to zero, no weight decay
    augment: object  # pipelines.augment.Augment used for the labelled images
    image_size: int
    workers: int
    device_id: int | None
    seed: int = 0


def finetune_augment(run_aug: dict, on: bool):
    """The pretraining's crop and flip, with colour jitter, grayscale and blur off (on=False: none)."""
    from simclr_dali.pipelines.augment import Augment

    if not on:  # the whole image, squashed to a square, never flipped
        return Augment(crop_min_area=1.0, crop_max_area=1.0, crop_min_ratio=1.0, crop_max_ratio=1.0,
                       flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    keep = ("crop_min_area", "crop_max_area", "crop_min_ratio", "crop_max_ratio", "flip_p")
    return Augment(**{k: run_aug[k] for k in keep if k in run_aug}, jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def finetune(backbone: nn.Module, labelled, n_classes: int, test_loader, s: FinetuneSettings,
             device: torch.device) -> dict:
    """Fine-tune backbone + a linear head on `labelled` (a Source), then score it on `test_loader`.

    Every parameter trains, BatchNorm in train mode; the labelled batch is one augmented view from our
    training pipeline (pipelines.loader.one_view_pipeline: the pretraining's own DALI crop and flip). On a
    GPU the forward pass runs in bf16 autocast (weights and optimiser in float32) on a channels-last model,
    as training does; on the CPU in float32. Returns top-1 and top-5 (None with fewer than 5 classes) on the
    test set.
    """
    from simclr_dali.models.backbone import feature_width
    from simclr_dali.pipelines.loader import Shard, train_loader

    torch.manual_seed(s.seed)
    head = nn.Linear(feature_width(backbone), n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model = nn.Sequential(backbone, head).to(device)
    gpu = device.type == "cuda"
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    batch = min(s.batch_size, len(labelled))
    steps = s.epochs * (len(labelled) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    for epoch in range(s.epochs):
        loader = train_loader(labelled, batch_size=batch, size=s.image_size, aug=s.augment, shard=Shard(),
                              seed=s.seed, epoch=epoch, workers=s.workers, device_id=s.device_id,
                              channels_last=gpu, views=1)
        model.train()
        for view, y in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                logits = model(view.to(device))
            loss = F.cross_entropy(logits.float(), y.view(-1).long().to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        del loader  # one pipeline at a time
    logits, labels = extract(model, test_loader, device)
    return {"top1": top_k_accuracy(logits, labels, 1), "top5": top_k_accuracy(logits, labels, 5)}


def finetune_epochs(requested: int, fraction: float, n_labelled: int, batch_size: int, min_steps: int) -> int:
    """The paper's schedule (60 epochs at <= 1% labels, 30 above) unless `requested`, stretched to at
    least `min_steps` steps so that a handful of labelled images still gets a real run."""
    epochs = requested or (60 if fraction <= 0.01 else 30)
    per_epoch = n_labelled // min(batch_size, n_labelled)
    return max(epochs, math.ceil(min_steps / per_epoch))
