"""The settings of a training run: one dataclass, each field's range beside it, exposed as flags, checked
before any work starts, recorded in config.json and re-runnable with --config."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from simclr_dali.models.methods import METHODS
from simclr_dali.pipelines.augment import Augment
from simclr_dali.settings import (
    Parser,
    add_dataclass_flags,
    check_args,
    dataclass_from_args,
    given_values,
    ordered_fields,
    set_given,
    setting,
    tracks_given,
)
from simclr_dali.training.checkpoint import find_checkpoint
from simclr_dali.training.layers import checkpoint_settings, recorded_given, resume_changes, shown
from simclr_dali.training.recipes import RECIPES, recipe_defaults, resolve

OPTIMIZERS = ("lars", "sgd", "momentum", "adamw")
CHOICES = {"method": tuple(METHODS), "recipe": ("auto", *RECIPES), "optimizer": OPTIMIZERS,
           "lr_scaling": ("linear", "sqrt")}  # the values of the settings that choose the layers of defaults


@tracks_given
@dataclass
class Config:
    config: str = setting("", help="start from the settings a run recorded (its config.json); flags given here "
                          "override them")
    data: str = setting("digits", help="'digits', a folder of images (class sub-folders give labels), 'list:FILE' (an "
                        "image list from simclr_dali.pipelines.verify), 'wds:PATTERN' (tar shards, e.g. "
                        "'wds:/data/shard-*.tar'), 'cifar10:PATH' or 'cifar100:PATH'")
    test_data: str = setting("", help="separate test data for evaluation, in any form --data takes (else a folder "
                             "keeps 10% aside, shards their test-*.tar)")
    out: str = setting("runs/simclr", help="output folder: config, metrics, checkpoint, backbone weights")
    backbone: str = setting("resnet18", help="any timm model name")
    small_stem: bool = setting(False, help="3x3 stride-1 stem without max-pool, for 32-pixel images")
    sync_bn: bool = setting(True, help="BatchNorm over the global batch (the paper's global BN) where several CUDA "
                            "processes train; --no-sync-bn: per process")
    proj_hidden: int = setting(0, low=0, help="projection head hidden width (0 = the backbone's feature width)")
    proj_dim: int = setting(128, low=1, help="projection head output size")
    image_size: int = setting(32, low=8, help="side of the augmented views, in pixels")
    epochs: int = setting(100, low=1, help="training epochs")
    batch_size: int = setting(256, low=1, help="images per process per step (each gives two views)")
    lr: float = setting(0.3, low=0, above=True, help="base learning rate per 256 images, scaled by the global batch")
    lr_scaling: str = setting("linear", choices=CHOICES["lr_scaling"], help="linear: lr * B/256; sqrt: lr * "
                              "sqrt(B/256)")
    optimizer: str = setting("lars", choices=CHOICES["optimizer"], help="lars (timm), sgd (Nesterov), momentum (SGD "
                             "with plain momentum) or adamw")
    momentum: float = setting(0.9, low=0, high=1, below=True, help="momentum for lars, sgd and momentum (sgd: Nesterov "
                              "momentum when above 0)")
    weight_decay: float = setting(1e-6, low=0, help="weight decay (biases and norm weights are exempt)")
    warmup_epochs: float = setting(-1.0, low=0, off=-1.0, off_means="the default", help="linear warmup in epochs, then "
                                   "cosine decay to zero (-1: the method's paper value, 10 for SimCLR and BYOL, 12 for "
                                   "SupCon, 0 for MoCo, at most a tenth of the run)")
    recipe: str = setting("auto", choices=("auto", *RECIPES), help="defaults that fit the data, under the flags given: "
                          "small (the paper's CIFAR-10 setting) for images of 64 px or less, imagenet above (auto), or "
                          "either by name (README, Methods and recipes)")
    method: str = setting("simclr", choices=tuple(METHODS), help="simclr, supcon (needs labels), moco or byol; each "
                          "brings its paper's defaults for the settings not given (README, Methods and recipes)")
    temperature: float = setting(0.1, low=0, above=True, help="tau of the contrastive loss (NT-Xent, SupCon, MoCo)")
    queue_size: int = setting(65536, low=1, help="MoCo: keys of earlier steps in the queue of negatives")
    target_momentum: float = setting(0.996, low=0, high=1, help="MoCo, BYOL: EMA coefficient m0 of the momentum "
                                     "network")
    momentum_schedule: str = setting("cosine", choices=("cosine", "constant"), help="MoCo, BYOL: m rises from m0 to 1 "
                                     "on a cosine over the run, or stays m0")
    pred_hidden: int = setting(4096, low=1, help="BYOL: hidden width of the predictor")
    loss_impl: str = setting("auto", choices=("auto", "triton", "tiled", "reference"), help="NT-Xent implementation: "
                             "auto, triton, tiled or reference")
    loss_precision: str = setting("auto", choices=("auto", "fp32"), help="NT-Xent products: auto follows the mixed "
                                  "precision (bf16/fp16 operands, fp32 sums), or fp32")
    channels_last: str = setting("auto", choices=("auto", "on", "off"), help="channels-last model and views: on, off, "
                                 "auto (on for CUDA, off on the CPU)")
    compile: bool = setting(False, help="torch.compile the model (backbone and head)")
    seed: int = setting(0, low=0, help="seeds weights, data order and augmentations")
    resume: bool = setting(False, help="continue from OUT/checkpoint")
    resume_from: str = setting("", help="continue from this checkpoint folder instead (OUT/checkpoint.prev, the one "
                               "before the newest); implies --resume")
    stop_after: int = setting(0, low=0, help="end this invocation after this many epochs, checkpointed (0 = never)")
    workers: int = setting(0, low=0, help="DALI CPU threads per process (0 = cores / processes)")
    log_every: int = setting(10, low=1, help="steps between lines in metrics.jsonl: the only steps (with epoch ends) "
                             "that read the device")
    save_every_minutes: float = setting(10.0, low=0, help="checkpoint at the first log step or epoch end this long "
                                        "after the last (0 = every epoch end)")
    save_every_steps: int = setting(0, low=0, help="also checkpoint every this many steps (0 = off)")
    on_bad_image: str = setting("skip", choices=("skip", "error"), help="images DALI cannot decode: skip (listed in "
                                "OUT/skipped.txt) or error")
    max_nonfinite: int = setting(0, low=0, help="steps with a non-finite loss or gradient to skip before stopping the "
                                 "run")
    knn_every: int = setting(0, low=0, help="epochs between online kNN top-1 checks on held-out labelled data (0 = "
                             "off)")
    knn_train: int = setting(1000, low=1, help="online kNN: labelled training images that vote, spread evenly over the "
                             "classes")
    knn_per_class: int = setting(20, low=1, help="online kNN: at least this many voting images of each class (all a "
                                 "class has where it has fewer)")
    knn_test: int = setting(500, low=1, help="online kNN: held-out test images it scores")
    log_with: str = setting("", help="also log metrics through accelerate's trackers, comma-separated: tensorboard "
                            "(OUT/tensorboard), mlflow (MLFLOW_TRACKING_URI, else OUT/mlflow.db), wandb "
                            "(WANDB_MODE=offline keeps it in OUT/wandb)")
    aug: Augment = field(default_factory=Augment, metadata={"help": "augmentation settings (flags of their own)"})


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
                 optimizer: str | None = None, lr_scaling: str | None = None,
                 layers: list[dict] | None = None) -> Parser:
    """The flags, their defaults those of this method, recipe, optimiser and lr scaling (what --help shows; or
    `layers`, layers.settings_in_order's), and where a default depends on them, every value it takes."""
    parser = Parser(prog=program_name(), epilog=LAUNCH,
                    description="SimCLR pretraining with DALI, timm and accelerate. A default that a method, a "
                                "recipe or an optimiser sets is shown for the flags given with --help: "
                                "`--method moco --image-size 224 --help` shows MoCo's at 224 px.")
    notes = layer_notes()
    add_dataclass_flags(parser, Config, skip=("aug",), notes=notes)
    add_dataclass_flags(parser.add_argument_group("augmentations (one value for both views, or two: view 1 and "
                                                  "view 2)"), Augment, per_view=True, notes=notes)
    if layers is None:
        layers = [layered_defaults(method, resolve(recipe, image_size or Config.image_size), optimizer, lr_scaling)]
    for layer in layers:
        parser.set_defaults(**layer)
    return parser


SQRT_LR = 0.075 * 256 ** 0.5  # SimCLR's square-root rule, 0.075 sqrt(B) (Chen et al. 2020, appendix B.1), per 256


def settings_in_order(now: dict, recorded: dict, resumed: dict) -> list[dict]:
    """Where each setting of a run comes from, in one order; each layer's values replace those below it:

        1. the fields' own defaults (Config, Augment: SimCLR's ImageNet recipe)
        2. the method's paper values (models/methods.py)
        3. the recipe's, resolved by image size (recipes.py); then, for an optimiser other than the method's
           own, that optimiser's lr and weight decay, and for `--lr-scaling sqrt` SimCLR's square-root rule
        4. the values a recorded run was given (`--config`: its config.json's `given`, layers.recorded_given)
        5. the values given now: the flags, or the fields an API caller set (the parser's own values)

    Returns the layers of parser defaults, 2 to 4, lowest first: `now` the values given on the command line,
    `recorded` those a --config run was given. 2 and 3 follow the method, recipe, image size, optimiser and lr
    scaling that 4 and 5 give (a value the parser will refuse chooses nothing), so a re-run with `--method moco`
    takes MoCo's values for what neither gave, and a value given is never replaced by a default. A resume starts
    from `resumed`, every setting of its checkpoint, in place of 1 to 4: nothing not given now changes, and what
    is given now applies to the saved state or is one sentence (layers.resume_changes)."""
    if resumed:
        return [resumed]
    given = {**recorded, **now}
    chosen = {k: v for k, v in given.items() if k not in CHOICES or v in CHOICES[k]}
    recipe = resolve(chosen.get("recipe", "auto"), chosen.get("image_size", Config.image_size))
    return [layered_defaults(chosen.get("method", "simclr"), recipe, chosen.get("optimizer"),
                             chosen.get("lr_scaling")), recorded]


def field_defaults() -> dict:
    """Layer 1: every setting's own default, flat (the augmentations by their own names)."""
    return {**{f.name: f.default for f in dataclasses.fields(Config) if f.name != "aug"},
            **{f.name: f.default for f in dataclasses.fields(Augment)}}


def derived_defaults(given: dict) -> dict:
    """Layers 1 to 3 for a run given `given`: each setting's value where nothing gives it."""
    return {**field_defaults(), **settings_in_order(given, {}, {})[0]}


def layered_defaults(method: str, recipe: str, optimizer: str | None = None, lr_scaling: str | None = None) -> dict:
    """Layers 2 and 3: the method's paper values, the (resolved) recipe's, then, for an optimiser other than the
    method's own, that optimiser's learning rate and weight decay (the method's and the recipe's are for its own
    optimiser: LARS's 0.3 would be 2,000 times AdamW's), and for SimCLR on LARS with square-root scaling the
    paper's rule, lr 1.2 per 256 images (0.075 sqrt(B))."""
    from simclr_dali.training.optim import OPTIMIZER_DEFAULTS

    values = {**METHODS[method].defaults, **recipe_defaults(recipe, method)}
    own = values.get("optimizer", Config.optimizer)
    if optimizer and optimizer != own:
        values.update(OPTIMIZER_DEFAULTS[optimizer])
    if lr_scaling == "sqrt" and method == "simclr" and (optimizer or own) == "lars":
        values["lr"] = SQRT_LR
    return values


def layer_notes() -> dict[str, str]:
    """For --help: each setting that a method or a recipe sets, and every value they (and an optimiser other than
    the method's own) give it; --help's `default` is this command line's."""
    from simclr_dali.training.optim import OPTIMIZER_DEFAULTS

    notes = {}
    for name, default in field_defaults().items():
        methods = [f"{m} {per_view_shown(c.defaults[name])}" for m, c in METHODS.items() if name in c.defaults]
        recipes = [f"{r} recipe {shown(values[name])}" + ("" if name in RECIPES[r] else " for simclr")
                   for r in RECIPES for values in [recipe_defaults(r, "simclr")] if name in values]
        if not methods and not recipes:
            continue
        optimizers = [f"{o} {shown(v[name])}" for o, v in OPTIMIZER_DEFAULTS.items() if name in v]
        parts = ["by method: " + ", ".join([*methods, f"else {shown(default)}"]) if methods else "",
                 ", ".join(recipes), "with an optimiser not the method's own: " + ", ".join(optimizers)
                 if optimizers else "", f"--lr-scaling sqrt: {shown(SQRT_LR)} for simclr (0.075 sqrt(B))"
                 if name == "lr" else ""]
        notes[name] = "; ".join(p for p in parts if p)
    return notes


def per_view_shown(value) -> str:
    return shown(value) + (" (per view)" if isinstance(value, (list, tuple)) else "")


def parse_command(argv: list[str] | None = None) -> tuple[Config, set[str]]:
    """The run's settings, each from the layer settings_in_order gives it, and the names of those given on
    this command line. The returned Config knows all that were given (settings.given: now, and to the runs it was
    recorded from or resumes), which config.json records as `given`."""
    now = given_values(build_parser(), argv)
    recorded = recorded_given(now["config"], Config, derived_defaults) if now.get("config") else {}
    resumed, resumed_given = ({}, {})
    if now.get("resume") or now.get("resume_from"):  # the checkpoint open_run will open
        out = Path(now.get("out") or recorded.get("out") or Config.out)
        path = Path(now["resume_from"]) if now.get("resume_from") else find_checkpoint(out)
        resumed, resumed_given = checkpoint_settings(path, Config)
    parser = build_parser(layers=settings_in_order(now, recorded, resumed))
    args = parser.parse_args(argv)
    check_args(parser, args, ordered_fields(Augment))
    cfg = dataclass_from_args(Config, args, aug=dataclass_from_args(Augment, args))
    cfg.resume = cfg.resume or bool(cfg.resume_from)
    validate(cfg)
    names = set(now) | set(recorded) | set(resumed_given)
    set_given(cfg, names)  # after the values above were worked out: they are not given by that
    set_given(cfg.aug, names)
    if resumed:
        resume_changes(resumed, cfg, set(now))  # a setting the checkpoint fixes: one sentence
    return cfg, set(now)


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_command(argv)[0]


def validate(cfg: Config) -> None:
    """What the flags' own checks (`setting`) cannot see."""
    from simclr_dali.training.trackers import names

    cfg.log_with = ",".join(names(cfg.log_with))  # each known and installed, or one sentence
