import pytest
import timm
import torch
from torch import nn

from simclr_dali.errors import UserError
from simclr_dali.models.backbone import Encoder, create_backbone


@pytest.mark.parametrize("name,width", [("resnet18", 512), ("mobilenetv3_small_050", 1024)])
def test_forward_shapes_for_timm_names(name, width):
    model = Encoder(create_backbone(name), proj_hidden=64, proj_dim=32).eval()
    x = torch.randn(3, 3, 32, 32)
    assert model.backbone(x).shape == (3, width)
    assert model(x).shape == (3, 32)
    assert isinstance(model.head[0], nn.Linear) and model.head[0].in_features == width


def test_small_stem_keeps_resolution():
    plain, small = create_backbone("resnet18"), create_backbone("resnet18", small_stem=True)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    # the stem's output is 4x larger per side without the stride-2 conv and the max-pool
    assert small.maxpool(small.act1(small.bn1(small.conv1(x)))).shape[-1] == 32
    assert plain.maxpool(plain.act1(plain.bn1(plain.conv1(x)))).shape[-1] == 8
    assert small(x).shape == plain(x).shape == (2, 512)


def test_backbone_weights_load_into_plain_timm_model():
    exported = create_backbone("resnet18").state_dict()
    timm.create_model("resnet18", num_classes=0).load_state_dict(exported)  # strict


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="unknown backbone 'resnet19x'.*resnet18"):
        create_backbone("resnet19x")
    with pytest.raises(UserError, match="small-stem"):
        create_backbone("mobilenetv3_small_050", small_stem=True)
