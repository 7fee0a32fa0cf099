"""The comparison point for `benchmark.py pipeline`: the same two-view SimCLR augmentations done the
usual way, with torchvision transforms on PIL images in a DataLoader with worker processes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from simclr_dali.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, Augment
from simclr_dali.pipelines.sources import Source


def simclr_transform(size: int, aug: Augment):
    """One view's augmentations (`aug` holds one value per setting: Augment.views) as torchvision spells them
    (PIL image -> normalised tensor)."""
    from torchvision import transforms as T

    steps = [
        T.RandomResizedCrop(size, scale=(aug.crop_min_area, aug.crop_max_area),
                            ratio=(aug.crop_min_ratio, aug.crop_max_ratio)),
        T.RandomHorizontalFlip(aug.flip_p),
        T.RandomApply([T.ColorJitter(**aug.jitter_amounts())], p=aug.jitter_p),
        T.RandomGrayscale(aug.gray_p),
    ]
    if aug.blur_p > 0:
        steps.append(T.RandomApply([T.GaussianBlur(aug.blur_window(size), (aug.blur_sigma_min, aug.blur_sigma_max))],
                                   p=aug.blur_p))
    if aug.solarize_p > 0:
        steps.append(T.RandomSolarize(SOLARIZE_THRESHOLD, p=aug.solarize_p))
    steps += [T.ToTensor(), T.Normalize([m / 255 for m in IMAGENET_MEAN], [s_ / 255 for s_ in IMAGENET_STD])]
    return T.Compose(steps)


class TwoViews(Dataset):
    """Decode once (PIL), augment twice, each view with its settings."""

    def __init__(self, source: Source, size: int, aug: Augment):
        self.source, self.transforms = source, [simclr_transform(size, view) for view in aug.views()]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        from PIL import Image

        if self.source.encoded:
            with Image.open(self.source.files[i]) as f:
                image = f.convert("RGB")
        else:
            image = Image.fromarray(self.source.images[i])
        first, second = self.transforms
        return first(image), second(image), int(self.source.labels[i])


def torchvision_loader(source: Source, *, batch_size: int, size: int, aug: Augment, workers: int,
                       seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """pin_memory: batches in page-locked memory, for fast copies to a GPU (as GPU training sets it)."""
    return DataLoader(TwoViews(source, size, aug), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0, prefetch_factor=2 if workers else None,
                      pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=lambda w: np.random.seed(seed + w))
