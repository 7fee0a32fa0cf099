"""The settings a user gives are the settings that train: one order of layers (config.settings_in_order), a
value given through the Python API counts even where it equals the field's default, a --config re-run takes what
the recorded run was given and derives the rest for what it now is, and a resume keeps the checkpoint's settings,
applies what is given now or refuses it in one sentence, and records each change."""
import dataclasses
import json

import pytest
import torch
from conftest import make_folder, train_here

from simclr_dali import Config, EvalConfig, Run, pretrain
from simclr_dali import training as train
from simclr_dali.errors import UserError
from simclr_dali.evaluation import evaluate
from simclr_dali.pipelines.augment import Augment
from simclr_dali.settings import to_argv
from simclr_dali.training.config import settings_in_order

SMALL_BYOL = ["--method", "byol", "--image-size", "32"]  # two layers of defaults over the fields': BYOL's, small's


def parsed(cfg: Config) -> Config:
    return train.parse_args(to_argv(cfg))


# -- the Python API -------------------------------------------------------------------------------------------------
def test_values_passed_to_the_api_are_given_even_at_the_fields_defaults():
    cfg = parsed(Config(method="moco", lr=0.3, temperature=0.1))
    assert (cfg.lr, cfg.temperature) == (0.3, 0.1)  # not MoCo's 0.03 and 0.2
    assert parsed(Config(method="byol", proj_dim=128)).proj_dim == 128  # not BYOL's 256
    cfg = parsed(Config(image_size=32, lr=0.3, temperature=0.1, aug=Augment(jitter_strength=1.0, blur_p=0.5)))
    assert (cfg.lr, cfg.temperature, cfg.aug.jitter_strength, cfg.aug.blur_p) == (0.3, 0.1, 1.0, 0.5)  # not small's
    assert cfg.weight_decay == 1e-4  # not given: the small recipe's
    cfg = Config(method="moco")
    cfg.lr = 0.3  # set by assignment: given too
    assert parsed(cfg).lr == 0.3


FIELDS = [f for f in dataclasses.fields(Config) if f.name not in ("aug", "config", "resume", "resume_from")]


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_every_training_field_set_to_its_default_is_honoured(field):
    cfg = parsed(Config(**{"method": "byol", "image_size": 32, field.name: field.default}))
    assert getattr(cfg, field.name) == field.default


@pytest.mark.parametrize("field", dataclasses.fields(Augment), ids=[f.name for f in dataclasses.fields(Augment)])
def test_every_augmentation_field_set_to_its_default_is_honoured(field):
    cfg = parsed(Config(method="byol", image_size=32, aug=Augment(**{field.name: field.default})))
    assert getattr(cfg.aug, field.name) == field.default


EVAL_FIELDS = [f for f in dataclasses.fields(EvalConfig) if f.name not in ("run", "config", "embed", "to")]


@pytest.mark.parametrize("field", EVAL_FIELDS, ids=[f.name for f in EVAL_FIELDS])
def test_every_evaluation_field_set_to_its_default_is_honoured_over_a_recorded_evaluation(field, tmp_path):
    def other(default):  # a value in range that is not the default
        if isinstance(default, (bool, str)):
            return not default if isinstance(default, bool) else "other/data"
        return default + 1 if isinstance(default, int) or default >= 1 else 0.5

    changed = {f.name: other(f.default) for f in EVAL_FIELDS}
    (tmp_path / "eval_config.json").write_text(json.dumps(changed))
    cfg = evaluate.parse_args(to_argv(EvalConfig(run="runs/x", config=str(tmp_path / "eval_config.json"),
                                                 **{field.name: field.default})))
    assert getattr(cfg, field.name) == field.default
    other = next(f for f in EVAL_FIELDS if f.name != field.name)
    assert getattr(cfg, other.name) == changed[other.name]  # not given: the recorded evaluation's


def test_pretrain_and_evaluate_pass_what_is_given(monkeypatch, tmp_path):
    import simclr_dali.evaluation.evaluate as evaluation
    import simclr_dali.training.loop as loop

    seen = []
    monkeypatch.setattr(loop, "train", lambda argv: seen.append(train.parse_args(argv)) or 0)
    pretrain(Config(method="moco", out=str(tmp_path / "run")), lr=0.3, aug=Augment(blur_p=0.5))
    assert (seen[0].method, seen[0].lr, seen[0].aug.blur_p) == ("moco", 0.3, 0.5)
    with pytest.raises(TypeError, match="unexpected setting 'no_such_setting'"):
        pretrain(Config(), no_such_setting=1)
    (tmp_path / "eval_config.json").write_text(json.dumps({"knn_k": 20, "probe_epochs": 5}))
    monkeypatch.setattr(evaluation, "evaluate_run", lambda cfg: dataclasses.asdict(cfg))
    scores = Run(tmp_path / "run").evaluate(config=str(tmp_path / "eval_config.json"), knn_k=200)
    assert (scores["knn_k"], scores["probe_epochs"]) == (200, 5)  # given over recorded; the rest recorded


