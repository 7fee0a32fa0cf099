"""Recipes: named sets of defaults that fit the data, chosen by image size (--recipe auto) or by name.

A recipe sits under the flags: every setting given on the command line (or given to a --config run) wins,
and what the recipe set is recorded in config.json and shown in the start-up panel.

  imagenet  the paper's ImageNet recipe, the settings' own defaults: colour strength 1.0, blur with
            probability 0.5, and the method's loss and optimiser defaults (README, Methods and recipes).
  small     the paper's CIFAR-10 setting (Chen et al. 2020, appendix B.9) for 32 to 64 px images: crop
            and flip kept, colour distortion strength 0.5, no Gaussian blur; for SimCLR, the official
            implementation's CIFAR-10 command (google-research/simclr README): lr 1.0 per 256 images
            (LARS, linear scaling) and weight decay 1e-4, with solo-learn's temperature 0.2
            (scripts/pretrain/cifar/simclr.yaml) rather than that command's 0.5, which B.8 finds best
            only after 300 epochs: 0.2 scored higher on digits at 10 epochs (docs/results.md, Recipes).
            Other methods keep their own loss and optimiser defaults: the recipe's are SimCLR's.
The small stem (3x3 stride-1, no max-pool), which B.9 also uses, stays a flag of its own (--small-stem):
it keeps every activation at full resolution, about 16 times the work per image (docs/results.md, The small
stem).
"""
from __future__ import annotations

SMALL_MAX_SIZE = 64  # auto: images of this side or less take the small recipe
RECIPES = {
    "imagenet": {},
    "small": {"jitter_strength": 0.5, "blur_p": 0.0},  # appendix B.9; google-research/simclr --use_blur=False
}
# SimCLR's loss and optimiser at small sizes: solo-learn's temperature, google-research/simclr's CIFAR-10 lr and decay
SMALL_SIMCLR = {"temperature": 0.2, "lr": 1.0, "weight_decay": 1e-4}


def resolve(recipe: str, image_size: int) -> str:
    """The recipe `recipe` names at this image size: auto picks small up to SMALL_MAX_SIZE px."""
    if recipe != "auto":
        return recipe
    return "small" if image_size <= SMALL_MAX_SIZE else "imagenet"


def recipe_defaults(recipe: str, method: str) -> dict:
    """The settings (flag destinations: aug fields by their own names) a resolved recipe sets."""
    return {**RECIPES[recipe], **(SMALL_SIMCLR if recipe == "small" and method == "simclr" else {})}


def recipe_record(recipe: str, image_size: int, method: str, values: dict, given: set[str],
                  resumed: dict | None = None) -> dict:
    """config.json's account: the recipe resolved, and the values it set that nothing given replaced (`given`:
    every setting given, now or to the run this one was recorded from). A resume keeps its checkpoint's settings,
    so its account is the checkpoint's (less what is given now)."""
    if resumed and "recipe_values" in resumed:
        return {"recipe_resolved": resumed.get("recipe_resolved", resolve(recipe, image_size)),
                "recipe_values": {k: v for k, v in resumed["recipe_values"].items() if k not in given}}
    resolved = resolve(recipe, image_size)
    set_here = recipe_defaults(resolved, method)  # less what a flag or a later layer (an optimiser's) replaced
    return {"recipe_resolved": resolved,
            "recipe_values": {k: values[k] for k, v in set_here.items() if k not in given and values[k] == v}}
