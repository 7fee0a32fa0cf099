"""The settings of a training run: one dataclass, each field's range beside it, exposed as flags, checked
before any work starts, recorded in config.json and re-runnable with --config."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from models.methods import METHODS
from pipelines.augment import Augment
from simclr_dali.settings import (
    Parser,
    add_dataclass_flags,
    check_args,
    dataclass_from_args,
    given_dests,
    ordered_fields,
    recorded_settings,
    setting,
)
from simclr_dali.training.recipes import RECIPES, recipe_defaults, resolve

OPTIMIZERS = ("lars", "sgd", "momentum", "adamw")


@dataclass
class Config:
    config: str = ""  # start from the settings a run recorded (its config.json); flags given here override them
    data: str = "digits"  # 'digits', a folder of images (class sub-folders give labels), 'list:FILE' (an image list from pipelines.verify), 'wds:PATTERN' (tar shards, e.g. 'wds:/data/shard-*.tar'), 'cifar10:PATH' or 'cifar100:PATH'
    test_data: str = ""  # separate test data for evaluation, in any form --data takes (else a folder keeps 10% aside, shards their test-*.tar)
    out: str = "runs/simclr"  # output folder: config, metrics, checkpoint, backbone weights
    backbone: str = "resnet18"  # any timm model name
    small_stem: bool = False  # 3x3 stride-1 stem without max-pool, for 32-pixel images
    sync_bn: bool = True  # BatchNorm over the global batch (the paper's global BN) where several CUDA processes train; --no-sync-bn: per process
    proj_hidden: int = setting(0, low=0)  # projection head hidden width (0 = the backbone's feature width)
    proj_dim: int = setting(128, low=1)  # projection head output size
    image_size: int = setting(32, low=8)  # side of the augmented views, in pixels
    epochs: int = setting(100, low=1)  # training epochs
    batch_size: int = setting(256, low=1)  # images per process per step (each gives two views)
    lr: float = setting(0.3, low=0, above=True)  # base learning rate per 256 images, scaled by the global batch
    lr_scaling: str = setting("linear", choices=("linear", "sqrt"))  # linear: lr * B/256; sqrt: lr * sqrt(B/256)
    optimizer: str = setting("lars", choices=OPTIMIZERS)  # lars (timm), sgd (Nesterov), momentum (SGD with plain momentum) or adamw
    momentum: float = setting(0.9, low=0, high=1, below=True)  # momentum for lars, sgd and momentum (sgd: Nesterov momentum when above 0)
    weight_decay: float = setting(1e-6, low=0)  # weight decay (biases and norm weights are exempt)
    warmup_epochs: float = setting(-1.0, low=0, off=-1.0, off_means="the default")  # linear warmup in epochs, then cosine decay to zero (-1: the method's paper value, 10 for SimCLR and BYOL, 12 for SupCon, 0 for MoCo, at most a tenth of the run)
    recipe: str = setting("auto", choices=("auto", *RECIPES))  # defaults that fit the data, under the flags given: small (the paper's CIFAR-10 setting) for images of 64 px or less, imagenet above (auto), or either by name (README, Recipes)
    method: str = setting("simclr", choices=tuple(METHODS))  # simclr, supcon (needs labels), moco or byol; each brings its paper's defaults for the settings not given (README, Methods)
    temperature: float = setting(0.1, low=0, above=True)  # tau of the contrastive loss (NT-Xent, SupCon, MoCo)
    queue_size: int = setting(65536, low=1)  # MoCo: keys of earlier steps in the queue of negatives
    target_momentum: float = setting(0.996, low=0, high=1)  # MoCo, BYOL: EMA coefficient m0 of the momentum network
    momentum_schedule: str = setting("cosine", choices=("cosine", "constant"))  # MoCo, BYOL: m rises from m0 to 1 on a cosine over the run, or stays m0
    pred_hidden: int = setting(4096, low=1)  # BYOL: hidden width of the predictor
    loss_impl: str = setting("auto", choices=("auto", "triton", "tiled", "reference"))  # NT-Xent implementation: auto, triton, tiled or reference
    loss_precision: str = setting("auto", choices=("auto", "fp32"))  # NT-Xent products: auto follows the mixed precision (bf16/fp16 operands, fp32 sums), or fp32
    channels_last: str = setting("auto", choices=("auto", "on", "off"))  # channels-last model and views: on, off, auto (on for CUDA, off on the CPU)
    compile: bool = False  # torch.compile the model (backbone and head)
    seed: int = setting(0, low=0)  # seeds weights, data order and augmentations
    resume: bool = False  # continue from OUT/checkpoint
    resume_from: str = ""  # continue from this checkpoint folder instead (OUT/checkpoint.prev, the one before the newest); implies --resume
    stop_after: int = setting(0, low=0)  # end this invocation after this many epochs, checkpointed (0 = never)
    workers: int = setting(0, low=0)  # DALI CPU threads per process (0 = cores / processes)
    log_every: int = setting(10, low=1)  # steps between lines in metrics.jsonl: the only steps (with epoch ends) that read the device
    save_every_minutes: float = setting(10.0, low=0)  # checkpoint at the first log step or epoch end this long after the last (0 = every epoch end)
    save_every_steps: int = setting(0, low=0)  # also checkpoint every this many steps (0 = off)
    on_bad_image: str = setting("skip", choices=("skip", "error"))  # images DALI cannot decode: skip (listed in OUT/skipped.txt) or error
    max_nonfinite: int = setting(0, low=0)  # steps with a non-finite loss or gradient to skip before stopping the run
    knn_every: int = setting(0, low=0)  # epochs between online kNN top-1 checks on held-out labelled data (0 = off)
    knn_train: int = setting(1000, low=1)  # online kNN: labelled training images that vote
    knn_test: int = setting(500, low=1)  # online kNN: held-out test images it scores
    log_with: str = ""  # also log metrics through accelerate's trackers, comma-separated: tensorboard (OUT/tensorboard), mlflow (MLFLOW_TRACKING_URI, else OUT/mlflow.db), wandb (WANDB_MODE=offline keeps it in OUT/wandb)
    aug: Augment = field(default_factory=Augment)  # augmentation settings (flags of their own)


# config.json keys that a run works out rather than takes as settings (--config leaves them out)
DERIVED = frozenset({"world_size", "world_sizes", "global_batch", "scaled_lr", "steps_per_epoch", "n_train",
                     "dali_placement", "loss_impl_resolved", "loss_operands", "device", "mixed_precision",
                     "channels_last_resolved", "warmup_epochs_resolved", "batch_norm", "scan", "recipe_resolved",
                     "recipe_values"})


def program_name() -> str:
    """The command as the usage line names it: train.py, simclr-train, or `python -m simclr_dali.training`, whose
    argv[0] is its __main__.py (also under `accelerate launch -m`)."""
    name = Path(sys.argv[0]).name
    if name != "__main__.py":
        return name
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name.removesuffix('.__main__') if spec else 'simclr_dali.training'}"


LAUNCH = ("Several processes (GPUs, machines) and mixed precision come from accelerate: `accelerate launch "
          "[--num_processes N] [--mixed_precision bf16] train.py ...` (README: Scaling out).")


def build_parser(method: str = "simclr", recipe: str = "auto", image_size: int | None = None,
                 optimizer: str | None = None) -> Parser:
    """The flags, their defaults those of this method, recipe and optimiser (what --help shows), and where a default
    depends on them, every value it takes."""
    parser = Parser(prog=program_name(), epilog=LAUNCH,
                    description="SimCLR pretraining with DALI, timm and accelerate. A default that a method, a "
                                "recipe or an optimiser sets is shown for the flags given with --help: "
                                "`--method moco --image-size 224 --help` shows MoCo's at 224 px.")
    notes = layer_notes()
    add_dataclass_flags(parser, Config, skip=("aug",), notes=notes)
    add_dataclass_flags(parser.add_argument_group("augmentations (one value for both views, or two: view 1 and "
                                                  "view 2)"), Augment, per_view=True, notes=notes)
    parser.set_defaults(**layered_defaults(method, resolve(recipe, image_size or Config.image_size), optimizer))
    return parser


def layered_defaults(method: str, recipe: str, optimizer: str | None = None) -> dict:
    """The defaults under the flags, in order: the method's paper values, the (resolved) recipe's, then, for an
    optimiser other than the method's own, that optimiser's learning rate and weight decay: the method's and the
    recipe's are for the method's own optimiser (LARS's 0.3 would be 2,000 times AdamW's)."""
    from simclr_dali.training.optim import OPTIMIZER_DEFAULTS

    values = {**METHODS[method].defaults, **recipe_defaults(recipe, method)}
    if optimizer and optimizer != values.get("optimizer", Config.optimizer):
        values.update(OPTIMIZER_DEFAULTS[optimizer])
    return values


def layer_notes() -> dict[str, str]:
    """For --help: each setting that a method or a recipe sets, and every value they (and an optimiser other than
    the method's own) give it; --help's `default` is this command line's."""
    from simclr_dali.training.optim import OPTIMIZER_DEFAULTS

    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.name != "aug"}
    defaults.update({f.name: f.default for f in dataclasses.fields(Augment)})
    notes = {}
    for name, default in defaults.items():
        methods = [f"{m} {shown(c.defaults[name])}" for m, c in METHODS.items() if name in c.defaults]
        recipes = [f"{r} recipe {shown(values[name])}" + ("" if name in RECIPES[r] else " for simclr")
                   for r in RECIPES for values in [recipe_defaults(r, "simclr")] if name in values]
        if not methods and not recipes:
            continue
        optimizers = [f"{o} {shown(v[name])}" for o, v in OPTIMIZER_DEFAULTS.items() if name in v]
        parts = ["by method: " + ", ".join([*methods, f"else {shown(default)}"]) if methods else "",
                 ", ".join(recipes), "with an optimiser not the method's own: " + ", ".join(optimizers)
                 if optimizers else ""]
        notes[name] = "; ".join(p for p in parts if p)
    return notes


