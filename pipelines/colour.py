"""Colour jitter and random grayscale, the two ways: one colour map per view (the default) and torchvision's steps
one after another, each clipped (jitter_clip=1). Written once for both devices; tests/data/test_colour_map.py and
test_colour.py hold them against torchvision. `aug` is one view's settings (augment.Augment, which imports this
module)."""
from __future__ import annotations

import math

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types


def uniform(low: float, high: float):
    """A per-sample uniform draw; a plain number when the range is one value (DALI wants high > low)."""
    return fn.random.uniform(range=[low, high]) if high > low else float(low)


# -- colour jitter step by step (jitter_clip=1), as torchvision's ColorJitter and the paper's code run it ----------
# Brightness and contrast blend the image with a reference as torchvision's adjust_* do, black and the image's own
# mean grey, and clip to uint8. Saturation (a blend with each pixel's grey) and hue run as one DALI op, hsv: scaling
# and rotating the chroma commute, so one op drops only the clip between them, and one pass over the pixels costs
# half of two. DALI's hue rotates the chroma plane (YIQ) where
# torchvision shifts H in HSV (tests/data/test_colour.py measures both differences). The order of the three steps is
# drawn per image, as torchvision draws randperm(4): one of their 6 orders.
def order_of(position: int, brightness_first: bool) -> tuple[str, ...]:
    """The steps in the order that random_order's (colour position, brightness first) names."""
    steps = ["brightness", "contrast"] if brightness_first else ["contrast", "brightness"]
    steps.insert(position, "colour")
    return tuple(steps)


ORDERS = {(p, first): order_of(p, first) for p in range(3) for first in (True, False)}  # the 6 orders


def brightness(images, factor):
    """factor * x (torchvision's adjust_brightness: a blend with black)."""
    return fn.brightness_contrast(images, brightness=factor)


def mean_grey(images):
    """Each image's mean luma (ITU-R 601 weights, as torchvision's rgb_to_grayscale), a scalar on the images'
    device."""
    return fn.reductions.mean(fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY))


def contrast_blend(images, factor):
    """factor * x + (1 - factor) * mean grey by arithmetic, rounded and saturated to uint8 by the cast: contrast
    where the mean is GPU data, which DALI cannot take as an operator's argument."""
    return fn.cast(images * factor + mean_grey(images) * (1.0 - factor), dtype=types.UINT8)


def contrast(images, factor):
    """A blend toward the image's own mean grey (torchvision's adjust_contrast), not DALI's fixed 128: on a dark
    image the fixed centre would brighten it too. On the host the mean is brightness_contrast's centre, one pass
    over the pixels; on the GPU it is data there, so the blend is arithmetic (contrast_blend)."""
    if images.device == "gpu":
        return contrast_blend(images, factor)
    return fn.brightness_contrast(images, contrast=factor, contrast_center=mean_grey(images))


def saturation_and_hue(images, saturation=1.0, degrees=0.0):
    """Chroma (YIQ) scaled by `saturation` and rotated by `degrees`, in one pass. Scaling the chroma is torchvision's
    adjust_saturation (a blend with the pixel's luma); the rotation is DALI's hue, not torchvision's HSV shift."""
    return fn.hsv(images, saturation=saturation, hue=degrees)


def jitter_factors(aug) -> dict:
    """A factor per jitter_ranges key, each uniform in its range (hue in degrees), drawn per image."""
    return {name: uniform(low, high) for name, (low, high) in aug.jitter_ranges().items()}


def random_order():
    """(colour position, brightness first): 0, 1 or 2 and a bool, uniform and independent, so each of the 6
    orders of the three steps has probability 1/6 (ORDERS)."""
    return fn.random.choice(3), fn.random.coin_flip(probability=0.5, dtype=types.BOOL)


def color_jitter(images, factors, order):
    """Brightness, contrast and colour (saturation and hue) in `order` (random_order's pair), each with its factor
    (factors: a node or number per jitter_ranges key). Conditional execution: each image runs each step once."""
    position, brightness_first = order
    first, middle, last = position == 0, position == 1, position == 2

    def colour(x):
        return saturation_and_hue(x, factors["saturation"], factors["hue"])

    if first:
        images = colour(images)
    if brightness_first:
        images = brightness(images, factors["brightness"])
        if middle:
            images = colour(images)
        images = contrast(images, factors["contrast"])
    else:
        images = contrast(images, factors["contrast"])
        if middle:
            images = colour(images)
        images = brightness(images, factors["brightness"])
    if last:
        images = colour(images)
    return images


def grayscale(images):
    """Luma in all three channels (torchvision's rgb_to_grayscale with 3 output channels)."""
    grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return fn.color_space_conversion(grey, image_type=types.GRAY, output_type=types.RGB)


