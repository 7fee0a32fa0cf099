"""What the backbone learned: kNN and linear probe on frozen features, against random init.

    python evaluate.py --run runs/digits
    python evaluate.py --run runs/x --data /images/train --test-data /images/val

Features come from the run's exported backbone (backbone.safetensors) in eval mode, through a DALI
pipeline without augmentation (resize, centre crop, normalise).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cli import UserError, add_dataclass_flags, dataclass_from_args, exit_on_user_error


@dataclass
class EvalConfig:
    run: str = ""  # the training run's output folder (holds config.json and backbone.safetensors)
    data: str = ""  # training split to fit kNN and the probe on (default: the run's --data)
    test_data: str = ""  # test split (default: the run's --test-data, or the data's own test split)
    batch_size: int = 256  # images per feature-extraction batch
    workers: int = 2  # DALI CPU threads
    knn_k: int = 200  # neighbours for the weighted kNN vote (capped at the train size)
    knn_temperature: float = 0.1  # kNN vote weight exp(cosine / T)
    probe_epochs: int = 100  # linear probe epochs over the cached features
    probe_lr: float = 1e-3  # linear probe AdamW learning rate
    probe_weight_decay: float = 1e-4  # linear probe weight decay
    seed: int = 0  # seeds the random-init backbone and the probe


# -- features ---------------------------------------------------------------------------------
def load_backbone(run_cfg: dict, weights: Path | None):
    """The run's backbone architecture, with its trained weights or (weights=None) at random init."""
    from safetensors.torch import load_file

    from models.backbone import create_backbone

    model = create_backbone(run_cfg["backbone"], run_cfg.get("small_stem", False))
    if weights is not None:
        model.load_state_dict(load_file(str(weights)))
    return model


@torch.no_grad()
def extract(model, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (N, F) and labels (N,), in the loader's order; BatchNorm in eval mode."""
    model.eval().to(device)
    feats, labels = [], []
    for images, y in loader:
        feats.append(model(images.to(device)).float().cpu())
        labels.append(y.view(-1).long().cpu())
    return torch.cat(feats), torch.cat(labels)


# -- protocols --------------------------------------------------------------------------------
@torch.no_grad()
def knn_top1(train_x, train_y, test_x, test_y, k: int = 200, temperature: float = 0.1,
             chunk: int = 1024) -> float:
    """Weighted kNN (cosine similarity, votes weighted by exp(sim / T)), top-1 accuracy."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, len(train_x))
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for start in range(0, len(test_x), chunk):
        sim = test_x[start:start + chunk] @ train_x.T  # (c, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), classes).scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[start:start + chunk]).sum().item()
    return correct / len(test_x)


def linear_probe_top1(train_x, train_y, test_x, test_y, *, epochs: int = 100, lr: float = 1e-3,
                      weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0) -> float:
    """A linear layer trained on standardised frozen features (the backbone never sees a gradient)."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    layer = torch.nn.Linear(train_x.shape[1], classes)
    torch.nn.init.normal_(layer.weight, std=0.01, generator=gen)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(train_x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x), generator=gen).split(batch_size):
            loss = F.cross_entropy(layer(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (layer(test_x).argmax(1) == test_y).float().mean().item()


# -- the command ------------------------------------------------------------------------------
def evaluate_backbone(model, train_loader, test_loader, cfg: EvalConfig, device) -> dict:
    train_x, train_y = extract(model, train_loader, device)
    test_x, test_y = extract(model, test_loader, device)
    return {"knn_top1": knn_top1(train_x, train_y, test_x, test_y, cfg.knn_k, cfg.knn_temperature),
            "linear_top1": linear_probe_top1(train_x, train_y, test_x, test_y, epochs=cfg.probe_epochs,
                                             lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay,
                                             seed=cfg.seed)}


def load_run(run: Path) -> dict:
    if not (run / "config.json").is_file():
        raise UserError(f"{run} is not a training run: it has no config.json (pass train.py's --out)")
    if not (run / "backbone.safetensors").is_file():
        raise UserError(f"{run} has no backbone.safetensors yet: training has not finished")
    return json.loads((run / "config.json").read_text())


def labelled(source, what: str):
    if (source.labels < 0).any():
        raise UserError(f"evaluation needs labels, but the {what} split of {source.name} has images "
                        f"outside class sub-folders")
    return source


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kNN and linear-probe evaluation of a SimCLR run.")
    add_dataclass_flags(parser, EvalConfig)
    cfg = dataclass_from_args(EvalConfig, parser.parse_args(argv))
    if not cfg.run:
        raise UserError("--run is required: the output folder of a training run")

    from rich.console import Console
    from rich.table import Table

    from pipelines.loader import eval_loader
    from pipelines.sources import load_source

    run = Path(cfg.run)
    run_cfg = load_run(run)
    data = cfg.data or run_cfg["data"]
    test_data = cfg.test_data or (run_cfg.get("test_data", "") if not cfg.data else "")
    train_src = labelled(load_source(data, "train", test_data or None), "train")
    test_src = labelled(load_source(data, "test", test_data or None), "test")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = run_cfg["image_size"]

    def loaders():
        kwargs = dict(batch_size=cfg.batch_size, size=size, workers=cfg.workers, device_id=0 if cuda else None)
        return eval_loader(train_src, **kwargs), eval_loader(test_src, **kwargs)

    torch.manual_seed(cfg.seed)
    results = evaluate_backbone(load_backbone(run_cfg, run / "backbone.safetensors"), *loaders(), cfg, device)
    torch.manual_seed(cfg.seed)
    results["random_init"] = evaluate_backbone(load_backbone(run_cfg, None), *loaders(), cfg, device)
    results.update(n_train=len(train_src), n_test=len(test_src), data=data, test_data=test_data)

    tmp = run / "eval.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(run / "eval.json")

    table = Table(title=f"{run_cfg['backbone']} on {data}: {len(train_src)} train / {len(test_src)} test")
    table.add_column("top-1")
    table.add_column("SimCLR", justify="right")
    table.add_column("random init", justify="right")
    for key, name in (("knn_top1", f"kNN (k={min(cfg.knn_k, len(train_src))})"), ("linear_top1", "linear probe")):
        table.add_row(name, f"{results[key]:.2%}", f"{results['random_init'][key]:.2%}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
