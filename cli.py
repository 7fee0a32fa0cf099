"""User-facing errors: one sentence on stderr, exit status 2, no traceback."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (path, data, flag) that we can describe in one sentence."""


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a CLI entry point so that a UserError prints its sentence and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field of a dataclass, used as its --help text."""
    comments = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = re.match(r"\s+(\w+)\s*:[^=#]+=[^#]*#\s*(.+)$", line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    return comments


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One dashed flag per dataclass field: `lr_scaling` -> `--lr-scaling`, bools as on/off pairs."""
    helps = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = helps.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                help=f"{text} (default: {default})")


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def given_dests(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The settings named on the command line (not left at their defaults): parsed once more with
    every default suppressed, so that only what was given lands in the namespace."""
    defaults = {action: action.default for action in parser._actions}
    for action in defaults:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults.items():
            action.default = default
