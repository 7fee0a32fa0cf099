"""User-facing errors: one sentence on stderr, exit status 2, no traceback."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (path, data, flag) that we can describe in one sentence."""


def leave(status: int, err: BaseException | None = None) -> None:
    """Exit with `status`; at once (os._exit, no teardown) after an error that left a DALI pipeline no longer
    valid (pipelines.failures.UnreadableData): tearing such a pipeline down has been seen to end in SIGSEGV after
    the sentence was printed. Whatever is on disk is whole: checkpoints are swapped in with renames."""
    if getattr(err, "pipeline_failed", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status) from None


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a CLI entry point so that a UserError prints its sentence and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            leave(2, err)

    return wrapper
