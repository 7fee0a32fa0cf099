"""Any timm backbone: the image size reaches models built for one (ViTs), the backbone's own no_weight_decay()
holds through the method's wrapper (no decay and no LARS adaptation for a ViT's position embedding and class
token), and each optimiser brings its own learning rate and weight decay, as each method does."""
import json

import pytest
import timm
import torch
from conftest import make_folder
from safetensors.torch import load_file

from simclr_dali import training as train
from simclr_dali.models.backbone import create_backbone

VIT = "vit_tiny_patch16_224"


@pytest.mark.parametrize("size", [64, 224])
def test_a_vit_is_built_for_the_image_size(size):
    vit = create_backbone(VIT, image_size=size).eval()
    assert vit.patch_embed.img_size == (size, size) and vit.pos_embed.shape == (1, 1 + (size // 16) ** 2, 192)
    assert vit(torch.randn(2, 3, size, size)).shape == (2, 192)


def test_a_backbone_for_any_size_is_built_as_timm_builds_it():
    resnet = create_backbone("test_resnet", image_size=64)  # ResNets take no img_size: none is passed
    plain = timm.create_model("test_resnet", num_classes=0)
    assert resnet.state_dict().keys() == plain.state_dict().keys()


def groups(model, optimizer) -> dict[str, dict]:
    """Each parameter's name -> its group in the optimiser."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in optimizer.param_groups for p in g["params"]}


def test_a_vits_position_embedding_and_class_token_take_no_decay_and_no_adaptation():
    cfg = train.parse_args(["--backbone", VIT, "--image-size", "64"])
    model = train.build_model(cfg)
    optimizer, _ = train.build_optimizer(cfg, model, lr=0.5, steps_per_epoch=10)
    by_name = groups(model, optimizer)
    for name in ("backbone.pos_embed", "backbone.cls_token"):  # (1, 17, 192) and (1, 1, 192): not 1-d, yet exempt
        assert by_name[name]["weight_decay"] == 0 and not by_name[name]["always_adapt"], name
    wd = by_name["backbone.blocks.0.attn.qkv.weight"]["weight_decay"]
    assert wd == cfg.weight_decay == 1e-4  # the small recipe's, at 64 px
    # one step from zero momentum, the exempt group's update is plain SGD: w - lr g, no trust ratio, no decay
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    pos, grad = model.backbone.pos_embed.detach().clone(), model.backbone.pos_embed.grad.clone()
    qkv, qkv_grad = (t.detach().clone() for t in (model.backbone.blocks[0].attn.qkv.weight,
                                                  model.backbone.blocks[0].attn.qkv.weight.grad))
    optimizer.step()
    torch.testing.assert_close(model.backbone.pos_embed.detach(), pos - 0.5 * grad, rtol=0, atol=1e-6)
    trust = 1e-3 * qkv.norm() / (qkv_grad.norm() + wd * qkv.norm() + 1e-8)  # timm's LARS: trust_coeff 1e-3, eps 1e-8
    want = qkv - 0.5 * trust * (qkv_grad + wd * qkv)
    torch.testing.assert_close(model.backbone.blocks[0].attn.qkv.weight.detach(), want, rtol=1e-5, atol=1e-7)


# -- each optimiser's defaults ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["32", "224"])
def test_adamw_takes_moco_v3s_values_not_lars(size):
    cfg = train.parse_args(["--optimizer", "adamw", "--image-size", size])
    assert (cfg.lr, cfg.weight_decay) == (1.5e-4, 0.1)  # per 256 images; LARS's were 1.0 (small) or 0.3 (imagenet)
    cfg = train.parse_args(["--optimizer", "adamw", "--image-size", size, "--lr", "5e-4"])
    assert (cfg.lr, cfg.weight_decay) == (5e-4, 0.1)  # a flag still wins
    cfg = train.parse_args(["--optimizer", "adamw", "--method", "byol", "--image-size", size])
    assert (cfg.lr, cfg.weight_decay) == (1.5e-4, 0.1)  # BYOL's 0.2 and 1.5e-6 are for its LARS


def test_a_methods_own_optimiser_keeps_the_methods_values():
    cfg = train.parse_args(["--method", "moco", "--optimizer", "momentum", "--image-size", "224"])
    assert (cfg.lr, cfg.weight_decay) == (0.03, 1e-4)
    cfg = train.parse_args(["--optimizer", "lars", "--image-size", "32"])
    assert (cfg.lr, cfg.weight_decay) == (1.0, 1e-4)  # SimCLR's own LARS: the small recipe's values
    cfg = train.parse_args(["--method", "moco", "--optimizer", "lars", "--image-size", "224"])
    assert (cfg.lr, cfg.weight_decay) == (0.3, 1e-6)  # SimCLR's LARS values, not MoCo's SGD ones


@pytest.mark.slow
def test_a_vit_trains_at_64_px_evaluates_and_exports_for_timm(tmp_path):
    from simclr_dali.evaluation import evaluate
    from simclr_dali.tools import export

    folder, out = make_folder(tmp_path / "images", per_class=4, size=(80, 60)), tmp_path / "vit"  # 11 train, 1 test
    assert train.main(["--data", str(folder), "--backbone", VIT, "--image-size", "64", "--batch-size", "4",
                       "--epochs", "1", "--log-every", "1", "--workers", "1", "--optimizer", "adamw",
                       "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["image_size"], cfg["optimizer"], cfg["lr"], cfg["weight_decay"]) == (64, "adamw", 1.5e-4, 0.1)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == cfg["steps_per_epoch"] == 2 and all(r["loss"] > 0 for r in records)
    weights = load_file(str(out / "backbone.safetensors"))
    assert weights["pos_embed"].shape == (1, 17, 192)
    timm.create_model(VIT, num_classes=0, img_size=64).load_state_dict(weights)  # strict: every key
    assert evaluate.main(["--run", str(out), "--batch-size", "4", "--workers", "1", "--probe-epochs", "2",
                          "--knn-k", "5", "--no-plots"]) == 0
    assert json.loads((out / "eval.json").read_text())["crop"] == 0.875  # above 32 px: the central 87.5%
    assert export.main(["--run", str(out), "--format", "timm"]) == 0
    loaded = timm.create_model(f"local-dir:{out / 'export' / 'timm'}", pretrained=True, num_classes=0)
    assert loaded.pretrained_cfg["input_size"] == (3, 64, 64) and loaded.pretrained_cfg["crop_pct"] == 0.875