def color_jitter_and_gray(images, aug):
    """Colour jitter with probability jitter_p, then grayscale with probability gray_p (conditional execution:
    images that skip a step cost nothing there)."""
    if fn.random.coin_flip(probability=aug.jitter_p, dtype=types.BOOL):
        images = color_jitter(images, jitter_factors(aug), random_order())
    if fn.random.coin_flip(probability=aug.gray_p, dtype=types.BOOL):
        images = grayscale(images)
    return images


# -- colour jitter and grayscale as one affine map per view -------------------------------------------
# torchvision's four jitter steps are affine in RGB where nothing clips: brightness scales; saturation blends each
# pixel with its luma grey; hue, as DALI turns it, rotates the chroma plane (YIQ's I and Q) about the grey axis; and
# contrast blends with the image's mean grey, which after affine steps is the same map applied to the original mean.
# Each step keeps grey grey, and saturation and hue keep luma, so the four commute: in any of the 24 orders a view's
# jitter is the one map  x -> a GREY x + p CHROMA x + q TURN x + r 1,  with a = b c, p + iq = b c s e^(ih) and
# r = b (1 - c) m (m: the view's mean luma, in levels). Grayscale after it zeroes p and q; no jitter is (1, 1, 0, 0).
# So a view's whole colour step is one coord_transform with a 3x4 matrix built per image from its draws: one pass
# over the pixels, rounded and saturated to uint8 once, where the steps take four passes and the branches of a drawn
# order. What it gives up is the clip to 0..255 between steps: tests/data/test_colour_map.py measures it against
# torchvision over the recipes' ranges; jitter_clip=1 keeps the step-by-step path.
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as DALI's GRAY and its hsv's Y
YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
GREY = np.outer(np.ones(3), LUMA)  # x -> its luma, in all three channels
CHROMA = np.eye(3) - GREY  # x -> what is not grey in it
TURN = np.linalg.inv(YIQ) @ np.array([[0, 0, 0], [0, 0, 1], [0, -1, 0]]) @ YIQ  # a quarter turn of the chroma
TERM_MATRICES = np.stack([np.hstack([m, np.zeros((3, 1))]) for m in (GREY, CHROMA, TURN)]
                         + [np.hstack([np.zeros((3, 3)), np.ones((3, 1))])])  # (4, 3, 4): what a, p, q, r multiply
NO_JITTER = np.array([[1], [1], [0], [0]], np.float32)  # (a, p, q, r) of the identity, a column
CHROMA_TERMS = np.array([[0], [1], [1], [0]], np.float32)  # the terms grayscale zeroes


def jitter_terms(b, c, s, h):
    """(a, p, q, r / m) of a jitter with brightness b, contrast c, saturation s and hue h radians (nodes of one value
    per view, or numbers)."""
    bc = b * c
    bcs = bc * s
    return bc, bcs * dmath.cos(h), bcs * dmath.sin(h), b - bc


def _const(values) -> types.Constant:
    return types.Constant(np.asarray(values, np.float32))


def view_uniform(ranges: list[tuple[float, float]]):
    """Per image, one uniform draw per view (a vector), view i's in ranges[i]: one operator where the views share
    the range."""
    lows, highs = (np.array(v, np.float32) for v in zip(*ranges))
    if len(set(ranges)) == 1:
        low, high = ranges[0]
        return fn.random.uniform(range=[low, high], shape=[len(ranges)]) if high > low else _const(lows)
    return fn.random.uniform(range=[0, 1], shape=[len(ranges)]) * _const(highs - lows) + _const(lows)


def view_coin(probabilities: list[float]):
    """Per image, one coin per view (a uint8 vector: 1 with view i's probability, else 0)."""
    if len(set(probabilities)) == 1:
        return fn.random.coin_flip(probability=probabilities[0], shape=[len(probabilities)], dtype=types.UINT8)
    return fn.cast(fn.random.uniform(range=[0, 1], shape=[len(probabilities)]) < _const(probabilities),
                   dtype=types.UINT8)


def mean_colour(images):
    """Each image's mean (r, g, b), in levels, on the images' device."""
    return fn.reductions.mean(images, axes=[0, 1], dtype=types.FLOAT)


def luma(colours):
    """The luma of (..., 3) colours: (..., 1)."""
    return fn.coord_transform(colours, M=LUMA[None].astype(np.float32))


SKIP_FROM = 64  # views of this side and more skip their map where both coins came up 0 (colour, `skip`)


