"""SimCLR pretraining: DALI two-view pipeline -> timm backbone + head -> NT-Xent -> LARS.

`main` reads as its phases: settings, the run's folder and checkpoint, data, model and optimiser, what
the run records, the loop, the exported backbone. The loop is `train_epochs`, on one screen; what it
does at its sync points (log, guard, save) is `Loop`'s.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from simclr_dali.environment import check_environment
from simclr_dali.models.loss_core import resolve_impl
from simclr_dali.pipelines.failures import StoreLost
from simclr_dali.settings import given as given_fields
from simclr_dali.training.ahead import AHEAD_FRACTION, NextEpoch
from simclr_dali.training.checkpoint import (
    SaveClock,
    Saved,
    check_metrics,
    export_backbone,
    open_checkpoint,
    prepare_out,
    resume,
    resumed_batch,
    save_checkpoint,
    unrestorable,
    write_json,
)
from simclr_dali.training.config import Config, parse_command
from simclr_dali.training.finite import FiniteGuard
from simclr_dali.training.layers import flat_resolved, given_record, resume_changes
from simclr_dali.training.optim import build_optimizer, scaled_lr, warmup_epochs
from simclr_dali.training.peers import Exchange, one_voice
from simclr_dali.training.peers import watch as watch_peers
from simclr_dali.training.recipes import recipe_record
from simclr_dali.training.room import check_free_space, checkpoint_bytes, one_checkpoint_bytes
from simclr_dali.training.setup import (
    batch_norm,
    build_model,
    dali_device_id,
    load_train_source,
    loss_operands,
    make_accelerator,
    make_monitor,
    memory_format_and_compile,
    threads_per_process,
)
from simclr_dali.training.signals import StopSignal, how_to_go_on, saved_so_far
from simclr_dali.training.trackers import PROJECT, prepare_stores

if TYPE_CHECKING:  # modules that --help does not load: read here only for the types of Parts
    from accelerate import Accelerator
    from timm.scheduler import CosineLRScheduler

    from simclr_dali.lock import RunLock
    from simclr_dali.models.method import Method
    from simclr_dali.pipelines.loader import Shard
    from simclr_dali.pipelines.sources import Source
    from simclr_dali.training.monitor import KnnMonitor


@dataclass
class Parts:
    """What the phases before the loop settle; the loop reads them and changes none."""
    cfg: Config
    accelerator: Accelerator
    out: Path
    resuming: Saved | None
    lock: RunLock | None = None  # the output folder's run.lock, held by the main process only
    # prepare_data: what this process reads, with how many threads, on which device
    source: Source | None = None
    shard: Shard | None = None
    device_id: int | None = None  # DALI's: None on the CPU
    workers: int = 1
    steps_per_epoch: int = 0
    monitor: KnnMonitor | None = None  # --knn-every's, where it is on
    # prepare_model: the networks as accelerate wraps them, the method itself, its optimiser and schedule
    model: torch.nn.Module | None = None  # DDP's wrapper, where there are several processes
    optimizer: torch.optim.Optimizer | None = None  # accelerate's wrapper around it
    method: Method | None = None  # the model unwrapped: the method's loss and after_step (models/method.py)
    scheduler: CosineLRScheduler | None = None
    channels_last: bool = False
    global_batch: int = 0
    lr: float = 0.0  # the base lr scaled by the global batch
    operands: torch.dtype = torch.float32
    loss_impl: str = "auto"
    checkpoint_bytes: int = 0  # about what one checkpoint holds
    resolved: dict = dataclasses.field(default_factory=dict)


def open_run(cfg: Config, given: set[str]) -> Parts:
    """The accelerator, the output folder, the seed, and the checkpoint to resume from (read back whole
    first), with the run's global batch spread over however many processes this invocation has."""
    from accelerate.utils import set_seed

    check_environment()  # what accelerate and torch.distributed read, before they read it
    accelerator = make_accelerator(cfg.log_with, cfg.out)
    watch_peers(accelerator.num_processes)
    out = Path(cfg.out)
    lock = prepare_out(cfg, out, accelerator)
    try:
        set_seed(cfg.seed)
        resuming = open_checkpoint(out, cfg.resume_from) if cfg.resume else None
        if resuming is not None:
            check_metrics(out)
            cfg.batch_size = resumed_batch(resuming, accelerator.num_processes,
                                           cfg.batch_size if "batch_size" in given else None)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Parts(cfg, accelerator, out, resuming, lock=lock)


