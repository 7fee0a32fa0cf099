"""SimCLR pretraining: DALI two-view pipeline -> timm backbone + head -> NT-Xent -> LARS.

    python train.py --data digits --epochs 30 --out runs/digits
    accelerate launch train.py --data /images/train --image-size 224 --batch-size 256 --out runs/x

Reads top to bottom: settings, data, model, optimiser, loop, save.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpoint import (check_metrics, export_backbone, open_checkpoint, prepare_out, resume, resumed_batch,
                        save_checkpoint, unrestorable, write_json)
from cli import (Parser, UserError, add_dataclass_flags, check_args, dataclass_from_args, given_dests,
                 ordered_fields, recorded_settings, setting)
from peers import one_voice
from peers import watch as watch_peers
from pipelines.augment import Augment


# -----------------------------------------------------------------------------------------------
# Settings
# -----------------------------------------------------------------------------------------------
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
    optimizer: str = setting("lars", choices=("lars", "sgd", "adamw"))  # lars (timm), sgd or adamw
    momentum: float = setting(0.9, low=0, high=1, below=True)  # momentum for lars and sgd (sgd: Nesterov momentum when above 0)
    weight_decay: float = setting(1e-6, low=0)  # weight decay (biases and norm weights are exempt)
    warmup_epochs: float = setting(-1.0, low=0, off=-1.0, off_means="the default")  # linear warmup in epochs, then cosine decay to zero (-1: the paper's 10, at most a tenth of the run)
    temperature: float = setting(0.1, low=0, above=True)  # NT-Xent tau
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
    log_with: str = setting("", choices=("", "tensorboard"))  # also log metrics through accelerate's trackers: tensorboard (to OUT/tensorboard)
    aug: Augment = field(default_factory=Augment)  # augmentation settings (flags of their own)


# config.json keys that a run works out rather than takes as settings (--config leaves them out)
DERIVED = frozenset({"world_size", "world_sizes", "global_batch", "scaled_lr", "steps_per_epoch", "n_train",
                     "dali_placement", "loss_impl_resolved", "loss_operands", "device", "mixed_precision",
                     "channels_last_resolved", "warmup_epochs_resolved", "batch_norm", "scan"})


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
    recorded = first.parse_known_args(argv)[0].config
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
    if cfg.log_with == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--log-with tensorboard needs the tensorboard package: pip install tensorboard")


def memory_format_and_compile(model, cfg: Config, device: torch.device):
    """(model, channels_last): channels-last where --channels-last says so (auto: on CUDA, what bf16
    convolutions on tensor cores want; not on the CPU, where it measured no faster: README, Measured
    throughput), then compiled in place with --compile (the state dict keeps its names, no _orig_mod.)."""
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
    if channels_last:  # the views come channels-last from DALI (HWC), without a copy
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile()
    return model, channels_last


def loss_operands(precision: str, mixed_precision: str) -> torch.dtype:
    """What NT-Xent's similarity products read: the run's 16-bit type under bf16/fp16 mixed precision
    (--loss-precision auto), else float32. accelerate hands the loss float32 embeddings either way, so
    without this the fused 16-bit kernels would never train."""
    if precision == "auto" and mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.float32


def batch_norm(sync_bn: bool, asked: bool, world: int, device: torch.device) -> str:
    """How BatchNorm normalises, in a few words for config.json and the panel: over the global batch
    (SyncBatchNorm) where several CUDA processes train, as the paper does, so that the two views of an
    image never share one GPU's statistics; else per process, and why. --sync-bn asked for on CPU
    processes is one sentence: torch's SyncBatchNorm runs on GPUs only."""
    if world == 1:
        return "per process (one process)"
    if not sync_bn:
        return "per process (--no-sync-bn)"
    if device.type != "cuda":
        if asked:
            raise UserError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
        return f"per process ({world} CPU processes: SyncBatchNorm runs on GPUs only)"
    return f"global (SyncBatchNorm over {world} processes)"


