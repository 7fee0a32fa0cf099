"""What a run is built from, each decided in one function: the accelerator, the data, the model, its
memory format, what NT-Xent's products read, and how BatchNorm normalises."""
from __future__ import annotations

import torch

from simclr_dali.errors import UserError
from simclr_dali.training.config import Config


def make_accelerator(log_with: str = "", out: str | None = None):
    """accelerate's Accelerator, with --log-with's trackers (trackers.py). cpu=True is what makes several
    CPU processes form a gloo group (plain Accelerator() on a CPU-only machine leaves each alone)."""
    from accelerate import Accelerator

    from simclr_dali.training.trackers import make_trackers

    return Accelerator(cpu=not torch.cuda.is_available(), log_with=make_trackers(log_with, out) if log_with else None,
                       project_dir=out if log_with else None)


def threads_per_process(world: int) -> int:
    """The CPU threads each process uses (DALI's, the image check's): the cores this process may run on (its
    affinity, as a container or a scheduler sets it) shared by the run's processes on this machine
    (LOCAL_WORLD_SIZE, which accelerate launch and torchrun set; all `world` of them without it)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    here = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    return max(1, cores // max(1, here))


def dali_device_id(accelerator) -> int | None:
    """DALI's device: this process's GPU, or None for a CPU-only pipeline."""
    return accelerator.local_process_index if accelerator.device.type == "cuda" else None


def load_train_source(cfg: Config, world: int, screen=None):
    from simclr_dali.pipelines.sources import load_source

    source = load_source(cfg.data, "train", cfg.test_data or None, screen=screen)
    per_process = len(source) // world
    if per_process < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {per_process} training images "
                        f"each of the {world} process(es) reads from {cfg.data} ({len(source)} in all)")
    check_method_data(cfg, source, world)
    return source


def check_method_data(cfg: Config, source, world: int) -> None:
    """What a method asks of the data, in one sentence before any work: SupCon's labels (shards carry
    theirs in the stream: models.methods.SupCon checks its first batch), a MoCo queue shorter than the data."""
    from simclr_dali.models.methods import METHODS

    if METHODS[cfg.method].needs_labels and source.shards is None and (source.labels < 0).all():
        raise UserError(f"--method {cfg.method} needs labels, and {cfg.data} has none: give it class sub-folders "
                        f"(or CIFAR batches, or shards with .cls entries), or train with --method simclr")
    if cfg.method == "moco" and cfg.queue_size > len(source) - cfg.batch_size * world:
        raise UserError(f"--queue-size {cfg.queue_size} is at least as large as the {len(source)} training images "
                        f"of {cfg.data} less a global batch: the queue would hold keys of the very images it is "
                        f"compared with; pass --queue-size {max(1, (len(source) // 4))} or less")


def make_monitor(cfg: Config, source, workers: int, device_id: int | None, screen=None, rank: int = 0,
                 world: int = 1):
    """The optional online kNN check (monitor.KnnMonitor) on the run's own train and test splits, its
    extraction split over the `world` processes."""
    if not cfg.knn_every:
        return None
    from simclr_dali.pipelines.sources import load_source
    from simclr_dali.training.monitor import KnnMonitor

    return KnnMonitor(source, load_source(cfg.data, "test", cfg.test_data or None, screen), n_train=cfg.knn_train,
                      per_class=cfg.knn_per_class, n_test=cfg.knn_test, size=cfg.image_size,
                      batch_size=cfg.batch_size, workers=workers, device_id=device_id, seed=cfg.seed, rank=rank,
                      world=world)


def build_model(cfg: Config):
    """The method's networks (models/methods.py) around a timm backbone: forward gives what its loss takes."""
    from simclr_dali.models.backbone import create_backbone
    from simclr_dali.models.methods import METHODS

    backbone = create_backbone(cfg.backbone, cfg.small_stem, cfg.image_size)
    return METHODS[cfg.method].build(backbone, cfg)  # from the settings the method takes, and no other


def memory_format_and_compile(model, cfg: Config, device: torch.device):
    """(model, channels_last): channels-last where --channels-last says so (auto: on CUDA, what bf16
    convolutions on tensor cores want; not on the CPU, where it measured no faster: docs/results.md,
    Throughput), then compiled in place with --compile (the state dict keeps its names, no _orig_mod.)."""
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
