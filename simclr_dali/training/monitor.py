"""The online kNN check (--knn-every): top-1 of the current backbone on fixed labelled subsets of the run's
own splits, between epochs."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.features import extract, knn_top1
from simclr_dali.errors import UserError


def _concat(a, b):
    """One Source holding a then b (so one DALI pipeline serves both), or None if they cannot mix."""
    from pipelines.sources import Source

    labels = np.concatenate([a.labels, b.labels])
    if a.encoded and b.encoded:
        return Source(a.name, labels, files=a.files + b.files, classes=a.classes)
    if not a.encoded and not b.encoded and a.images.shape[1:] == b.images.shape[1:]:
        return Source(a.name, labels, images=np.concatenate([a.images, b.images]), classes=a.classes)
    return None


class KnnMonitor:
    """kNN top-1 of the current backbone on fixed subsets of the run's own train and test splits.

    Feature extraction only (no gradients, eval mode, then the backbone's mode is restored). The DALI
    eval pipeline is built on first use and kept: it is re-iterated each time rather than rebuilt,
    so the monitor holds one small memory pool for the whole run.
    """

    def __init__(self, train_src, test_src, *, n_train: int, n_test: int, size: int, batch_size: int,
                 workers: int, device_id: int | None, seed: int = 0, k: int = 200):
        for src, what in ((train_src, "train"), (test_src, "test")):
            if getattr(src, "shards", None) is not None:
                raise UserError(f"--knn-every needs images it can pick one by one, but {src.name} is read from "
                                f"tar shards; point --test-data at a folder, or leave --knn-every off")
            if len(src) == 0 or (src.labels < 0).any():
                raise UserError(f"--knn-every needs labelled images, but the {what} split of {src.name} "
                                f"{'is empty' if len(src) == 0 else 'has images outside class sub-folders'}")
        rng = np.random.default_rng(seed)
        self.train = train_src.subset(np.sort(rng.permutation(len(train_src))[:n_train]))
        self.test = test_src.subset(np.sort(rng.permutation(len(test_src))[:n_test]))
        self.kwargs = dict(batch_size=batch_size, size=size, workers=workers, device_id=device_id)
        self.k, self.loaders = k, None

    def __len__(self) -> int:
        return len(self.train) + len(self.test)

    def __call__(self, backbone: nn.Module, device: torch.device) -> float:
        from pipelines.loader import eval_loader

        if self.loaders is None:
            both = _concat(self.train, self.test)
            sources = [both] if both is not None else [self.train, self.test]
            self.loaders = [eval_loader(s, **self.kwargs) for s in sources]
        was_training = backbone.training
        try:
            parts = [extract(backbone, loader, device) for loader in self.loaders]
        finally:
            backbone.train(was_training)
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        n = len(self.train)
        return knn_top1(x[:n], y[:n], x[n:], y[n:], k=self.k, device=device)