def warmup_epochs(cfg: Config) -> float:
    """--warmup-epochs, or by default the paper's 10 capped at a tenth of the run (a 10-epoch run warms
    up for 1: a long warmup in a short run leaves little time at the full learning rate)."""
    return cfg.warmup_epochs if cfg.warmup_epochs >= 0 else min(10.0, cfg.epochs / 10)


def scaled_lr(cfg: Config, global_batch: int) -> float:
    ratio = global_batch / 256
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))


# -----------------------------------------------------------------------------------------------
# Data, model, optimiser
# -----------------------------------------------------------------------------------------------
def make_accelerator(log_with: str = "", out: str | None = None):
    from accelerate import Accelerator

    # cpu=True is what makes several CPU processes form a gloo group (plain Accelerator() on a
    # CPU-only machine leaves each process training alone).
    return Accelerator(cpu=not torch.cuda.is_available(), log_with=log_with or None,
                       project_dir=out if log_with else None)


def dali_device_id(accelerator) -> int | None:
    """DALI's device: this process's GPU, or None for a CPU-only pipeline."""
    return accelerator.local_process_index if accelerator.device.type == "cuda" else None


def load_train_source(cfg: Config, world: int, screen=None):
    from pipelines.sources import load_source

    source = load_source(cfg.data, "train", cfg.test_data or None, screen=screen)
    per_process = len(source) // world
    if per_process < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {per_process} training images "
                        f"each of the {world} process(es) reads from {cfg.data} ({len(source)} in all)")
    return source


def make_monitor(cfg: Config, source, workers: int, device_id: int | None, screen=None):
    """The optional online kNN check (probes.KnnMonitor) on the run's own train and test splits."""
    if not cfg.knn_every:
        return None
    from pipelines.sources import load_source
    from probes import KnnMonitor

    return KnnMonitor(source, load_source(cfg.data, "test", cfg.test_data or None, screen), n_train=cfg.knn_train,
                      n_test=cfg.knn_test, size=cfg.image_size, batch_size=cfg.batch_size, workers=workers,
                      device_id=device_id, seed=cfg.seed)


def build_model(cfg: Config):
    from models.backbone import SimCLRModel, create_backbone

    return SimCLRModel(create_backbone(cfg.backbone, cfg.small_stem), cfg.proj_hidden, cfg.proj_dim)


def build_optimizer(cfg: Config, model, lr: float, steps_per_epoch: int):
    """timm's optimiser (biases and norm weights exempt from decay and LARS adaptation) and its
    warmup + cosine schedule, stepped per iteration. Each can skip a step on the device (the found_inf
    protocol, safeguards.FiniteGuard): torch's fused SGD and AdamW, and timm's LARS as GuardedLars."""
    from timm.optim import Lars, create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    from safeguards import GuardedLars, zero_momentum

    kwargs = {"momentum": cfg.momentum} if cfg.optimizer in ("lars", "sgd") else {"fused": True}
    if cfg.optimizer == "sgd":  # timm's sgd is Nesterov's, which needs momentum
        kwargs.update(fused=True, nesterov=cfg.momentum > 0)
    optimizer = create_optimizer_v2(model, cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                                    filter_bias_and_bn=True, **kwargs)
    if isinstance(optimizer, Lars):  # the same parameter groups and settings, skippable on the device
        optimizer = GuardedLars(optimizer.param_groups, **optimizer.defaults)
    zero_momentum(optimizer)
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(warmup_epochs(cfg) * steps_per_epoch)), total - 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=0.0,
                                  warmup_t=warmup, warmup_lr_init=lr * 1e-3 if warmup else lr,
                                  warmup_prefix=True, t_in_epochs=False)
    return optimizer, scheduler


