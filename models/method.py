"""What a method is to the training loop: `Method`, and `MomentumMethod` for those with a momentum network.

The loop treats every method alike (simclr_dali/training/loop.py):
  outputs = model(views)                the networks on [view1; view2] (2B, C, H, W); what --compile compiles
  loss = model.loss(outputs, labels)    the loss, outside compile (the fused kernels)
  model.after_step(taken, progress)     after the optimiser step: momentum networks and the queue, moved
                                        only where the guard took the step (`taken`, a boolean on the device)
  model.backbone                        the online backbone: exported, evaluated, monitored
Everything a method keeps between steps (momentum networks, the queue) is a parameter or buffer, so it is in
the model's state dict: checkpointed, resumed bit for bit, exported with the rest.

A method is built from its own settings: the keyword arguments of its constructor, each a training setting
of the same name (`build`), so that a setting a method does not take is never passed to it.
"""
from __future__ import annotations

import copy
import inspect
import math
from abc import ABCMeta, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from simclr_dali.models.backbone import Encoder


class Method(Encoder, metaclass=ABCMeta):
    """A timm backbone and a projection head (`Encoder`), plus the loss that trains them. A method without its
    own `loss` and `describe` cannot be built."""
    title: ClassVar[str]  # the name the run's report gives it
    needs_labels: ClassVar[bool] = False  # the loss reads the labels (the loader's, or the shards' .cls)
    kernels: ClassVar[bool] = False  # the loss runs on the fused kernels (its implementation is worth naming)
    warmup: ClassVar[float] = 10.0  # epochs of linear warmup by default (--warmup-epochs -1), at most a tenth
    defaults: ClassVar[dict[str, Any]] = {}  # settings the method's paper sets over the settings' own defaults

    def __init__(self, backbone: nn.Module, *, proj_hidden: int, proj_dim: int):
        super().__init__(backbone, proj_hidden, proj_dim)
        self.loss_options: dict = {}  # the kernels' impl and operands, which the run resolves after building it

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        """The training settings this method is built from: its constructor's keyword arguments."""
        return tuple(name for name, p in inspect.signature(cls.__init__).parameters.items()
                     if p.kind == p.KEYWORD_ONLY)

    @classmethod
    def build(cls, backbone: nn.Module, settings: Any) -> Method:
        """The method around `backbone`, from the fields of `settings` (a Config) that it takes."""
        return cls(backbone, **{name: getattr(settings, name) for name in cls.settings()})

    @abstractmethod
    def loss(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """The scalar loss of `outputs` (what forward gave) for a batch with these labels (-1: none)."""

    @abstractmethod
    def describe(self) -> str:
        """The loss in a few words, for the run's report."""

    def after_step(self, taken: torch.Tensor, progress: float) -> None:
        """After the optimiser's step (`taken`: whether the guard let it through; `progress`: step / steps).
        Nothing moves between steps but the optimiser's weights, unless a method says otherwise."""


class MomentumMethod(Method):
    """A method with a momentum copy of the backbone and head (no gradient), moved by an EMA of the online
    networks after each step:
        target <- m target + (1 - m) online,   m = 1 - (1 - m0) (cos(pi t / T) + 1) / 2 (cosine) or m0.
    A subclass adds its own modules, then calls `make_targets`."""

    def __init__(self, backbone: nn.Module, *, proj_hidden: int, proj_dim: int, target_momentum: float,
                 momentum_schedule: str):
        super().__init__(backbone, proj_hidden=proj_hidden, proj_dim=proj_dim)
        self.target_momentum, self.momentum_schedule = target_momentum, momentum_schedule

    def make_targets(self) -> None:
        """The momentum copies, from the online networks as they are now (the papers' initialisation)."""
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_head = copy.deepcopy(self.head).requires_grad_(False)

    def pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target): the networks the EMA moves, each toward its online one."""
        return [(self.backbone, self.momentum_backbone), (self.head, self.momentum_head)]

    def momentum(self, progress: float) -> float:
        """m at `progress` (step / total steps): constant, or from m0 up to 1 on a cosine."""
        if self.momentum_schedule == "constant":
            return self.target_momentum
        return 1 - (1 - self.target_momentum) * (math.cos(math.pi * progress) + 1) / 2

    def describe_momentum(self) -> str:
        rise = " rising to 1 (cosine)" if self.momentum_schedule == "cosine" else " (constant)"
        return f"momentum network m {self.target_momentum:g}{rise}"

    def targets_forward(self, views: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.momentum_head(self.momentum_backbone(views))

    @torch.no_grad()
    def after_step(self, taken: torch.Tensor, progress: float) -> None:
        """target <- target + (1 - m) (online - target), where the step was taken (else unchanged)."""
        weight = taken.to(torch.float32) * (1 - self.momentum(progress))  # on the device: no host read
        targets = [p for _, target in self.pairs() for p in target.parameters()]
        online = [p.detach() for module, _ in self.pairs() for p in module.parameters()]
        torch._foreach_lerp_(targets, online, weight.to(targets[0].dtype))
