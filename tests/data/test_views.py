"""Each view its settings: one value for both views or a pair (view 1, view 2), through the flags, the Python
API, config.json and --config; solarisation against torchvision's; and each method's views as its paper
defines them (MoCo v2's, BYOL's asymmetric pair), under the flags given."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import dali_device_id

from simclr_dali import training as train
from simclr_dali.errors import UserError
from simclr_dali.pipelines.augment import Augment
from simclr_dali.pipelines.loader import Shard, train_loader
from simclr_dali.pipelines.sources import Source
from simclr_dali.settings import to_argv

IDENTITY = dict(crop_min_area=1.0, crop_min_ratio=1.0, crop_max_ratio=1.0, flip_p=0.0, jitter_p=0.0, gray_p=0.0,
                blur_p=0.0)


def ramps(n: int = 8, size: int = 16) -> Source:
    """n images in which every level 0..255 occurs, each image its own shift of the levels."""
    levels = (np.arange(size * size * 3).reshape(size, size, 3) * 255 // (size * size * 3 - 1)).astype(np.int64)
    images = np.stack([(levels + 37 * i) % 256 for i in range(n)]).astype(np.uint8)
    return Source("ramps", np.arange(n, dtype=np.int64), images=images)


def uint8_views(source: Source, aug: Augment, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(view 1, view 2) of one batch as uint8 NHWC, and the source index of each row."""
    from test_pipeline import pixels

    size = source.images.shape[1]
    loader = train_loader(source, batch_size=len(source), size=size, aug=aug, shard=Shard(), seed=0, epoch=0,
                          workers=1, device_id=dali_device_id(device))
    v1, v2, y = (t.cpu() for t in next(iter(loader)))
    return (*(pixels(v).round().clamp(0, 255).to(torch.uint8).numpy() for v in (v1, v2)), y.view(-1).numpy())


def test_solarisation_is_torchvisions_and_each_view_takes_its_own_probability(device):
    """View 1 never solarised, view 2 always: view 1 is the image, view 2 torchvision's solarize(image, 128),
    every level of 0..255 checked (pixels() brings a uint8 level back within 2e-4 of itself, so rounding is exact)."""
    from torchvision.transforms.functional import solarize

    source = ramps()
    first, second, index = uint8_views(source, Augment(**IDENTITY, solarize_p=(0.0, 1.0)), device)
    images = source.images[index]
    expected = solarize(torch.from_numpy(images).permute(0, 3, 1, 2), 128).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(first, images)
    np.testing.assert_array_equal(second, expected)
    assert (expected != images).mean() > 0.45  # levels 128..255 changed: about half of them


def test_per_view_settings_split_into_two_views():
    aug = Augment(blur_p=[1.0, 0.1], solarize_p=(0.0, 0.2), jitter_strength=[0.5], gray_p=[0.3, 0.3])
    assert (aug.blur_p, aug.solarize_p, aug.jitter_strength, aug.gray_p) == ((1.0, 0.1), (0.0, 0.2), 0.5, 0.3)
    first, second = aug.views()
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert first.jitter_strength == second.jitter_strength == 0.5 and first.gray_p == second.gray_p == 0.3
    with pytest.raises(UserError, match="one value .both views. or two"):
        Augment(blur_p=[0.1, 0.2, 0.3])


def test_a_flag_with_two_values_sets_each_view_and_one_value_sets_both():
    cfg = train.parse_args(["--image-size", "224", "--blur-p", "0.9", "0.2", "--gray-p", "0.4"])
    assert (cfg.aug.blur_p, cfg.aug.gray_p) == ((0.9, 0.2), 0.4)
    with pytest.raises(UserError, match="--blur-p must be in .0, 1., got 1.5"):
        train.parse_args(["--blur-p", "0.5", "1.5"])  # each view's value is checked
    with pytest.raises(UserError, match="--crop-min-area 0.9 is above --crop-max-area 0.5"):
        train.parse_args(["--crop-min-area", "0.1", "0.9", "--crop-max-area", "0.5"])  # in order, view by view


