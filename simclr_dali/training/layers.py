"""What earlier runs give a run (config.settings_in_order puts them in their place): the values a recorded run
was given (`--config`: its config.json's `given`), every setting of the checkpoint a resume goes on from, and on
a resume, which of the settings given now may change (applied, and recorded in config.json's `changes`) and which
the saved state fixes (one sentence).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from simclr_dali.errors import UserError
from simclr_dali.pipelines.augment import Augment, per_view
from simclr_dali.settings import read_recorded, recorded_settings

# what an invocation does, not a setting of the run: never taken from a recorded run or a checkpoint
ACTIONS = frozenset({"config", "resume", "resume_from", "stop_after"})
# config.json keys that a run works out rather than takes as settings (--config leaves them out)
DERIVED = frozenset({"world_size", "world_sizes", "workers_resolved", "global_batch", "scaled_lr", "steps_per_epoch", "n_train",
                     "dali_placement", "loss_impl_resolved", "loss_operands", "device", "mixed_precision",
                     "channels_last_resolved", "warmup_epochs_resolved", "batch_norm", "scan", "recipe_resolved",
                     "recipe_values", "given", "changes"})
# settings that a resume cannot change: the saved weights, optimiser state, queue and data order depend on them
FIXED = {"backbone": "the saved weights are its", "small_stem": "the saved weights are its",
         "proj_hidden": "the saved head is this wide", "proj_dim": "the saved head is this wide",
         "pred_hidden": "the saved predictor is this wide", "method": "the saved networks are its",
         "queue_size": "the saved queue is this long", "optimizer": "the saved optimiser state is its",
         "data": "the steps taken read it", "seed": "the steps taken drew its order",
         "recipe": "it set the run's defaults when it started; give the settings themselves"}


# -- what a recorded run was given, and what a checkpoint holds -------------------------------------------------------
def settings_of(recorded: dict, schema, path: str, flag: str) -> dict:
    """The settings a config.json holds, flat as the flags take them (the augmentations by their own names, a pair
    per view as a list), each checked against its field's type in `schema` (train's Config); the actions left
    out."""
    return recorded_settings(recorded, schema, path, flag, DERIVED, skip=ACTIONS)


def recorded_given(path: str, schema, derive) -> dict:
    """What the run that wrote this config.json was given (its `given`), and any other setting of the file that
    is not what `derive(given)` (the defaults that run would have derived) gives: a value edited into the file by
    hand counts as given. A file written before runs recorded `given`: every setting in it. The whole file is
    checked first: a key this version does not know, or a value of the wrong type, is one sentence."""
    recorded = read_recorded(path)
    settings = settings_of(recorded, schema, path, "--config")
    if "given" not in recorded:
        return settings
    if not isinstance(recorded["given"], dict):
        raise UserError(f"--config {path}: 'given' should hold settings, not {recorded['given']!r}")
    given = settings_of(nested(recorded["given"]), schema, path, "--config")
    derived = derive(given)
    edited = {k: v for k, v in settings.items() if k not in given and k in derived
              and per_view(v) != per_view(derived[k])}
    return {**given, **edited}


def nested(flat: dict) -> dict:
    """A flat `given` as config.json's settings nest: the augmentations under `aug`."""
    aug = {f.name for f in dataclasses.fields(Augment)}
    return {**{k: v for k, v in flat.items() if k not in aug}, "aug": {k: v for k, v in flat.items() if k in aug}}


def checkpoint_settings(path: Path | None, schema) -> tuple[dict, dict]:
    """For --resume: (every setting, what it was given) of the checkpoint in `path`, from its config.json;
    ({}, {}) where that cannot be read (the resume then says why, naming the file, once it opens the checkpoint)."""
    if path is None or not (path / "config.json").is_file():
        return {}, {}
    try:
        saved = read_recorded(str(path / "config.json"), "--resume")
    except UserError:
        return {}, {}
    given = saved.get("given")
    return settings_of(saved, schema, str(path / "config.json"), "--resume"), given if isinstance(given, dict) else {}


# -- a resume: what changes, and what cannot -------------------------------------------------------------------------
def flat_resolved(config: dict) -> dict:
    """A config.json's (or a Config's asdict's) settings flat, each pair per view a tuple."""
    return {**{k: v for k, v in config.items() if k != "aug"},
            **{k: per_view(v) for k, v in (config.get("aug") or {}).items()}}


def resume_changes(before: dict, cfg, now: set[str]) -> list[tuple[str, object, object]]:
    """(setting, checkpoint's value, this run's value) of each setting given now that differs from the checkpoint
    (`before`: its settings, flat); a setting the saved state fixes (FIXED) is one sentence naming both values."""
    after = flat_resolved(dataclasses.asdict(cfg))
    changed = [(k, before.get(k), after[k]) for k in sorted(now - ACTIONS)
               if k in after and k in before and per_view(before[k]) != after[k]]
    for name, old, new in changed:
        if name in FIXED:
            raise UserError(f"--resume: the checkpoint was trained with --{name.replace('_', '-')} {shown(old)}, "
                            f"which cannot change to {shown(new)} in a run that goes on ({FIXED[name]}): resume "
                            f"without it, or start a new run with another --out")
    return changed


def shown(value) -> str:
    """A value as the command line and --help show it: numbers in short form, a pair per view as V1/V2."""
    if isinstance(value, (list, tuple)):
        return "/".join(map(shown, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def given_record(cfg, names: set[str]) -> dict:
    """config.json's `given`: each setting given (now, or to the runs this one was recorded from), its value."""
    values = flat_resolved(dataclasses.asdict(cfg))
    return {k: list(values[k]) if isinstance(values[k], tuple) else values[k] for k in sorted(names - ACTIONS)
            if k in values}