def shown(value) -> str:
    """A default as --help shows it: numbers in short form, a pair per view as V1/V2."""
    if isinstance(value, (list, tuple)):
        return "/".join(map(shown, value)) + " (per view)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_command(argv: list[str] | None = None) -> tuple[Config, set[str]]:
    """The settings (a recorded run's, with --config, under the flags given) and the names of those
    given on the command line."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default="")
    first.add_argument("--method", default="simclr")
    first.add_argument("--recipe", default="auto")
    first.add_argument("--image-size", default=str(Config().image_size))
    first.add_argument("--optimizer", default=None)
    known = first.parse_known_args(argv)[0]
    recorded = known.config
    method = known.method if known.method in METHODS else "simclr"  # else the parser refuses it below
    recipe = known.recipe if known.recipe in ("auto", *RECIPES) else "auto"  # else refused below
    size = int(known.image_size) if known.image_size.isdigit() else None  # else refused below
    optimizer = known.optimizer if known.optimizer in OPTIMIZERS else None  # else refused below
    parser = build_parser(method, recipe, size, optimizer)
    if recorded:  # a new run: --resume is an action of the recorded run, not one of its settings
        actions = frozenset({"resume", "resume_from", "config"})
        parser.set_defaults(**recorded_settings(recorded, Config, DERIVED, skip=actions))
    args = parser.parse_args(argv)
    check_args(parser, args, ordered_fields(Augment))
    cfg = dataclass_from_args(Config, args, aug=dataclass_from_args(Augment, args))
    cfg.resume = cfg.resume or bool(cfg.resume_from)
    validate(cfg)
    return cfg, given_dests(parser, argv)


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_command(argv)[0]


def validate(cfg: Config) -> None:
    """What the flags' own checks (`setting`) cannot see."""
    from simclr_dali.training.trackers import names

    cfg.log_with = ",".join(names(cfg.log_with))  # each known and installed, or one sentence
