"""The methods: SimCLR, SupCon, MoCo v2 and BYOL, each its modules plus its loss, in one class.

The training loop treats them all alike (simclr_dali/training/loop.py):
  outputs = model(views)          the networks on [view1; view2] (2B, C, H, W); what --compile compiles
  loss = method.loss(outputs, labels)   the loss, outside compile (the fused kernels)
  method.after_step(taken, progress)    after the optimiser step: momentum networks and the queue, moved
                                  only where the guard took the step (`taken`, a boolean on the device)
  method.backbone                 the online backbone: exported, evaluated, monitored
Everything a method keeps between steps (momentum networks, the queue) is a parameter or buffer, so it
is in the model's state dict: checkpointed, resumed bit for bit, exported with the rest.

SimCLR and SupCon share the networks (backbone + projection head) and differ in the loss. MoCo and BYOL
add a momentum copy of the backbone and head, moved by an EMA of the online one after each step:
    target <- m target + (1 - m) online,   m = 1 - (1 - m0) (cos(pi t / T) + 1) / 2 (cosine) or m0.
MoCo's queue holds the keys of earlier steps, one per image of the global batch (gathered across
processes, so every rank holds the same queue); BYOL adds a predictor and has no negatives, so its loss
(normalised MSE, 2 - 2 cos) is plain PyTorch.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from simclr_dali.models import contrastive, loss_core, ntxent
from simclr_dali.models.backbone import ProjectionHead, SimCLRModel, feature_width
from simclr_dali.errors import UserError


class SimCLR(SimCLRModel):
    """Chen et al. 2020: NT-Xent over the two views of the global batch."""
    needs_labels = False
    defaults: dict = {}  # the settings' own defaults are SimCLR's ImageNet values (README, Methods)
    warmup = 10.0  # epochs of linear warmup by default (--warmup-epochs -1), at most a tenth of the run

    def __init__(self, backbone: nn.Module, proj_hidden: int = 0, proj_dim: int = 128, temperature: float = 0.1,
                 **_):
        super().__init__(backbone, proj_hidden, proj_dim)
        self.temperature = temperature
        self.loss_options: dict = {}  # impl and operands, which the run resolves after building the model

    title = "SimCLR"
    kernels = True  # the loss runs on the fused kernels (its implementation is worth naming)

    def describe(self) -> str:
        return f"NT-Xent, tau {self.temperature}"

    def loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ntxent.nt_xent_loss(*z.chunk(2), self.temperature, **self.loss_options)

    def after_step(self, taken: torch.Tensor, progress: float) -> None:
        """Nothing moves between steps but the optimiser's weights."""


class SupCon(SimCLR):
    """Khosla et al. 2020 (L_out): every view of the global batch with the anchor's label is a positive."""
    needs_labels = True
    defaults = {"temperature": 0.1, "optimizer": "lars", "lr": 0.4, "weight_decay": 1e-3}
    warmup = 12.0  # the official TensorFlow script's (the paper gives none); at most a tenth of the run

    title, checked = "SupCon", False

    def describe(self) -> str:
        return f"SupCon (L_out, positives by label), tau {self.temperature}"

    def loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.checked:  # shards carry their labels in the stream: the first batch says (one host read)
            if bool((labels < 0).all()):
                raise UserError("--method supcon needs labels, and the first batch has none: its shards hold no "
                                ".cls entries (pipelines/pack.py writes them from class sub-folders)")
            self.checked = True
        return contrastive.supcon_loss(*z.chunk(2), labels, self.temperature, **self.loss_options)


class _Momentum(SimCLR):
    """The online backbone and head with a momentum copy of each (no gradient, moved by EMA)."""

    def __init__(self, backbone: nn.Module, proj_hidden: int = 0, proj_dim: int = 128, temperature: float = 0.1,
                 target_momentum: float = 0.99, momentum_schedule: str = "constant", **_):
        super().__init__(backbone, proj_hidden, proj_dim, temperature)
        self.target_momentum, self.momentum_schedule = target_momentum, momentum_schedule

    def make_targets(self) -> None:
        """The momentum copies, from the online networks as they are now (the paper's initialisation)."""
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_head = copy.deepcopy(self.head).requires_grad_(False)

    def online(self) -> list[nn.Module]:
        return [self.backbone, self.head]

    def targets(self) -> list[nn.Module]:
        return [self.momentum_backbone, self.momentum_head]

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
        targets = [p for module in self.targets() for p in module.parameters()]
        online = [p.detach() for module in self.online() for p in module.parameters()]
        torch._foreach_lerp_(targets, online, weight.to(targets[0].dtype))


