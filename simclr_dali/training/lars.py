"""timm's LARS with a step that can be skipped on the device (the found_inf protocol): see GuardedLars."""
from __future__ import annotations

import torch
from timm.optim import Lars
from torch.optim.sgd import sgd


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
