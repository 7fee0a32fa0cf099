"""What the backbone learned: kNN and linear probe on frozen features, optional semi-supervised
fine-tuning, each against the same architecture at random init; plots; frozen embeddings.

    python evaluate.py --run runs/digits                      # kNN, linear probe, plots
    python evaluate.py --run runs/digits --finetune --label-fraction 0.01
    python evaluate.py --run runs/x --data /images/train --test-data /images/val
    python evaluate.py --run runs/x --embed /images/catalogue --to catalogue.npy

Features come from the run's exported backbone (backbone.safetensors) in eval mode, through a DALI
pipeline without augmentation (resize, centre crop, normalise). The protocols are in probes.py, the
pictures in plots.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from simclr_dali.errors import UserError
from simclr_dali.evaluation.backbone import load_backbone, load_run
from simclr_dali.evaluation.embed import embed_folder, resolved_crop
from simclr_dali.evaluation.probes import linear_probe_top1
from simclr_dali.evaluation.processes import Processes
from simclr_dali.models.features import extract, knn_top1, split_extract
from simclr_dali.settings import (
    Parser,
    add_dataclass_flags,
    check_args,
    dataclass_from_args,
    given_values,
    read_recorded,
    recorded_settings,
    set_given,
    setting,
    tracks_given,
)
from simclr_dali.training.checkpoint import write_json
from simclr_dali.training.peers import one_voice


@tracks_given
@dataclass
class EvalConfig:
    config: str = setting("", help="start from the settings an evaluation recorded (RUN/eval_config.json); flags given "
                          "here override")
    run: str = setting("", help="the training run's output folder (holds config.json and backbone.safetensors)")
    data: str = setting("", help="training split to fit kNN and the probe on (default: the run's --data)")
    test_data: str = setting("", help="test split (default: the run's --test-data, or the data's own test split)")
    batch_size: int = setting(256, low=1, help="images per feature-extraction batch")
    workers: int = setting(2, low=1, help="DALI CPU threads")
    crop: float = setting(-1.0, low=0, high=1, above=True, off=-1.0, off_means="auto", help="evaluation view: the "
                          "central fraction kept (shorter side resized to S / crop, then an S x S centre crop); 1 "
                          "keeps the whole image; -1 (auto): 1 at 32 px and below, as google-research/simclr evaluates "
                          "CIFAR, else 0.875, the usual protocol")
    knn_k: int = setting(200, low=1, help="neighbours for the weighted kNN vote (capped at the train size)")
    knn_temperature: float = setting(0.1, low=0, above=True, help="kNN vote weight exp(cosine / T)")
    knn_memory_mb: float = setting(-1.0, low=0, above=True, off=-1.0, off_means="auto", help="kNN: memory the bank's "
                                   "normalised copy may take, else it is read a part at a time; -1 (auto): 4096 on a "
                                   "GPU, 256 on the CPU (host memory, which also holds the features)")
    probe_epochs: int = setting(100, low=1, help="linear probe epochs over the cached features")
    probe_lr: float = setting(1e-3, low=0, above=True, help="linear probe AdamW learning rate")
    probe_weight_decay: float = setting(1e-4, low=0, help="linear probe weight decay")
    seed: int = setting(0, low=0, help="seeds the random-init backbone, the probe, the labelled subset and fine-tuning")
    finetune: bool = setting(False, help="also fine-tune backbone + linear head on a fraction of the labels")
    label_fraction: float = setting(0.1, low=0, high=1, above=True, help="fine-tuning: class-balanced fraction of the "
                                    "training labels (0.01, 0.1, 1.0)")
    finetune_epochs: int = setting(0, low=0, help="fine-tuning epochs (0 = the paper's: 60 at label fractions <= 0.01, "
                                   "30 above)")
    finetune_min_steps: int = setting(100, low=0, help="fine-tuning: at least this many steps, however few the labels")
    finetune_batch_size: int = setting(256, low=1, help="fine-tuning: images per step (capped at the labelled subset)")
    finetune_lr: float = setting(0.05, low=0, above=True, help="fine-tuning: SGD Nesterov learning rate, cosine to "
                                 "zero")
    finetune_augment: bool = setting(True, help="fine-tuning: the pretraining's crop and flip (colour, gray, blur off)")
    plots: bool = setting(True, help="write PNGs beside the run: training curves, t-SNE map, retrieval grid")
    plot_points: int = setting(2000, low=1, help="most test images drawn in the t-SNE map")
    embed: str = setting("", help="a folder of images to embed with the frozen backbone instead of evaluating")
    to: str = setting("", help="with --embed: the .npy file for the (N, F) embeddings (paths go to FILE.paths.txt)")


# -- frozen scores -----------------------------------------------------------------------------
def frozen_scores(train_x, train_y, test_x, test_y, cfg: EvalConfig, device=None) -> dict:
    """kNN and linear probe on features (kept on the CPU), computed on `device`."""
    return {"knn_top1": knn_top1(train_x, train_y, test_x, test_y, cfg.knn_k, cfg.knn_temperature, device=device,
                                 memory_mb=knn_memory_mb(cfg.knn_memory_mb, torch.device(device or "cpu"))),
            "linear_top1": linear_probe_top1(train_x, train_y, test_x, test_y, epochs=cfg.probe_epochs,
                                             device=device,
                                             lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay,
                                             seed=cfg.seed)}


def knn_memory_mb(setting: float, device: torch.device) -> float:
    """--knn-memory-mb, or for auto (-1) 4096 on a GPU and 256 on the CPU, whose memory holds the features too."""
    return setting if setting != -1 else 4096.0 if device.type == "cuda" else 256.0


def evaluate_backbone(model, train_loader, test_loader, cfg: EvalConfig, device) -> dict:
    """kNN and linear probe on the frozen features of `model`."""
    return frozen_scores(*extract(model, train_loader, device), *extract(model, test_loader, device), cfg, device)


# -- inputs -----------------------------------------------------------------------------------
def training_records(run: Path, cfg: EvalConfig) -> dict | None:
    """metrics.jsonl by kind, for the training curves (None: no plots, or nothing logged yet)."""
    from simclr_dali.evaluation import plots

    if not cfg.plots or not (run / "metrics.jsonl").is_file():
        return None
    kinds = plots.read_metrics(run / "metrics.jsonl", "delete what is damaged, or pass --no-plots")
    return kinds if kinds.get("step") or kinds.get("epoch") else None


def labelled(source, what: str):
    """The source, if it has images and (folders, lists, arrays) labels; tar shards' labels arrive with
    their samples, and `labels_read` checks them once read."""
    if len(source) == 0:
        raise UserError(f"evaluation needs test images, but the {what} split of {source.name} is empty")
    if source.shards is None and (source.labels < 0).any():
        raise UserError(f"evaluation needs labels, but the {what} split of {source.name} has images "
                        f"outside class sub-folders")
    return source


def labels_read(labels: torch.Tensor, source, what: str) -> None:
    """Labels that came with tar-shard samples: each must have had a .cls component."""
    missing = int((labels < 0).sum())
    if missing:
        raise UserError(f"evaluation needs labels, but {missing} of the {len(labels)} samples in the {what} "
                        f"split of {source.name} have no .cls label")


def build_parser() -> Parser:
    parser = Parser(description="kNN, linear-probe and fine-tuning evaluation of a SimCLR run, plots, and "
                                "frozen embeddings of a folder.")
    add_dataclass_flags(parser, EvalConfig)
    return parser


def parse_args(argv: list[str] | None) -> EvalConfig:
    parser = build_parser()
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default="")
    recorded = first.parse_known_args(argv)[0].config
    if recorded:
        parser.set_defaults(**recorded_settings(read_recorded(recorded), EvalConfig, recorded,
                                                skip=frozenset({"config"})))
    args = parser.parse_args(argv)
    check_args(parser, args)
    cfg = dataclass_from_args(EvalConfig, args)
    set_given(cfg, given_values(parser, argv))
    if not cfg.run:
        raise UserError("--run is required: the output folder of a training run")
    if cfg.embed and not cfg.to:
        raise UserError("--embed needs --to FILE.npy: where to write the embeddings")
    if cfg.embed and not cfg.to.endswith(".npy"):
        raise UserError(f"--to must name a .npy file, got {cfg.to}")
    return cfg


# -- fine-tuning, both backbones -----------------------------------------------------------------
def run_finetune(cfg: EvalConfig, run_cfg: dict, run: Path, train_src, test_loader, n_classes: int,
                 device_id, device) -> dict:
    from simclr_dali.evaluation.probes import (
        FinetuneSettings,
        balanced_subset,
        finetune,
        finetune_augment,
        finetune_epochs,
    )

    if getattr(train_src, "shards", None) is not None:
        raise UserError(f"--finetune picks a labelled subset image by image, which tar shards ({train_src.name}) "
                        f"do not allow: pass a folder or a list of images as --data")
    index = balanced_subset(train_src.labels, cfg.label_fraction, cfg.seed)
    subset = train_src.subset(index)
    epochs = finetune_epochs(cfg.finetune_epochs, cfg.label_fraction, len(subset), cfg.finetune_batch_size,
                             cfg.finetune_min_steps)
    settings = FinetuneSettings(epochs=epochs, batch_size=cfg.finetune_batch_size, lr=cfg.finetune_lr,
                                augment=finetune_augment(run_cfg.get("aug", {}), cfg.finetune_augment),
                                image_size=run_cfg["image_size"], workers=cfg.workers, device_id=device_id,
                                seed=cfg.seed)
    scores = {}
    for name, weights in (("simclr", run / "backbone.safetensors"), ("random_init", None)):
        torch.manual_seed(cfg.seed)
        scores[name] = finetune(load_backbone(run_cfg, weights), subset, n_classes, test_loader, settings, device)
    counts = np.bincount(subset.labels)
    return {"label_fraction": cfg.label_fraction, "n_labelled": len(subset),
            "per_class": int(counts[counts > 0].min()), "epochs": epochs,
            "batch_size": min(cfg.finetune_batch_size, len(subset)), "lr": cfg.finetune_lr,
            "augment": ("random resized crop + flip as in pretraining; colour jitter, grayscale and blur off"
                        if cfg.finetune_augment else "none (whole image resized to a square)"),
            "precision": ("bf16 autocast, channels-last" if device.type == "cuda" else "float32"),
            "optimizer": "SGD, Nesterov momentum 0.9, no weight decay, cosine to zero",
            **scores["simclr"], "random_init": scores["random_init"]}


# -- the command ------------------------------------------------------------------------------
def print_table(results: dict, run_cfg: dict, data: str, cfg: EvalConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    n_train, n_test = results["n_train"], results["n_test"]
    table = Table(title=f"{run_cfg['backbone']} on {data}: {n_train} train / {n_test} test")
    table.add_column("protocol")
    table.add_column(run_cfg.get("method", "simclr"), justify="right")
    table.add_column("random init", justify="right")
    pct = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    for key, name in (("knn_top1", f"kNN (k={min(cfg.knn_k, n_train)}) top-1"), ("linear_top1", "linear probe top-1")):
        table.add_row(name, pct(results[key]), pct(results["random_init"][key]))
    ft = results.get("finetune")
    if ft:
        what = f"fine-tune, {ft['label_fraction']:.0%} labels ({ft['n_labelled']} images)"
        for k in ("top1", "top5"):
            if ft[k] is not None:
                table.add_row(f"{what} top-{k[-1]}", pct(ft[k]), pct(ft["random_init"][k]))
    Console().print(table)


def make_plots(run: Path, cfg: EvalConfig, feats: dict, train_src, test_src, results: dict,
               records: dict | None) -> dict:
    from simclr_dali.evaluation import plots

    written = {}
    if records is not None:
        written["curves"] = plots.training_curves(run / "metrics.jsonl", run / "training_curves.png", records)
    _, _, test_x, test_y = feats["simclr"]
    maps = {"SimCLR": feats["simclr"][2], "random init": feats["random_init"][2]}
    scores = {"SimCLR": results["knn_top1"], "random init": results["random_init"]["knn_top1"]}
    written["embeddings"] = plots.embedding_map(maps, test_y.numpy(), test_src.classes, run / "embeddings.png",
                                                scores=scores, max_points=cfg.plot_points, seed=cfg.seed)
    train_x, train_y = feats["simclr"][:2]
    if any(getattr(s, "shards", None) is not None for s in (train_src, test_src)):
        return {k: str(v) for k, v in written.items()}  # no image-by-image access to draw the retrieval grid
    written["retrieval"] = plots.retrieval_grid(test_x, test_y.numpy(), train_x, train_y.numpy(), test_src,
                                                train_src, run / "retrieval.png", seed=cfg.seed)
    return {k: str(v) for k, v in written.items() if v is not None}


@one_voice  # several processes: the first to fail says why, the others stop quietly
def main(argv: list[str] | None = None) -> int:
    from simclr_dali.environment import check_environment

    check_environment()
    cfg = parse_args(argv)
    run = Path(cfg.run)
    run_cfg = load_run(run)
    procs = Processes.start()
    try:
        if cfg.embed:
            return embed_folder(cfg, run, run_cfg, procs)
        evaluate_run(cfg, procs)
        return 0
    finally:
        procs.end()


def protocol(cfg: EvalConfig, run_cfg: dict, crop: float, n_train: int, procs: Processes, dtype) -> dict:
    """How each number in eval.json was measured, beside it."""
    size = run_cfg["image_size"]
    return {
        "view": f"shorter side resized to {math.floor(size / crop + 1e-6)}, centre crop {size} x {size}, "
                f"ImageNet mean and std; no augmentation",
        "features": f"the backbone's pooled output in eval mode (BatchNorm running statistics), kept as {dtype}, "
                    f"extracted by {procs.world} process(es)",
        "knn": {"k": min(cfg.knn_k, n_train), "temperature": cfg.knn_temperature, "similarity": "cosine",
                "vote": "sum of exp(similarity / temperature) per class", "bank": n_train},
        "linear": {"epochs": cfg.probe_epochs, "optimizer": "AdamW", "lr": cfg.probe_lr,
                   "weight_decay": cfg.probe_weight_decay, "schedule": "cosine to zero", "batch_size": 256,
                   "features": "standardised by the training split's mean and standard deviation"},
        "random_init": f"the same architecture at random init, seed {cfg.seed}",
    }


def evaluate_run(cfg: EvalConfig, procs: Processes | None = None) -> dict:
    """The run's backbone and the same architecture at random init, scored on frozen features (and
    fine-tuned with --finetune); the table printed, eval.json and eval_config.json written (plots after
    them). Under `accelerate launch`, every process extracts its part of each split and the main process
    does the rest. Returns what eval.json holds (on the main process; {} on the others)."""
    from simclr_dali.pipelines.loader import eval_loader
    from simclr_dali.pipelines.sources import load_source
    from simclr_dali.pipelines.verify import Screening
    from simclr_dali.training.peers import Exchange

    run = Path(cfg.run)
    run_cfg = load_run(run)
    procs = procs or Processes.start()
    records = training_records(run, cfg) if procs.main else None
    device, device_id = procs.device, procs.device_id
    data = cfg.data or run_cfg["data"]
    test_data = cfg.test_data or (run_cfg.get("test_data", "") if not cfg.data else "")
    exchange = Exchange(procs.rank, procs.world, "simclr/evaluate")
    screen = Screening("skip", cfg.workers, procs.main, share=exchange.share, gather=exchange.gather,
                       rank=procs.rank, world=procs.world)  # evaluate on what DALI can decode; skipped files counted
    train_src = labelled(load_source(data, "train", test_data or None, screen), "train")
    test_src = labelled(load_source(data, "test", test_data or None, screen), "test")
    crop = resolved_crop(cfg.crop, run_cfg["image_size"])
    kwargs = dict(batch_size=cfg.batch_size, size=run_cfg["image_size"], workers=cfg.workers, device_id=device_id,
                  crop=crop)
    parts = [src.part(procs.rank, procs.world) for src in (train_src, test_src)]
    train_loader, test_loader = (eval_loader(part, **kwargs) if len(part) else None for part in parts)  # kept, re-read

    feats, results = {}, {}
    # random init first: only its test features are kept (for the map), so the host holds one backbone's bank
    for name, weights in (("random_init", None), ("simclr", run / "backbone.safetensors")):
        torch.manual_seed(cfg.seed)
        model = load_backbone(run_cfg, weights)
        feats[name] = (*split_extract(model, train_src, train_loader, procs.rank, procs.world, device),
                       *split_extract(model, test_src, test_loader, procs.rank, procs.world, device))
        if not procs.main:
            continue
        labels_read(feats[name][1], train_src, "train")
        labels_read(feats[name][3], test_src, "test")
        results[name] = frozen_scores(*feats[name], cfg, device)
        if name == "random_init":  # its bank goes before the run's backbone extracts its own
            feats[name] = (None, None, *feats[name][2:])
    if not procs.main:
        return {}
    dtype = str(feats["simclr"][0].dtype).replace("torch.", "")
    results = {**results.pop("simclr"), **results}
    results.update(method=run_cfg.get("method", "simclr"), crop=crop, n_train=len(train_src),
                   n_test=len(test_src), data=data, test_data=test_data, device=str(device), processes=procs.world,
                   protocol=protocol(cfg, run_cfg, crop, len(train_src), procs, dtype))
    if screen.bad:
        results["skipped_files"] = [p for p, _ in screen.bad]
    if cfg.finetune:
        n_classes = max(len(train_src.classes), int(max(train_src.labels.max(), test_src.labels.max())) + 1)
        whole_test = test_loader if procs.world == 1 else eval_loader(test_src, **kwargs)
        results["finetune"] = run_finetune(cfg, run_cfg, run, train_src, whole_test, n_classes, device_id, device)
    print_table(results, run_cfg, data, cfg)
    write_json(run / "eval.json", results)
    write_json(run / "eval_config.json", dataclasses.asdict(cfg))  # `evaluate.py --config` runs it again
    if cfg.plots:  # after the numbers are safe on disk
        results["plots"] = make_plots(run, cfg, feats, train_src, test_src, results, records)
        write_json(run / "eval.json", results)
    return results


if __name__ == "__main__":
    sys.exit(main())
