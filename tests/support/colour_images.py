"""The colour tests' images and plumbing (tests/data/test_colour.py, test_colour_map.py): generated uint8 images
around a dark, a mid-grey and a bright mean, a graph run through DALI on them with per-image arguments, and
torchvision's own ops on them."""
import numpy as np
import nvidia.dali.fn as fn
import torch
import torchvision.transforms.functional as TF
from conftest import dali_device_id
from nvidia.dali.pipeline import do_not_convert, pipeline_def
from PIL import Image

MEANS = {"dark": 41, "mid-grey": 128, "bright": 210}  # the mean grey level each generated image is built around


def generated(mean: int, n: int = 6, side: int = 40, seed: int = 0) -> np.ndarray:
    """(n, side, side, 3) uint8: smooth random colours (a bilinear 4x4 field, +-60 levels) with noise (sd 8) around
    `mean`, clipped, so that bright images hold saturated pixels and dark ones pixels at 0."""
    rng = np.random.default_rng([seed, mean])
    out = []
    for _ in range(n):
        coarse = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR), np.float64) / 255
        img = mean + 120 * (field - field.mean()) + rng.normal(0, 8, field.shape)
        out.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return np.stack(out)


@do_not_convert
def batch_of(values):
    """An external_source callback giving `values`, one entry per sample, every iteration."""
    return lambda: [np.asarray(v) for v in values]


def through_dali(graph, images: np.ndarray, *per_image, device: str = "cpu") -> np.ndarray:
    """graph(image node, *argument nodes) on one batch, each image with its own arguments (per_image: one sequence
    per argument, an entry per image), the images on `device` as the training pipeline places them."""
    @pipeline_def(batch_size=len(images), num_threads=1, device_id=dali_device_id(device), seed=0,
                  enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=batch_of(images), batch=True, layout="HWC")
        args = [fn.external_source(source=batch_of(values), batch=True) for values in per_image]
        return graph(x.gpu() if device == "cuda" else x, *args)

    p = pipe()
    p.build()
    (out,) = p.run()
    out = out.as_cpu() if device == "cuda" else out
    return np.stack([np.asarray(out[i]) for i in range(len(images))])


def torchvision_op(op: str, image: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's own op on a uint8 HWC image (as a uint8 CHW tensor, its tensor path)."""
    f = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation,
         "hue": TF.adjust_hue}[op]
    return f(torch.from_numpy(image).permute(2, 0, 1), factor).permute(1, 2, 0).numpy()


def summary(diff: np.ndarray) -> str:
    return f"mean |d| {np.abs(diff).mean():.3f}, max |d| {np.abs(diff).max()}, d in [{diff.min()}, {diff.max()}]"