def prepare_data(p: Parts):
    """Each process reads its own shard; steps per epoch are equal on every process. Files DALI cannot
    decode are screened first (skipped or refused, --on-bad-image). Returns the screening."""
    from simclr_dali.pipelines.loader import Shard, epoch_steps
    from simclr_dali.pipelines.verify import Screening

    acc, world = p.accelerator, p.accelerator.num_processes
    p.workers = p.cfg.workers or threads_per_process(world)
    exchange = Exchange(acc.process_index, world)
    screen = Screening(p.cfg.on_bad_image, p.workers, acc.is_main_process, share=exchange.share,
                       gather=exchange.gather, rank=acc.process_index, world=world)
    p.source = load_train_source(p.cfg, world, screen)
    p.shard, p.device_id = Shard(acc.process_index, world), dali_device_id(acc)
    p.steps_per_epoch = epoch_steps(len(p.source), world, p.cfg.batch_size)
    p.monitor = make_monitor(p.cfg, p.source, p.workers, p.device_id, screen, acc.process_index,
                             world)  # None unless --knn-every
    if acc.is_main_process:
        screen.write_skipped(p.out / "skipped.txt")
    return screen


def prepare_model(p: Parts, given: set[str]) -> str:
    """Model (global BatchNorm where it applies), memory format, optimiser and schedule, prepared by
    accelerate; what NT-Xent's products read and which implementation computes them. Returns how
    BatchNorm normalises."""
    cfg, acc = p.cfg, p.accelerator
    model = build_model(cfg)
    if acc.is_main_process:  # room for the checkpoints, before the first step
        check_free_space(p.out, checkpoint_bytes(model, cfg.optimizer))
    p.checkpoint_bytes = one_checkpoint_bytes(model, cfg.optimizer)
    bn = batch_norm(cfg.sync_bn, "sync_bn" in given, acc.num_processes, acc.device)
    if bn.startswith("global"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model, p.channels_last = memory_format_and_compile(model, cfg, acc.device)
    p.global_batch = cfg.batch_size * acc.num_processes
    p.lr = scaled_lr(cfg, p.global_batch)
    optimizer, p.scheduler = build_optimizer(cfg, model, p.lr, p.steps_per_epoch)
    # The scheduler is not registered for checkpointing: its lr is a function of the step
    # (step_update), and accelerate would load it back with pickle (weights_only=False).
    p.model, p.optimizer = acc.prepare(model, optimizer)
    p.operands = loss_operands(cfg.loss_precision, acc.mixed_precision)
    p.loss_impl = resolve_impl(cfg.loss_impl, acc.device, p.operands)
    p.method = acc.unwrap_model(p.model)  # its loss and after_step, outside DDP and compile
    p.method.loss_options = {"impl": p.loss_impl, "operands": p.operands}
    return bn


def record(p: Parts, bn: str, screen, given: set[str]) -> None:
    """config.json's settings, what the run worked out from them (layers.DERIVED), what it was given (`given`:
    now, and to the runs it was recorded from or resumes), and each change a resume made (`changes`: from the
    step it holds, the earlier resumes' first). `given`: the names given on this command line."""
    from simclr_dali.pipelines.loader import placement

    acc, cfg = p.accelerator, p.cfg
    values = flat_resolved(dataclasses.asdict(cfg))
    every = (given_fields(cfg) or set()) | (given_fields(cfg.aug) or set())
    saved = p.resuming.config if p.resuming else None
    changes = [] if saved is None else saved.get("changes", []) + [
        {"step": p.resuming.step, "setting": name, "from": old, "to": new}
        for name, old, new in resume_changes(flat_resolved(saved), cfg, given)]
    p.resolved = {**dataclasses.asdict(p.cfg), "world_size": acc.num_processes, "workers_resolved": p.workers,
                  "global_batch": p.global_batch,
                  "scaled_lr": p.lr, "steps_per_epoch": p.steps_per_epoch,
                  "n_train": len(p.source), "dali_placement": placement(p.device_id),
                  "loss_impl_resolved": p.loss_impl, "loss_operands": str(p.operands).removeprefix("torch."),
                  "batch_norm": bn, "device": str(acc.device), "mixed_precision": acc.mixed_precision,
                  "channels_last_resolved": p.channels_last, "warmup_epochs_resolved": warmup_epochs(p.cfg),
                  "scan": screen.summary() if screen.checked else None, "given": given_record(cfg, every),
                  "changes": changes, **recipe_record(cfg.recipe, cfg.image_size, cfg.method, values, every, saved)}


def start_trackers(p: Parts, report) -> None:
    """--log-with: accelerate's trackers (trackers.py), given the settings as flat scalars (others as
    JSON text)."""
    if not p.cfg.log_with:
        return
    if p.accelerator.is_main_process:
        prepare_stores(p.cfg.log_with, p.out)
    flat = {**p.resolved, **{f"aug_{k}": v for k, v in p.resolved["aug"].items()}}
    flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat.items() if k != "aug"}
    p.accelerator.init_trackers(PROJECT, config=flat)
    report.tracker = p.accelerator.log