# -----------------------------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------------------------
@one_voice  # several processes: the first to fail says why, the others stop quietly (peers.py)
def main(argv: list[str] | None = None) -> int:
    cfg, given = parse_command(argv)
    from accelerate.utils import broadcast_object_list, set_seed

    from models.ntxent import nt_xent_loss, resolve_impl
    from pipelines.loader import Shard, epoch_steps, placement, train_loader
    from pipelines.verify import Screening
    from report import Report, read_back
    from safeguards import FiniteGuard, SaveClock, StopSignal, check_free_space, checkpoint_bytes

    accelerator = make_accelerator(cfg.log_with, cfg.out)
    world, rank = accelerator.num_processes, accelerator.process_index
    watch_peers(world)
    out = Path(cfg.out)
    prepare_out(cfg, out, accelerator)
    set_seed(cfg.seed)
    resuming = open_checkpoint(out, cfg.resume_from) if cfg.resume else None  # every file read back first
    if resuming is not None:  # the run's global batch, over however many processes this invocation has
        check_metrics(out)
        cfg.batch_size = resumed_batch(resuming, world, cfg.batch_size if "batch_size" in given else None)

    # data: each process reads its own shard; steps per epoch are equal on every process
    workers = cfg.workers or max(1, (os.cpu_count() or 1) // world)
    screen = Screening(cfg.on_bad_image, workers, accelerator.is_main_process,  # files DALI cannot decode
                       share=lambda obj: broadcast_object_list([obj])[0])
    source = load_train_source(cfg, world, screen)
    shard, device_id = Shard(rank, world), dali_device_id(accelerator)
    steps_per_epoch = epoch_steps(len(source), world, cfg.batch_size)
    monitor = make_monitor(cfg, source, workers, device_id, screen)  # None unless --knn-every
    if accelerator.is_main_process:
        screen.write_skipped(out / "skipped.txt")

    # model and optimiser
    model = build_model(cfg)
    if accelerator.is_main_process:  # room for the checkpoints, before the first step
        check_free_space(out, checkpoint_bytes(model, cfg.optimizer))
    bn = batch_norm(cfg.sync_bn, "sync_bn" in given, world, accelerator.device)
    if bn.startswith("global"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model, channels_last = memory_format_and_compile(model, cfg, accelerator.device)
    global_batch = cfg.batch_size * world
    lr = scaled_lr(cfg, global_batch)
    optimizer, scheduler = build_optimizer(cfg, model, lr, steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is not registered for checkpointing: its lr is a function of the step
    # (step_update below), and accelerate would load it back with pickle (weights_only=False).
    operands = loss_operands(cfg.loss_precision, accelerator.mixed_precision)
    loss_impl = resolve_impl(cfg.loss_impl, accelerator.device, operands)

    resolved = {**dataclasses.asdict(cfg), "world_size": world, "global_batch": global_batch,
                "scaled_lr": lr, "steps_per_epoch": steps_per_epoch, "n_train": len(source),
                "dali_placement": placement(device_id), "loss_impl_resolved": loss_impl,
                "loss_operands": str(operands).removeprefix("torch."), "batch_norm": bn,
                "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
                "channels_last_resolved": channels_last, "warmup_epochs_resolved": warmup_epochs(cfg),
                "scan": screen.summary() if screen.checked else None}
    start_step, loader_state, history = (resume(cfg, resuming, out, accelerator, model, steps_per_epoch,
                                                source.shards is not None) if resuming else (0, None, [[world, 0]]))
    resolved["world_sizes"] = history  # [[processes, from step], ...]: a resume may change them
    start_epoch = start_step // steps_per_epoch
    report = Report(accelerator.is_main_process, out, accelerator.reduce, accelerator.device)
    report.start(resolved, model=accelerator.unwrap_model(model), source=source, start_epoch=start_epoch,
                 start_step=start_step)
    report.rewind(start_step)  # a killed run may have logged steps after its last checkpoint
    if accelerator.is_main_process:
        write_json(out / "config.json", resolved)
    if cfg.log_with:  # hyperparameters must be flat scalars for tensorboard: others go as JSON text
        flat = {**resolved, **{f"aug_{k}": v for k, v in resolved["aug"].items()}}
        flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                for k, v in flat.items() if k != "aug"}
        accelerator.init_trackers("tensorboard", config=flat)
        report.tracker = accelerator.log

    step, saved = start_step, (start_step if cfg.resume else None)
    last = min(cfg.epochs, start_epoch + cfg.stop_after) if cfg.stop_after else cfg.epochs
    guard = FiniteGuard(accelerator, model, optimizer, cfg.max_nonfinite)  # skips non-finite steps on the device
    clock = SaveClock(cfg.save_every_minutes)
    stop = StopSignal(accelerator)  # SIGINT / SIGTERM: checkpoint at the next step boundary, then exit

    def sync(epoch_end: bool) -> tuple[bool, bool]:
        """The loop's host sync, at log steps, saves and epoch ends only: one read of the logged loss
        sums, the guard's counters and the flags every process must agree on. Returns (stop, save)."""
        logged, guarded, flags = read_back([report.pending(), guard.pending(), stop.pending(clock.due(epoch_end))])
        skipped = guard.check(guarded, out, saved)  # raises past --max-nonfinite: nothing is saved after
        if skipped:
            report.nonfinite(*skipped)
        report.logged(step, logged, log=step % cfg.log_every == 0, epoch_end=epoch_end)
        return stop.settle(flags)

    def epoch_loader(epoch: int, done: int):
        """This process's two-view batches of `epoch`, after the `done` steps a mid-epoch resume took."""
        state = loader_state if done else None
        try:
            return train_loader(source, batch_size=cfg.batch_size, size=cfg.image_size, aug=cfg.aug, shard=shard,
                                seed=cfg.seed, epoch=epoch, workers=workers, device_id=device_id,
                                channels_last=channels_last, state=state, done=done)
        except RuntimeError as err:  # DALI refused the saved state of a checkpoint without a file list
            if state is None:
                raise
            raise unrestorable(resuming, out, rank, err) from None

    def save(progress: dict, loader_state: bytes | None = None) -> None:
        nonlocal saved
        save_checkpoint(accelerator, out, progress, resolved, loader_state)
        saved = step
        clock.saved()

    try:
        for epoch in range(start_epoch, last):
            done = step - epoch * steps_per_epoch  # steps of this epoch taken before a mid-epoch resume
            loader = epoch_loader(epoch, done)
            model.train()
            report.epoch_start(epoch, steps_per_epoch, done)
            stopping = False
            for view1, view2, _ in loader:
                if step == epoch * steps_per_epoch:
                    report.first_batch()
                scheduler.step_update(step)
                views = torch.cat([view1, view2]).to(accelerator.device, non_blocking=True)
                z = model(views)  # (2B, proj_dim): one pass, BN sees both views
                loss = nt_xent_loss(*z.chunk(2), cfg.temperature, impl=loss_impl, operands=operands)
                accelerator.backward(loss)
                step += 1
                report.step(loss, guard.step(loss, step), optimizer.param_groups[0]["lr"], global_batch)
                if step % steps_per_epoch == 0:
                    break  # the epoch's end synchronises below
                periodic = cfg.save_every_steps > 0 and step % cfg.save_every_steps == 0
                if step % cfg.log_every == 0 or periodic or stop.now:
                    stopping, due = sync(epoch_end=False)
                    if stopping or due or periodic:
                        save({"epoch": epoch - 1, "step": step}, loader.state())
                    if stopping:
                        break
            del loader  # free the pipeline's threads before the next one starts
            if step % steps_per_epoch == 0:  # the epoch is whole
                stopping, due = sync(epoch_end=True)
                if monitor is not None and (epoch + 1) % cfg.knn_every == 0 and accelerator.is_main_process:
                    # main process only, no collectives inside: the others go on to the checkpoint's barrier
                    report.knn(epoch, step, monitor(accelerator.unwrap_model(model).backbone, accelerator.device))
                if stopping or due or epoch + 1 == last:
                    save({"epoch": epoch, "step": step})
            if stopping:
                report.interrupted(stop.message(step, out, argv, world))
                accelerator.end_training()
                return 128 + stop.signum
    except KeyboardInterrupt:  # a second signal: stop at once; the checkpoint on disk is whole
        report.interrupted(stop.abort_message(step, out, saved))
        return 130
    finally:
        stop.restore()

    if accelerator.is_main_process:
        export_backbone(accelerator.unwrap_model(model), out / "backbone.safetensors")
    report.finish(done=last == cfg.epochs)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