# -- the order, and --config re-runs ----------------------------------------------------------------------------
def test_the_layers_follow_what_the_given_values_choose():
    low = settings_in_order({"method": "moco"}, {"image_size": 224, "lr": 0.5}, {})
    assert low[0]["optimizer"] == "momentum" and low[0]["crop_min_area"] == 0.2 and "blur_p" not in low[0]
    assert low[1] == {"image_size": 224, "lr": 0.5}  # a recorded run's given values over layers 2 and 3
    assert settings_in_order({"lr": 0.1}, {}, {"lr": 0.7, "method": "byol"}) == [{"lr": 0.7, "method": "byol"}]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A 32 px SimCLR run: the small recipe's lr 1.0, weight decay 1e-4, jitter 0.5, no blur, temperature 0.2."""
    root = tmp_path_factory.mktemp("given")
    folder = make_folder(root / "images", per_class=4)
    assert train_here("--data", str(folder), "--out", str(root / "run"), "--epochs", "1") == 0
    return root / "run" / "config.json"


@pytest.mark.slow
def test_config_json_records_what_was_given_apart_from_what_was_derived(recorded):
    cfg = json.loads(recorded.read_text())
    assert cfg["given"] == {"backbone": "test_resnet", "batch_size": 8, "data": cfg["data"], "epochs": 1,
                            "image_size": 32, "log_every": 1, "out": cfg["out"], "warmup_epochs": 1.0,
                            "workers": 1}
    assert (cfg["lr"], cfg["temperature"], cfg["aug"]["blur_p"]) == (1.0, 0.2, 0.0)  # derived: the small recipe's
    assert cfg["changes"] == []


@pytest.mark.slow
def test_a_rerun_with_another_method_takes_that_methods_values(recorded):
    cfg = train.parse_args(["--config", str(recorded), "--method", "moco"])
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("momentum", 0.03, 1e-4)
    assert cfg.warmup_epochs == 1.0  # given to the recorded run (MoCo's own is 0)
    assert (cfg.target_momentum, cfg.momentum_schedule, cfg.temperature) == (0.999, "constant", 0.2)
    assert train.parse_args(["--config", str(recorded), "--method", "byol"]).proj_dim == 256
    assert (cfg.backbone, cfg.batch_size, cfg.epochs) == ("test_resnet", 8, 1)  # what the recorded run was given


@pytest.mark.slow
def test_a_rerun_at_224_px_takes_the_imagenet_recipe(recorded):
    from simclr_dali.training.recipes import recipe_record

    cfg = train.parse_args(["--config", str(recorded), "--image-size", "224"])
    assert (cfg.aug.jitter_strength, cfg.aug.blur_p, cfg.temperature, cfg.lr, cfg.weight_decay) == (1.0, 0.5, 0.1,
                                                                                                      0.3, 1e-6)
    values = {**dataclasses.asdict(cfg.aug), **dataclasses.asdict(cfg)}
    assert recipe_record(cfg.recipe, 224, "simclr", values, set())["recipe_resolved"] == "imagenet"


@pytest.mark.slow
def test_a_value_edited_into_config_json_counts_as_given(recorded, tmp_path):
    edited = json.loads(recorded.read_text())
    edited["temperature"] = 0.7
    (tmp_path / "config.json").write_text(json.dumps(edited))
    cfg = train.parse_args(["--config", str(tmp_path / "config.json"), "--image-size", "224"])
    assert (cfg.temperature, cfg.lr) == (0.7, 0.3)  # the edit holds; lr, not edited, is the imagenet recipe's


# -- --resume ---------------------------------------------------------------------------------------------------
@pytest.fixture
def stopped(tmp_path):
    """A 96 px run (the imagenet recipe) stopped after its first of two epochs, with weight decay 1e-4."""
    folder = make_folder(tmp_path / "images", per_class=4)
    out = tmp_path / "run"
    args = ["--data", str(folder), "--out", str(out), "--epochs", "2", "--image-size", "96", "--batch-size", "4",
            "--backbone", "test_resnet", "--log-every", "1", "--workers", "1", "--weight-decay", "1e-4"]
    assert train.main([*args, "--stop-after", "1"]) == 0
    return out, args


