"""The online kNN check (--knn-every): top-1 of the current backbone on fixed labelled subsets of the run's
own splits, between epochs, its feature extraction split over the run's processes."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from simclr_dali.errors import UserError
from simclr_dali.models.features import knn_top1, split_extract

OVERREAD = 3  # tar shards: the bank's shards hold this many times the images it keeps (see KnnMonitor)


def per_class_draw(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `per_class` images of each class (all a class has where it has fewer), drawn with rng."""
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels[labels >= 0])]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def shards_holding(source, n: int, rng: np.random.Generator):
    """`source` cut to tar shards drawn with rng until they hold at least n samples (or all of them)."""
    order, total, pick = rng.permutation(len(source.shards)), 0, []
    for i in order:
        if total >= n:
            break
        pick.append(int(i))
        total += source.counts[i]
    return source.pick_shards(sorted(pick))


class Split:
    """One side of the check (the bank or the test images): the source every process reads its part of,
    each part's loader built on first use and kept (re-iterated, not rebuilt: one small memory pool for the
    whole run), and `keep`, the positions kept of what is read (None: all)."""

    def __init__(self, source, keep: np.ndarray | None = None):
        self.source, self.keep, self.loader = source, keep, None

    def features(self, backbone: nn.Module, device: torch.device, rank: int, world: int, loader_kwargs: dict):
        """(features on the main process, None elsewhere; labels on every process) of what is kept, in the
        source's order whatever the number of processes."""
        from simclr_dali.pipelines.loader import eval_loader

        part = self.source.part(rank, world)
        if self.loader is None and len(part):
            self.loader = eval_loader(part, **loader_kwargs)
        return self.kept(*split_extract(backbone, self.source, self.loader, rank, world, device))

    def kept(self, x, y):
        """The rows of (features or None, labels) at the positions kept."""
        if self.keep is None:
            return x, y
        keep = torch.from_numpy(self.keep)
        return (x[keep] if x is not None else None), y[keep]

    def cut(self, keep: np.ndarray, x, y):
        """Keeps the positions `keep` from now on (a draw made once what is read gave its labels); returns
        those rows of (x, y)."""
        self.keep = keep
        return self.kept(x, y)


class KnnMonitor:
    """kNN top-1 of the current backbone on fixed subsets of the run's own train and test splits.

    The bank holds, of each class, max(`per_class`, n_train / classes) training images (all the class has
    where it has fewer), so that it stays useful at 1,000 classes; the test images are `n_test` drawn at
    random. Every process extracts its part of both (no gradients, eval mode, then the backbone's mode is
    restored); the main process scores them. A call is a collective: every process makes it.

    Tar shards give their labels only as they are read, so the draw is made at the first call: the test
    images from test shards drawn until they hold n_test; the bank from training shards drawn until they
    hold OVERREAD x the images it keeps, each class then cut to its share. Shards written by
    pipelines.pack mix the classes, so each class has about OVERREAD times its share in them (below it for a
    class only with odds under one in a million at 20 per class); the same shards and images are read at
    every call. The features the training steps compute are of augmented views in train mode, not these.
    """

    def __init__(self, train_src, test_src, *, per_class: int, n_train: int, n_test: int, size: int,
                 batch_size: int, workers: int, device_id: int | None, seed: int = 0, k: int = 200,
                 rank: int = 0, world: int = 1):
        for src, what in ((train_src, "train"), (test_src, "test")):
            if len(src) == 0:
                raise UserError(f"--knn-every needs labelled images, but the {what} split of {src.name} is empty")
            if src.shards is None and (src.labels < 0).any():
                raise UserError(f"--knn-every needs labelled images, but the {what} split of {src.name} "
                                f"has images outside class sub-folders")
        self.rng = np.random.default_rng(seed)
        self.per_class, self.n_train, self.n_test = per_class, n_train, n_test
        self.train_src, self.rank, self.world, self.k = train_src, rank, world, k
        self.kwargs = dict(batch_size=batch_size, size=size, workers=workers, device_id=device_id)
        if test_src.shards is not None:
            self.test = Split(shards_holding(test_src, n_test, self.rng))  # `keep` drawn at the first call
        else:
            self.test = Split(test_src.subset(np.sort(self.rng.permutation(len(test_src))[:n_test])))
        self.bank, self.n_classes = None, 0
        if train_src.shards is None:
            classes = len(np.unique(train_src.labels))
            self.bank = Split(train_src.subset(per_class_draw(train_src.labels, self.share(classes), self.rng)))

    def share(self, classes: int) -> int:
        """Images of each class in the bank."""
        return max(self.per_class, math.ceil(self.n_train / max(1, classes)))

    def __len__(self) -> int:
        """Images it scores and votes with (tar shards: those it reads, until the first call draws)."""
        return sum(len(s.keep) if s.keep is not None else len(s.source) for s in (self.test, self.bank) if s)

    def __call__(self, backbone: nn.Module, device: torch.device) -> float | None:
        """kNN top-1 on the main process (None on the others)."""
        was_training = backbone.training
        try:
            test_x, test_y = self.test.features(backbone, device, self.rank, self.world, self.kwargs)
            self.check_labels(test_y, "test")
            if self.test.keep is None and self.test.source.shards is not None:  # test shards, first call: the
                self.n_classes = int(test_y.max()) + 1  # draw (classes: the largest index seen, not a count of few)
                test_x, test_y = self.test.cut(np.sort(self.rng.permutation(len(test_y))[:self.n_test]), test_x,
                                               test_y)
            if self.bank is None:  # training shards, first call: their draw, from the labels the samples carried
                self.n_classes = self.n_classes or int(test_y.max()) + 1
                share = self.share(self.n_classes)
                self.bank = Split(shards_holding(self.train_src, OVERREAD * share * self.n_classes, self.rng))
            bank_x, bank_y = self.bank.features(backbone, device, self.rank, self.world, self.kwargs)
            self.check_labels(bank_y, "training")
            if self.bank.keep is None and self.bank.source.shards is not None:
                bank_x, bank_y = self.bank.cut(per_class_draw(bank_y.numpy(), self.share(self.n_classes), self.rng),
                                               bank_x, bank_y)
        finally:
            backbone.train(was_training)
        if self.rank != 0:
            return None
        return knn_top1(bank_x, bank_y, test_x, test_y, k=self.k, device=device)

    @staticmethod
    def check_labels(y: torch.Tensor, what: str) -> None:
        """Labels that came with tar-shard samples (every process has them, so each raises alike)."""
        missing = int((y < 0).sum())
        if missing:
            raise UserError(f"--knn-every needs labelled images, but {missing} of the {len(y)} {what} samples it "
                            f"read have no .cls label")
