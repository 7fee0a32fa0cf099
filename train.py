"""SimCLR pretraining: DALI two-view pipeline -> timm backbone + head -> NT-Xent -> LARS.

    python train.py --data digits --epochs 30 --out runs/digits
    accelerate launch train.py --data /images/train --image-size 224 --batch-size 256 --out runs/x

Reads top to bottom: settings, data, model, optimiser, loop, save.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cli import UserError, add_dataclass_flags, dataclass_from_args, exit_on_user_error
from pipelines.augment import Augment


# -----------------------------------------------------------------------------------------------
# Settings
# -----------------------------------------------------------------------------------------------
@dataclass
class Config:
    data: str = "digits"  # 'digits', a folder of images, 'cifar10:PATH' or 'cifar100:PATH'
    test_data: str = ""  # a separate folder for evaluation (else a folder keeps 10% aside)
    out: str = "runs/simclr"  # output folder: config, metrics, checkpoint, backbone weights
    backbone: str = "resnet18"  # any timm model name
    small_stem: bool = False  # 3x3 stride-1 stem without max-pool, for 32-pixel images
    proj_hidden: int = 0  # projection head hidden width (0 = the backbone's feature width)
    proj_dim: int = 128  # projection head output size
    image_size: int = 32  # side of the augmented views, in pixels
    epochs: int = 100  # training epochs
    batch_size: int = 256  # images per process per step (each gives two views)
    lr: float = 0.3  # base learning rate per 256 images, scaled by the global batch
    lr_scaling: str = "linear"  # linear: lr * B/256; sqrt: lr * sqrt(B/256)
    optimizer: str = "lars"  # lars (timm), sgd or adamw
    momentum: float = 0.9  # momentum for lars and sgd
    weight_decay: float = 1e-6  # weight decay (biases and norm weights are exempt)
    warmup_epochs: float = 10.0  # linear warmup length, then cosine decay to zero
    temperature: float = 0.1  # NT-Xent tau
    loss_impl: str = "auto"  # NT-Xent implementation: auto, triton, tiled or reference
    seed: int = 0  # seeds weights, data order and augmentations
    resume: bool = False  # continue from OUT/checkpoint
    stop_after: int = 0  # end this invocation after this many epochs, checkpointed (0 = never)
    workers: int = 0  # DALI CPU threads per process (0 = cores / processes)
    log_every: int = 10  # steps between lines in metrics.jsonl
    aug: Augment = field(default_factory=Augment)  # augmentation settings (flags of their own)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description="SimCLR pretraining with DALI, timm and accelerate.")
    add_dataclass_flags(parser, Config, skip=("aug",))
    add_dataclass_flags(parser.add_argument_group("augmentations"), Augment)
    args = parser.parse_args(argv)
    cfg = dataclass_from_args(Config, args, aug=dataclass_from_args(Augment, args))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    checks = [
        (cfg.temperature > 0, f"--temperature must be positive, got {cfg.temperature}"),
        (cfg.batch_size > 0, f"--batch-size must be positive, got {cfg.batch_size}"),
        (cfg.epochs > 0, f"--epochs must be positive, got {cfg.epochs}"),
        (cfg.image_size >= 8, f"--image-size must be at least 8 pixels, got {cfg.image_size}"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (cfg.lr_scaling in ("linear", "sqrt"), f"--lr-scaling must be linear or sqrt, got {cfg.lr_scaling!r}"),
        (cfg.optimizer in ("lars", "sgd", "adamw"), f"--optimizer must be lars, sgd or adamw, got {cfg.optimizer!r}"),
        (cfg.loss_impl in ("auto", "triton", "tiled", "reference"),
         f"--loss-impl must be auto, triton, tiled or reference, got {cfg.loss_impl!r}"),
        (cfg.stop_after >= 0, f"--stop-after must not be negative, got {cfg.stop_after}"),
        (cfg.warmup_epochs >= 0, f"--warmup-epochs must not be negative, got {cfg.warmup_epochs}"),
    ]
    for ok, sentence in checks:
        if not ok:
            raise UserError(sentence)


def scaled_lr(cfg: Config, global_batch: int) -> float:
    ratio = global_batch / 256
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))


# -----------------------------------------------------------------------------------------------
# Data, model, optimiser
# -----------------------------------------------------------------------------------------------
def make_accelerator():
    from accelerate import Accelerator

    # cpu=True is what makes several CPU processes form a gloo group (plain Accelerator() on a
    # CPU-only machine leaves each process training alone).
    return Accelerator(cpu=not torch.cuda.is_available())


def dali_device_id(accelerator) -> int | None:
    """DALI's device: this process's GPU, or None for a CPU-only pipeline."""
    return accelerator.local_process_index if accelerator.device.type == "cuda" else None


def load_train_source(cfg: Config, world: int):
    from pipelines.sources import load_source

    source = load_source(cfg.data, "train", cfg.test_data or None)
    per_process = len(source) // world
    if per_process < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {per_process} training images "
                        f"each of the {world} process(es) reads from {cfg.data} ({len(source)} in all)")
    return source


def build_model(cfg: Config):
    from models.backbone import SimCLRModel, create_backbone

    return SimCLRModel(create_backbone(cfg.backbone, cfg.small_stem), cfg.proj_hidden, cfg.proj_dim)


def build_optimizer(cfg: Config, model, lr: float, steps_per_epoch: int):
    """timm's optimiser (biases and norm weights exempt from decay and LARS adaptation) and its
    warmup + cosine schedule, stepped per iteration."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    kwargs = {"momentum": cfg.momentum} if cfg.optimizer in ("lars", "sgd") else {}
    optimizer = create_optimizer_v2(model, cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                                    filter_bias_and_bn=True, **kwargs)
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=0.0,
                                  warmup_t=warmup, warmup_lr_init=lr * 1e-3 if warmup else lr,
                                  warmup_prefix=True, t_in_epochs=False)
    return optimizer, scheduler


