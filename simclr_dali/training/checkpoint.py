"""Never lose work: the output folder is checked before training, checkpoints are written beside
the old ones and swapped in with renames (the one before the newest is kept), and a run resumes only
from a checkpoint whose every file reads back whole, offering the previous one when the newest does not.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from simclr_dali.errors import UserError
from simclr_dali.readback import (
    Unreadable,
    check_manifest,
    check_safetensors,
    check_torch_file,
    manifest,
    present,
    read_json,
    read_jsonl,
)
from simclr_dali.training.layers import FIXED, flat_resolved, resume_changes
from simclr_dali.training.room import no_room, no_room_is_one_sentence


def save_checkpoint(accelerator, out: Path, state: dict, config: dict, loader_state: bytes | None = None,
                    need: int = 0) -> None:
    """Accelerate state + our progress (+ each process's DALI state mid-epoch), atomically: a crash,
    even kill -9, at any moment leaves a whole checkpoint that find_checkpoint finds, and the one
    before the newest stays beside it (checkpoint.prev), for when the newest is damaged later. A full
    disk (`need`: about what one checkpoint holds) is one sentence, with nothing half-written left."""
    tmp = out / "checkpoint.tmp"
    with no_room_is_one_sentence(out, tmp, need, accelerator.is_main_process, lambda: previous_is_whole(out)):
        write_checkpoint(accelerator, out, state, config, loader_state)
    accelerator.wait_for_everyone()


def write_checkpoint(accelerator, out: Path, state: dict, config: dict, loader_state: bytes | None) -> None:
    final, prev, tmp, drop = (out / name for name in (NEWEST, PREVIOUS, "checkpoint.tmp", "checkpoint.drop"))
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if loader_state is not None:
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / f"dali_{accelerator.process_index}.state").write_bytes(loader_state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / "config.json", config)
            as_umask_allows(*tmp.iterdir())
            # written last, its presence marks a whole save; it lists every file's size and checksum
            write_json(tmp / "progress.json", {**state, "files": manifest(tmp)})
            as_umask_allows(tmp / "progress.json")
            fsync(*tmp.iterdir(), tmp)  # on the disk before the swap, also across a power cut
            if drop.exists():  # left by a crash during the last clean-up
                shutil.rmtree(drop)
            if final.exists():  # renames only: at every moment one of final, prev, tmp is whole
                if prev.exists():
                    prev.rename(drop)
                final.rename(prev)
            tmp.rename(final)
            fsync(out)
            shutil.rmtree(drop, ignore_errors=True)
            shutil.rmtree(out / LEGACY, ignore_errors=True)
    except OSError as err:
        if no_room(err):
            raise
        raise UserError(f"cannot write a checkpoint to {tmp}: {err.strerror}; {previous_is_whole(out)}") from None


def previous_is_whole(out: Path) -> str:
    found = find_checkpoint(out)
    return f"the previous checkpoint, {found}, is whole" if found else "no checkpoint was written before this one"


NEWEST, PREVIOUS = "checkpoint", "checkpoint.prev"
LEGACY = "checkpoint.old"  # older versions' name for the previous checkpoint, left by a crash mid-swap
SET_ASIDE = "checkpoint.set-aside"  # a newest checkpoint passed over by --resume-from


def checkpoints(out: Path) -> list[Path]:
    """The checkpoint folders in `out`, newest first. A folder only takes the name `checkpoint` whole
    (renamed from checkpoint.tmp), so `checkpoint` is the newest; without it (a crash between two
    renames) the previous one is."""
    return [out / name for name in (NEWEST, PREVIOUS, LEGACY) if (out / name).is_dir()]


def find_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint, whole unless damaged since (open_checkpoint checks)."""
    found = checkpoints(out)
    return found[0] if found else None


def write_json(path: Path, obj: dict) -> None:
    """`obj` as JSON, atomically; strict JSON (a NaN or infinity is refused, never written bare: the settings
    are checked to be finite numbers before any work)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def export_backbone(model, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    with no_room_is_one_sentence(path.parent, tmp, need, True, lambda: f"the checkpoint in {path.parent} is whole"):
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    as_umask_allows(tmp)
    os.replace(tmp, path)


def as_umask_allows(*paths: Path) -> None:
    """Files readable by the group and others as far as the umask allows, like any file the user
    writes: safetensors writes its files 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def refuse_to_overwrite(cfg, out: Path) -> None:
    if find_checkpoint(out) and not cfg.resume:
        raise UserError(f"{out} already holds a checkpoint: pass --resume to continue that run, "
                        f"or choose another --out")


def prepare_out(cfg, out: Path, accelerator):
    """Refuse to overwrite a run by accident; take the folder's lock (one folder, one run: simclr_dali.lock)
    before anything is written there; check that it is writable before training. `cfg` is train.Config.
    Returns the lock on the main process (None on the others, which share it)."""
    from simclr_dali import lock as run_lock

    refuse_to_overwrite(cfg, out)
    held = None
    if accelerator.is_main_process:
        if out.exists() and not out.is_dir():
            raise UserError(f"output folder {out} is a file")
        try:
            out.mkdir(parents=True, exist_ok=True)
            held = run_lock.take(out)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            if held is not None:
                held.release()
            raise UserError(f"cannot write to output folder {out}: {err.strerror}") from None
        if held.took_over:
            print(f"note: {held.took_over}", file=sys.stderr)
        try:
            refuse_to_overwrite(cfg, out)  # again: the run that held the lock a moment ago may have written one
        except UserError:
            held.release()
            raise
    accelerator.wait_for_everyone()
    return held


@dataclasses.dataclass
class Saved:
    """A checkpoint read back whole: its folder, the settings it was written with and its progress."""
    path: Path
    config: dict
    progress: dict

    @property
    def step(self) -> int:
        return self.progress["step"]


def check_checkpoint(path: Path) -> Saved:
    """Every file of the checkpoint in `path`, read back as far as it can be without loading it:
    Unreadable (without a remedy) names the first one missing, cut short or not what train.py writes.
    The files progress.json lists are whole when their sizes and checksums match; in older checkpoints,
    without the list, each file's format is read back instead."""
    progress = read_json(path / "progress.json", "", need=("epoch", "step"))
    listed = "files" in progress
    if listed:
        check_manifest(path, progress["files"], "")
    config = read_json(path / "config.json", "", need=("global_batch", "world_size", "steps_per_epoch"))
    counts = [("progress.json", progress, "step", 0)] + [("config.json", config, key, 1) for key in
                                                         ("global_batch", "world_size", "steps_per_epoch")]
    for name, values, key, least in counts:
        if type(values[key]) is not int or values[key] < least:
            raise Unreadable(path / name, f"holds {key} {values[key]!r}, not a count: it was not written by train.py")
    if not listed:
        check_safetensors(path / "model.safetensors", "")
        check_torch_file(path / "optimizer.bin", "")
        for rank in range(config["world_size"]):
            check_torch_file(path / f"random_states_{rank}.pkl", "")
            if progress["step"] % config["steps_per_epoch"]:  # mid-epoch: each process's DALI state
                present(path / f"dali_{rank}.state", "")
        if (path / "scaler.pt").exists():  # --mixed-precision fp16
            check_torch_file(path / "scaler.pt", "")
    return Saved(path, config, progress)


def open_checkpoint(out: Path, resume_from: str = "") -> Saved:
    """The checkpoint that --resume (the newest in `out`) or --resume-from continues from, read back
    whole; a damaged one is one sentence that offers another whole checkpoint of the run if there is one."""
    flag = "--resume-from" if resume_from else "--resume"
    path = Path(resume_from) if resume_from else find_checkpoint(out)
    if path is None:
        raise UserError(f"--resume: there is no checkpoint in {out / NEWEST}")
    if not path.is_dir():
        raise UserError(f"--resume-from {path}: no such checkpoint folder")
    try:
        return check_checkpoint(path)
    except Unreadable as err:
        raise err.fixed_by(other_checkpoint(out, path, flag), f"{flag}: ") from None


def other_checkpoint(out: Path, bad: Path, flag: str = "--resume") -> str:
    """What to do when checkpoint `bad` cannot be used: resume from another whole one of the run, or
    start again."""
    for other in checkpoints(out):
        if other.resolve() == bad.resolve():
            continue
        try:
            saved = check_checkpoint(other)
        except Unreadable:
            continue
        return f"the checkpoint {other} (step {saved.step}) is whole: continue from it with --resume-from {other} " \
               f"in place of {flag}"
    return f"{out} holds no other whole checkpoint: start the run again (with another --out)"


def check_metrics(out: Path) -> None:
    """metrics.jsonl, which a resumed run appends to, readable (a last line cut by a kill is fine)."""
    if (out / "metrics.jsonl").is_file():
        read_jsonl(out / "metrics.jsonl", "delete what is damaged (or the whole file) and resume again")


def resumed_batch(saved: Saved, world: int, given: int | None) -> int:
    """The per-process batch of a resumed run: its global batch, which the schedule and the learning
    rate were built for, over this invocation's processes. `given`: --batch-size, if named."""
    total = saved.config["global_batch"]
    if total % world:
        sizes = ", ".join(str(w) for w in range(1, total + 1) if total % w == 0)
        raise UserError(f"--resume: the run's global batch of {total} images does not split over {world} "
                        f"processes; resume it on {sizes} process(es)")
    if given is not None and given != total // world:
        raise UserError(f"--resume: the run's global batch is {total} images, so --batch-size on {world} "
                        f"process(es) is {total // world}, not {given} (or leave --batch-size out)")
    return total // world


def resume(cfg, saved: Saved, out: Path, accelerator, model, optimizer, steps_per_epoch: int,
           wds: bool) -> tuple[int, bytes | None, list]:
    """Load checkpoint `saved` (open_checkpoint) into `model` and `optimizer`, whose groups keep this run's
    settings (a weight decay or momentum given on resume holds; the saved state, momentum buffers and
    moments, is the checkpoint's); returns the step it was saved at, DALI's state when it stops inside an
    epoch and was written by as many processes with the same views (else the epoch goes on from its next
    global batch, pipelines.loader.shard_order), and the run's world sizes so far as [[processes, from
    step], ...]. With --resume-from, a newer checkpoint is set aside first."""
    path, config, step = saved.path, saved.config, saved.step
    if step > cfg.epochs * steps_per_epoch:
        raise UserError(f"--resume: the checkpoint in {path} is at step {step}, past the end of {cfg.epochs} epochs "
                        f"of {steps_per_epoch} steps: give --epochs {-(-step // steps_per_epoch)} or more")
    resume_changes(flat_resolved(config), cfg, set(FIXED))  # what the saved state fixes: one sentence
    if config["steps_per_epoch"] != steps_per_epoch:
        raise UserError(f"--resume: {cfg.data} now gives {steps_per_epoch} steps per epoch, not the "
                        f"{config['steps_per_epoch']} the checkpoint in {path} was written with: "
                        f"the data changed")
    before, world = config["world_size"], accelerator.num_processes
    history = config.get("world_sizes") or [[before, 0]]
    views = views_changed(cfg, config)  # DALI's saved state is of the old graph: the epoch goes on without it
    if world != before:
        history = history + [[world, step]]
    if world != before and step % steps_per_epoch and wds:
        raise UserError(f"--resume: the checkpoint in {path} stops inside an epoch of tar shards, which DALI "
                        f"splits by process: finish that epoch on {before} process(es), then resume on {world}")
    if views and step % steps_per_epoch and wds:  # the rest of the epoch cannot be read without DALI's state
        raise UserError(f"--resume: the checkpoint in {path} stops inside an epoch of tar shards, whose reader "
                        f"cannot skip to the step: finish that epoch without {views}, then resume with it")
    flag = "--resume-from" if cfg.resume_from else "--resume"
    shapes = {k: tuple(v.shape) for k, v in accelerator.unwrap_model(model).state_dict().items()}
    try:
        check_safetensors(path / "model.safetensors", "", expect=shapes, what=f"--backbone {cfg.backbone}")
    except Unreadable as err:
        raise err.fixed_by(other_checkpoint(out, path, flag), f"{flag}: ") from None
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]  # this run's settings
    load_state_safely(accelerator, path, lambda: other_checkpoint(out, path, flag))  # no pickle that runs code
    for group, settings in zip(optimizer.param_groups, groups):  # load_state_dict restored the saved run's
        group.update(settings)
    newest = out / NEWEST
    if accelerator.is_main_process and newest.is_dir() and newest.resolve() != path.resolve():
        shutil.rmtree(out / SET_ASIDE, ignore_errors=True)  # set aside by an earlier --resume-from
        newest.rename(out / SET_ASIDE)  # so that the next save keeps `path` as the previous checkpoint
    accelerator.wait_for_everyone()
    if step % steps_per_epoch == 0 or world != before or views:
        return step, None, history
    return step, (path / f"dali_{accelerator.process_index}.state").read_bytes(), history


