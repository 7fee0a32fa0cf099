"""simclr-dali: SimCLR pretraining with NVIDIA DALI pipelines, a fused NT-Xent kernel and accelerate.

The Python API (simclr_dali.api) is loaded on first use, so that `import simclr_dali.errors` and the
command-line tools stay light:

    from simclr_dali import Augment, Config, EvalConfig, Run, pretrain
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Augment", "Config", "EvalConfig", "Run", "pretrain"]

_HOMES = {"pretrain": "simclr_dali.api", "Run": "simclr_dali.api", "Config": "simclr_dali.training.config",
          "EvalConfig": "simclr_dali.evaluation.evaluate", "Augment": "simclr_dali.pipelines.augment"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'simclr_dali' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
