"""The SimCLR augmentation graph, written once for both devices.

`simclr_view` is one augmented view: random resized crop, colour jitter (with probability),
random grayscale, Gaussian blur (with probability), then flip + normalise fused in
crop_mirror_normalize. Flip commutes with the colour and blur steps, so fusing it at the end gives
the paper's distribution. Random decisions are DALI's own random operators (CPU argument inputs),
so they follow the pipeline seed on either device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types

from cli import setting

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class Augment:
    crop_min_area: float = setting(0.08, low=0, high=1, above=True)  # random resized crop: smallest fraction of the image area kept
    crop_max_area: float = setting(1.0, low=0, high=1, above=True)  # random resized crop: largest fraction of the image area kept
    crop_min_ratio: float = setting(3 / 4, low=0, above=True)  # random resized crop: smallest aspect ratio
    crop_max_ratio: float = setting(4 / 3, low=0, above=True)  # random resized crop: largest aspect ratio
    flip_p: float = setting(0.5, low=0, high=1)  # probability of a horizontal flip
    jitter_strength: float = setting(1.0, low=0)  # colour jitter s: brightness, contrast, saturation 0.8s; hue 0.2s
    jitter_p: float = setting(0.8, low=0, high=1)  # probability that colour jitter is applied
    gray_p: float = setting(0.2, low=0, high=1)  # probability of converting a view to grayscale
    blur_p: float = setting(0.5, low=0, high=1)  # probability of Gaussian blur (0 switches blur off, as for CIFAR)
    blur_sigma_min: float = setting(0.1, low=0, above=True)  # Gaussian blur: smallest sigma, in pixels
    blur_sigma_max: float = setting(2.0, low=0, above=True)  # Gaussian blur: largest sigma, in pixels
    blur_kernel_frac: float = setting(0.1, low=0, high=1, above=True)  # Gaussian blur: kernel side as a fraction of the output side

    ORDERED = (("crop_min_area", "crop_max_area"), ("crop_min_ratio", "crop_max_ratio"),
               ("blur_sigma_min", "blur_sigma_max"))  # each (smallest, largest) pair in order (cli.check_args)

    def jitter_ranges(self) -> dict[str, tuple[float, float]]:
        """Ranges of the colour_twist factors. DALI takes hue in degrees: 0.2s of a turn = 72s deg."""
        s = self.jitter_strength
        return {"brightness": (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s),
                "contrast": (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s),
                "saturation": (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s),
                "hue": (-0.2 * s * 360.0, 0.2 * s * 360.0)}

    def blur_window(self, size: int) -> int:
        """An odd kernel side, about blur_kernel_frac of the output side (at least 3)."""
        k = max(3, int(round(self.blur_kernel_frac * size)))
        return k if k % 2 == 1 else k + 1


def decode(encoded, gpu: bool):
    """Encoded bytes -> RGB HWC uint8; the one place a device is named for decoding."""
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)


def _uniform(low: float, high: float):
    """A per-sample uniform draw; a plain number when the range is one value (DALI wants high > low)."""
    return fn.random.uniform(range=[low, high]) if high > low else float(low)


def _coin(p: float):
    """A per-sample 0.0 / 1.0 that is 1.0 with probability p."""
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _factor(low: float, high: float, apply):
    """A per-sample factor: uniform in [low, high] where `apply` is 1, else the identity (1)."""
    return 1.0 + apply * (_uniform(low, high) - 1.0)


def color_jitter_and_gray(images, aug: Augment):
    """Colour jitter with probability jitter_p, then grayscale with probability gray_p, in one twist."""
    r = aug.jitter_ranges()
    apply = _coin(aug.jitter_p)
    keep_colour = 1.0 - _coin(aug.gray_p)
    return fn.color_twist(
        images,
        brightness=_factor(*r["brightness"], apply),
        contrast=_factor(*r["contrast"], apply),
        saturation=_factor(*r["saturation"], apply) * keep_colour,  # saturation 0 = grayscale
        hue=apply * _uniform(*r["hue"]),
    )


def gaussian_blur(images, size: int, aug: Augment):
    """Blur with probability blur_p (conditional execution: unblurred samples cost nothing)."""
    if aug.blur_p <= 0:
        return images
    if fn.random.coin_flip(probability=aug.blur_p, dtype=types.BOOL):
        sigma = _uniform(aug.blur_sigma_min, aug.blur_sigma_max)
        # Taps beyond 3 sigma carry 0.3% of the weight: a per-sample window of 2*ceil(3 sigma)+1,
        # capped at the paper's tenth of the side, gives the same blur at a fraction of the cost
        # (a 23-tap kernel at 224 px made blur the slowest operator).
        if isinstance(sigma, float):
            window = min(2 * math.ceil(3 * sigma) + 1, aug.blur_window(size))
        else:
            window = dmath.min(2 * fn.cast(dmath.ceil(3.0 * sigma), dtype=types.INT32) + 1,
                               aug.blur_window(size))
        images = fn.gaussian_blur(images, window_size=window, sigma=sigma)
    return images


def normalize(images, mirror=0, layout: str = "CHW"):
    """uint8 HWC -> float32 CHW (or HWC, for channels-last models) with ImageNet statistics, optionally
    mirrored (fused)."""
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT, output_layout=layout,
                                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def simclr_view(images, size: int, aug: Augment, layout: str = "CHW"):
    """One independently augmented view (N, 3, size, size), or (N, size, size, 3) for layout HWC."""
    views = fn.random_resized_crop(images, size=[size, size],
                                   random_area=[aug.crop_min_area, aug.crop_max_area],
                                   random_aspect_ratio=[aug.crop_min_ratio, aug.crop_max_ratio])
    views = color_jitter_and_gray(views, aug)
    views = gaussian_blur(views, size, aug)
    return normalize(views, mirror=fn.random.coin_flip(probability=aug.flip_p), layout=layout)


def center_view(images, size: int, layout: str = "CHW"):
    """The evaluation view: resize the shorter side to `size`, centre crop, normalise."""
    images = fn.resize(images, resize_shorter=size)
    return fn.crop_mirror_normalize(images, crop=[size, size], dtype=types.FLOAT, output_layout=layout,
                                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