def views_changed(cfg, config: dict) -> str:
    """The view settings (augmentations, image size) in which this run differs from checkpoint `config`, as
    flags, or "" where it does not."""
    views = {f.name for f in dataclasses.fields(cfg.aug)} | {"image_size"}
    changed = resume_changes(flat_resolved(config), cfg, views)
    return ", ".join("--" + name.replace("_", "-") for name, _, _ in changed)


def unrestorable(saved: Saved, out: Path, rank: int, err: Exception) -> UserError:
    """DALI could not restore a mid-epoch pipeline state from checkpoint `saved`."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200].rstrip(".")
    return UserError(f"--resume: {saved.path / f'dali_{rank}.state'} is not a DALI pipeline state this version "
                     f"can restore ({reason}): {other_checkpoint(out, saved.path)}")


# -- when to save ----------------------------------------------------------------------------------
class SaveClock:
    """--save-every-minutes: a checkpoint is due once that long has passed since the last one (0: at
    every epoch end, as short runs want)."""

    def __init__(self, minutes: float):
        self.seconds, self.last = minutes * 60, time.monotonic()

    def due(self, epoch_end: bool) -> bool:
        return (self.seconds == 0 and epoch_end) or (self.seconds > 0 and time.monotonic() - self.last >= self.seconds)

    def saved(self) -> None:
        self.last = time.monotonic()


def fsync(*paths: Path) -> None:
    """Flush files (and folders: their entries) to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- checkpoint files that load without running code ---------------------------------------------