def test_the_api_config_json_and_config_carry_both_views(tmp_path):
    cfg = train.Config(method="byol", image_size=224, aug=Augment(blur_p=(0.7, 0.3)))
    argv = to_argv(cfg)
    assert argv[argv.index("--blur-p"):][:3] == ["--blur-p", "0.7", "0.3"]
    parsed = train.parse_args(argv)
    assert parsed.aug.blur_p == (0.7, 0.3) and parsed.aug.solarize_p == (0.0, 0.2)  # BYOL's, not given
    recorded = json.loads(json.dumps(dataclasses.asdict(parsed)))  # as config.json holds it: pairs are lists
    assert recorded["aug"]["blur_p"] == [0.7, 0.3] and recorded["aug"]["solarize_p"] == [0.0, 0.2]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    again = train.parse_args(["--config", str(tmp_path / "config.json")])
    assert again.aug == parsed.aug


# -- each method's views ----------------------------------------------------------------------------------------
def ranges(view: Augment) -> tuple:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) of a view, rounded."""
    return tuple(round(getattr(view, f"jitter_{k}") * view.jitter_strength, 6)
                 for k in ("brightness", "contrast", "saturation", "hue"))


def test_simclrs_views_are_the_papers():
    first, second = train.parse_args(["--image-size", "224"]).aug.views()
    assert first == second and ranges(first) == (0.8, 0.8, 0.8, 0.2)  # Chen et al. 2020, appendix A
    assert (first.crop_min_area, first.jitter_p, first.gray_p, first.blur_p, first.solarize_p) == (0.08, 0.8, 0.2,
                                                                                                   0.5, 0.0)
    assert first.jitter_ranges()["hue"] == pytest.approx((-72.0, 72.0))  # 0.2 of a turn, in degrees


def test_moco_v2_crops_from_a_fifth_and_jitters_at_0_4():
    first, second = train.parse_args(["--method", "moco", "--image-size", "224"]).aug.views()
    assert first == second and ranges(first) == (0.4, 0.4, 0.4, 0.1)  # MoCo v2's aug_plus
    assert (first.crop_min_area, first.jitter_p, first.gray_p, first.blur_p, first.solarize_p) == (0.2, 0.8, 0.2,
                                                                                                   0.5, 0.0)


def test_byols_views_differ_in_blur_and_solarisation():
    first, second = train.parse_args(["--method", "byol", "--image-size", "224"]).aug.views()
    assert ranges(first) == ranges(second) == (0.4, 0.4, 0.2, 0.1)  # Grill et al. 2020, Table 6
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert first.jitter_ranges()["saturation"] == pytest.approx((0.8, 1.2))
    assert (first.crop_min_area, first.jitter_p, first.gray_p) == (second.crop_min_area, second.jitter_p,
                                                                   second.gray_p) == (0.08, 0.8, 0.2)


def test_flags_win_over_a_methods_views():
    cfg = train.parse_args(["--method", "byol", "--image-size", "224", "--blur-p", "0.5", "--solarize-p", "0.1", "0"])
    assert (cfg.aug.blur_p, cfg.aug.solarize_p) == (0.5, (0.1, 0.0))
    cfg = train.parse_args(["--method", "moco", "--image-size", "224", "--crop-min-area", "0.08"])
    assert (cfg.aug.crop_min_area, cfg.aug.jitter_strength) == (0.08, 0.5)


def test_the_small_recipe_turns_blur_off_for_every_method_and_keeps_byols_solarisation():
    cfg = train.parse_args(["--method", "byol", "--image-size", "32"])
    assert (cfg.aug.blur_p, cfg.aug.solarize_p, cfg.aug.jitter_strength) == (0.0, (0.0, 0.2), 0.5)
