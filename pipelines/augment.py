"""The SimCLR augmentation graph, written once for both devices.

`augmented_views` gives independently augmented views of each image, each with its own settings: random resized
crop, colour jitter (with probability) and random grayscale as one colour map per view, Gaussian blur (with
probability), solarisation (with probability, BYOL), then flip + normalise fused in crop_mirror_normalize;
`two_views` gives view 1 and view 2. Flip commutes with the colour, blur and solarisation steps, so fusing it at the
end gives the paper's distribution. Random decisions are DALI's own random operators (CPU argument inputs), so they
follow the pipeline seed on either device; the views' colour draws are one vector per image.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types

from simclr_dali.errors import UserError
from simclr_dali.pipelines import EVAL_CROP
from simclr_dali.pipelines.colour import colour, uniform
from simclr_dali.settings import setting, tracks_given

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


PerView = float | tuple[float, float]  # one value for both views, or (view 1, view 2)


@tracks_given
@dataclass
class Augment:
    """The augmentations of the two views. Every setting is one value for both views, or a pair (view 1, view 2)
    where a method's paper makes them differ (BYOL's blur and solarisation); `views()` splits them."""
    crop_min_area: PerView = setting(0.08, low=0, high=1, above=True, help="random resized crop: smallest fraction of "
                                     "the image area kept")
    crop_max_area: PerView = setting(1.0, low=0, high=1, above=True, help="random resized crop: largest fraction of "
                                     "the image area kept")
    crop_min_ratio: PerView = setting(3 / 4, low=0, above=True, help="random resized crop: smallest aspect ratio")
    crop_max_ratio: PerView = setting(4 / 3, low=0, above=True, help="random resized crop: largest aspect ratio")
    flip_p: PerView = setting(0.5, low=0, high=1, help="probability of a horizontal flip")
    jitter_strength: PerView = setting(1.0, low=0, help="colour jitter strength s, which scales the four ranges below")
    jitter_brightness: PerView = setting(0.8, low=0, help="colour jitter: brightness factor in [1 - b s, 1 + b s] (b, "
                                         "at s = 1)")
    jitter_contrast: PerView = setting(0.8, low=0, help="colour jitter: contrast factor in [1 - c s, 1 + c s] (c, at s "
                                       "= 1)")
    jitter_saturation: PerView = setting(0.8, low=0, help="colour jitter: saturation factor in [1 - a s, 1 + a s] (a, "
                                         "at s = 1)")
    jitter_hue: PerView = setting(0.2, low=0, high=0.5, help="colour jitter: hue turned by up to h s of a full turn "
                                  "(h, at s = 1)")
    jitter_p: PerView = setting(0.8, low=0, high=1, help="probability that colour jitter is applied")
    jitter_clip: PerView = setting(0, choices=(0, 1), help="1: colour jitter step by step, each step clipped to "
                                   "0..255 as torchvision does (slower); 0: the steps as one colour map, clipped once")
    gray_p: PerView = setting(0.2, low=0, high=1, help="probability of converting a view to grayscale")
    blur_p: PerView = setting(0.5, low=0, high=1, help="probability of Gaussian blur (0 switches blur off, as for "
                              "CIFAR)")
    blur_sigma_min: PerView = setting(0.1, low=0, above=True, help="Gaussian blur: smallest sigma, in pixels")
    blur_sigma_max: PerView = setting(2.0, low=0, above=True, help="Gaussian blur: largest sigma, in pixels")
    blur_kernel_frac: PerView = setting(0.1, low=0, high=1, above=True, help="Gaussian blur: kernel side as a fraction "
                                        "of the output side")
    solarize_p: PerView = setting(0.0, low=0, high=1, help="probability of solarisation: levels of 128 and above "
                                  "inverted (BYOL)")

    ORDERED = (("crop_min_area", "crop_max_area"), ("crop_min_ratio", "crop_max_ratio"),
               ("blur_sigma_min", "blur_sigma_max"))  # each (smallest, largest) pair in order (cli.check_args)

    def __post_init__(self):  # flags and config.json give lists: one value, or a pair where the views differ
        for f in fields(self):
            setattr(self, f.name, per_view(getattr(self, f.name)))

    def views(self) -> tuple["Augment", "Augment"]:
        """(view 1, view 2), each holding one value per setting."""
        def view(i: int) -> Augment:
            return Augment(**{f.name: v[i] if isinstance(v, (tuple, list)) else v
                              for f in fields(self) for v in [getattr(self, f.name)]})
        return view(0), view(1)

    def jitter_amounts(self) -> dict[str, float]:
        """One view's torchvision ColorJitter(brightness, contrast, saturation, hue): b s, c s, a s, h s."""
        return {k: getattr(self, f"jitter_{k}") * self.jitter_strength
                for k in ("brightness", "contrast", "saturation", "hue")}

    def jitter_ranges(self) -> dict[str, tuple[float, float]]:
        """Ranges of one view's colour_twist factors (jitter_amounts as torchvision reads them). DALI takes hue in
        degrees: h s of a turn = 360 h s degrees."""
        amount = self.jitter_amounts()
        ranges = {k: (max(0.0, 1 - amount[k]), 1 + amount[k]) for k in ("brightness", "contrast", "saturation")}
        return {**ranges, "hue": (-amount["hue"] * 360.0, amount["hue"] * 360.0)}

    def blur_window(self, size: int) -> int:
        """An odd kernel side, about blur_kernel_frac of the output side (at least 3), for one view."""
        k = max(3, int(round(self.blur_kernel_frac * size)))
        return k if k % 2 == 1 else k + 1