def check_checkpoint_files(path: Path, rank: int) -> None:
    """accelerate's load_state reads model.safetensors (no code) and optimizer.bin with
    torch.load(weights_only=True), but registered objects (custom_checkpoint_*.pkl) with
    weights_only=False, and it swallows any error on random_states_*.pkl. We register nothing, so a
    custom pickle is refused here, and the random states are loaded once here the safe way."""
    from accelerate.utils import load

    customs = sorted(p.name for p in path.iterdir() if re.fullmatch(r"custom_checkpoint_\d+\.pkl", p.name))
    if customs:
        raise UserError(f"--resume: {path / customs[0]} is a pickle that would run code on loading "
                        f"(written by an older version of train.py); refusing to load it")
    states = path / f"random_states_{rank}.pkl"
    if states.is_file():
        try:
            load(states, weights_only=True)
        except Exception as err:
            raise UserError(f"--resume: {states} does not hold plain random-number states "
                            f"({type(err).__name__}); refusing to load it") from None


def load_state_safely(accelerator, path: Path, remedy: Callable[[], str]) -> None:
    """accelerator.load_state, with a refused pickle, or a file that passed checkpoint.check_checkpoint
    and still does not load, reported in one sentence ending in `remedy()`."""
    check_checkpoint_files(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, ValueError, KeyError, TypeError, OSError, EOFError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200].rstrip(".")
        raise UserError(f"--resume: the checkpoint in {path} does not load ({reason}): {remedy()}") from None
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met a global it does not allow
        from accelerate.utils import load

        culprit = path
        for file in sorted([*path.glob("*.bin"), *path.glob("*.pkl")]):
            try:
                load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                culprit = file
                break
        raise UserError(f"--resume: {culprit} holds more than tensors and plain data, and loading it "
                        f"could run code; refusing to load it") from None
