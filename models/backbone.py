"""A timm backbone with the SimCLR projection head."""
from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from simclr_dali.errors import UserError


def create_backbone(name: str, small_stem: bool = False) -> nn.Module:
    """`timm.create_model(name, num_classes=0)`: pooled features of size `model.num_features`.

    `small_stem` swaps a ResNet-style stem (7x7 stride-2 conv + max-pool) for a 3x3 stride-1 conv
    without pooling, the usual choice for 32-pixel images.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown backbone {name!r}: not a timm model name{hint}")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    if small_stem:
        conv = getattr(model, "conv1", None)
        if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
            raise UserError(f"--small-stem needs a ResNet-style backbone with conv1 and maxpool; "
                            f"{name} has none")
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


class ProjectionHead(nn.Sequential):
    """Linear-BN-ReLU-Linear, as in SimCLR."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class SimCLRModel(nn.Module):
    """Backbone + projection head; `forward` returns projections (B, proj_dim)."""

    def __init__(self, backbone: nn.Module, proj_hidden: int = 0, proj_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        width = feature_width(backbone)
        self.head = ProjectionHead(width, proj_hidden or width, proj_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def feature_width(backbone: nn.Module) -> int:
    """Size of the pooled features timm returns with num_classes=0 (after any pre-logits layer,
    which `num_features` does not count for models such as MobileNetV3)."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
