"""The methods: SimCLR, SupCon, MoCo v2 and BYOL, each its networks and its loss in one class.

What the training loop asks of a method is `Method`'s contract (models/method.py). SimCLR and SupCon share
the networks (backbone + projection head) and differ in the loss. MoCo and BYOL are `MomentumMethod`s: a
momentum copy of the backbone and head, moved by an EMA of the online ones after each step. MoCo's queue
holds the keys of earlier steps, one per image of the global batch (gathered across processes, so every
rank holds the same queue); BYOL adds a predictor and has no negatives, so its loss (normalised MSE,
2 - 2 cos) is plain PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simclr_dali.errors import UserError
from simclr_dali.models import contrastive, loss_core, ntxent
from simclr_dali.models.backbone import ProjectionHead, feature_width
from simclr_dali.models.method import Method, MomentumMethod


class SimCLR(Method):
    """Chen et al. 2020: NT-Xent over the two views of the global batch."""
    title, kernels = "SimCLR", True
    defaults: dict = {}  # the settings' own defaults are SimCLR's ImageNet values (docs/design.md, Methods)

    def __init__(self, backbone: nn.Module, *, proj_hidden: int = 0, proj_dim: int = 128, temperature: float = 0.1):
        super().__init__(backbone, proj_hidden=proj_hidden, proj_dim=proj_dim)
        self.temperature = temperature

    def describe(self) -> str:
        return f"NT-Xent, tau {self.temperature}"

    def loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ntxent.nt_xent_loss(*z.chunk(2), self.temperature, **self.loss_options)


class SupCon(SimCLR):
    """Khosla et al. 2020 (L_out): every view of the global batch with the anchor's label is a positive."""
    title, needs_labels = "SupCon", True
    defaults = {"temperature": 0.1, "optimizer": "lars", "lr": 0.4, "weight_decay": 1e-3}
    warmup = 12.0  # the official TensorFlow script's (the paper gives none); at most a tenth of the run
    checked = False

    def describe(self) -> str:
        return f"SupCon (L_out, positives by label), tau {self.temperature}"

    def loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.checked:  # shards carry their labels in the stream: the first batch says (one host read)
            if bool((labels < 0).all()):
                raise UserError("--method supcon needs labels, and the first batch has none: its shards hold no "
                                ".cls entries (simclr_dali.pipelines.pack writes them from class sub-folders)")
            self.checked = True
        return contrastive.supcon_loss(*z.chunk(2), labels, self.temperature, **self.loss_options)


class MoCo(MomentumMethod):
    """MoCo v2 (He et al. 2020; Chen et al. 2020), symmetric: each view's query against the other view's
    momentum key and a queue of `queue_size` keys of earlier steps."""
    title, kernels = "MoCo v2", True
    defaults = {"temperature": 0.2, "optimizer": "momentum", "lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0,
                "queue_size": 65536, "target_momentum": 0.999, "momentum_schedule": "constant",
                # MoCo v2's views (its code's aug_plus): crops from 0.2 of the area, jitter 0.4/0.4/0.4/0.1 (SimCLR's
                # at strength 0.5), the rest SimCLR's
                "crop_min_area": 0.2, "jitter_strength": 0.5}

    def __init__(self, backbone: nn.Module, *, proj_hidden: int = 0, proj_dim: int = 128, temperature: float = 0.2,
                 target_momentum: float = 0.999, momentum_schedule: str = "constant", queue_size: int = 65536,
                 seed: int = 0):
        super().__init__(backbone, proj_hidden=proj_hidden, proj_dim=proj_dim, target_momentum=target_momentum,
                         momentum_schedule=momentum_schedule)
        self.temperature = temperature
        self.make_targets()
        start = torch.randn(queue_size, proj_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", F.normalize(start, dim=1))  # (K, D) unit keys, oldest overwritten first
        self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))  # the slot the next key takes
        # identical on every rank by construction: DDP need not broadcast them at every forward
        self._ddp_params_and_buffers_to_ignore = ["queue", "queue_next"]
        self.pending: torch.Tensor | None = None

    def describe(self) -> str:
        return (f"InfoNCE against a queue of {self.queue.shape[0]} keys, tau {self.temperature}; "
                f"{self.describe_momentum()}")

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


class BYOL(MomentumMethod):
    """Grill et al. 2020: the online network with a predictor regresses the momentum network's projection
    of the other view; symmetric, no negatives."""
    title = "BYOL"
    defaults = {"optimizer": "lars", "lr": 0.2, "weight_decay": 1.5e-6, "proj_hidden": 4096, "proj_dim": 256,
                "pred_hidden": 4096, "target_momentum": 0.996, "momentum_schedule": "cosine",
                # BYOL's asymmetric views (its Table 6): jitter 0.4/0.4/0.2/0.1 (strength 0.5, saturation halved
                # again), blur with probability 1.0 on view 1 and 0.1 on view 2, solarisation 0.0 and 0.2
                "jitter_strength": 0.5, "jitter_saturation": 0.4, "blur_p": [1.0, 0.1], "solarize_p": [0.0, 0.2]}

    def __init__(self, backbone: nn.Module, *, proj_hidden: int = 0, proj_dim: int = 256,
                 target_momentum: float = 0.996, momentum_schedule: str = "cosine", pred_hidden: int = 4096):
        super().__init__(backbone, proj_hidden=proj_hidden, proj_dim=proj_dim, target_momentum=target_momentum,
                         momentum_schedule=momentum_schedule)
        self.predictor = ProjectionHead(proj_dim, pred_hidden or feature_width(backbone), proj_dim)
        self.make_targets()

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


METHODS: dict[str, type[Method]] = {"simclr": SimCLR, "supcon": SupCon, "moco": MoCo, "byol": BYOL}