class MoCo(_Momentum):
    """MoCo v2 (He et al. 2020; Chen et al. 2020), symmetric: each view's query against the other view's
    momentum key and a queue of `queue_size` keys of earlier steps."""
    needs_labels = False
    defaults = {"temperature": 0.2, "optimizer": "momentum", "lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0,
                "queue_size": 65536, "target_momentum": 0.999, "momentum_schedule": "constant",
                # MoCo v2's views (its code's aug_plus): crops from 0.2 of the area, jitter 0.4/0.4/0.4/0.1 (SimCLR's
                # at strength 0.5), the rest SimCLR's
                "crop_min_area": 0.2, "jitter_strength": 0.5}

    def __init__(self, backbone: nn.Module, proj_hidden: int = 0, proj_dim: int = 128, temperature: float = 0.2,
                 target_momentum: float = 0.999, momentum_schedule: str = "constant", queue_size: int = 65536,
                 seed: int = 0, **_):
        super().__init__(backbone, proj_hidden, proj_dim, temperature, target_momentum, momentum_schedule)
        self.make_targets()
        start = torch.randn(queue_size, proj_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", F.normalize(start, dim=1))  # (K, D) unit keys, oldest overwritten first
        self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))  # the slot the next key takes
        # identical on every rank by construction: DDP need not broadcast them at every forward
        self._ddp_params_and_buffers_to_ignore = ["queue", "queue_next"]
        self.pending: torch.Tensor | None = None

    title = "MoCo v2"

    def describe(self) -> str:
        return f"InfoNCE against a queue of {self.queue.shape[0]} keys, tau {self.temperature}; {self.describe_momentum()}"

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.backbone(views)), self.targets_forward(views)  # queries, keys: (2B, D) each

    def loss(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        q, k = outputs
        k1, k2 = k.detach().chunk(2)
        self.pending = F.normalize(k1.float(), dim=1)  # one key per image goes into the queue
        keys = torch.cat([k2, k1])  # view 1's queries meet view 2's keys, and the other way round
        return contrastive.moco_loss(q, keys, self.queue, self.temperature, **self.loss_options)

    @torch.no_grad()
    def after_step(self, taken: torch.Tensor, progress: float) -> None:
        super().after_step(taken, progress)
        if self.pending is not None:
            self.enqueue(loss_core.gather(self.pending), taken)
            self.pending = None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, taken: torch.Tensor | bool = True) -> None:
        """keys (G, D) of every rank, in rank order, into the ring after the newest, as if one at a time;
        nothing where the step was not taken. Of more keys than slots, the newest K stay."""
        size, count = self.queue.shape[0], keys.shape[0]
        offsets = torch.arange(count, device=keys.device)[-size:]  # distinct slots: index_copy_ stays deterministic
        slots = (self.queue_next + offsets) % size
        taken = torch.as_tensor(taken, device=keys.device)
        self.queue.index_copy_(0, slots, torch.where(taken, keys[-size:].to(self.queue.dtype), self.queue[slots]))
        self.queue_next.copy_((self.queue_next + count * taken.long()) % size)


class BYOL(_Momentum):
    """Grill et al. 2020: the online network with a predictor regresses the momentum network's projection
    of the other view; symmetric, no negatives."""
    needs_labels = False
    defaults = {"optimizer": "lars", "lr": 0.2, "weight_decay": 1.5e-6, "proj_hidden": 4096, "proj_dim": 256,
                "pred_hidden": 4096, "target_momentum": 0.996, "momentum_schedule": "cosine",
                # BYOL's asymmetric views (its Table 6): jitter 0.4/0.4/0.2/0.1 (strength 0.5, saturation halved
                # again), blur with probability 1.0 on view 1 and 0.1 on view 2, solarisation 0.0 and 0.2
                "jitter_strength": 0.5, "jitter_saturation": 0.4, "blur_p": [1.0, 0.1], "solarize_p": [0.0, 0.2]}

    def __init__(self, backbone: nn.Module, proj_hidden: int = 0, proj_dim: int = 256, temperature: float = 0.1,
                 target_momentum: float = 0.996, momentum_schedule: str = "cosine", pred_hidden: int = 4096, **_):
        super().__init__(backbone, proj_hidden, proj_dim, temperature, target_momentum, momentum_schedule)
        self.predictor = ProjectionHead(proj_dim, pred_hidden or feature_width(backbone), proj_dim)
        self.make_targets()

    title, kernels = "BYOL", False

    def describe(self) -> str:
        return f"normalised MSE of predictions (plain PyTorch: no negatives); {self.describe_momentum()}"

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictor(self.head(self.backbone(views))), self.targets_forward(views)

    def loss(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        p, t = outputs
        p1, p2 = p.chunk(2)
        t1, t2 = t.detach().chunk(2)
        return normalized_mse(p1, t2) + normalized_mse(p2, t1)


def normalized_mse(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """BYOL's loss, mean over the rows of ||p/|p| - t/|t|||^2 = 2 - 2 cos(p, t), in float32. A plain
    PyTorch function: with no negatives there is no (N x N) matrix to avoid."""
    with torch.autocast(p.device.type, enabled=False):
        cos = F.cosine_similarity(p.float(), t.float(), dim=1)
        return (2 - 2 * cos).mean()


METHODS = {"simclr": SimCLR, "supcon": SupCon, "moco": MoCo, "byol": BYOL}
