"""--recipe (simclr_dali/training/recipes.py): resolved by image size, the values it sets at 32 and 224 px,
flags and --config over it, what config.json records; and the evaluation view's centre crop."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_dali import training as train
from simclr_dali.pipelines import eval_crop
from simclr_dali.pipelines.loader import eval_loader
from simclr_dali.pipelines.sources import load_folder
from simclr_dali.training.recipes import recipe_record, resolve

IMAGENET = {"jitter_strength": 1.0, "blur_p": 0.5, "temperature": 0.1, "lr": 0.3, "weight_decay": 1e-6}
SMALL = {"jitter_strength": 0.5, "blur_p": 0.0, "temperature": 0.2, "lr": 1.0, "weight_decay": 1e-4}


def values(cfg) -> dict:
    flat = {**dataclasses.asdict(cfg.aug), **dataclasses.asdict(cfg)}
    return {k: flat[k] for k in IMAGENET}


@pytest.mark.parametrize("size,recipe", [(32, "small"), (64, "small"), (65, "imagenet"), (224, "imagenet")])
def test_auto_picks_small_up_to_64_px(size, recipe):
    assert resolve("auto", size) == recipe
    assert values(train.parse_args(["--image-size", str(size)])) == (SMALL if recipe == "small" else IMAGENET)


def test_the_default_run_is_32_px_and_small():
    cfg, given = train.parse_command([])
    assert (cfg.recipe, cfg.image_size) == ("auto", 32) and values(cfg) == SMALL
    flat = {**dataclasses.asdict(cfg.aug), **dataclasses.asdict(cfg)}
    assert recipe_record(cfg.recipe, cfg.image_size, cfg.method, flat, given) == {
        "recipe_resolved": "small", "recipe_values": SMALL}


def test_a_recipe_by_name_at_any_size():
    assert values(train.parse_args(["--recipe", "imagenet", "--image-size", "32"])) == IMAGENET
    assert values(train.parse_args(["--recipe", "small", "--image-size", "224"])) == SMALL


def test_flags_given_win_over_the_recipe_and_are_not_its_values():
    argv = ["--image-size", "32", "--jitter-strength", "0.8", "--lr", "0.5", "--blur-p", "0.3"]
    cfg, given = train.parse_command(argv)
    assert values(cfg) == {**SMALL, "jitter_strength": 0.8, "lr": 0.5, "blur_p": 0.3}
    flat = {**dataclasses.asdict(cfg.aug), **dataclasses.asdict(cfg)}
    assert recipe_record(cfg.recipe, cfg.image_size, cfg.method, flat, given)["recipe_values"] == {
        "temperature": 0.2, "weight_decay": 1e-4}


def test_an_optimiser_not_the_methods_own_replaces_the_recipes_lr_and_decay_and_the_account_says_so():
    cfg, given = train.parse_command(["--image-size", "32", "--optimizer", "adamw"])
    assert values(cfg) == {**SMALL, "lr": 1.5e-4, "weight_decay": 0.1}
    flat = {**dataclasses.asdict(cfg.aug), **dataclasses.asdict(cfg)}
    assert recipe_record(cfg.recipe, cfg.image_size, cfg.method, flat, given)["recipe_values"] == {
        "jitter_strength": 0.5, "blur_p": 0.0, "temperature": 0.2}


def test_other_methods_take_the_small_augmentations_and_keep_their_own_loss_and_optimiser():
    cfg = train.parse_args(["--method", "moco", "--image-size", "32"])
    assert (cfg.aug.jitter_strength, cfg.aug.blur_p) == (0.5, 0.0)
    assert (cfg.temperature, cfg.lr, cfg.weight_decay) == (0.2, 0.03, 1e-4)  # MoCo's


def test_a_recorded_run_keeps_what_its_recipe_set(tmp_path):
    cfg = train.parse_args(["--image-size", "32", "--temperature", "0.3"])
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    again = train.parse_args(["--config", str(tmp_path / "config.json"), "--image-size", "224"])
    assert values(again) == values(cfg) and again.image_size == 224  # recorded values over the new recipe


def test_a_run_from_a_recorded_config_gives_the_recorded_account():
    recorded = {"recipe_resolved": "small", "recipe_values": {"jitter_strength": 0.5, "lr": 1.0}}
    assert recipe_record("auto", 224, "simclr", {}, {"lr", "out"}, recorded) == {
        "recipe_resolved": "small", "recipe_values": {"jitter_strength": 0.5}}


def test_an_unknown_recipe_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.main(["--recipe", "cifar"])
    assert "--recipe" in capsys.readouterr().err


# -- the evaluation view's centre crop --------------------------------------------------------------
@pytest.fixture
def framed(tmp_path):
    """One 64 x 64 image: a red frame 8 px wide around green."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[..., 1] = 255
    pixels[:8], pixels[-8:], pixels[:, :8], pixels[:, -8:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "framed.png")
    return load_folder(str(tmp_path / "images"), "all")


def red_share(view: torch.Tensor) -> float:
    """Fraction of the view's pixels that are more red than green (the view is ImageNet-normalised)."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rgb = view[0] * std[:, None, None] + mean[:, None, None]
    return (rgb[0] > rgb[1]).float().mean().item()


def test_the_evaluation_view_keeps_the_central_fraction(framed):
    def view(crop: float) -> torch.Tensor:
        return next(iter(eval_loader(framed, batch_size=1, size=32, workers=1, device_id=None, crop=crop)))[0]

    # the whole image, resized 64 -> 32: a 4 px frame, 44% of the pixels
    assert red_share(view(1.0)) == pytest.approx(1 - (24 / 32) ** 2, abs=0.05)
    # the usual 87.5%: 64 -> 36 px (a 4.5 px frame), the central 32 keep 2.5 px of it
    assert red_share(view(0.875)) == pytest.approx(1 - (27 / 32) ** 2, abs=0.05)
    assert red_share(view(0.5)) == 0  # 64 px kept as they are, the central 32 cut out: green only


def test_the_evaluation_view_is_the_whole_image_at_32_px_and_below(framed):
    """google-research/simclr turns test cropping off at 32 px and below (CIFAR), and so does eval_loader's default:
    the 4 px frame of the whole image, resized 64 -> 32, not the 2.5 px that the central 87.5% keeps."""
    assert eval_crop(24) == eval_crop(32) == 1.0 and eval_crop(33) == eval_crop(224) == 0.875
    view = next(iter(eval_loader(framed, batch_size=1, size=32, workers=1, device_id=None)))[0]
    assert red_share(view) == pytest.approx(1 - (24 / 32) ** 2, abs=0.05)
