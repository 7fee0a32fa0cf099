"""The Python API: what the commands do, from a notebook or another project, with plain objects (the
settings dataclasses, a `Run` pointing at a run's folder, numpy and torch results).

    from simclr_dali import Config, Run, pretrain

    run = pretrain(Config(data="digits", out="runs/api", backbone="resnet10t", epochs=2))
    backbone = run.backbone()              # a torch.nn.Module in eval mode, the run's small stem in place
    features, paths = run.embed("photos")  # every image of a folder: numpy (N, F), and the paths in that order
    z = run.embed(views)                   # a (N, 3, S, S) tensor normalised as the pipeline does -> (N, F)
    scores = run.evaluate(probe_epochs=20) # kNN and linear probe, as evaluate.py writes them to eval.json

Settings pass through the command line's own parser and checks, so a value the flags would refuse is
the same one-sentence UserError here (raised, not printed). A field set is a value given, as a flag is, even
where it equals the field's default: `Config(method="moco", lr=0.3)` trains at 0.3, not MoCo's 0.03.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch

from simclr_dali.settings import to_argv


def pretrain(config=None, **settings) -> Run:
    """Train in this process as `train.py` would with the fields of `config` (a training Config, default
    Config()) that its caller set, and `settings` (more field names, `aug=Augment(...)` included) over them: a
    value set is a value given, equal to the field's default or not, and what was not set the method and the
    recipe decide (docs/design.md, Settings and recipes). Returns the Run. A run stopped by a signal raises
    KeyboardInterrupt after its checkpoint."""
    from simclr_dali.training.config import Config
    from simclr_dali.training.loop import train

    cfg = copy.copy(config or Config())
    names = {f.name for f in dataclasses.fields(cfg)}
    for name, value in settings.items():
        if name not in names:
            raise TypeError(f"pretrain() got an unexpected setting {name!r}")
        setattr(cfg, name, value)
    status = train(to_argv(cfg))
    if status:
        raise KeyboardInterrupt(f"training stopped by a signal; its checkpoint is in {Path(cfg.out) / 'checkpoint'}"
                                f" and pretrain(config, resume=True) goes on")
    return Run(cfg.out)


@dataclasses.dataclass
class Run:
    """A training run's output folder: its settings (config.json) and exported backbone, both read
    back (and checked) before use."""
    path: Path

    def __post_init__(self):
        self.path = Path(self.path)

    @property
    def config(self) -> dict:
        """The run's config.json: its settings and what it worked out (world size, scaled lr, ...)."""
        from simclr_dali.evaluation.backbone import load_run

        return load_run(self.path)

    def backbone(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """The trained backbone (pooled features, no projection head) in eval mode, on `device`."""
        from simclr_dali.evaluation.backbone import load_backbone

        model = load_backbone(self.config, self.path / "backbone.safetensors").eval()
        return model.to(device) if device is not None else model

    def embed(self, images, *, batch_size: int = 256, workers: int = 2, device: torch.device | str | None = None):
        """Frozen features. `images` is a folder (every image under it, through the DALI evaluation
        view at the run's image size: returns a float32 numpy array (N, F) and the paths in its row
        order; undecodable files are left out) or a (N, 3, S, S) tensor already normalised as the
        pipeline's views are (returns a float32 tensor (N, F) on the CPU)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(images, torch.Tensor):
            model = self.backbone(device)
            with torch.no_grad():
                return torch.cat([model(part.to(device)).float().cpu() for part in images.split(batch_size)])
        from simclr_dali.evaluation.embed import embed_images

        x, files, _ = embed_images(self.path, self.config, str(images), batch_size=batch_size, workers=workers,
                                   device=device)
        return x.numpy().astype(np.float32), files

    def evaluate(self, **settings) -> dict:
        """kNN and linear probe (and fine-tuning with finetune=True) against random init, as
        `evaluate.py --run RUN` with these settings (EvalConfig's field names); what eval.json holds."""
        from simclr_dali.evaluation.evaluate import EvalConfig, evaluate_run, parse_args

        cfg = parse_args(to_argv(EvalConfig(run=str(self.path), **settings)))
        return evaluate_run(cfg)
