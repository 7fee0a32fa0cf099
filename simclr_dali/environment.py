"""The environment variables a run reads or hands on, checked before any work: a value the library reading it
would take silently for something else (accelerate trains in fp32 under ACCELERATE_MIXED_PRECISION=bfloat16,
and records it as the run's precision) or refuse with a traceback deep inside (torch.distributed on a port
out of range) is one sentence naming the variable, its value and the values it accepts.

Read by accelerate and torch.distributed: the mixed precision, the process counts and ranks that
`accelerate launch` / torchrun set, the rendezvous address and port; by us: the index cache's folder;
by the BLAS libraries: their thread count.
"""
from __future__ import annotations

import os
from typing import Callable

from simclr_dali.errors import UserError

PRECISIONS = ("no", "fp16", "bf16")  # fp8 needs NVIDIA Transformer Engine, which this trainer does not use
TRUE_FALSE = ("1", "0", "true", "false", "yes", "no", "on", "off", "y", "n", "t", "f")  # accelerate's str_to_bool


def _integer(low: int, high: int | None = None) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        ok = value.strip().isdigit() and int(value) >= low and (high is None or int(value) <= high)
        return None if ok else (f"a whole number from {low} to {high}" if high is not None
                                else f"a whole number of at least {low}")
    return check


def _one_of(choices: tuple[str, ...], case_sensitive: bool = True) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        ok = value in choices if case_sensitive else value.lower() in choices
        return None if ok else "one of " + ", ".join(choices)
    return check


def _host(value: str) -> str | None:
    return None if value.strip() and not any(c.isspace() for c in value) else "a host name or address"


def _absolute(value: str) -> str | None:
    return None if os.path.isabs(value) else "an absolute path"


CHECKS: dict[str, Callable[[str], str | None]] = {
    "ACCELERATE_MIXED_PRECISION": _one_of(PRECISIONS),
    "ACCELERATE_USE_CPU": _one_of(TRUE_FALSE, case_sensitive=False),
    "WORLD_SIZE": _integer(1),
    "RANK": _integer(0),
    "LOCAL_RANK": _integer(0),
    "LOCAL_WORLD_SIZE": _integer(1),
    "NODE_RANK": _integer(0),
    "GROUP_RANK": _integer(0),
    "MASTER_ADDR": _host,
    "MASTER_PORT": _integer(1, 65535),
    "OMP_NUM_THREADS": _integer(1),
    "XDG_CACHE_HOME": _absolute,
}


def check_environment(environ=None) -> None:
    """One sentence for the first variable set to a value its reader does not accept, or for ranks that do not fit
    their counts; nothing when all are unset or valid."""
    env = os.environ if environ is None else environ
    for name, check in CHECKS.items():
        if name in env and (accepts := check(env[name])) is not None:
            raise UserError(f"environment variable {name} is {env[name]!r}, which is not accepted: it takes {accepts}"
                            f" (or unset it)")
    for rank, count in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if rank in env and count in env and int(env[rank]) >= int(env[count]):
            raise UserError(f"environment variable {rank} is {env[rank]}, but {count} is {env[count]}: a rank counts "
                            f"from 0 to {int(env[count]) - 1}")
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env and int(env["LOCAL_WORLD_SIZE"]) > int(env["WORLD_SIZE"]):
        raise UserError(f"environment variable LOCAL_WORLD_SIZE is {env['LOCAL_WORLD_SIZE']}, more than WORLD_SIZE "
                        f"{env['WORLD_SIZE']}: a machine cannot run more of the run's processes than the run has")
