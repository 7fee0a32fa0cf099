"""See the augmentations: original images beside pairs of views from the training pipeline itself.

    simclr-preview --data digits --out views.png
    simclr-preview --data /images/train --image-size 224 --blur-p 0 --out views.png
    simclr-preview --data /images/train --image-size 224 --method byol --out byol.png   # BYOL's two views

The views come from `pipelines.loader.train_loader` with the same augmentation flags and defaults as
train.py (the method's and the recipe's; one pair per epoch seed: pair p is what epoch p of a run with
this --seed would draw for these images, had they formed the whole data set), de-normalised for display. The "original" row is the
raw source image (the decoded file or the array), so crops show where they came from.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from simclr_dali.errors import UserError, exit_on_user_error
from simclr_dali.models.methods import METHODS
from simclr_dali.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, Augment
from simclr_dali.settings import (
    Check,
    Parser,
    add_dataclass_flags,
    check_args,
    checked,
    dataclass_from_args,
    given_values,
    ordered_fields,
)
from simclr_dali.training.recipes import RECIPES

CELL = 1.3  # inches per image


def pixels(views: torch.Tensor) -> np.ndarray:
    """Normalised (N, 3, S, S) float views -> (N, S, S, 3) uint8 for display."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (views.cpu().float() * std + mean).clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def augmented_pairs(source, aug: Augment, *, size: int, seed: int, pairs: int,
                    device_id: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """`pairs` two-view draws of every image of `source`, each (N, S, S, 3) uint8 in source order."""
    from simclr_dali.pipelines.loader import Shard, train_loader

    out = []
    for p in range(pairs):
        loader = train_loader(source, batch_size=len(source), size=size, aug=aug, shard=Shard(), seed=seed,
                              epoch=p, workers=1, device_id=device_id)
        view1, view2, _ = next(iter(loader))
        order = torch.as_tensor(loader.feeder.order[:len(source)])  # batch row i holds image order[i]
        a, b = torch.empty_like(view1.cpu()), torch.empty_like(view2.cpu())
        a[order], b[order] = view1.cpu(), view2.cpu()
        out.append((pixels(a), pixels(b)))
        del loader
    return out


def describe(aug: Augment, size: int) -> str:
    """The settings in a line; where the views differ, view 1's and view 2's (`1.0/0.1`)."""
    def v(name: str, form: str = "g") -> str:
        value = getattr(aug, name)
        return "/".join(format(x, form) for x in value) if isinstance(value, tuple) else format(value, form)

    jitter = "/".join(dict.fromkeys(  # torchvision's ColorJitter(brightness, contrast, saturation, hue), per view
        "-".join(f"{amount:g}" for amount in view.jitter_amounts().values()) for view in aug.views()))
    parts = [f"{size} px crop of {v('crop_min_area')}-{v('crop_max_area')} of the area, "
             f"ratio {v('crop_min_ratio', '.2f')}-{v('crop_max_ratio', '.2f')}", f"flip {v('flip_p')}",
             f"jitter {jitter} p={v('jitter_p')}", f"gray {v('gray_p')}",
             f"blur p={v('blur_p')} sigma {v('blur_sigma_min')}-{v('blur_sigma_max')}"]
    if aug.solarize_p != 0:
        parts.append(f"solarize p={v('solarize_p')}")
    return ", ".join(parts)


def draw(originals: list[np.ndarray], pairs: list, aug: Augment, size: int, out: Path) -> Path:
    """Rows: original, then view 1 / view 2 of each pair; one column per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simclr_dali.evaluation.plots import save, show

    rows = 1 + 2 * len(pairs)
    cols = len(originals)
    fig, axes = plt.subplots(rows, cols, figsize=(CELL * cols + 0.9, CELL * rows + 0.7), squeeze=False,
                             gridspec_kw={"wspace": 0.06, "hspace": 0.12})
    labels = ["original"] + [f"pair {p + 1}\nview {v}" for p in range(len(pairs)) for v in (1, 2)]
    for c, image in enumerate(originals):
        show(axes[0, c], image)
        for p, (a, b) in enumerate(pairs):
            show(axes[1 + 2 * p, c], a[c])
            show(axes[2 + 2 * p, c], b[c])
    for r, label in enumerate(labels):
        axes[r, 0].set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center", labelpad=8)
    fig.subplots_adjust(left=0.9 / (CELL * cols + 0.9), right=0.99, bottom=0.01, top=1 - 0.7 / (CELL * rows + 0.7))
    fig.suptitle(f"training views: {describe(aug, size)}", fontsize=9, wrap=True)
    return save(fig, out)


def build_parser() -> Parser:
    parser = Parser(description="Draw original images beside augmented training views.")
    parser.add_argument("--data", default="digits",
                        help="'digits', a folder of images, 'cifar10:PATH' or 'cifar100:PATH' (default: digits)")
    parser.add_argument("--out", default="views.png", help="PNG to write (default: views.png)")
    checked(parser, "--image-size", type=int, default=32, check=Check(low=8),
            help="side of the augmented views, in pixels (default: 32)")
    checked(parser, "--seed", type=int, default=0, check=Check(low=0),
            help="picks the images and seeds the augmentations (default: 0)")
    checked(parser, "--n", type=int, default=8, check=Check(low=1), help="images to show (default: 8)")
    checked(parser, "--pairs", type=int, default=2, check=Check(low=1), help="augmented pairs per image (default: 2)")
    checked(parser, "--method", default="simclr", check=Check(choices=tuple(METHODS)),
            help="whose views: each method's as train.py gives them (default: simclr)")
    checked(parser, "--recipe", default="auto", check=Check(choices=("auto", *RECIPES)),
            help="the recipe's augmentations, as train.py (default: auto: small up to 64 px, else imagenet)")
    add_dataclass_flags(parser.add_argument_group("augmentations (as train.py: one value for both views, or two)"),
                        Augment, per_view=True)
    return parser


def view_defaults(parser: Parser, argv: list[str] | None) -> dict:
    """The augmentation defaults train.py would take for the --method, --recipe and --image-size given (its
    layers of defaults, config.settings_in_order)."""
    from simclr_dali.training.config import settings_in_order

    names = {f.name for f in dataclasses.fields(Augment)}
    [values, _] = settings_in_order(given_values(parser, argv), {}, {})
    return {k: v for k, v in values.items() if k in names}


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.set_defaults(**view_defaults(parser, argv))
    args = parser.parse_args(argv)
    check_args(parser, args, ordered_fields(Augment))
    aug = dataclass_from_args(Augment, args)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")

    from simclr_dali.evaluation.plots import display_image
    from simclr_dali.pipelines.sources import load_source

    source = load_source(args.data, "train")
    if args.n > len(source):
        raise UserError(f"--n {args.n} is more than the {len(source)} images in {args.data}")
    picked = source.subset(np.sort(np.random.default_rng(args.seed).choice(len(source), args.n, replace=False)))
    device_id = 0 if torch.cuda.is_available() else None
    pairs = augmented_pairs(picked, aug, size=args.image_size, seed=args.seed, pairs=args.pairs,
                            device_id=device_id)
    originals = [display_image(picked, i, max_side=4 * args.image_size) for i in range(len(picked))]
    try:
        print(draw(originals, pairs, aug, args.image_size, out))
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
