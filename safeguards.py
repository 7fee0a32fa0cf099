"""What keeps a run from losing work or training on garbage, for train.py: interruption by a signal,
non-finite steps, room on the output disk, and checkpoint files that load without running code.
"""
from __future__ import annotations

import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch

from cli import UserError


# -- SIGINT / SIGTERM: finish the step, checkpoint, exit ------------------------------------------
class StopSignal:
    """Turns SIGINT and SIGTERM into a request that the loop honours at the next step boundary.

    A second signal of either kind stops at once (KeyboardInterrupt); the checkpoint on disk is
    always whole anyway, since saving swaps folders with renames. With several processes every one
    must stop at the same step (they meet in collectives), so they agree through a tiny all-reduce,
    only on steps that `due` names (one process alone needs no agreement and checks every step).
    """

    def __init__(self, accelerator):
        self.accelerator, self.signum, self.previous = accelerator, 0, {}
        if threading.current_thread() is threading.main_thread():  # the only thread that may set them
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handler(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, due: bool = True) -> bool:
        """True on every process once any of them was signalled (checked where `due`)."""
        if self.accelerator.num_processes == 1:
            return bool(self.signum)
        if not due:
            return False
        flag = torch.tensor([float(self.signum)], device=self.accelerator.device)
        self.signum = int(self.accelerator.reduce(flag, "max").item()) or self.signum
        return bool(self.signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def message(self, step: int, out: Path, argv: list[str] | None, world: int) -> str:
        """The one line printed after the checkpoint: where it is and how to go on."""
        args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        how = "launch it as before with --resume" if world > 1 else \
            "continue with  " + shlex.join(["python", "train.py", *args, "--resume"])
        return f"{self.name} at step {step}: the checkpoint is in {out / 'checkpoint'}; {how}"

    @staticmethod
    def abort_message(step: int, out: Path, saved: int | None) -> str:
        where = f"the checkpoint of step {saved} in {out / 'checkpoint'} is whole" if saved is not None \
            else "no checkpoint was written yet"
        return f"stopped at once at step {step} by a second signal; {where}"

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# -- non-finite steps ---------------------------------------------------------------------------
def step_if_finite(accelerator, model, optimizer, loss: torch.Tensor) -> str:
    """Applies the optimiser step when the loss and the gradients are finite; zeroes the gradients
    either way. Returns "" when the step was applied, else what was not finite.

    One host sync per step (the `.item()`): whether to update must be known before the next step's
    forward reads the weights, and an optimiser step cannot be undone on the device without a copy
    of every weight and state tensor. accelerate's GradScaler makes the same choice under fp16. The
    check itself runs on the device: one fused norm over the gradients.
    """
    ok = torch.isfinite(loss.detach()).all()
    if accelerator.scaler is None:  # under fp16 the scaler skips steps with inf gradients itself
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True))
    bad = (~ok).float().reshape(1)
    if accelerator.num_processes > 1:  # every process takes the same decision
        bad = accelerator.reduce(bad, "max")
    if bad.item() == 0:
        optimizer.step()
        problem = ""
    else:
        value = accelerator.reduce(loss.detach().float().reshape(1), "mean").item()
        problem = "the gradients became non-finite" if torch.isfinite(torch.tensor(value)) else \
            f"the loss became {value}"
    optimizer.zero_grad(set_to_none=True)
    return problem


def nonfinite_error(problem: str, step: int, skipped: int, limit: int, out: Path, saved: int | None) -> UserError:
    where = (f"the last checkpoint, {out / 'checkpoint'} (step {saved}), is from before it"
             if saved is not None else "no checkpoint was written yet")
    budget = (f"it is non-finite step {skipped}, more than --max-nonfinite {limit}" if limit
              else "pass --max-nonfinite K to skip up to K such steps")
    return UserError(f"{problem} at step {step}: lower --lr, raise --temperature, or train in bf16 rather "
                     f"than fp16 ({budget}); nothing was saved after it, and {where}")


def fsync(*paths: Path) -> None:
    """Flush files (and folders: their entries) to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- room on the output disk ----------------------------------------------------------------------
def checkpoint_bytes(model, optimizer_name: str) -> int:
    """About what the output folder must hold at the worst moment: while a checkpoint is written the
    previous one stays, each holding the weights and the optimiser's state (one tensor per weight
    for momentum, two for AdamW), plus the exported backbone."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_checkpoint = weights * (1 + (2 if optimizer_name == "adamw" else 1))
    return 2 * per_checkpoint + weights


def check_free_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"output folder {out} has {free / 2**20:.0f} MiB free, but its checkpoints need "
                        f"about {need / 2**20:.0f} MiB: free some space or choose another --out")


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


def load_state_safely(accelerator, path: Path) -> None:
    """accelerator.load_state, with a refused pickle reported in one sentence."""
    check_checkpoint_files(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
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
