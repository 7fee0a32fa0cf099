"""One process of a run fails, the run stops: every process exits non-zero within seconds, the one that
met the cause says why (one sentence, or its traceback for a bug), and no other prints a traceback.

Processes meet in collectives, so one that stops (a damaged image inside its part of a shard, a bug)
leaves the others waiting on it: on gloo their collective breaks ("Connection closed by peer", with a
traceback on every rank), on NCCL it hangs until the watchdog's timeout. The run's own key-value store
(torch.distributed's, which every process already reaches) carries the news instead:

- `failing()`: a process that stops on an error counts itself in the store; the first to do so is the
  one that says why (every process raises alike on a decision they took together, such as the
  non-finite budget, and only the first prints it);
- a process whose collective broke because another failed exits quietly with status 1 (`one_voice`);
- a watcher thread polls the store once a second and ends a process that is waiting in a collective
  that never returns (os._exit: the checkpoint on disk is whole whenever a process dies, saves are
  atomic).
"""
from __future__ import annotations

import functools
import os
import pickle
import sys
import threading
import time
import traceback
from typing import Callable

from simclr_dali.errors import UserError, leave

KEY = "simclr/failures"  # how many processes of this run stopped on an error
POLL_S = 1.0  # the watcher's period
LINGER_S = 2.0  # how much later than the failing process the others exit

_store = None  # this run's torch.distributed store, once `watch` is called with several processes
_failing = threading.Event()  # this process is stopping on an error of its own
_finished = threading.Event()  # this process's command returned: the watcher stops
_thread: threading.Thread | None = None


def watch(world: int) -> None:
    """Start taking part: several processes share the default process group's store (call after the
    group exists, as accelerate's Accelerator makes it); alone, nothing to do."""
    global _store, _thread
    if world < 2 or _store is not None:
        return
    import torch.distributed as dist

    _store = dist.distributed_c10d._get_default_store()
    _finished.clear()
    _thread = threading.Thread(target=_watcher, name="peers", daemon=True)
    _thread.start()


def finished() -> None:
    """The command returned: stop the watcher and wait for it, so that it is not inside a call to the
    store while the process exits and tears the store down (which aborts the process: "terminate called
    without an active exception", seen at the end of whole runs on a loaded machine)."""
    _finished.set()
    if _thread is not None and _thread is not threading.current_thread():
        _thread.join()


def failing() -> bool:
    """This process stops on an error: tell the others. True when it is the first of the run to (the one
    that says why); alone, always."""
    _failing.set()
    if _store is None:
        return True
    try:
        return _store.add(KEY, 1) == 1
    except Exception:  # the store went with its host: another process stopped first
        return False


def another_failed() -> bool:
    """Whether another process of the run stopped on an error (or the store went away with its host)."""
    if _store is None or _failing.is_set():
        return False
    try:
        return _store.check([KEY])
    except Exception:
        return True


def _watcher() -> None:
    while not _failing.is_set() and not _finished.wait(POLL_S):
        if another_failed() and not _failing.is_set():
            _leave(1, after=LINGER_S)  # waiting in a collective that would never return: its peer is gone


def one_voice(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """A command's entry point, as cli.exit_on_user_error, for a run of one or more processes: a
    UserError is one sentence and exit 2 (printed by the first process that meets it); an error that
    another process's failure caused here is exit 1, quietly; any other error is told to the others,
    then raised as usual."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            status = main(*args, **kwargs)
            finished()
            return status
        except UserError as err:
            if failing():
                print(f"error: {err}", file=sys.stderr)
            _leave(2, err=err)
        except Exception:
            if another_failed():  # this process's collective broke because a peer failed
                _leave(1, after=LINGER_S)
            failing()
            if _store is None:
                raise
            traceback.print_exc()  # a bug met here: this process's traceback, as Python would print it
            _leave(1)

    return wrapper


def _leave(status: int, after: float = 0.0, err: BaseException | None = None):
    """Exit with `status`. With peers, without the usual teardown, which would wait on processes that are
    gone or going (destroying the process group); a process stopped by another's failure leaves `after`
    seconds later, so that the launcher (which names the first process to exit as the run's root cause)
    names the one that failed. Alone, as errors.leave."""
    if _store is None:
        leave(status, err)
    time.sleep(after)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# -- objects between processes, without a collective ---------------------------------------------
class Exchange:
    """share / gather through the run's store, each process waiting by polling it, not in a collective:
    the work before an exchange (the first image check of a large folder) may take longer than a
    collective's timeout. A process that fails meanwhile is seen by the watcher, which ends the others.
    Alone (no store), share is the object itself and gather a list of it."""

    def __init__(self, rank: int, world: int, name: str = "simclr/exchange"):
        self.rank, self.world, self.name, self.count = rank, world, name, 0

    def _key(self, part: str) -> str:
        return f"{self.name}/{self.count}/{part}"

    @staticmethod
    def _wait(key: str):
        while not _store.check([key]):
            time.sleep(0.05)
        return pickle.loads(_store.get(key))

    def share(self, obj):
        """The main process's (rank 0's) `obj`, on every process."""
        if _store is None or self.world < 2:
            return obj
        self.count += 1
        if self.rank == 0:
            _store.set(self._key("main"), pickle.dumps(obj))
            return obj
        return self._wait(self._key("main"))

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if _store is None or self.world < 2:
            return [obj]
        self.count += 1
        _store.set(self._key(str(self.rank)), pickle.dumps(obj))
        return [obj if r == self.rank else self._wait(self._key(str(r))) for r in range(self.world)]
