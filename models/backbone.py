"""A timm backbone with the SimCLR projection head."""
from __future__ import annotations

import difflib

import torch
from torch import nn

from simclr_dali.errors import UserError


def create_backbone(name: str, small_stem: bool = False, image_size: int | None = None) -> nn.Module:
    """`timm.create_model(name, num_classes=0)`: pooled features of size `model.num_features`.

    `image_size` reaches the models built for one input size (timm's `fixed_input_size`: ViTs, Swin, MaxViT, ...,
    whose position embeddings or windows follow it), as their `img_size`; the others take any size and no such
    argument. `small_stem` swaps a ResNet-style stem (7x7 stride-2 conv + max-pool) for a 3x3 stride-1 conv
    without pooling, the usual choice for 32-pixel images.
    """
    import timm  # with torchvision, seconds to load: here, so that the settings and --help do without it

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown backbone {name!r}: not a timm model name{hint}")
    sized = {"img_size": image_size} if image_size and fixed_input_size(name) else {}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **sized)
    except (AssertionError, ValueError) as err:  # timm's own checks, such as a size its patches do not divide
        raise UserError(f"timm cannot build {name} for {image_size} px images ({err or type(err).__name__}): pick "
                        f"another --image-size or backbone") from None
    if small_stem:
        conv = getattr(model, "conv1", None)
        if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
            raise UserError(f"--small-stem needs a ResNet-style backbone with conv1 and maxpool; "
                            f"{name} has none")
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def fixed_input_size(name: str) -> bool:
    """Whether timm builds `name` for one input size (its pretrained config says so)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return bool(cfg and cfg.fixed_input_size)


class ProjectionHead(nn.Sequential):
    """Linear-BN-ReLU-Linear, as in SimCLR."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class Encoder(nn.Module):
    """A backbone and a projection head: `forward` returns projections (B, proj_dim). Every method is one
    (models/method.py), and its state dict's names start backbone. and head."""

    def __init__(self, backbone: nn.Module, proj_hidden: int = 0, proj_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        width = feature_width(backbone)
        self.head = ProjectionHead(width, proj_hidden or width, proj_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def no_weight_decay(self) -> set[str]:
        """The backbone's own exemptions from weight decay (a ViT's position embedding and class token), by their
        names here: timm's optimiser factory asks the model it is given, which is this one."""
        names = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in names}


def feature_width(backbone: nn.Module) -> int:
    """Size of the pooled features timm returns with num_classes=0 (after any pre-logits layer,
    which `num_features` does not count for models such as MobileNetV3)."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
