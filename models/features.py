"""What a backbone's frozen features say: extracted over a loader in eval mode, and the weighted kNN vote
that both the online monitor (training) and evaluate.py score them with."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP16_MAX = torch.finfo(torch.float16).max


@torch.no_grad()
def extract(model, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (N, F) and labels (N,), in the loader's order; BatchNorm in eval mode. The features go
    into one buffer allocated on the host at the first batch: float16, half of float32's bytes (ImageNet's
    1.28 M x 2048 features are 5.2 GB, not 10.5 twice over as per-batch copies joined at the end), and
    float32 only if a feature lies beyond float16's range. The loader gives every image of its source once."""
    model.eval().to(device)
    n = len(loader.feeder.source)
    feats, labels, filled = None, torch.full((n,), -1, dtype=torch.long), 0
    for images, y in loader:
        out = model(images.to(device)).float()
        if feats is None:
            feats = torch.empty((n, out.shape[1]), dtype=torch.float16)
        if feats.dtype == torch.float16 and out.abs().max() > FP16_MAX:
            feats = feats.float()
        rows = min(len(out), n - filled)
        feats[filled:filled + rows] = out[:rows].cpu()
        labels[filled:filled + rows] = y.view(-1)[:rows].long()
        filled += rows
    if feats is None or filled != n:
        raise ValueError(f"the loader gave {filled} images, not the {n} expected")
    return feats, labels


def split_extract(model, source, part_loader, rank: int, world: int,
                  device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Features (on the main process; None on the others) and labels (on every process) of `source`, whose
    parts (pipelines.sources.Source.part) the `world` processes extract (`part_loader`: this process's, None
    for an empty part), in the source's order whatever the number of processes."""
    from simclr_dali.models.backbone import feature_width

    if part_loader is None:
        x, y = torch.empty((0, feature_width(model)), dtype=torch.float16), torch.empty(0, dtype=torch.long)
    else:
        x, y = extract(model, part_loader, device)
    order = source.joined_order(world)
    return gather_rows(x, device, keep=rank == 0, order=order), gather_rows(y, device, order=order)


@torch.no_grad()
def gather_rows(x: torch.Tensor, device: torch.device, chunk_bytes: int = 256 * 2**20,
                keep: bool = True, order=None) -> torch.Tensor | None:
    """Every process's rows of `x` (on the host), joined in rank order, on the host of each process that
    keeps them (`keep`); alone, `x` itself. `order` (optional): where each row of the joined result goes
    instead (pipelines.sources.Source.joined_order: the source's own order, whatever the number of
    processes). Parts of any length; exchanged a chunk of rows at a time through `device` (the collective's:
    NCCL's GPU, gloo's CPU), so that the device holds at most about world x `chunk_bytes` whatever the rows
    add up to."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    sizes = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(x), x.element_size()], device=device))
    if x.is_floating_point() and max(int(s[1]) for s in sizes) > x.element_size():
        x = x.float()  # another process's features needed float32 (extract): all send float32
    sizes = [int(s[0]) for s in sizes]
    out = torch.empty((sum(sizes), *x.shape[1:]), dtype=x.dtype) if keep else None
    row_bytes = max(1, math.prod(x.shape[1:]) * x.element_size())  # alike on every process, even an empty part
    step = max(1, min(chunk_bytes // row_bytes, max(sizes)))  # rows per exchange: a chunk, or the longest part
    starts = [sum(sizes[:r]) for r in range(world)]
    for first in range(0, max(sizes), step):
        mine = torch.zeros((step, *x.shape[1:]), dtype=x.dtype, device=device)
        part = x[first:first + step]
        mine[:len(part)] = part.to(device)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        if keep:
            for r, got in enumerate(parts):
                rows = max(0, min(step, sizes[r] - first))
                at = slice(starts[r] + first, starts[r] + first + rows)
                out[at if order is None else torch.as_tensor(order[at])] = got[:rows].cpu()
    return out


@torch.no_grad()
def knn_top1(train_x, train_y, test_x, test_y, k: int = 200, temperature: float = 0.1,
             chunk: int = 1024, device: torch.device | str | None = None, memory_mb: float = 4096) -> float:
    """Weighted kNN (cosine similarity, votes weighted by exp(sim / T)), top-1 accuracy, computed on
    `device` (default: where the features are), test images a chunk at a time against the bank (train_x)
    as `nearest` reads it, so that the device holds at most about `memory_mb` however large the bank."""
    device = torch.device(device or train_x.device)
    classes = int(max(train_y.max(), test_y.max())) + 1
    bank = Bank(train_x, device, memory_mb, chunk)
    train_y, test_y = train_y.to(device), test_y.to(device)
    correct = 0
    for start in range(0, len(test_x), chunk):
        top_sim, top_idx = bank.nearest(test_x[start:start + chunk], k)
        votes = torch.zeros(len(top_sim), classes, dtype=top_sim.dtype, device=device).scatter_add_(
            1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[start:start + chunk]).sum().item()
    return correct / len(test_x)


class Bank:
    """Rows of features (where they are: host memory, 16-bit or 32) searched by cosine similarity on
    `device`: normalised whole on the device where that fits in `memory_mb`, else a part at a time, each
    query chunk's top k merged over the parts (ImageNet's bank, 1.28 M x 2048, is 5.2 GB in float16)."""

    def __init__(self, x: torch.Tensor, device: torch.device, memory_mb: float = 4096, chunk: int = 1024):
        self.x, self.device = x, device
        row_bytes = x.shape[1] * (x.element_size() + max(4, x.element_size()))  # a part, its normalised copy,
        self.rows = max(1, int(memory_mb * 2**20 // (row_bytes + chunk * 4)))  # a column of similarities
        self.whole = self._unit(x) if self.rows >= len(x) else None

    def _unit(self, part: torch.Tensor) -> torch.Tensor:
        part = part.to(self.device)
        return F.normalize(part.float() if part.element_size() < 4 else part, dim=1)  # 16-bit read as float32

    @torch.no_grad()
    def nearest(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, bank rows) of each query row's k nearest bank rows (k capped at the bank), best first."""
        k = min(k, len(self.x))
        query = self._unit(query)
        if self.whole is not None:
            return (query @ self.whole.T).topk(k, dim=1)
        top_sim = top_idx = None
        for first in range(0, len(self.x), self.rows):
            part = self.x[first:first + self.rows]
            sim, idx = (query @ self._unit(part).T).topk(min(k, len(part)), dim=1)
            idx += first
            if top_sim is not None:  # merge: the k best of the best so far and this part's
                sim = torch.cat([top_sim, sim], 1)
                sim, where = sim.topk(min(k, sim.shape[1]), dim=1)
                idx = torch.cat([top_idx, idx], 1).gather(1, where)
            top_sim, top_idx = sim, idx
        return top_sim, top_idx
