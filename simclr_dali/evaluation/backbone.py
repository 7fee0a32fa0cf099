"""A training run's backbone: its settings and exported weights read back before any work (a damaged file
is one sentence saying how to recover it from the run's checkpoint), and the backbone built from them."""
from __future__ import annotations

from pathlib import Path

from simclr_dali.errors import UserError
from simclr_dali.readback import Unreadable, check_safetensors, read_json


def load_backbone(run_cfg: dict, weights: Path | None):
    """The run's backbone architecture, with its trained weights or (weights=None) at random init."""
    from safetensors.torch import load_file

    from simclr_dali.models.backbone import create_backbone

    model = create_backbone(run_cfg["backbone"], run_cfg.get("small_stem", False),
                             run_cfg.get("image_size"))
    if weights is not None:
        model.load_state_dict(load_file(str(weights)))
    return model


def load_run(run: Path) -> dict:
    """The run's settings (config.json) and its exported backbone, both read back before any work; a
    damaged one is recovered from the run's checkpoint, as the sentence says."""
    from simclr_dali.models.backbone import create_backbone

    if not (run / "config.json").is_file() and not (run / "checkpoint" / "config.json").is_file():
        raise UserError(f"{run} is not a training run: it has no config.json (pass train.py's --out)")
    try:
        run_cfg = read_json(run / "config.json", "", need=("backbone", "image_size", "data"))
    except Unreadable as err:
        whole = whole_checkpoint(run)
        raise err.fixed_by(f"the checkpoint keeps a copy: copy {whole / 'config.json'} to {run}" if whole else
                           f"{run} holds no whole checkpoint to recover it from: train again") from None
    weights = run / "backbone.safetensors"
    if not weights.is_file():
        raise UserError(f"{run} has no backbone.safetensors yet: training has not finished")
    model = create_backbone(run_cfg["backbone"], run_cfg.get("small_stem", False),
                             run_cfg.get("image_size"))
    try:
        check_safetensors(weights, "", expect={k: tuple(v.shape) for k, v in model.state_dict().items()},
                          what=f"the run's {run_cfg['backbone']}")
    except Unreadable as err:
        whole = whole_checkpoint(run)
        raise err.fixed_by(f"export it again from the checkpoint with  python train.py --config "
                           f"{whole / 'config.json'} --out {run} --resume" if whole else
                           f"{run} holds no whole checkpoint to export it from: train again") from None
    return run_cfg


def whole_checkpoint(run: Path) -> Path | None:
    """The run's newest checkpoint, if every file of it reads back whole."""
    from simclr_dali.training.checkpoint import check_checkpoint, find_checkpoint

    try:
        return check_checkpoint(find_checkpoint(run) or run / "checkpoint").path
    except Unreadable:
        return None