# -----------------------------------------------------------------------------------------------
# Saving: checkpoints are written beside the old one and swapped in with renames
# -----------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, out: Path, state: dict, config: dict) -> None:
    """Accelerate state + our progress, atomically: a crash leaves the previous checkpoint whole."""
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "config.json", config)
        write_json(tmp / "progress.json", state)  # written last: its presence marks a whole save
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(out: Path) -> Path | None:
    """The last whole checkpoint (also after a crash between the two renames)."""
    for path in (out / "checkpoint", out / "checkpoint.old"):
        if (path / "progress.json").is_file():
            return path
    return None


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def export_backbone(model, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


# -----------------------------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------------------------
@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from accelerate.utils import set_seed

    from models.ntxent import nt_xent_loss, resolve_impl
    from pipelines.loader import Shard, placement, train_loader
    from report import Report

    accelerator = make_accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    out = Path(cfg.out)
    prepare_out(cfg, out, accelerator)
    set_seed(cfg.seed)

    # data: each process reads its own shard; steps per epoch are equal on every process
    source = load_train_source(cfg, world)
    shard, device_id = Shard(rank, world), dali_device_id(accelerator)
    workers = cfg.workers or max(1, (os.cpu_count() or 1) // world)
    steps_per_epoch = (len(source) // world) // cfg.batch_size

    # model and optimiser
    model = build_model(cfg)
    global_batch = cfg.batch_size * world
    lr = scaled_lr(cfg, global_batch)
    optimizer, scheduler = build_optimizer(cfg, model, lr, steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    loss_impl = resolve_impl(cfg.loss_impl, accelerator.device)

    resolved = {**dataclasses.asdict(cfg), "world_size": world, "global_batch": global_batch,
                "scaled_lr": lr, "steps_per_epoch": steps_per_epoch, "n_train": len(source),
                "dali_placement": placement(device_id), "loss_impl_resolved": loss_impl,
                "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision}
    start_epoch = resume(cfg, out, accelerator) if cfg.resume else 0
    report = Report(accelerator.is_main_process, out, accelerator.reduce)
    report.start(resolved, model=accelerator.unwrap_model(model), source=source, start_epoch=start_epoch)
    if accelerator.is_main_process:
        write_json(out / "config.json", resolved)

    step = start_epoch * steps_per_epoch
    last = min(cfg.epochs, start_epoch + cfg.stop_after) if cfg.stop_after else cfg.epochs
    for epoch in range(start_epoch, last):
        loader = train_loader(source, batch_size=cfg.batch_size, size=cfg.image_size, aug=cfg.aug,
                              shard=shard, seed=cfg.seed, epoch=epoch, workers=workers,
                              device_id=device_id)
        model.train()
        report.epoch_start(epoch, steps_per_epoch)
        for view1, view2, _ in loader:
            scheduler.step_update(step)
            view1, view2 = view1.to(accelerator.device), view2.to(accelerator.device)
            z = model(torch.cat([view1, view2]))  # (2B, proj_dim): one pass, BN sees both views
            loss = nt_xent_loss(*z.chunk(2), cfg.temperature, impl=cfg.loss_impl)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            report.step(step, loss.detach(), optimizer.param_groups[0]["lr"], global_batch,
                        log=step % cfg.log_every == 0)
        report.epoch_end(epoch, step)
        del loader  # free the pipeline's threads before the next one starts
        save_checkpoint(accelerator, out, {"epoch": epoch, "step": step}, resolved)

    if accelerator.is_main_process:
        export_backbone(accelerator.unwrap_model(model), out / "backbone.safetensors")
    report.finish(done=last == cfg.epochs)
    accelerator.end_training()
    return 0


def prepare_out(cfg: Config, out: Path, accelerator) -> None:
    """Refuse to overwrite a run by accident; check that the folder is writable before training."""
    if find_checkpoint(out) and not cfg.resume:
        raise UserError(f"{out} already holds a checkpoint: pass --resume to continue that run, "
                        f"or choose another --out")
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to output folder {out}: {err.strerror}") from None
    accelerator.wait_for_everyone()


def resume(cfg: Config, out: Path, accelerator) -> int:
    """Load the last checkpoint; returns the first epoch still to train."""
    path = find_checkpoint(out)
    if path is None:
        raise UserError(f"--resume: there is no checkpoint in {out / 'checkpoint'}")
    saved = json.loads((path / "config.json").read_text())
    for key in ("backbone", "small_stem", "proj_hidden", "proj_dim", "batch_size", "data"):
        if saved.get(key) != getattr(cfg, key):
            raise UserError(f"--resume: the checkpoint in {path} was trained with --{key.replace('_', '-')} "
                            f"{saved.get(key)}, not {getattr(cfg, key)}")
    if saved.get("world_size") != accelerator.num_processes:
        raise UserError(f"--resume: the checkpoint in {path} was written by {saved.get('world_size')} "
                        f"process(es); resume it with the same number, not {accelerator.num_processes}")
    accelerator.load_state(str(path))
    return json.loads((path / "progress.json").read_text())["epoch"] + 1


if __name__ == "__main__":
    sys.exit(main())