def per_view(values) -> PerView:
    """Flag or recorded values as a setting: one value (or two equal ones) for both views, else (view 1, view 2)."""
    if not isinstance(values, (tuple, list)):
        return values
    if not 1 <= len(values) <= 2:
        raise UserError(f"an augmentation setting takes one value (both views) or two (view 1, view 2), "
                        f"got {len(values)}: {' '.join(map(str, values))}")
    return values[0] if len(values) == 1 or values[0] == values[1] else tuple(values)


# -- decoding only what is an image ------------------------------------------------------------------
# DALI's decoder meets whatever a file or shard member holds once training runs: text, zero bytes, a GIF,
# an empty member where a sample has no image. Handed such bytes it fails the whole pipeline, and has been
# seen to take the process down with it (SIGSEGV) instead of raising. So the first bytes of every sample
# are compared in the graph with the signatures of the formats it decodes (pipelines.verify.MAGIC, the one
# table): a sample that matches none is never decoded. A tiny grey JPEG takes its place, and the pipeline's
# `unreadable` output says which sample it was (the Loader names its file in one sentence).
def signature_masks() -> tuple[np.ndarray, np.ndarray]:
    """(signatures, masks), (K, HEAD_BYTES) uint8 each: sample bytes b match signature k where
    (b ^ signatures[k]) & masks[k] is all zero."""
    from simclr_dali.pipelines.verify import HEAD_BYTES, SIGNATURES

    sigs, masks = np.zeros((len(SIGNATURES), HEAD_BYTES), np.uint8), np.zeros((len(SIGNATURES), HEAD_BYTES), np.uint8)
    for k, parts in enumerate(SIGNATURES):
        for offset, magic in parts:
            sigs[k, offset:offset + len(magic)] = np.frombuffer(magic, np.uint8)
            masks[k, offset:offset + len(magic)] = 0xFF
    return sigs, masks


def grey_jpeg() -> np.ndarray:
    """An 8x8 mid-grey JPEG's bytes: what an unreadable sample is decoded as (its views are never trained on)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "JPEG", quality=50)
    return np.frombuffer(buf.getvalue(), np.uint8)


def unreadable_sample(encoded):
    """Per sample, whether its first bytes match no signature of a format the decoder reads (an empty sample
    included: it is padded with zeros). CPU operators before the decoder, whatever the device: a slice, a
    reshape, one arithmetic expression, two reductions and a comparison, once per image (not per view)."""
    from simclr_dali.pipelines.verify import HEAD_BYTES

    sigs, masks = signature_masks()
    head = fn.slice(encoded, start=[0], shape=[HEAD_BYTES], axes=[0], out_of_bounds_policy="pad", fill_values=0)
    mismatch = (fn.reshape(head, shape=[1, HEAD_BYTES]) ^ types.Constant(sigs)) & types.Constant(masks)
    return fn.reductions.min(fn.reductions.max(mismatch, axes=[1])) != 0


def decode(encoded, gpu: bool):
    """Encoded bytes -> (RGB HWC uint8 images, per-sample `unreadable` flags); the one place a device is named
    for decoding. Needs the pipeline's conditionals (enable_conditionals=True)."""
    unreadable = unreadable_sample(encoded)
    if unreadable:
        encoded = types.Constant(grey_jpeg())
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB), unreadable


def gaussian_kernel(sigma, window: int):
    """The (window, window) Gaussian of `sigma` (per image), normalised: the outer product of the normalised 1-D
    taps exp(-x^2 / 2 sigma^2), computed at once from the squared distances."""
    x = np.arange(window, dtype=np.float32) - window // 2
    taps = dmath.exp(types.Constant(-(x[:, None] ** 2 + x[None, :] ** 2) / 2) / (sigma * sigma))
    return taps / fn.reductions.sum(taps)


