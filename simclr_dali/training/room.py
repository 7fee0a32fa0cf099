"""Room on the output disk: what a run's checkpoints need, checked before the first step, and a full disk met
while writing (whichever library meets it) turned into one sentence with nothing half-written left."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable

from simclr_dali.errors import UserError


def checkpoint_bytes(model, optimizer_name: str) -> int:
    """About what the output folder must hold at the worst moment: while a checkpoint is written the
    newest and the previous one stay, each holding the weights and the optimiser's state (one tensor
    per weight for momentum, two for AdamW), plus the exported backbone."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * one_checkpoint_bytes(model, optimizer_name) + weights


def one_checkpoint_bytes(model, optimizer_name: str) -> int:
    """About what one checkpoint holds: the weights and the optimiser's state (one tensor per weight for
    momentum, two for AdamW)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights * (1 + (2 if optimizer_name == "adamw" else 1))


def check_free_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"output folder {out} has {free / 2**20:.0f} MiB free, but its checkpoints need "
                        f"about {need / 2**20:.0f} MiB: free some space or choose another --out")


NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "a file-size limit was met",
           errno.EDQUOT: "the disk quota is used up"}


def no_room(err: BaseException) -> str | None:
    """Why `err` says the output disk has no room, whatever library raised it: an OSError's errno, or the words
    of one that wraps it (safetensors: 'File too large (os error 27)'); None when it says something else."""
    if isinstance(err, OSError) and err.errno in NO_ROOM:
        return NO_ROOM[err.errno]
    text = str(err)
    for number, why in NO_ROOM.items():
        if f"os error {number})" in text or os.strerror(number) in text:
            return why
    return None


def size_limit() -> int | None:
    """This process's file-size limit in bytes (`ulimit -f`), None without one."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


@contextlib.contextmanager
def no_room_is_one_sentence(out: Path, tmp: Path, need: int, main: bool, after: Callable[[], str]):
    """Writing into `tmp` (a folder, or a file) under `out` met a full disk or a file-size limit, whichever library
    raised it (safetensors, torch's zip writer, plain writes): one sentence naming the folder, what was being
    written and the room it needs, and what was half-written of `tmp` removed (by the main process, for a folder
    that all processes share); `after()` ends it (what is still whole). torch's writer drops the errno ('file
    write failed'): any error while free space or the limit is short of `need` counts."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 (whatever raised it: re-raised unless it says the disk is full)
        why, free, limit = no_room(err), shutil.disk_usage(out).free, size_limit()
        if why is None and free < need:
            why = "no space left on the device"
        elif why is None and limit is not None and need > limit:
            why = "a file-size limit was met"
        if why is None:
            raise
        named = getattr(err, "filename", None)  # else the newest file of the folder: the one being written
        newest = max(tmp.rglob("*"), key=lambda p: p.stat().st_mtime, default=None) if tmp.is_dir() else None
        what = Path(named) if named else newest or tmp
        if main or tmp.is_file():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        what = what.relative_to(out) if what.is_relative_to(out) else what
        room = f"about {need / 2**20:.1f} MiB" if need else "more room"
        limits = f", and files may hold at most {limit / 2**20:.1f} MiB (ulimit -f)" if limit is not None else ""
        raise UserError(f"no room in output folder {out} while writing {what} ({why}): it needs {room}; the disk has "
                        f"{free / 2**20:.0f} MiB free{limits}; nothing half-written is left, and {after()}") from None
