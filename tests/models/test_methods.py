"""--method (models/methods.py): each method's paper defaults under the flags given, the momentum network's
EMA (exactly, and only where the step was taken), MoCo's queue ring, BYOL's predictor, a loss that a few
steps lower on a fixed batch; and, training for real, bitwise resume of MoCo and BYOL with their momentum
networks and queue in the checkpoint."""
import math

import pytest
import torch
from conftest import fixed_batch, make_folder, train_here
from safetensors.torch import load_file

from simclr_dali import training as train
from simclr_dali.models.backbone import create_backbone
from simclr_dali.models.method import Method, MomentumMethod
from simclr_dali.models.methods import BYOL, METHODS, MoCo, SimCLR, SupCon

# -- defaults ---------------------------------------------------------------------------------------
SIMCLR = {"temperature": 0.1, "optimizer": "lars", "lr": 0.3, "weight_decay": 1e-6, "proj_hidden": 0, "proj_dim": 128}


@pytest.mark.parametrize("method,expected", [
    ("simclr", SIMCLR),
    ("supcon", {"temperature": 0.1, "optimizer": "lars", "lr": 0.4, "weight_decay": 1e-3}),
    ("moco", {"temperature": 0.2, "optimizer": "momentum", "lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0,
              "queue_size": 65536, "target_momentum": 0.999, "momentum_schedule": "constant"}),
    ("byol", {"optimizer": "lars", "lr": 0.2, "weight_decay": 1.5e-6, "proj_hidden": 4096, "proj_dim": 256,
              "pred_hidden": 4096, "target_momentum": 0.996, "momentum_schedule": "cosine"})])
def test_each_method_brings_its_paper_defaults(method, expected):
    cfg = train.parse_args(["--method", method, "--image-size", "224"])  # the ImageNet recipe
    assert cfg.method == method
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_simclr_defaults_are_unchanged():
    assert {k: getattr(train.parse_args(["--image-size", "224"]), k) for k in SIMCLR} == SIMCLR
    assert {k: getattr(train.parse_args(["--recipe", "imagenet"]), k) for k in SIMCLR} == SIMCLR
    assert train.parse_args([]).method == "simclr"


def test_a_flag_given_wins_over_the_method_default():
    cfg, given = train.parse_command(["--method", "moco", "--lr", "0.5", "--temperature", "0.1"])
    assert (cfg.lr, cfg.temperature, cfg.weight_decay) == (0.5, 0.1, 1e-4)
    assert {"method", "lr", "temperature"} <= given and "weight_decay" not in given


@pytest.mark.parametrize("method,epochs,warmup", [("simclr", 200, 10), ("supcon", 200, 12), ("supcon", 50, 5),
                                                  ("byol", 300, 10), ("moco", 200, 0)])
def test_warmup_follows_the_method(method, epochs, warmup):
    assert train.warmup_epochs(train.parse_args(["--method", method, "--epochs", str(epochs)])) == warmup


def test_a_recorded_run_keeps_its_method(tmp_path):
    import dataclasses
    import json
    cfg = train.parse_args(["--method", "byol", "--lr", "0.7"])
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    again = train.parse_args(["--config", str(tmp_path / "config.json")])
    assert dataclasses.asdict(again) == {**dataclasses.asdict(cfg), "config": str(tmp_path / "config.json")}


def test_an_unknown_method_is_refused_in_one_sentence(capsys):
    with pytest.raises(SystemExit):
        train.main(["--method", "swav"])
    assert "--method" in capsys.readouterr().err


# -- the contract -------------------------------------------------------------------------------------
def test_each_method_is_built_from_its_own_settings_and_no_other():
    assert SimCLR.settings() == ("proj_hidden", "proj_dim", "temperature")
    assert SupCon.settings() == SimCLR.settings()
    assert MoCo.settings() == ("proj_hidden", "proj_dim", "temperature", "target_momentum", "momentum_schedule",
                               "queue_size", "seed")
    assert BYOL.settings() == ("proj_hidden", "proj_dim", "target_momentum", "momentum_schedule", "pred_hidden")
    fields = set(train.parse_args([]).__dataclass_fields__)
    assert all(set(cls.settings()) <= fields for cls in METHODS.values())  # each a training setting
    cfg = train.parse_args(["--method", "byol", "--proj-hidden", "16", "--proj-dim", "8", "--pred-hidden", "12"])
    model = BYOL.build(create_backbone("test_resnet"), cfg)
    assert not hasattr(model, "temperature")  # BYOL has no temperature to carry
    assert (model.head[-1].out_features, model.predictor[0].out_features, model.target_momentum) == (8, 12, 0.996)
    with pytest.raises(TypeError, match="queue_size"):  # a setting a method does not take is never swallowed
        BYOL(create_backbone("test_resnet"), queue_size=8)


