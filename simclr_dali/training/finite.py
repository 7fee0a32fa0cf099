"""Non-finite steps, decided on the device: skipped without a host sync, counted, and the run stopped in
one sentence past --max-nonfinite."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from simclr_dali.errors import UserError


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

    def arm(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Decides, on the device, whether step `step` is taken (its loss and gradients finite), hands the
        decision to the optimiser, whose next step() then changes nothing where it is not, and counts it.
        Returns the decision, a boolean on the device."""
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
