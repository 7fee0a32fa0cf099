"""The settings of a training run: one dataclass, each field's range beside it, exposed as flags, checked
before any work starts, recorded in config.json and re-runnable with --config."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

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


@dataclass
class Config:
    config: str = ""  # start from the settings a run recorded (its config.json); flags given here override them
    data: str = "digits"  # 'digits', a folder of images, a list from pipelines.verify, 'cifar10:PATH', 'cifar100:PATH'
    test_data: str = ""  # a separate folder for evaluation (else a folder keeps 10% aside)
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
    optimizer: str = setting("lars", choices=("lars", "sgd", "momentum", "adamw"))  # lars (timm), sgd (Nesterov), momentum (SGD with plain momentum) or adamw
    momentum: float = setting(0.9, low=0, high=1, below=True)  # momentum for lars, sgd and momentum (sgd: Nesterov momentum when above 0)
    weight_decay: float = setting(1e-6, low=0)  # weight decay (biases and norm weights are exempt)
    warmup_epochs: float = setting(-1.0, low=0, off=-1.0, off_means="the default")  # linear warmup in epochs, then cosine decay to zero (-1: the paper's 10, at most a tenth of the run)
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


def build_parser() -> Parser:
    parser = Parser(description="SimCLR pretraining with DALI, timm and accelerate.")
    add_dataclass_flags(parser, Config, skip=("aug",))
    add_dataclass_flags(parser.add_argument_group("augmentations"), Augment)
    return parser


def parse_command(argv: list[str] | None = None) -> tuple[Config, set[str]]:
    """The settings (a recorded run's, with --config, under the flags given) and the names of those
    given on the command line."""
    parser = build_parser()
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default="")
    first.add_argument("--method", default="simclr")
    first.add_argument("--recipe", default="auto")
    first.add_argument("--image-size", default=str(Config().image_size))
    known = first.parse_known_args(argv)[0]
    recorded = known.config
    method = known.method if known.method in METHODS else "simclr"  # else the parser refuses it below
    parser.set_defaults(**METHODS[method].defaults)  # the method's paper values
    if known.recipe in ("auto", *RECIPES) and known.image_size.isdigit():  # else refused below
        parser.set_defaults(**recipe_defaults(resolve(known.recipe, int(known.image_size)), method))
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