def test_the_momentum_methods_share_a_base_and_not_simclrs():
    assert issubclass(MoCo, MomentumMethod) and issubclass(BYOL, MomentumMethod)
    assert not issubclass(MoCo, SimCLR) and not issubclass(BYOL, SimCLR)
    assert all(issubclass(cls, Method) for cls in METHODS.values())


def test_a_method_without_its_loss_cannot_be_built():
    class Unfinished(Method):
        def describe(self) -> str:
            return "no loss yet"

    with pytest.raises(TypeError, match="loss"):
        Unfinished(create_backbone("test_resnet"), proj_hidden=8, proj_dim=4)


# -- the momentum network ---------------------------------------------------------------------------
def momentum_model(cls, **kwargs):
    torch.manual_seed(0)
    return cls(create_backbone("test_resnet"), proj_hidden=16, proj_dim=8, **kwargs).train()


@pytest.mark.parametrize("cls,own", [(MoCo, {"queue_size": 32}), (BYOL, {"pred_hidden": 16})])
def test_the_momentum_network_takes_no_gradient_and_moves_by_exactly_its_ema(cls, own):
    model = momentum_model(cls, target_momentum=0.9, momentum_schedule="constant", **own)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets, onlines = [t for _, t in model.pairs()], [o for o, _ in model.pairs()]
    assert [type(t) for t in targets] == [type(model.backbone), type(model.head)]
    for target, online in zip(targets, onlines):  # starts as a copy
        assert all(torch.equal(a, b) for a, b in zip(target.parameters(), online.parameters()))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.loss(model(images), torch.zeros(4, dtype=torch.long)).backward()
    assert all(p.grad is None for t in targets for p in t.parameters())
    optimizer.step()
    before = [[p.clone() for p in t.parameters()] for t in targets]
    model.after_step(torch.tensor(True), 0.3)
    for target, online, old in zip(targets, onlines, before):
        for p, o, b in zip(target.parameters(), online.parameters(), old):
            assert torch.equal(p, b.lerp(o, torch.tensor(0.1, dtype=p.dtype)))  # b + (1 - m) (o - b), m = 0.9
        assert any(not torch.equal(p, b) for p, b in zip(target.parameters(), old))
    moved = [[p.clone() for p in t.parameters()] for t in targets]
    model.after_step(torch.tensor(False), 0.4)  # a step the guard skipped moves nothing
    assert all(torch.equal(p, b) for t, old in zip(targets, moved) for p, b in zip(t.parameters(), old))


def test_the_cosine_schedule_rises_from_m0_to_one():
    model = momentum_model(BYOL, target_momentum=0.996, momentum_schedule="cosine", pred_hidden=16)
    assert model.momentum(0.0) == pytest.approx(0.996)
    assert model.momentum(0.5) == pytest.approx(0.998)
    assert model.momentum(1.0) == pytest.approx(1.0)
    model.momentum_schedule = "constant"
    assert model.momentum(0.7) == 0.996


def test_the_queue_wraps_around_and_skipped_steps_leave_it_alone():
    model = momentum_model(MoCo, queue_size=5)
    start = model.queue.clone()
    keys = torch.arange(1.0, 9.0).repeat(8, 1).T  # (8, 8): key i is all i + 1
    model.enqueue(keys[:3])
    assert torch.equal(model.queue[:3], keys[:3]) and torch.equal(model.queue[3:], start[3:])
    model.enqueue(keys[3:6])  # slots 3, 4, then 0 again
    assert torch.equal(model.queue, torch.stack([keys[5], keys[1], keys[2], keys[3], keys[4]]))
    assert model.queue_next.item() == 1
    before = model.queue.clone()
    model.enqueue(keys[6:8], torch.tensor(False))
    assert torch.equal(model.queue, before) and model.queue_next.item() == 1
    model.enqueue(keys)  # more keys than slots: as if one at a time from slot 1 on, the newest five stay
    assert torch.equal(model.queue, torch.stack([keys[4], keys[5], keys[6], keys[7], keys[3]]))
    assert model.queue_next.item() == (1 + 8) % 5


