"""The comparison point for `benchmark.py pipeline`: the same two-view SimCLR augmentations done the best ways
torchvision offers, in a DataLoader with persistent worker processes and, for a GPU, pinned memory. Two styles,
as the fastest depends on the image size: its transforms v2 on uint8 tensors (converted to float only at the
end), and its classic transforms on PIL images. Pillow decodes for both.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from simclr_dali.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, Augment
from simclr_dali.pipelines.sources import Source

STYLES = ("tensor", "pil")  # transforms v2 on uint8 tensors; transforms (v1) on PIL images


def simclr_transform(size: int, aug: Augment, style: str = "tensor"):
    """One view's augmentations (`aug` holds one value per setting: Augment.views) as torchvision spells them:
    uint8 CHW tensor (style "tensor") or PIL image ("pil") -> normalised float32 tensor."""
    if style == "tensor":
        from torchvision.transforms import v2 as T
        to_float = [T.ToDtype(torch.float32, scale=True)]
    else:
        from torchvision import transforms as T
        to_float = [T.ToTensor()]
    steps = [
        T.RandomResizedCrop(size, scale=(aug.crop_min_area, aug.crop_max_area),
                            ratio=(aug.crop_min_ratio, aug.crop_max_ratio), antialias=True),
        T.RandomHorizontalFlip(aug.flip_p),
        T.RandomApply([T.ColorJitter(**aug.jitter_amounts())], p=aug.jitter_p),
        T.RandomGrayscale(aug.gray_p),
    ]
    if aug.blur_p > 0:
        steps.append(T.RandomApply([T.GaussianBlur(aug.blur_window(size), (aug.blur_sigma_min, aug.blur_sigma_max))],
                                   p=aug.blur_p))
    if aug.solarize_p > 0:
        steps.append(T.RandomSolarize(SOLARIZE_THRESHOLD, p=aug.solarize_p))
    steps += to_float + [T.Normalize([m / 255 for m in IMAGENET_MEAN], [s_ / 255 for s_ in IMAGENET_STD])]
    return T.Compose(steps)


class TwoViews(Dataset):
    """Decode once, augment twice, each view with its settings."""

    def __init__(self, source: Source, size: int, aug: Augment, style: str = "tensor"):
        self.source, self.style = source, style
        self.transforms = [simclr_transform(size, view, style) for view in aug.views()]

    def __len__(self) -> int:
        return len(self.source)

    def image(self, i: int):
        """Decoded by Pillow (torchvision's own decoders are deprecated for TorchCodec's): a PIL image, or its
        pixels as a uint8 CHW tensor."""
        from PIL import Image

        if not self.source.encoded:
            image = Image.fromarray(self.source.images[i])
        else:
            with Image.open(self.source.files[i]) as f:
                image = f.convert("RGB")
        return image if self.style == "pil" else torch.from_numpy(np.array(image)).permute(2, 0, 1)

    def __getitem__(self, i: int):
        image = self.image(i)
        first, second = self.transforms
        return first(image), second(image), int(self.source.labels[i])


def torchvision_loader(source: Source, *, batch_size: int, size: int, aug: Augment, workers: int,
                       seed: int = 0, pin_memory: bool = False, style: str = "tensor") -> DataLoader:
    """pin_memory: batches in page-locked memory, for fast copies to a GPU (as GPU training sets it)."""
    return DataLoader(TwoViews(source, size, aug, style), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0, prefetch_factor=2 if workers else None,
                      pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=lambda w: np.random.seed(seed + w))
