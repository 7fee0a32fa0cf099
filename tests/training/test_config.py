"""Re-running a recorded run: --config for train.py and evaluate.py, flags over the file, one sentence for
a file this version cannot take; the files a run writes are readable as the umask allows; defaults that
fit the run's length."""
import json
import os
import stat

import pytest
from conftest import make_folder, train_here

from simclr_dali import training as train
from simclr_dali.evaluation import evaluate

QUICK_EVAL = ["--batch-size", "8", "--workers", "1", "--probe-epochs", "3", "--knn-k", "5", "--no-plots"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    folder = make_folder(root / "images", per_class=8)
    out = root / "first"
    assert train_here("--data", str(folder), "--out", str(out), "--epochs", "1", "--temperature", "0.3",
                      "--crop-min-area", "0.2", "--jitter-strength", "0.5") == 0
    return out


@pytest.mark.slow
def test_a_recorded_run_runs_again_with_flags_over_its_settings(recorded, tmp_path):
    again = tmp_path / "again"
    cfg, given = train.parse_command(["--config", str(recorded / "config.json"), "--out", str(again),
                                      "--epochs", "2"])
    first = json.loads((recorded / "config.json").read_text())
    assert (cfg.temperature, cfg.aug.crop_min_area, cfg.aug.jitter_strength) == (0.3, 0.2, 0.5)
    assert (cfg.epochs, cfg.out, cfg.data, cfg.backbone) == (2, str(again), first["data"], "test_resnet")
    assert given == {"config", "out", "epochs"} and cfg.resume is False
    assert train.main(["--config", str(recorded / "config.json"), "--out", str(again), "--epochs", "2"]) == 0
    second = json.loads((again / "config.json").read_text())
    differ = {k for k in first if first[k] != second[k]}
    assert differ <= {"config", "out", "epochs", "warmup_epochs_resolved", "scan", "given"}, differ
    assert second["config"] == str(recorded / "config.json") and second["epochs"] == 2
    assert second["given"] == {**first["given"], "out": str(again), "epochs": 2}


@pytest.mark.slow
@pytest.mark.parametrize("change,sentence", [
    ({"learning_rate": 1.0}, "holds 'learning_rate', which this version of the command does not know"),
    ({"aug": {"hue_degrees": 3}}, "holds 'aug.hue_degrees', which this version of the command does not know"),
    ({"epochs": "ten"}, "epochs is 'ten', but it should be a int"),
    ({"small_stem": 1}, "small_stem is 1, but it should be a bool"),
])
def test_a_file_this_version_cannot_take_is_one_sentence(recorded, tmp_path, capsys, change, sentence):
    settings = json.loads((recorded / "config.json").read_text())
    settings.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(SystemExit) as stop:
        train.main(["--config", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: --config {path}")
    assert sentence in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("content,sentence", [(None, "no such file"), ("{not json", "is not a JSON file of settings"),
                                              ("[1, 2]", "holds no settings")])
def test_a_config_that_is_not_one_is_one_sentence(tmp_path, capsys, content, sentence):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit):
        train.main(["--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --config {path}") and sentence in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_evaluate_records_its_settings_and_runs_them_again(recorded):
    assert evaluate.main(["--run", str(recorded), *QUICK_EVAL, "--knn-temperature", "0.2"]) == 0
    settings = json.loads((recorded / "eval_config.json").read_text())
    assert settings["knn_temperature"] == 0.2 and settings["probe_epochs"] == 3
    assert evaluate.main(["--config", str(recorded / "eval_config.json"), "--knn-k", "3"]) == 0
    again = json.loads((recorded / "eval_config.json").read_text())
    assert (again["knn_k"], again["knn_temperature"], again["run"]) == (3, 0.2, str(recorded))


@pytest.mark.slow
def test_what_a_run_writes_is_as_readable_as_the_umask_allows(recorded):
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in [*recorded.iterdir(), *(recorded / "checkpoint").iterdir()] if p.is_file()]
    assert {p.name for p in files} >= {"backbone.safetensors", "model.safetensors", "config.json", "metrics.jsonl"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


@pytest.mark.parametrize("args,warmup", [(["--epochs", "10"], 1.0), (["--epochs", "30"], 3.0),
                                         (["--epochs", "800"], 10.0), (["--epochs", "10", "--warmup-epochs", "5"], 5.0),
                                         (["--epochs", "10", "--warmup-epochs", "0"], 0.0)])
def test_warmup_is_the_papers_ten_epochs_at_most_a_tenth_of_the_run(args, warmup):
    assert train.warmup_epochs(train.parse_args(args)) == warmup
