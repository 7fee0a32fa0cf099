"""The Python API: the README's block runs as it stands (read out of the README, in a fresh process, on
the built-in digits, from a folder whose own models.py and pipelines.py stay theirs), settings built in Python
pass the flags' own checks, and they turn back into the command line that gives them."""
from __future__ import annotations

import re

import pytest
from conftest import ROOT, run_cli

from simclr_dali import Config, EvalConfig, pretrain
from simclr_dali import training as train
from simclr_dali.errors import UserError
from simclr_dali.evaluation import evaluate
from simclr_dali.pipelines.augment import Augment
from simclr_dali.settings import to_argv


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    marker = text.index("<!-- python-api: tests/e2e/test_api.py runs the next block -->")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


@pytest.mark.slow
def test_the_readme_block_runs_as_it_stands(tmp_path):
    # a notebook's folder with modules of the two common names: the block imports simclr_dali's, not these
    (tmp_path / "models.py").write_text("raise ImportError('the user models.py was imported')\n")
    (tmp_path / "pipelines.py").write_text("raise ImportError('the user pipelines.py was imported')\n")
    (tmp_path / "block.py").write_text(readme_block() + "\nimport sys\nassert 'models' not in sys.modules\n")
    r = run_cli("block.py", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert "0.1 0.1" in lines  # the temperature set, though it is the field's default, over the small recipe's 0.2
    assert "torch.Size([2, 512])" in lines
    assert "(20, 512) 00.png" in lines
    [scores] = [line for line in lines if line.startswith("kNN top-1 ")]
    knn, probe = (float(v) / 100 for v in re.findall(r"([\d.]+)%", scores))
    assert 0.1 < knn <= 1 and 0.1 < probe <= 1  # ten classes: above chance after two epochs
    assert (tmp_path / "runs" / "notebook" / "eval.json").is_file()


def test_settings_round_trip_through_the_command_line():
    cfg = Config(data="digits", epochs=3, lr=0.5, sync_bn=False, compile=True, log_with="tensorboard",
                 recipe="imagenet", aug=Augment(blur_p=0.0, jitter_strength=0.5))
    argv = to_argv(cfg)
    assert "--no-sync-bn" in argv and "--compile" in argv and ["--blur-p", "0.0"] == argv[argv.index("--blur-p"):][:2]
    assert argv[:2] == ["--data", "digits"]  # given, though it is the default: a value passed is a value given
    assert train.parse_args(argv) == cfg
    # a field not set is a flag left out: the recipe and the method set it
    assert train.parse_args(to_argv(Config())) == train.parse_args([])
    assert train.parse_args(to_argv(Config(method="moco"))).lr == 0.03
    ecfg = EvalConfig(run="runs/x", probe_epochs=7, plots=False)
    assert evaluate.parse_args(to_argv(ecfg)) == ecfg


def test_a_setting_the_flags_refuse_is_the_same_sentence(tmp_path):
    with pytest.raises(UserError, match=r"^--temperature must be more than 0, got -1.0$"):
        pretrain(Config(temperature=-1.0, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # refused before any work
    with pytest.raises(UserError, match=r"^argument --epochs: invalid int value: 'ten'$"):
        pretrain(Config(epochs="ten", out=str(tmp_path / "run")))
    with pytest.raises(TypeError):
        pretrain(Config(), no_such_setting=1)
