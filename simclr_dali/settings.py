"""Settings declared once as their dataclass field (`setting`: default, range, help),
exposed as dashed flags, checked before any work starts, and read back from a run's config.json."""
from __future__ import annotations

import argparse
import copy as copylib
import dataclasses
import json
import math
import sys
import weakref
from pathlib import Path

from simclr_dali.errors import UserError


class Formatter(argparse.HelpFormatter):
    """argparse's help, with a per-view flag's values shown as `X [X2]` (one value, or one per view)."""

    def _format_args(self, action, default_metavar):
        if getattr(action, "per_view", False):
            name = self._metavar_formatter(action, default_metavar)(1)[0]
            return f"{name} [{name}2]"
        return super()._format_args(action, default_metavar)


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (an unknown flag, a value of the wrong type) are a UserError like any
    other: one sentence on stderr and exit 2 from a command (exit_on_user_error), without the usage
    block; raised to a caller of the Python API."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(message)


@dataclasses.dataclass(frozen=True)
class Check:
    """The values a setting accepts, declared once beside it (`setting`, `checked`) and enforced by
    `check_args` before any work starts."""
    low: float | None = None  # the smallest value (excluded with above=True)
    high: float | None = None  # the largest value (excluded with below=True)
    above: bool = False
    below: bool = False
    choices: tuple = ()
    off: object = None  # one more value allowed outside the range, meaning `off_means`
    off_means: str = ""
    infinite: bool = False  # inf accepted, where infinity means something (nan never is: it is no number)

    def ok(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # before any comparison: nan passes every `<`
            return self.infinite and not math.isnan(value) and (value > 0 or self.low is None)
        if self.off is not None and value == self.off:
            return True
        if self.choices:
            return value in self.choices
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or (value < self.high if self.below else value <= self.high)

    def allowed(self) -> str:
        if self.low is None and self.high is None and not self.choices:
            return "a number" if self.off is None else f"a number (or {self.off}: {self.off_means})"
        if self.choices:
            return "one of " + ", ".join(repr(c) if c == "" else str(c) for c in self.choices)
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.above else '['}{self.low:g}, {self.high:g}{')' if self.below else ']'}"
        elif self.low is not None:
            text = f"{'more than' if self.above else 'at least'} {self.low:g}"
        else:
            text = f"{'less than' if self.below else 'at most'} {self.high:g}"
        return text + (f" (or {self.off}: {self.off_means})" if self.off is not None else "")

    def bad_values(self, kind=float) -> list:
        """Values the check refuses (for the tests that try every flag)."""
        if self.choices:  # a word for a choice of words, else a number that is none of the numbers
            return ["bogus"] if any(isinstance(c, str) for c in self.choices) else [kind(max(self.choices) + 1)]
        step = 1 if kind is int else 0.5
        out = []
        if self.low is not None:
            out.append(self.low if self.above else self.low - step)
        if self.high is not None:
            out.append(self.high if self.below else self.high + step)
        return [kind(v) for v in out if v != self.off]


_GIVEN: dict[int, set[str]] = {}  # id(settings object) -> the fields its caller set (kept out of its __dict__)


def tracks_given(cls):
    """Class decorator for a settings dataclass: each instance remembers the fields its caller set, in the
    constructor or by assignment afterwards, whether or not the value equals the field's default (`given`).
    A value passed is a value given: `Config(method="moco", lr=0.3)` trains at 0.3, not at MoCo's 0.03.
    copy.copy and copy.deepcopy keep what was given; `dataclasses.replace` passes every field again, so every
    field of its copy counts as given (copy and assign instead)."""
    init, names = cls.__init__, [f.name for f in dataclasses.fields(cls)]

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        set_given(self, set(names[:len(args)]) | set(kwargs))

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if id(self) in _GIVEN and name in names:
            _GIVEN[id(self)].add(name)

    def __copy__(self):
        new = cls.__new__(cls)
        new.__dict__.update(self.__dict__)
        set_given(new, given(self) or ())
        return new

    def __deepcopy__(self, memo):
        new = memo[id(self)] = cls.__new__(cls)
        new.__dict__.update({k: copylib.deepcopy(v, memo) for k, v in self.__dict__.items()})
        set_given(new, given(self) or ())
        return new

    cls.__init__, cls.__setattr__, cls.__copy__, cls.__deepcopy__ = __init__, __setattr__, __copy__, __deepcopy__
    return cls


def given(obj) -> set[str] | None:
    """The fields of a settings object that its caller set (tracks_given), or None where it does not track them."""
    return _GIVEN.get(id(obj))


def set_given(obj, names) -> None:
    """Records which fields of `obj` count as given (also for an object built from a command line, whose
    constructor is passed every field, given or not); forgotten when `obj` is."""
    if id(obj) not in _GIVEN:
        weakref.finalize(obj, _GIVEN.pop, id(obj), None)
    _GIVEN[id(obj)] = {f.name for f in dataclasses.fields(obj)} & set(names)


def setting(default, help: str = "", **check):
    """A dataclass field with its --help text and the values it accepts:
    `epochs: int = setting(100, low=1, help="training epochs")`."""
    return dataclasses.field(default=default, metadata={"help": help, "check": Check(**check) if check else None})