@pytest.mark.slow
def test_a_resume_applies_a_new_weight_decay_and_momentum_and_records_each_change(stopped):
    out, args = stopped
    assert train.main(["--out", str(out), "--resume", "--weight-decay", "1e-3", "--momentum", "0.8",
                       "--lr", "0.5", "--epochs", "3"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["image_size"], cfg["recipe_resolved"], cfg["aug"]["blur_p"]) == (96, "imagenet", 0.5)  # kept
    steps = cfg["steps_per_epoch"]
    assert cfg["changes"] == [{"step": steps, "setting": "epochs", "from": 2, "to": 3},
                              {"step": steps, "setting": "lr", "from": 0.3, "to": 0.5},
                              {"step": steps, "setting": "momentum", "from": 0.9, "to": 0.8},
                              {"step": steps, "setting": "weight_decay", "from": 1e-4, "to": 1e-3}]
    groups = torch.load(out / "checkpoint" / "optimizer.bin", weights_only=True)["param_groups"]
    assert sorted((g["weight_decay"], g["momentum"]) for g in groups) == [(0.0, 0.8), (1e-3, 0.8)]
    assert cfg["given"]["weight_decay"] == 1e-3 and cfg["given"]["image_size"] == 96
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] == 3 and records[-1]["step"] == 3 * steps


@pytest.mark.slow
@pytest.mark.parametrize("flags,sentence", [
    (["--method", "supcon"], "trained with --method simclr, which cannot change to supcon"),
    (["--backbone", "resnet10t"], "trained with --backbone test_resnet, which cannot change to resnet10t"),
    (["--proj-dim", "64"], "trained with --proj-dim 128, which cannot change to 64"),
])
def test_a_resume_that_cannot_apply_a_change_is_one_sentence(stopped, capsys, flags, sentence):
    out, _ = stopped
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(out), "--resume", *flags])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and sentence in err, err


@pytest.mark.slow
def test_a_resume_to_fewer_epochs_than_taken_is_one_sentence(stopped, tmp_path, capsys):
    out, args = stopped
    assert train.main(["--out", str(out), "--resume"]) == 0  # both epochs done
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(out), "--resume", "--epochs", "1"])
    assert stop.value.code == 2 and "past the end of 1 epochs" in capsys.readouterr().err


# -- --lr-scaling sqrt ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,lr", [(256, 1.2), (4096, 4.8)])  # 0.075 sqrt(B), Chen et al. 2020, appendix B.1
def test_square_root_scaling_follows_the_papers_rule(batch, lr):
    cfg = train.parse_args(["--lr-scaling", "sqrt", "--image-size", "224"])
    assert train.scaled_lr(cfg, batch) == pytest.approx(lr, rel=1e-12)
    cfg = train.parse_args(["--lr-scaling", "sqrt", "--image-size", "224", "--lr", "0.6"])
    assert train.scaled_lr(cfg, batch) == pytest.approx(0.6 * (batch / 256) ** 0.5, rel=1e-12)  # a base given


def test_an_unknown_method_given_to_the_api_is_the_flags_sentence():
    with pytest.raises(UserError):
        parsed(Config(method="nope"))


@pytest.mark.slow
def test_a_resume_mid_epoch_with_other_views_reads_the_rest_of_the_epoch_with_them(tmp_path, hooks):
    """DALI's saved state is of the old graph: the epoch goes on from its next global batch, with fresh draws."""
    import os
    import signal

    folder = make_folder(tmp_path / "images", per_class=8)  # 22 training images: 2 steps of 8 per epoch
    run = ["--data", str(folder), "--epochs", "2", "--out", str(tmp_path / "run")]
    hooks[3] = lambda loss: (os.kill(os.getpid(), signal.SIGTERM), loss)[1]  # step 3 of 4: inside epoch 2
    assert train_here(*run) == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "run" / "checkpoint" / "progress.json").read_text())["step"] == 3
    assert train_here(*run, "--resume", "--solarize-p", "0", "0.5") == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["aug"]["solarize_p"] == [0.0, 0.5]
    assert cfg["changes"] == [{"step": 3, "setting": "solarize_p", "from": 0.0, "to": [0.0, 0.5]}]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4
