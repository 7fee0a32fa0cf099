"""One output folder, one run: `run.lock` in --out, taken before anything else is written there.

The lock is a small JSON file (host, process, start time), created with O_CREAT | O_EXCL, which is atomic on
local file systems and on NFS (v3 and later): of two runs started together into one folder, one creates it and
the other reads who holds it and refuses in one sentence. Only the run's main process takes it (the others
wait for it at accelerate's barrier and fail with it), so every process of one run, on one machine or many,
shares its one lock.

A lock is stale when its holder cannot be running: on this host, no process has its pid; on another host
(a shared file system), its heartbeat is older than STALE_S (the holder touches the file every HEARTBEAT_S).
A stale lock is taken over, and the take-over is said: it is renamed aside first (one rename wins, whoever
else tries at the same moment), checked to be the lock judged stale, then replaced by this run's.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from simclr_dali.errors import UserError

NAME = "run.lock"
HEARTBEAT_S = 30.0  # how often the holder touches its lock
STALE_S = 300.0  # a lock from another host untouched this long belongs to a machine that is gone
UNFILLED_S = 10.0  # a lock still empty this long was left by a process that died creating it


@dataclass
class Holder:
    host: str
    pid: int
    started: str  # local time, ISO 8601, to the second
    command: str = ""

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host}, started {self.started}" + \
            (f" ({self.command})" if self.command else "")


def this_process() -> Holder:
    return Holder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"),
                  " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv and sys.argv[0] else "")


def read_holder(path: Path) -> Holder | None:
    """Who holds the lock at `path`; None when it is gone, or unreadable (written by a process that died
    between creating and filling it, which counts as a dead holder on this host)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(str(data["host"]), int(data["pid"]), str(data["started"]), str(data.get("command", "")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Holder(socket.gethostname(), 0, "at an unknown time", "an unreadable lock file")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_because(holder: Holder, path: Path) -> str | None:
    """Why the lock cannot belong to a running process, or None when it may."""
    if holder.host == socket.gethostname():
        if holder.pid == os.getpid():
            return "this process left it (an earlier run that did not end)"
        if not holder.pid:
            return "it was never filled in" if _age(path) > UNFILLED_S else None
        return None if pid_alive(holder.pid) else f"its process {holder.pid} is gone"
    age = _age(path)
    return f"{holder.host} has not touched it for {age / 60:.0f} minutes" if age > STALE_S else None


def _age(path: Path) -> float:
    """Seconds since `path` was last touched (0 if it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class RunLock:
    """The lock this process holds on `out` (take() gives one); release() removes it if it is still ours."""

    def __init__(self, out: Path, holder: Holder, took_over: str = ""):
        self.path, self.holder, self.took_over = out / NAME, holder, took_over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if read_holder(self.path) == self.holder:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def _create(path: Path, holder: Holder) -> bool:
    """Create the lock whole or not at all: written to a file of this process's own, then hard-linked to its
    name (atomic, and it fails where the name exists), so that no other run ever reads it half-written. Where
    the file system has no hard links, O_CREAT | O_EXCL, filled in after (an unfilled lock counts as stale only
    once it is UNFILLED_S old)."""
    own = path.with_name(f"{NAME}.{holder.host}-{holder.pid}")
    _fill(os.open(own, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644), holder)
    try:
        os.link(own, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        pass
    finally:
        own.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    _fill(fd, holder)
    return True


def _fill(fd: int, holder: Holder) -> None:
    """The holder's JSON into open file `fd`, on the disk before it returns; closes it."""
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(holder.__dict__, f)
        f.flush()
        os.fsync(f.fileno())


def take(out: Path) -> RunLock:
    """This process's lock on output folder `out` (which exists), or one sentence naming the run that holds it."""
    path, me = out / NAME, this_process()
    for attempt in range(50):  # a lock released, taken over or being filled in between our reads: look again
        if _create(path, me):
            return RunLock(out, me)
        holder = read_holder(path)
        if holder is None:
            continue
        why = stale_because(holder, path)
        if why is None and not holder.pid:  # being filled in (no hard links here)
            time.sleep(0.1)
            continue
        if why is None:
            raise UserError(f"output folder {out} is in use by another run ({holder}): wait for it to finish, "
                            f"or choose another --out (its lock is {path})")
        aside = path.with_name(f"{NAME}.stale-{me.host}-{me.pid}")
        try:
            os.rename(path, aside)  # of several takers, one renames the stale lock; the others find it gone
        except FileNotFoundError:
            continue
        if read_holder(aside) != holder:  # what was renamed is not the lock judged stale: put it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        if _create(path, me):
            return RunLock(out, me, took_over=f"took over the lock of {out} from {holder}: {why}")
    raise UserError(f"output folder {out}: could not take its lock {path} (other runs keep taking it); "
                    f"choose another --out")