def checked(parser, *flags: str, check: Check, **kwargs) -> argparse.Action:
    """parser.add_argument, with the values the flag accepts (for `check_args`)."""
    action = parser.add_argument(*flags, **kwargs)
    action.check = check
    return action


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
               ordered: tuple[tuple[str, str], ...] = ()) -> None:
    """Every checked flag's value (each of a list's), then each (low, high) pair of dests in order:
    one sentence naming the flag, the value and what is allowed."""
    for action in parser._actions:
        check = getattr(action, "check", None)
        if check is None or not hasattr(args, action.dest):
            continue
        values = getattr(args, action.dest)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not check.ok(value):
                number = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
                raise UserError(f"{action.option_strings[0] if action.option_strings else action.dest} must be "
                                f"{number}{check.allowed()}, got {value}")
    for low, high in ordered:  # per view where a setting has one (a list: view 1, view 2)
        lows, highs = (v if isinstance(v, (list, tuple)) else [v] for v in (getattr(args, low), getattr(args, high)))
        for i in range(max(len(lows), len(highs))):
            smallest, largest = lows[min(i, len(lows) - 1)], highs[min(i, len(highs) - 1)]
            if smallest > largest:
                raise UserError(f"--{low.replace('_', '-')} {smallest} is above --{high.replace('_', '-')} {largest}"
                                f": the smallest value must not exceed the largest")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                        per_view: bool = False, notes: dict[str, str] | None = None) -> None:
    """One dashed flag per dataclass field: `lr_scaling` -> `--lr-scaling`, bools as on/off pairs; its help shows
    the parser's default (set_defaults changes it) and the field's note, if any (where other defaults come from).
    per_view: each takes one value (both views) or two (view 1, view 2), and gives a list."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            check = f.metadata.get("check")
            allowed = f"; {check.allowed()}" if check else ""
            note = f"; {notes[f.name]}" if notes and f.name in notes else ""
            action = parser.add_argument(flag, type=type(default), default=default, nargs="+" if per_view else None,
                                         help=f"{text} (default: %(default)r{' here' if note else ''}{note}{allowed})")
            action.per_view = per_view
        # every float is checked for being a finite number, with a declared range or without one
        action.check = f.metadata.get("check") or (Check() if type(default) is float else None)


def to_argv(obj) -> list[str]:
    """The flags that give dataclass `obj`'s given fields (tracks_given: what its caller set, equal to the
    field's default or not; for an object that does not track them, the fields that differ from the
    defaults); a nested dataclass field, train.py's aug, spreads into its own flags. It is the command line
    that add_dataclass_flags' parser reads back into an equal object, through the same checks, with the
    given values over every layer of defaults."""
    argv, chosen = [], given(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            argv += to_argv(value)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name not in chosen if chosen is not None else (value == default and type(value) is type(default)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:  # a tuple: one value per view
            argv += [flag, *(repr(v) if isinstance(v, float) else str(v) for v in
                             (value if isinstance(value, tuple) else [value]))]
    return argv


def ordered_fields(*classes) -> tuple[tuple[str, str], ...]:
    """The (smallest, largest) pairs that dataclasses declare in their ORDERED attribute."""
    return tuple(pair for cls in classes for pair in getattr(cls, "ORDERED", ()))


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def given_values(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The settings named on the command line (not left at their defaults) and their values: parsed with
    every default suppressed, so that only what was given lands in the namespace. --help is left to the
    full parse, which shows the defaults these choose."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-h", "--help")]
    defaults, parser_defaults = {action: action.default for action in parser._actions}, parser._defaults
    for action in defaults:
        action.default = argparse.SUPPRESS
    parser._defaults = {}  # set_defaults (a recorded run's settings) lands here
    try:
        return vars(parser.parse_args(argv))
    finally:
        parser._defaults = parser_defaults
        for action, default in defaults.items():
            action.default = default


def read_recorded(path: str, flag: str = "--config") -> dict:
    """A JSON file of settings that a command wrote (config.json, eval_config.json), or one sentence naming
    `flag` and the file."""
    file = Path(path)
    try:
        recorded = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{flag} {path} is not a JSON file of settings ({type(err).__name__}): pass a "
                        f"config.json that a run wrote") from None
    if not isinstance(recorded, dict):
        raise UserError(f"{flag} {path} holds no settings: pass a config.json that a run wrote")
    return recorded


def recorded_settings(recorded: dict, cls, path: str, flag: str = "--config", derived: frozenset[str] = frozenset(),
                      skip: frozenset[str] = frozenset()) -> dict:
    """The settings `recorded` holds (read_recorded's), as parser defaults for `cls`'s flags: a nested
    dataclass field (train.py's aug) spreads into its own fields. `derived` keys (what the run worked
    out, such as its world size) and `skip` keys (actions, such as --resume) are not settings and are
    left out; any other key this version does not know, or a value of the wrong type, is one sentence
    naming `flag` and the file `path`."""
    settings = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name not in recorded or f.name in skip:
            continue
        value = recorded[f.name]
        if dataclasses.is_dataclass(default):
            settings.update(recorded_settings_of(value, type(default), path, f.name, flag))
        else:
            settings[f.name] = _typed(value, default, path, f.name, flag)
    known = {f.name for f in dataclasses.fields(cls)} | derived | skip
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise UserError(f"{flag} {path} holds {', '.join(map(repr, unknown))}, which this version of the "
                        f"command does not know (written by another version?): remove them from the file")
    return settings


def recorded_settings_of(values, cls, path: str, name: str, flag: str = "--config") -> dict:
    if not isinstance(values, dict):
        raise UserError(f"{flag} {path}: {name!r} should hold settings, not {values!r}")
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{flag} {path} holds {', '.join(repr(f'{name}.{k}') for k in unknown)}, which this "
                        f"version of the command does not know (written by another version?): remove them")
    return {k: [_typed(x, fields[k], path, f"{name}.{k}", flag) for x in v] if isinstance(v, list) else
            _typed(v, fields[k], path, f"{name}.{k}", flag) for k, v in values.items()}  # a list: one value per view


def _typed(value, default, path: str, name: str, flag: str = "--config"):
    """`value` as the type of `default` (an int may stand for a float), else one sentence."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise UserError(f"{flag} {path}: {name} is {value!r}, but it should be a {kind.__name__}")
    return value
