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
             chunk: int = 1024, device: torch.device | str | None = None) -> float:
    """Weighted kNN (cosine similarity, votes weighted by exp(sim / T)), top-1 accuracy, computed on
    `device` (default: where the features are)."""
    device = torch.device(device or train_x.device)
    train_x, test_x = F.normalize(train_x.to(device), dim=1), F.normalize(test_x.to(device), dim=1)
    train_y, test_y = train_y.to(device), test_y.to(device)
    k = min(k, len(train_x))
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for start in range(0, len(test_x), chunk):
        sim = test_x[start:start + chunk] @ train_x.T  # (c, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), classes, dtype=sim.dtype, device=device).scatter_add_(1, train_y[top_idx],
                                                                           (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[start:start + chunk]).sum().item()
    return correct / len(test_x)
