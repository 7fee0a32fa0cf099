"""The optimiser and its schedule: timm's LARS (or SGD, AdamW) at the learning rate scaled by the global batch,
warmup then cosine decay per step, and every step skippable on the device (the found_inf protocol) so that
a non-finite step changes nothing (finite.FiniteGuard)."""
from __future__ import annotations

import math

import torch

# Each optimiser's learning rate (per 256 images, scaled by the global batch) and weight decay, from the paper that
# trains with it: what a run gets when it names an optimiser other than its method's own (models/methods.py), whose
# values were chosen for that one. LARS: SimCLR [C §2.3]; momentum (heavy-ball SGD) and sgd (Nesterov): MoCo v2 [M1
# §4]; AdamW: MoCo v3's ViT setting, lr 1.5e-4 per 256 and weight decay 0.1 (Chen, Xie, He 2021, §4 and appendix).
OPTIMIZER_DEFAULTS = {"lars": {"lr": 0.3, "weight_decay": 1e-6}, "sgd": {"lr": 0.03, "weight_decay": 1e-4},
                      "momentum": {"lr": 0.03, "weight_decay": 1e-4}, "adamw": {"lr": 1.5e-4, "weight_decay": 0.1}}


def warmup_epochs(cfg) -> float:
    """--warmup-epochs, or by default the method's paper value (SimCLR's 10) capped at a tenth of the run
    (a 10-epoch run warms up for 1: a long warmup in a short run leaves little time at the full rate)."""
    from simclr_dali.models.methods import METHODS

    return cfg.warmup_epochs if cfg.warmup_epochs >= 0 else min(METHODS[getattr(cfg, "method", "simclr")].warmup, cfg.epochs / 10)


def scaled_lr(cfg, global_batch: int) -> float:
    ratio = global_batch / 256
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))


def build_optimizer(cfg, model, lr: float, steps_per_epoch: int):
    """timm's optimiser (biases and norm weights exempt from decay and LARS adaptation) and its
    warmup + cosine schedule, stepped per iteration. Each can skip a step on the device (the found_inf
    protocol, finite.FiniteGuard): torch's fused SGD and AdamW, and timm's LARS as GuardedLars."""
    from timm.optim import Lars, create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    kwargs = {"momentum": cfg.momentum} if cfg.optimizer in ("lars", "sgd", "momentum") else {"fused": True}
    if cfg.optimizer in ("sgd", "momentum"):  # momentum: timm's name for SGD with plain (heavy-ball) momentum
        kwargs["fused"] = True
    if cfg.optimizer == "sgd":  # timm's sgd is Nesterov's, which needs momentum
        kwargs["nesterov"] = cfg.momentum > 0
    optimizer = create_optimizer_v2(model, cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                                    filter_bias_and_bn=True, **kwargs)
    if isinstance(optimizer, Lars):  # the same parameter groups and settings, skippable on the device
        from simclr_dali.training.lars import GuardedLars

        optimizer = GuardedLars(optimizer.param_groups, **optimizer.defaults)
    zero_momentum(optimizer)
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(warmup_epochs(cfg) * steps_per_epoch)), total - 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=0.0,
                                  warmup_t=warmup, warmup_lr_init=lr * 1e-3 if warmup else lr,
                                  warmup_prefix=True, t_in_epochs=False)
    return optimizer, scheduler


def zero_momentum(optimizer) -> None:
    """Momentum buffers of torch's SGD set to zero before the first step: its fused kernel leaves them
    uninitialised when that step is skipped (it allocates them empty, then skips)."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) != 0:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
