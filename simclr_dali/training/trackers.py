"""--log-with: the run's metrics also go to the experiment trackers people already use, through
accelerate's own tracker classes. Each is named in config.json's log_with; none is needed to train.

    tensorboard  event files in OUT/tensorboard
    mlflow       the MLflow server or store of MLFLOW_TRACKING_URI, else a local store, OUT/mlflow.db
                 (experiment MLFLOW_EXPERIMENT_NAME, else simclr-dali; the run is named after OUT)
    wandb        Weights & Biases, project simclr-dali (WANDB_PROJECT overrides it), run files under OUT/wandb;
                 WANDB_MODE=offline keeps everything there, for `wandb sync` later
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from simclr_dali.errors import UserError

PROJECT = "simclr-dali"
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # --log-with name -> package


def names(log_with: str) -> list[str]:
    """The trackers --log-with names (comma-separated), each once, checked: a name accelerate's trackers
    do not offer here, or a tracker whose package is missing, is one sentence."""
    chosen = list(dict.fromkeys(n.strip() for n in log_with.split(",") if n.strip()))
    for name in chosen:
        if name not in TRACKERS:
            raise UserError(f"--log-with {name!r} is not a tracker this trainer offers: choose from "
                            f"{', '.join(TRACKERS)} (several with commas)")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"--log-with {name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}")
    return chosen


def make_trackers(log_with: str, out: str) -> list:
    """accelerate tracker objects for Accelerator(log_with=...): nothing starts until init_trackers,
    which runs on the main process only."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    made, run_name = [], Path(out).name
    for name in names(log_with):
        if name == "tensorboard":
            made.append(TensorBoardTracker("tensorboard", out))
        elif name == "mlflow":
            made.append(MLflowTracker(experiment_name=PROJECT, run_name=run_name))
        else:
            made.append(WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, dir=str(out)))
    return made


def prepare_stores(log_with: str, out: Path) -> None:
    """Before the trackers start (main process): MLflow's local store beside the run where no
    MLFLOW_TRACKING_URI says otherwise; W&B's run folder."""
    chosen = names(log_with)
    if "mlflow" in chosen and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{out.resolve() / 'mlflow.db'}")
    if "wandb" in chosen:
        (out / "wandb").mkdir(parents=True, exist_ok=True)
