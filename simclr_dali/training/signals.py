"""SIGINT / SIGTERM during training: finish the step, checkpoint, exit with the command that goes on."""
from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path

import torch


class StopSignal:
    """Turns SIGINT and SIGTERM into a request that the loop honours at the next step boundary.

    A second signal of either kind stops at once (KeyboardInterrupt); the checkpoint on disk is
    always whole anyway, since saving swaps folders with renames. With several processes every one
    must stop (and save) at the same step, since they meet in collectives: they agree at the loop's
    sync points, where `pending` all-reduces the flags with the values read there anyway. One process
    alone needs no agreement and sees its signal at every step (`signalled`).
    """

    def __init__(self, accelerator):
        self.accelerator, self.signum, self.previous = accelerator, 0, {}
        if threading.current_thread() is threading.main_thread():  # the only thread that may set them
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handler(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def now(self) -> bool:
        """One process alone, signalled: stop at this step. (Several processes see it at a sync point.)"""
        return self.accelerator.num_processes == 1 and bool(self.signum)

    def pending(self, save_due: bool) -> torch.Tensor:
        """[signal, save due] on the device, the maximum over the processes (an all-reduce, no host
        read): any process's signal, and the main process's clock, decide for all."""
        flags = torch.tensor([float(self.signum), float(save_due)], device=self.accelerator.device)
        return self.accelerator.reduce(flags, "max") if self.accelerator.num_processes > 1 else flags

    def settle(self, values: list[float]) -> tuple[bool, bool]:
        """(stop, save) from pending()'s values, read at a sync point."""
        self.signum = int(values[0]) or self.signum
        return bool(self.signum), bool(values[1])

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def message(self, step: int, out: Path, argv: list[str] | None, world: int) -> str:
        """The one line printed after the checkpoint: where it is and how to go on."""
        return f"{self.name} at step {step}: the checkpoint is in {out / 'checkpoint'}; {how_to_go_on(argv, world)}"

    @staticmethod
    def abort_message(step: int, out: Path, saved: int | None) -> str:
        return f"stopped at once at step {step} by a second signal; {saved_so_far(saved, out)}"

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def saved_so_far(saved: int | None, out: Path) -> str:
    """What a run stopped without a checkpoint of its own leaves: `saved`, the step of its newest one."""
    return f"the checkpoint of step {saved} in {out / 'checkpoint'} is whole" if saved is not None \
        else "no checkpoint was written yet"


def how_to_go_on(argv: list[str] | None, world: int) -> str:
    """How to continue a stopped run from its newest checkpoint, whichever checkpoint this run started from."""
    args, given = [], iter(sys.argv[1:] if argv is None else argv)
    for arg in given:
        if arg == "--resume-from":
            next(given, None)
        elif arg != "--resume" and not arg.startswith("--resume-from="):
            args.append(arg)
    return "launch it as before with --resume" if world > 1 else \
        "continue with  " + shlex.join(["python", "train.py", *args, "--resume"])
