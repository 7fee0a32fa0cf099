"""What keeps a run from losing work or training on garbage, for train.py: interruption by a signal,
non-finite steps, room on the output disk, and checkpoint files that load without running code.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from timm.optim import Lars
from torch.optim.sgd import sgd

from cli import UserError


# -- SIGINT / SIGTERM: finish the step, checkpoint, exit ------------------------------------------
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
        args, given = [], iter(sys.argv[1:] if argv is None else argv)
        for arg in given:  # the newest checkpoint is the one to go on from, whichever this run started from
            if arg == "--resume-from":
                next(given, None)
            elif arg != "--resume" and not arg.startswith("--resume-from="):
                args.append(arg)
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


class SaveClock:
    """--save-every-minutes: a checkpoint is due once that long has passed since the last one (0: at
    every epoch end, as short runs want)."""

    def __init__(self, minutes: float):
        self.seconds, self.last = minutes * 60, time.monotonic()

    def due(self, epoch_end: bool) -> bool:
        return (self.seconds == 0 and epoch_end) or (self.seconds > 0 and time.monotonic() - self.last >= self.seconds)

    def saved(self) -> None:
        self.last = time.monotonic()


# -- non-finite steps, decided on the device ------------------------------------------------------
class GuardedLars(Lars):
    """timm's LARS (same settings, same state, so checkpoints load either way) whose step honours the
    `found_inf` / `grad_scale` protocol of torch's fused optimisers, as GradScaler and FiniteGuard set
    it: where found_inf is 1 no weight and no momentum changes, and nothing is read back to the host.

    The update is timm's: g' = trust * (g + wd * w) with trust = coeff |w| / (|g| + wd |w| + eps) (1
    where either norm is 0; only for groups with weight decay, so biases and norm weights are exempt),
    then SGD with momentum on g': buf = m * buf + (1 - dampening) g', w -= lr * buf (or Nesterov). The
    SGD part is torch's fused kernel, which takes found_inf on the device and skips the whole update.
    """
    _step_supports_amp_scaling = True  # GradScaler hands over found_inf instead of reading it on the host

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip, scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._group_step(group, params, skip, scale)
        return loss

    def _group_step(self, group: dict, params: list, skip, scale) -> None:
        grads = [p.grad for p in params]
        if scale is not None:  # fp16: the trust ratio needs the true gradient
            grads = torch._foreach_div(grads, scale)
        wd = group["weight_decay"]
        if wd != 0 or group["always_adapt"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            trust = group["trust_coeff"] * w_norm / (g_norm + w_norm * wd + group["eps"])
            trust = torch.where((w_norm > 0) & (g_norm > 0), trust, 1.0)
            if group["trust_clip"]:
                trust = torch.clamp(trust / group["lr"], max=1.0)
            grads = torch._foreach_add(grads, params, alpha=wd)
            torch._foreach_mul_(grads, list(trust.unbind()))
        bufs = []
        if group["momentum"] != 0:
            for p in params:  # zeros, not torch's first-step copy: a first step that is skipped must
                # leave them defined, and m * 0 + g = g is that copy bit for bit
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(self.state[p]["momentum_buffer"])
        sgd(params, grads, bufs, fused=True, found_inf=skip, weight_decay=0.0,
            momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
            maximize=False)


def zero_momentum(optimizer) -> None:
    """Momentum buffers of torch's SGD set to zero before the first step: its fused kernel leaves them
    uninitialised when that step is skipped (it allocates them empty, then skips)."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) != 0:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


class FiniteGuard:
    """Skips the optimiser steps whose loss or gradients are not finite, without a host sync.

    Each step decides on the device (loss finite, total gradient norm finite; with several processes an
    all-reduce, so that every process takes the same decision) and hands the decision to the optimiser
    through the found_inf protocol of torch's fused optimisers (GuardedLars for LARS): a skipped step
    changes no weight and no optimiser state. Under fp16 accelerate's GradScaler does the same for the
    gradients, and only the loss is checked here. The count and the first and last skipped steps stay on
    the device; `pending()` hands them to the loop's next sync point, and `check` stops the run there
    once more than `limit` steps were skipped: at most --log-every - 1 steps after the one that
    exceeded the budget, and always before a checkpoint is written.
    """

    def __init__(self, accelerator, model, optimizer, limit: int):
        self.accelerator, self.model, self.optimizer, self.limit = accelerator, model, optimizer, limit
        self.inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
        device = accelerator.device
        # skipped steps, first and last skipped step, the last skipped step's loss
        self.state = torch.tensor([0.0, -1.0, -1.0, 0.0], dtype=torch.float64, device=device)
        self.seen = 0  # skipped steps already reported

    def step(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The optimiser step if finite, skipped on the device if not; zeroes the gradients. Returns the
        decision, a boolean on the device."""
        loss = loss.detach().float()
        ok = torch.isfinite(loss)
        if self.accelerator.scaler is None:  # under fp16 the scaler finds non-finite gradients itself
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True))
        if self.accelerator.num_processes > 1:  # every process takes the same decision
            ok = self.accelerator.reduce(ok.float(), "sum") == self.accelerator.num_processes
        bad = ~ok
        if self.accelerator.scaler is None:
            self.inner.found_inf, self.inner.grad_scale = bad.float(), None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        count, first, last, value = self.state.unbind()
        self.state = torch.stack([count + bad, torch.where(bad & (first < 0), step, first),
                                  torch.where(bad, step, last), torch.where(bad, loss.double(), value)])
        return ok

    def pending(self) -> torch.Tensor:
        return self.state

    def check(self, values: list[float], out: Path, saved: int | None) -> tuple[int, int, str] | None:
        """At a sync point, with pending()'s values: the new skipped steps as (last step, count, problem),
        or None; raises the run's one-sentence error once more than `limit` steps were skipped."""
        count, first, last, value = int(values[0]), int(values[1]), int(values[2]), values[3]
        if count == self.seen:
            return None
        new, self.seen = count - self.seen, count
        problem = f"the loss became {value}" if not math.isfinite(value) else "the gradients became non-finite"
        if count > self.limit:
            raise nonfinite_error(problem, first, last, count, self.limit, out, saved)
        return last, new, problem


def nonfinite_error(problem: str, first: int, last: int, count: int, limit: int, out: Path,
                    saved: int | None) -> UserError:
    where = (f"the last checkpoint, {out / 'checkpoint'} (step {saved}), is from before it"
             if saved is not None else "no checkpoint was written yet")
    steps = f"at step {last}" if first == last else f"at step {last} ({count} non-finite steps since step {first})"
    budget = (f"{count} non-finite steps, more than --max-nonfinite {limit}" if limit
              else "pass --max-nonfinite K to skip up to K such steps")
    return UserError(f"{problem} {steps}: lower --lr, raise --temperature, or train in bf16 rather than fp16 "
                     f"({budget}); nothing was saved after it, and {where}")


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
    newest and the previous one stay, each holding the weights and the optimiser's state (one tensor
    per weight for momentum, two for AdamW), plus the exported backbone."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_checkpoint = weights * (1 + (2 if optimizer_name == "adamw" else 1))
    return 3 * per_checkpoint + weights


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
