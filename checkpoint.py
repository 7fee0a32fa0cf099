"""Never lose work: the output folder is checked before training, checkpoints are written beside
the old one and swapped in with renames, and a run resumes from the last whole one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cli import UserError


def save_checkpoint(accelerator, out: Path, state: dict, config: dict, loader_state: bytes | None = None) -> None:
    """Accelerate state + our progress (+ each process's DALI state mid-epoch), atomically: a crash,
    even kill -9, at any moment leaves the previous checkpoint whole, and find_checkpoint finds it."""
    from safeguards import fsync

    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
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
            write_json(tmp / "progress.json", state)  # written last: its presence marks a whole save
            as_umask_allows(*tmp.iterdir())
            fsync(*tmp.iterdir(), tmp)  # on the disk before the swap, also across a power cut
            if final.exists():
                if old.exists():  # left by a crash during the last clean-up; `final` is whole
                    shutil.rmtree(old)
                final.rename(old)
            tmp.rename(final)
            fsync(out)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise UserError(f"cannot write a checkpoint to {tmp}: {err.strerror}; the previous one in {out} "
                        f"is whole") from None
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
    as_umask_allows(tmp)
    os.replace(tmp, path)


def as_umask_allows(*paths: Path) -> None:
    """Files readable by the group and others as far as the umask allows, like any file the user
    writes: safetensors writes its files 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def prepare_out(cfg, out: Path, accelerator) -> None:
    """Refuse to overwrite a run by accident; check that the folder is writable before training.
    `cfg` is train.Config."""
    if find_checkpoint(out) and not cfg.resume:
        raise UserError(f"{out} already holds a checkpoint: pass --resume to continue that run, "
                        f"or choose another --out")
    if accelerator.is_main_process:
        if out.exists() and not out.is_dir():
            raise UserError(f"output folder {out} is a file")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to output folder {out}: {err.strerror}") from None
    accelerator.wait_for_everyone()


def saved_config(out: Path) -> tuple[Path, dict]:
    """The last whole checkpoint and the settings it was written with."""
    path = find_checkpoint(out)
    if path is None:
        raise UserError(f"--resume: there is no checkpoint in {out / 'checkpoint'}")
    return path, json.loads((path / "config.json").read_text())


def resumed_batch(out: Path, world: int, given: int | None) -> int:
    """The per-process batch of a resumed run: its global batch, which the schedule and the learning
    rate were built for, over this invocation's processes. `given`: --batch-size, if named."""
    path, saved = saved_config(out)
    total = saved["global_batch"]
    if total % world:
        sizes = ", ".join(str(w) for w in range(1, total + 1) if total % w == 0)
        raise UserError(f"--resume: the run's global batch of {total} images does not split over {world} "
                        f"processes; resume it on {sizes} process(es)")
    if given is not None and given != total // world:
        raise UserError(f"--resume: the run's global batch is {total} images, so --batch-size on {world} "
                        f"process(es) is {total // world}, not {given} (or leave --batch-size out)")
    return total // world


def resume(cfg, out: Path, accelerator, steps_per_epoch: int, wds: bool) -> tuple[int, bytes | None, list]:
    """Load the last checkpoint; returns the step it was saved at, DALI's state when it stops inside an
    epoch and was written by as many processes (else the epoch goes on from its next global batch,
    pipelines.loader.shard_order), and the run's world sizes so far as [[processes, from step], ...]."""
    path, saved = saved_config(out)
    for key in ("backbone", "small_stem", "proj_hidden", "proj_dim", "data"):
        if saved.get(key) != getattr(cfg, key):
            raise UserError(f"--resume: the checkpoint in {path} was trained with --{key.replace('_', '-')} "
                            f"{saved.get(key)}, not {getattr(cfg, key)}")
    if saved.get("steps_per_epoch") != steps_per_epoch:
        raise UserError(f"--resume: {cfg.data} now gives {steps_per_epoch} steps per epoch, not the "
                        f"{saved.get('steps_per_epoch')} the checkpoint in {path} was written with: "
                        f"the data changed")
    step = json.loads((path / "progress.json").read_text())["step"]
    before, world = saved["world_size"], accelerator.num_processes
    history = saved.get("world_sizes") or [[before, 0]]
    if world != before:
        history = history + [[world, step]]
        if step % steps_per_epoch and wds:
            raise UserError(f"--resume: the checkpoint in {path} stops inside an epoch of tar shards, which DALI "
                            f"splits by process: finish that epoch on {before} process(es), then resume on {world}")
    from safeguards import load_state_safely

    load_state_safely(accelerator, path)  # refuses pickles that would run code
    if step % steps_per_epoch == 0 or world != before:
        return step, None, history
    state = path / f"dali_{accelerator.process_index}.state"
    if not state.is_file():
        raise UserError(f"--resume: {path} stops inside an epoch but lacks {state.name}")
    return step, state.read_bytes(), history
