"""Every number a setting takes is a number: nan (which passes every `<` and `>`) and infinity are refused by
every float setting, from a flag, a --config file or the Python API, in one sentence, and config.json is
strict JSON."""
import json
import math

import pytest

from simclr_dali.errors import UserError
from simclr_dali.evaluation.evaluate import EvalConfig
from simclr_dali.evaluation.evaluate import build_parser as eval_parser
from simclr_dali.evaluation.evaluate import parse_args as eval_args
from simclr_dali.pipelines.augment import Augment
from simclr_dali.settings import Check
from simclr_dali.training.checkpoint import write_json
from simclr_dali.training.config import Config, build_parser, parse_args


def float_flags(parser) -> list[str]:
    """The parser's flags that take floats (by the type argparse converts them with, not by their checks)."""
    return [a.option_strings[0] for a in parser._actions if a.type is float and a.option_strings]


TRAIN_FLOATS = float_flags(build_parser())
EVAL_FLOATS = float_flags(eval_parser())


def test_the_float_flags_are_the_ones_a_reader_expects():
    """Written by hand: a float setting that lost its type (and so its check) would drop out of the tests."""
    assert {"--lr", "--weight-decay", "--temperature", "--warmup-epochs", "--save-every-minutes", "--jitter-strength",
            "--blur-sigma-max", "--crop-min-area", "--target-momentum"} <= set(TRAIN_FLOATS)
    assert {"--probe-lr", "--probe-weight-decay", "--knn-temperature"} <= set(EVAL_FLOATS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", TRAIN_FLOATS)
def test_train_refuses_a_value_that_is_no_finite_number_for_every_float_flag(flag, value):
    with pytest.raises(UserError) as err:
        parse_args([f"{flag}={value}"])  # the = keeps argparse from reading -inf as a flag
    text = str(err.value)
    assert text.startswith(f"{flag} must be a finite number ") and text.endswith(f", got {float(value)}"), text


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("flag", EVAL_FLOATS)
def test_evaluate_refuses_a_value_that_is_no_finite_number_for_every_float_flag(flag, value, tmp_path):
    with pytest.raises(UserError, match=f"^{flag} must be a finite number .*, got {float(value)}$"):
        eval_args(["--run", str(tmp_path), flag, value])


def test_a_per_view_setting_refuses_nan_for_either_view():
    with pytest.raises(UserError, match=r"^--blur-p must be a finite number in \[0, 1\], got nan$"):
        parse_args(["--blur-p", "0.5", "nan"])


def test_a_config_file_with_nan_or_infinity_is_refused(tmp_path):
    for value in ("NaN", "Infinity"):  # what Python's json reads and writes for them
        path = tmp_path / "run.json"
        path.write_text('{"lr": %s, "epochs": 3}' % value)
        with pytest.raises(UserError, match=r"^--lr must be a finite number more than 0, got (nan|inf)$"):
            parse_args(["--config", str(path)])


def test_the_api_refuses_nan_as_the_flags_do(tmp_path):
    from simclr_dali import pretrain

    with pytest.raises(UserError, match=r"^--temperature must be a finite number more than 0, got nan$"):
        pretrain(Config(data="digits", out=str(tmp_path / "run"), temperature=math.nan))
    with pytest.raises(UserError, match=r"^--crop-min-area must be a finite number in \(0, 1\], got inf$"):
        pretrain(Config(data="digits", out=str(tmp_path / "run"), aug=Augment(crop_min_area=math.inf)))
    with pytest.raises(UserError, match=r"^--probe-lr must be a finite number "):
        from simclr_dali.evaluation.evaluate import parse_args as parse_eval
        from simclr_dali.settings import to_argv
        parse_eval(to_argv(EvalConfig(run=str(tmp_path), probe_lr=math.nan)))


def test_a_check_refuses_nan_whatever_its_range_and_infinity_unless_declared():
    for check in (Check(low=0), Check(high=1), Check(low=0, high=1), Check(low=0, above=True), Check(),
                  Check(off=-1.0, low=0)):
        assert not check.ok(math.nan) and not check.ok(math.inf) and not check.ok(-math.inf)
        assert check.ok(0.5)
    assert Check(low=0, infinite=True).ok(math.inf) and not Check(low=0, infinite=True).ok(-math.inf)
    assert not Check(low=0, infinite=True).ok(math.nan)


def test_json_written_by_the_trainer_is_strict(tmp_path):
    write_json(tmp_path / "ok.json", {"lr": 0.3})
    assert json.loads((tmp_path / "ok.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {"lr": 0.3}
    with pytest.raises(ValueError):
        write_json(tmp_path / "bad.json", {"lr": math.nan})
    assert not (tmp_path / "bad.json").exists()
