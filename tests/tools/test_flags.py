"""Every flag of every command against its declared range (simclr_dali.settings.Check): a value outside it is one
sentence naming the flag, the value and what is allowed, exit 2, before any work starts. In-process:
each case only parses its arguments."""
import sys

import pytest

from simclr_dali import training as train
from simclr_dali.evaluation import evaluate
from simclr_dali.pipelines import pack, verify
from simclr_dali.pipelines.augment import Augment
from simclr_dali.tools import export, preview
from simclr_dali.tools.benchmark import command as benchmark

COMMANDS = {  # name: (parser, main, the arguments it needs besides the flag under test)
    "train.py": (train.build_parser, train.main, []),
    "evaluate.py": (evaluate.build_parser, evaluate.main, ["--run", "runs/none"]),
    "simclr_dali.pipelines.verify": (verify.build_parser, verify.main, ["no/such/folder"]),
    "simclr_dali.pipelines.pack": (pack.build_parser, pack.main, ["no/such/folder", "no/such/out"]),
    "simclr-preview": (preview.build_parser, preview.main, []),
    "simclr-export": (export.build_parser, export.main, ["--run", "runs/none"]),
    **{f"benchmark.py {name}": (lambda name=name: benchmark.build_parser().sections[name], benchmark.main, [name])
       for name in benchmark.SECTIONS},
}


def flag_cases():
    for command, (build, _, _) in COMMANDS.items():
        for action in build()._actions:
            check = getattr(action, "check", None)
            if check is not None:
                kind = action.type if action.type in (int, float) else str
                for bad in check.bad_values(kind):
                    yield pytest.param(command, action.option_strings[0], bad, check.allowed(),
                                       id=f"{command} {action.option_strings[0]} {bad}")


def ordered_cases():
    for command in ("train.py", "simclr-preview"):
        for low, high in Augment.ORDERED:
            yield pytest.param(command, low, high, id=f"{command} {low} > {high}")


def refuse(capsys, command: str, args: list[str]) -> str:
    _, main, needs = COMMANDS[command]
    with pytest.raises(SystemExit) as stop:
        main([*needs, *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_every_checked_flag_is_found():
    counts = {c: sum(1 for a in build()._actions if getattr(a, "check", None)) for c, (build, _, _) in COMMANDS.items()}
    assert counts["train.py"] >= 35 and counts["evaluate.py"] >= 12 and counts["simclr-preview"] >= 16
    assert all(counts.values()), counts


@pytest.mark.parametrize("command,flag,value,allowed", list(flag_cases()))
def test_a_value_outside_its_range_is_one_sentence(capsys, command, flag, value, allowed):
    err = refuse(capsys, command, [flag, str(value)])
    assert err == f"error: {flag} must be {allowed}, got {value}"


@pytest.mark.parametrize("command,low,high", list(ordered_cases()))
def test_a_smallest_value_above_the_largest_is_one_sentence(capsys, command, low, high):
    lo_value, hi_value = {"crop_min_area": (0.9, 0.5), "crop_min_ratio": (2.0, 1.0), "blur_sigma_min": (3.0, 1.0)}[low]
    err = refuse(capsys, command, [f"--{low.replace('_', '-')}", str(lo_value), f"--{high.replace('_', '-')}",
                                   str(hi_value)])
    assert err.startswith(f"error: --{low.replace('_', '-')} {lo_value} is above --{high.replace('_', '-')} {hi_value}")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_argparse_errors_are_one_sentence_too(capsys, command):
    assert "unrecognized arguments: --no-such-flag" in refuse(capsys, command, ["--no-such-flag"])


# -- the help tells the truth ----------------------------------------------------------------------------------
def help_of(parser, flag: str) -> str:
    action = next(a for a in parser._actions if flag in a.option_strings)
    return " ".join((action.help % {"default": action.default}).split())


def test_the_help_names_every_data_form_and_accelerate():
    parser = train.build_parser()
    for form in ("'digits'", "a folder of images", "'list:FILE'", "'wds:PATTERN'", "'cifar10:PATH'", "'cifar100:PATH'"):
        assert form in help_of(parser, "--data"), form
    assert "any form --data takes" in help_of(parser, "--test-data")
    assert "accelerate launch [--num_processes N] [--mixed_precision bf16] train.py" in parser.format_help()


def test_a_default_that_a_method_or_recipe_sets_gives_every_value():
    parser = train.build_parser()
    assert help_of(parser, "--lr").startswith("base learning rate per 256 images, scaled by the global batch (default: "
                                              "1.0 here; by method: supcon 0.4, moco 0.03, byol 0.2, else 0.3; small "
                                              "recipe 1 for simclr; with an optimiser not the method's own: lars 0.3, "
                                              "sgd 0.03, momentum 0.03, adamw 0.00015;")
    blur = help_of(parser, "--blur-p")
    assert "(default: 0.0 here; by method: byol 1/0.1 (per view), else 0.5; small recipe 0;" in blur
    assert "by method: supcon 0.1, moco 0.2, else 0.1; small recipe 0.2 for simclr" in help_of(parser, "--temperature")
    assert "(default: 128 here; by method: byol 256, else 128; at least 1)" in help_of(parser, "--proj-dim")


def test_the_help_shows_the_defaults_of_the_method_and_size_given(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_command(["--method", "moco", "--image-size", "224", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    assert "global batch (default: 0.03 here;" in text and "area kept (default: 0.2 here;" in text


@pytest.mark.slow
def test_the_usage_line_names_the_command_under_python_m(monkeypatch):
    """`python -m simclr_dali.training` (and `accelerate launch -m`, which runs it so) has __main__.py as argv[0]."""
    from conftest import run_cli

    r = run_cli("-m", "simclr_dali.training", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m simclr_dali.training [-h]"), r.stdout[:200]
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert train.build_parser().format_usage().startswith("usage: train.py [-h]")