def gaussian_blur(images, size: int, aug: Augment):
    """Blur with probability blur_p (conditional execution: unblurred samples cost nothing)."""
    if aug.blur_p <= 0:
        return images
    if fn.random.coin_flip(probability=aug.blur_p, dtype=types.BOOL):
        sigma = uniform(aug.blur_sigma_min, aug.blur_sigma_max)
        # Taps beyond 3 sigma carry 0.3% of the weight: a per-sample window of 2*ceil(3 sigma)+1,
        # capped at the paper's tenth of the side, gives the same blur at a fraction of the cost
        # (a 23-tap kernel at 224 px made blur the slowest operator).
        cap = aug.blur_window(size)
        if isinstance(sigma, float):
            window = min(2 * math.ceil(3 * sigma) + 1, cap)
        elif cap <= 2 * math.ceil(3 * aug.blur_sigma_min) + 1:
            window = cap  # every sigma gets the cap (3 taps below 35 px): one size for the batch
        elif cap >= 2 * math.ceil(3 * aug.blur_sigma_max) + 1:
            window = None  # no sigma reaches the cap: gaussian_blur's own window, 2 ceil(3 sigma) + 1, per sample
        else:
            window = dmath.min(2 * fn.cast(dmath.ceil(3.0 * sigma), dtype=types.INT32) + 1, cap)
        # `window` is a number, or a DataNode (a size per sample) whose truth value DALI refuses: test its type
        # first. A 3-tap window for the whole batch is one 2-D filter, quicker on a CPU than gaussian_blur's
        # per-image kernel set-up.
        if isinstance(window, int) and window == 3:
            kernel = gaussian_kernel(sigma, window)
            images = fn.filter(images, kernel.gpu() if images.device == "gpu" else kernel)
        elif window is None:
            images = fn.gaussian_blur(images, sigma=sigma)
        else:
            images = fn.gaussian_blur(images, window_size=window, sigma=sigma)
    return images


SOLARIZE_THRESHOLD = 128  # BYOL's solarisation inverts intensities of 0.5 and above: 128 and above in uint8


def solarize(images):
    """Levels of SOLARIZE_THRESHOLD and above inverted (x -> 255 - x), torchvision's solarize on uint8: one table
    lookup per pixel, the same on either device."""
    levels = range(256)
    return fn.lookup_table(images, keys=list(levels), values=[x if x < SOLARIZE_THRESHOLD else 255 - x for x in levels],
                           dtype=types.UINT8)


def random_solarize(images, aug: Augment):
    """Solarisation with probability solarize_p (conditional execution: the others cost nothing)."""
    if aug.solarize_p <= 0:
        return images
    if fn.random.coin_flip(probability=aug.solarize_p, dtype=types.BOOL):
        images = solarize(images)
    return images


def normalize(images, mirror=0, layout: str = "CHW"):
    """uint8 HWC -> float32 CHW (or HWC, for channels-last models) with ImageNet statistics, optionally
    mirrored (fused)."""
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT, output_layout=layout,
                                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def crop(images, size: int, aug: Augment):
    """A random resized crop, size x size."""
    return fn.random_resized_crop(images, size=[size, size], random_area=[aug.crop_min_area, aug.crop_max_area],
                                  random_aspect_ratio=[aug.crop_min_ratio, aug.crop_max_ratio])


def augmented_views(images, size: int, augs: list[Augment], layout: str = "CHW") -> list:
    """Independently augmented views (N, 3, size, size), or (N, size, size, 3) for layout HWC, one per entry of
    `augs` (each one view's settings, Augment.views): crop, colour (jitter and grayscale), blur, solarisation, then
    flip fused into the normalisation (flip commutes with the pixel-wise and symmetric steps)."""
    views = [crop(images, size, aug) for aug in augs]
    views = colour(views, augs, size)
    return [normalize(random_solarize(gaussian_blur(x, size, aug), aug), mirror=fn.random.coin_flip(
        probability=aug.flip_p), layout=layout) for x, aug in zip(views, augs)]


def simclr_view(images, size: int, aug: Augment, layout: str = "CHW"):
    """One augmented view with one view's settings."""
    return augmented_views(images, size, [aug], layout)[0]


def two_views(images, size: int, aug: Augment, layout: str = "CHW"):
    """View 1 and view 2 of each image, each with its own settings where they differ."""
    return tuple(augmented_views(images, size, list(aug.views()), layout))


def center_view(images, size: int, layout: str = "CHW", crop: float = EVAL_CROP):
    """The evaluation view: resize the shorter side to size / crop, centre crop size x size, normalise
    (crop 1 keeps the whole resized image)."""
    images = fn.resize(images, resize_shorter=math.floor(size / crop + 1e-6))
    return fn.crop_mirror_normalize(images, crop=[size, size], dtype=types.FLOAT, output_layout=layout,
                                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