class Loop:
    """The loop's state between steps, and what it does at its sync points: the one host read of the
    logged losses, the guard's counters and the flags every process must agree on; the loader of each
    epoch; the checkpoint."""

    def __init__(self, p: Parts, report, start_step: int, loader_state: bytes | None, argv):
        self.p, self.report, self.loader_state, self.argv = p, report, loader_state, argv
        self.step, self.saved = start_step, (start_step if p.cfg.resume else None)
        self.guard = FiniteGuard(p.accelerator, p.model, p.optimizer, p.cfg.max_nonfinite)  # on the device
        self.clock = SaveClock(p.cfg.save_every_minutes)
        self.stop = StopSignal(p.accelerator)  # SIGINT / SIGTERM: checkpoint at the next step boundary, then exit
        self.next_epoch = NextEpoch()

    def sync(self, epoch_end: bool) -> tuple[bool, bool]:
        """Log steps, saves and epoch ends only. Returns (stop, save)."""
        from simclr_dali.training.report import read_back

        report, guard, stop = self.report, self.guard, self.stop
        logged, guarded, flags = read_back([report.pending(), guard.pending(), stop.pending(self.clock.due(epoch_end))])
        skipped = guard.check(guarded, self.p.out, self.saved)  # raises past --max-nonfinite: nothing saved after
        if skipped:
            report.nonfinite(*skipped)
        report.logged(self.step, logged, log=self.step % self.p.cfg.log_every == 0, epoch_end=epoch_end)
        return stop.settle(flags)

    def loader(self, epoch: int, done: int):
        """This process's two-view batches of `epoch`, after the `done` steps a mid-epoch resume took."""
        from simclr_dali.pipelines.loader import train_loader

        p, cfg = self.p, self.p.cfg
        state = self.loader_state if done else None
        try:
            return train_loader(p.source, batch_size=cfg.batch_size, size=cfg.image_size, aug=cfg.aug, shard=p.shard,
                                seed=cfg.seed, epoch=epoch, workers=p.workers, device_id=p.device_id,
                                channels_last=p.channels_last, state=state, done=done)
        except RuntimeError as err:  # DALI refused the saved state of a checkpoint without a file list
            if state is None:
                raise
            raise unrestorable(p.resuming, p.out, p.accelerator.process_index, err) from None

    def loader_for(self, epoch: int, done: int):
        """`epoch`'s loader: the one built ahead while the last epoch ended (NextEpoch), else built now."""
        ahead = self.next_epoch.take(epoch) if done == 0 else None
        return ahead if ahead is not None else self.loader(epoch, done)

    def save(self, progress: dict, loader_state: bytes | None = None) -> None:
        save_checkpoint(self.p.accelerator, self.p.out, progress, self.p.resolved, loader_state,
                        need=self.p.checkpoint_bytes)
        self.saved = self.step
        self.clock.saved()

    def knn(self, epoch: int) -> None:
        """--knn-every: every process extracts its part of the monitor's images; the main process scores them
        and reports (the others go on to the checkpoint's barrier)."""
        p = self.p
        if p.monitor is not None and (epoch + 1) % p.cfg.knn_every == 0:
            top1 = p.monitor(p.accelerator.unwrap_model(p.model).backbone, p.accelerator.device)
            if p.accelerator.is_main_process:
                self.report.knn(epoch, self.step, top1)


