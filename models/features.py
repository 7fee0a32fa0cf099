"""What a backbone's frozen features say: extracted over a loader in eval mode, and the weighted kNN vote
that both the online monitor (training) and evaluate.py score them with."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract(model, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (N, F) and labels (N,), in the loader's order; BatchNorm in eval mode."""
    model.eval().to(device)
    feats, labels = [], []
    for images, y in loader:
        feats.append(model(images.to(device)).float().cpu())
        labels.append(y.view(-1).long().cpu())
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(train_x, train_y, test_x, test_y, k: int = 200, temperature: float = 0.1,
             chunk: int = 1024, device: torch.device | str | None = None, memory_mb: float = 4096) -> float:
    """Weighted kNN (cosine similarity, votes weighted by exp(sim / T)), top-1 accuracy, computed on
    `device` (default: where the features are). The bank (train_x) stays where it is: it goes to the device
    normalised whole where it fits in `memory_mb`, else a part at a time, each test chunk's top k merged over
    the parts, so that the device holds at most about `memory_mb` however large the bank (ImageNet's, 1.28 M x
    2048 floats, is 10 GB)."""
    device = torch.device(device or train_x.device)
    k = min(k, len(train_x))
    classes = int(max(train_y.max(), test_y.max())) + 1
    row_bytes = train_x.shape[1] * train_x.element_size()
    rows = max(k, int(memory_mb * 2**20 // (2 * row_bytes + chunk * 4)))  # the part, its normalised copy, sims
    bank = F.normalize(train_x.to(device), dim=1) if rows >= len(train_x) else None
    train_y, test_y = train_y.to(device), test_y.to(device)
    correct = 0
    for start in range(0, len(test_x), chunk):
        query = F.normalize(test_x[start:start + chunk].to(device), dim=1)
        if bank is not None:
            top_sim, top_idx = (query @ bank.T).topk(k, dim=1)
        else:
            top_sim = top_idx = None
            for first in range(0, len(train_x), rows):
                part = F.normalize(train_x[first:first + rows].to(device), dim=1)
                sim, idx = (query @ part.T).topk(min(k, len(part)), dim=1)
                idx += first
                if top_sim is not None:  # merge: the k best of the best so far and this part's
                    sim, where = torch.cat([top_sim, sim], 1).topk(k, dim=1)
                    idx = torch.cat([top_idx, idx], 1).gather(1, where)
                top_sim, top_idx = sim, idx
        votes = torch.zeros(len(query), classes, dtype=top_sim.dtype, device=device).scatter_add_(
            1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[start:start + chunk]).sum().item()
    return correct / len(test_x)
