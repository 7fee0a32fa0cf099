"""Every flag of every command against its declared range (simclr_dali.settings.Check): a value outside it is one
sentence naming the flag, the value and what is allowed, exit 2, before any work starts. In-process:
each case only parses its arguments."""
import pytest

from pipelines import pack, verify
from pipelines.augment import Augment
from simclr_dali import training as train
from simclr_dali.evaluation import evaluate
from simclr_dali.tools import export, preview
from simclr_dali.tools.benchmark import command as benchmark

COMMANDS = {  # name: (parser, main, the arguments it needs besides the flag under test)
    "train.py": (train.build_parser, train.main, []),
    "evaluate.py": (evaluate.build_parser, evaluate.main, ["--run", "runs/none"]),
    "pipelines.verify": (verify.build_parser, verify.main, ["no/such/folder"]),
    "pipelines.pack": (pack.build_parser, pack.main, ["no/such/folder", "no/such/out"]),
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
