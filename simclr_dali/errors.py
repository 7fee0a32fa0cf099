"""User-facing errors: one sentence on stderr, exit status 2, no traceback."""
from __future__ import annotations

import functools
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