def colour(views: list, augs: list, size: int = 0) -> list:
    """Colour jitter (with probability jitter_p, in effect any of its orders) and grayscale (with probability gray_p)
    of each view (augs: each view's settings), each one coord_transform. All views' draws are one vector per image,
    so the graph holds one set of operators for the matrices, whatever the number of views. Views of `size`
    SKIP_FROM and more skip the map where it is the identity (both coins 0: 16% of views at the defaults), through
    a conditional branch: there the map's pass over the pixels costs far more than the branch's few operators,
    which below that cost about as much as they save (docs/results.md, The pipeline)."""
    if any(a.jitter_clip for a in augs):  # the step-by-step path for the views that ask for it
        mapped = colour([x for x, a in zip(views, augs) if not a.jitter_clip], [a for a in augs if not a.jitter_clip],
                        size)
        return [color_jitter_and_gray(x, a) if a.jitter_clip else mapped.pop(0) for x, a in zip(views, augs)]
    jitter_p, gray_p = [a.jitter_p for a in augs], [a.gray_p for a in augs]
    if not any(jitter_p) and not any(gray_p):
        return views
    factors = None
    if any(jitter_p):
        ranges = [a.jitter_ranges() for a in augs]
        factors = {k: view_uniform([r[k] for r in ranges]) for k in ("brightness", "contrast", "saturation")}
        factors["hue"] = view_uniform([(math.radians(r["hue"][0]), math.radians(r["hue"][1])) for r in ranges])
    return coloured(views, factors, view_coin(jitter_p) if any(jitter_p) and min(jitter_p) < 1 else None,
                    view_coin(gray_p) if any(gray_p) else None, [bool(j or g) for j, g in zip(jitter_p, gray_p)],
                    skip=size >= SKIP_FROM)


def coloured(views: list, factors: dict | None, jitter=None, gray=None, which: list[bool] | None = None,
             skip: bool = False) -> list:
    """Each view through its colour map: `factors` (brightness, contrast, saturation, hue in radians: each a vector
    of one value per view, per image; None: no jitter) where the `jitter` coins (a vector; None: always) are 1, then
    grayscale where the `gray` coins are 1 (None: never); views whose `which` is False are left as they are. With
    `skip`, an image whose coins are both 0 for a view skips that view's map (the identity: the same pixels).

    On the GPU the mean luma is data there, which DALI cannot take as an argument: the matrices hold a, p and q, and
    the offset r is added by arithmetic in float and rounded by the cast, one more pass there."""
    n, gpu = len(views), views[0].device == "gpu"
    k = 3 if gpu else 4  # the terms the matrices hold
    terms, offset = _const(NO_JITTER[:k]), None  # offset: the GPU's r per level of mean luma, one per view
    if factors is not None:
        a, p, q, r_per_level = jitter_terms(*(factors[key] for key in ("brightness", "contrast", "saturation", "hue")))
        if gpu:
            terms, offset = fn.stack(a, p, q), r_per_level  # (3, views)
        else:
            m = fn.reshape(luma(fn.stack(*[mean_colour(x) for x in views])), shape=[n])  # (views,)
            terms = fn.stack(a, p, q, r_per_level * m)  # (4, views)
        if jitter is not None:
            terms = (terms - NO_JITTER[:k]) * jitter + NO_JITTER[:k]
            offset = None if offset is None else offset * jitter
    if gray is not None:
        terms = terms * (1.0 - gray * CHROMA_TERMS[:k])
    # (k, views, 1, 1) terms times their (k, 1, 3, 4) matrices, summed over the terms: each view's 3x4 map
    maps = fn.reductions.sum(fn.reshape(terms, shape=[k, n, 1, 1]) * _const(TERM_MATRICES[:k, None]), axes=[0])
    changes = None  # per view, whether the map is other than the identity (None: always)
    if skip and jitter is not None:
        changes = (jitter | gray) != 0 if gray is not None else jitter != 0
    elif skip and factors is None:
        changes = gray != 0
    out = []
    for i, x in enumerate(views):
        shift = None if offset is None else offset[i]
        if which is not None and not which[i]:
            out.append(x)
        elif changes is None:
            out.append(apply_map(x, maps[i], shift))
        else:
            if changes[i]:
                x = apply_map(x, maps[i], shift)
            out.append(x)
    return out


def apply_map(images, mt, shift=None):
    """The 3x4 map `mt` on uint8 images, rounded and saturated; with `shift` (the GPU's), plus shift times the
    images' mean luma, in float before the rounding."""
    if shift is None:
        return fn.coord_transform(images, MT=mt, dtype=types.UINT8)
    return fn.cast(fn.coord_transform(images, MT=mt, dtype=types.FLOAT) + shift * luma(mean_colour(images)),
                   dtype=types.UINT8)
