"""evaluate.py --embed: the frozen embeddings of every image of a folder, written as .npy with their paths;
under `accelerate launch`, each process embeds its part."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from simclr_dali.errors import UserError
from simclr_dali.evaluation.backbone import load_backbone
from simclr_dali.evaluation.processes import Processes
from simclr_dali.models.features import split_extract
from simclr_dali.pipelines import eval_crop


def resolved_crop(crop: float, image_size: int) -> float:
    """--crop, or for auto (-1) the evaluation view's crop at the run's image size (pipelines.eval_crop)."""
    return eval_crop(image_size) if crop == -1 else crop


def embed_images(run: Path, run_cfg: dict, folder: str, *, batch_size: int, workers: int, device: torch.device,
                 crop: float = -1.0, rank: int = 0, world: int = 1, device_id: int | None = -1):
    """Frozen embeddings (N, F) of every image under `folder`, in sorted path order, the paths, and the
    files DALI could not decode (left out: [(path, reason)]). Under several processes (`rank` of `world`),
    each embeds its part and the main process gets the whole (None elsewhere). `device_id`: DALI's (-1: the
    device's)."""
    from simclr_dali.pipelines.loader import eval_loader
    from simclr_dali.pipelines.sources import load_folder
    from simclr_dali.pipelines.verify import Screening
    from simclr_dali.training.peers import Exchange

    exchange = Exchange(rank, world, "simclr/embed")
    screen = Screening("skip", workers, rank == 0, share=exchange.share, gather=exchange.gather, rank=rank,
                       world=world)
    source = load_folder(folder, "all", screen)
    part = source.part(rank, world)
    if device_id == -1:
        device_id = (device.index or 0) if device.type == "cuda" else None
    loader = eval_loader(part, batch_size=batch_size, size=run_cfg["image_size"], workers=workers,
                         device_id=device_id, crop=resolved_crop(crop, run_cfg["image_size"])) if len(part) else None
    x, _ = split_extract(load_backbone(run_cfg, run / "backbone.safetensors"), source, loader, rank, world, device)
    return x, list(source.files), screen.bad


def embed_folder(cfg, run: Path, run_cfg: dict, procs: Processes) -> int:
    """--embed: the embeddings to cfg.to (.npy) and their paths beside it (FILE.paths.txt), written by the
    main process (cfg: evaluate.py's EvalConfig)."""
    from rich.console import Console

    x, files, bad = embed_images(run, run_cfg, cfg.embed, batch_size=cfg.batch_size, workers=cfg.workers,
                                 device=procs.device, crop=cfg.crop, rank=procs.rank, world=procs.world,
                                 device_id=procs.device_id)
    if not procs.main:
        return 0
    to = Path(cfg.to)
    paths = to.with_suffix(".paths.txt")
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        for final, write in ((to, lambda f: np.save(f, x.numpy().astype(np.float32))),
                             (paths, lambda f: f.write("".join(p + "\n" for p in files).encode()))):
            tmp = final.with_name(final.name + ".tmp")
            with open(tmp, "wb") as f:
                write(f)
            tmp.replace(final)
    except OSError as err:
        raise UserError(f"cannot write the embeddings to {to}: {err.strerror}") from None
    skipped = f"; {len(bad)} undecodable file(s) left out, e.g. {bad[0][0]}" if bad else ""
    Console().print(f"{len(files)} images from {cfg.embed} -> {to} ({x.shape[0]} x {x.shape[1]} float32), "
                    f"paths in {paths}{skipped}")
    return 0