def train_epochs(loop: Loop, start_epoch: int, last: int) -> int | None:
    """Epochs start_epoch..last-1: one forward pass over both views, the method's loss, backward, a step
    the guard may skip on the device, then what the method moves after a step (momentum networks, queue).
    Returns the exit status when a signal stopped it, else None."""
    p, report, stop = loop.p, loop.report, loop.stop
    cfg, acc, steps = p.cfg, p.accelerator, p.steps_per_epoch
    total = cfg.epochs * steps
    for epoch in range(start_epoch, last):
        done = loop.step - epoch * steps  # steps of this epoch taken before a mid-epoch resume
        loader = loop.loader_for(epoch, done)
        build_next_at = (epoch + 1) * steps - max(2, round(AHEAD_FRACTION * steps))  # this epoch's first step at least
        ahead = epoch + 1 == last  # nothing to build after the last epoch
        p.model.train()
        report.epoch_start(epoch, steps, done)
        stopping = False
        for view1, view2, labels in loader:
            if loop.step == epoch * steps:
                report.first_batch()
            p.scheduler.step_update(loop.step)
            views = torch.cat([view1, view2]).to(acc.device, non_blocking=True)
            outputs = p.model(views)  # one pass over both views (BN sees both): (2B, proj_dim) for SimCLR
            if p.method.needs_labels:  # SupCon's; the other losses leave them where the loader put them
                labels = labels.view(-1).to(acc.device, non_blocking=True)
            loss = p.method.loss(outputs, labels)
            acc.backward(loss)
            loop.step += 1
            taken = loop.guard.arm(loss, loop.step)  # a non-finite step: the optimiser's step changes nothing
            p.optimizer.step()
            p.optimizer.zero_grad(set_to_none=True)
            p.method.after_step(taken, loop.step / total)
            if not ahead and loop.step >= build_next_at:
                loop.next_epoch.start(epoch + 1, lambda e=epoch + 1: loop.loader(e, 0))
                ahead = True
            report.step(loss, taken, p.optimizer.param_groups[0]["lr"], p.global_batch)
            if loop.step % steps == 0:
                break  # the epoch's end synchronises below
            periodic = cfg.save_every_steps > 0 and loop.step % cfg.save_every_steps == 0
            if loop.step % cfg.log_every == 0 or periodic or stop.now:
                stopping, due = loop.sync(epoch_end=False)
                if stopping or due or periodic:
                    loop.save({"epoch": epoch - 1, "step": loop.step}, loader.state())
                if stopping:
                    break
        del loader  # free the pipeline's threads before the next one starts
        if loop.step % steps == 0:  # the epoch is whole
            stopping, due = loop.sync(epoch_end=True)
            loop.knn(epoch)
            if stopping or due or epoch + 1 == last:
                loop.save({"epoch": epoch, "step": loop.step})
        if stopping:
            report.interrupted(stop.message(loop.step, p.out, loop.argv, acc.num_processes))
            return 128 + stop.signum
    return None


@one_voice  # several processes: the first to fail says why, the others stop quietly (peers.py)
def main(argv: list[str] | None = None) -> int:
    """The command (train.py, simclr-train): a mistake is one sentence and exit status 2."""
    return train(argv)


def train(argv: list[str] | None = None) -> int:
    """One training invocation from its flags; a UserError propagates (the Python API raises it).
    Returns the exit status: 0, or 128 + the signal that stopped it after its checkpoint."""
    cfg, given = parse_command(argv)
    p = open_run(cfg, given)
    try:
        return train_run(p, cfg, given, argv)
    finally:
        if p.lock is not None:
            p.lock.release()


def train_run(p: Parts, cfg: Config, given: set[str], argv: list[str] | None) -> int:
    """train() once the output folder is this run's."""
    from simclr_dali.training.report import Report

    screen = prepare_data(p)
    bn = prepare_model(p, given)
    record(p, bn, screen, given)

    acc, steps = p.accelerator, p.steps_per_epoch
    start_step, loader_state, history = (resume(cfg, p.resuming, p.out, acc, p.model, p.optimizer, steps,
                                                p.source.shards is not None)
                                         if p.resuming else (0, None, [[acc.num_processes, 0]]))
    p.resolved["world_sizes"] = history  # [[processes, from step], ...]: a resume may change them
    start_epoch = start_step // steps
    report = Report(acc.is_main_process, p.out, acc.reduce, acc.device)
    report.start(p.resolved, model=acc.unwrap_model(p.model), source=p.source, start_epoch=start_epoch,
                 start_step=start_step)
    report.rewind(start_step)  # a killed run may have logged steps after its last checkpoint
    if acc.is_main_process:
        write_json(p.out / "config.json", p.resolved)
    start_trackers(p, report)

    loop = Loop(p, report, start_step, loader_state, argv)
    last = min(cfg.epochs, start_epoch + cfg.stop_after) if cfg.stop_after else cfg.epochs
    try:
        status = train_epochs(loop, start_epoch, last)
    except KeyboardInterrupt:  # a second signal: stop at once; the checkpoint on disk is whole
        report.interrupted(loop.stop.abort_message(loop.step, p.out, loop.saved))
        return 130
    except StoreLost as err:  # the bucket is gone past the retries: what is saved, and how to go on
        raise StoreLost(f"{err}; {saved_so_far(loop.saved, p.out)}: once the store answers, "
                        f"{how_to_go_on(loop.argv, acc.num_processes)}") from None
    finally:
        loop.stop.restore()
        loop.next_epoch.discard()
    if status is not None:
        acc.end_training()
        return status

    if acc.is_main_process:
        export_backbone(acc.unwrap_model(p.model), p.out / "backbone.safetensors")
    report.finish(done=last == cfg.epochs)
    acc.end_training()
    return 0
