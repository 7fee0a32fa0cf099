"""The torchvision baseline that `benchmark.py pipeline` compares with, in both of its styles (transforms v2 on
uint8 tensors, transforms on PIL images): with every random step turned off, each view is the image itself,
normalised, against a NumPy oracle; with the usual settings, two different views of every image."""
import numpy as np
import pytest
import torch
from conftest import make_folder

from simclr_dali.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, Augment
from simclr_dali.pipelines.baseline import STYLES, TwoViews, torchvision_loader
from simclr_dali.pipelines.sources import load_source

STILL = Augment(crop_min_area=1.0, crop_max_area=1.0, crop_min_ratio=1.0, crop_max_ratio=1.0, flip_p=0.0,
                jitter_p=0.0, gray_p=0.0, blur_p=0.0)  # the whole (square) image, nothing drawn changes it


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("kind", ["files", "arrays"])
def test_with_nothing_random_a_view_is_the_normalised_image(style, kind, tmp_path):
    if kind == "files":  # PNGs only: the oracle reads the same lossless pixels
        source = load_source(str(make_folder(tmp_path / "images", size=(24, 24), per_class=3)), "train")
        keep = [i for i, f in enumerate(source.files) if str(f).endswith(".png")]
        source = source.subset(np.asarray(keep))
        from PIL import Image
        pixels = [np.asarray(Image.open(f).convert("RGB")) for f in source.files]
    else:
        source = load_source("digits", "train").subset(np.arange(4))
        pixels = list(source.images)
    size = pixels[0].shape[0]
    views = TwoViews(source, size, STILL, style)
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    for i, image in enumerate(pixels):
        first, second, _ = views[i]
        want = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1)).float()
        assert first.dtype == torch.float32 and first.shape == (3, size, size)
        assert torch.allclose(first, want, atol=1e-5) and torch.equal(first, second)


@pytest.mark.parametrize("style", STYLES)
def test_the_usual_settings_give_two_different_views_in_batches(style):
    source = load_source("digits", "train").subset(np.arange(16))
    loader = torchvision_loader(source, batch_size=8, size=32, aug=Augment(), workers=0, style=style)
    first, second, labels = next(iter(loader))
    assert first.shape == second.shape == (8, 3, 32, 32) and labels.shape == (8,)
    assert all(not torch.equal(a, b) for a, b in zip(first, second))