def test_moco_queues_one_key_per_image_after_the_step():
    model = momentum_model(MoCo, queue_size=64)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    q, k = model(images)
    model.loss((q, k), torch.zeros(3, dtype=torch.long))
    model.after_step(torch.tensor(True), 0.0)
    assert torch.allclose(model.queue[:3], torch.nn.functional.normalize(k[:3].float(), dim=1))
    assert model.queue_next.item() == 3


# -- each method learns ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(method):
    """The same queue and targets before and after (their moves are after_step's, tested above)."""
    cfg, model, optimizer, views = fixed_batch("--method", method, "--lr", "0.2", "--queue-size", "64",
                                               "--proj-hidden", "64", "--pred-hidden", "64")
    labels = torch.arange(16) % 4  # SupCon: four classes of four images
    first = model.loss(model(views), labels).item()
    predictor = [p.clone() for p in model.predictor.parameters()] if method == "byol" else []
    for _ in range(8):
        model.loss(model(views), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.loss(model(views), labels).item() < first
    if method == "byol":  # the predictor trains: every one of its weights has moved
        assert all(not torch.equal(a, b) for a, b in zip(predictor, model.predictor.parameters()))


def test_supcon_refuses_a_batch_without_labels():
    from simclr_dali.errors import UserError
    model = momentum_model(SupCon)
    with pytest.raises(UserError, match="needs labels"):
        model.loss(torch.randn(8, 8), torch.full((4,), -1))


def test_simclr_is_what_trained_before():
    """The networks keep their names (backbone.*, head.*): checkpoints and exports of earlier runs load."""
    model = momentum_model(SimCLR)
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "head"}


# -- training for real --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("methods") / "images", per_class=12)  # 32 train: 4 steps/epoch


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_resume_of_a_momentum_method_is_bitwise(method, small_folder, tmp_path, monkeypatch):
    """Stopped at once at step 6 (a KeyboardInterrupt, as a second signal does) after the mid-epoch
    checkpoint at step 5, resumed, and finished: the same weights, momentum network and queue as one run."""
    flags = ["--data", str(small_folder), "--method", method, "--epochs", "3", "--save-every-steps", "5",
             "--queue-size", "16", "--proj-hidden", "32", "--pred-hidden", "32"]
    assert train_here(*flags, "--out", str(tmp_path / "straight")) == 0
    cls, calls, real = METHODS[method], {"n": 0}, METHODS[method].loss

    def interrupted(self, outputs, labels):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(self, outputs, labels)

    monkeypatch.setattr(cls, "loss", interrupted)
    assert train_here(*flags, "--out", str(tmp_path / "resumed")) == 130
    monkeypatch.setattr(cls, "loss", real)
    assert train_here(*flags, "--out", str(tmp_path / "resumed"), "--resume") == 0
    straight = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "checkpoint" / "model.safetensors"))
    assert straight.keys() == resumed.keys() and any(k.startswith("momentum_backbone.") for k in straight)
    assert method != "moco" or {"queue", "queue_next"} <= straight.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.slow
def test_supcon_and_moco_train_end_to_end_and_name_the_method(small_folder, tmp_path, capsys):
    import json
    for method in ("supcon", "moco"):
        out = tmp_path / method
        assert train_here("--data", str(small_folder), "--out", str(out), "--method", method, "--epochs", "2",
                          "--queue-size", "16") == 0
        assert json.loads((out / "config.json").read_text())["method"] == method
        assert math.isfinite(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"])
    text = capsys.readouterr().out
    assert "SupCon (L_out" in text and "InfoNCE against a queue of 16 keys" in text
    assert "recipe small (auto: 32 px <= 64): jitter_strength 0.5, blur_p 0" in " ".join(text.split())

