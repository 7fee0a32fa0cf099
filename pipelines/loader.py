"""The DALI pipelines and their iterators: two augmented views for training, one plain view for
evaluation. Sharding, shuffling and epoch length are ours (see `Feeder`), so every process runs the
same number of steps and a run can be resumed at any step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import nvidia.dali.fn as fn
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipelines.augment import Augment, center_view, decode, simclr_view
from pipelines.sources import Source


@dataclass
class Shard:
    index: int = 0  # this process's shard (accelerate's process_index)
    count: int = 1  # number of shards (accelerate's num_processes)


class Feeder:
    """Batches of (image, label) for `external_source`, from this process's shard of a source.

    An epoch draws one permutation of the whole data set (the same on every process, from the
    seed and the epoch), cuts it into `count` equal shards and gives this process its own, so the
    shards are disjoint and every process runs the same number of steps. Encoded sources yield the
    file bytes (decoded by DALI); array sources yield decoded HWC images.
    """

    def __init__(self, source: Source, batch_size: int, shard: Shard, *, shuffle: bool,
                 drop_last: bool, seed: int = 0, epoch: int = 0):
        self.source, self.batch_size, self.shard = source, batch_size, shard
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        per_shard = len(source) // shard.count if drop_last else -(-len(source) // shard.count)
        self.per_shard = per_shard
        self.steps = per_shard // batch_size if drop_last else -(-per_shard // batch_size)
        self.order = self.shard_order()

    def shard_order(self) -> np.ndarray:
        """Indices this process reads in this epoch, in order."""
        n = len(self.source)
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        start = self.shard.index * self.per_shard
        return perm[start:start + self.per_shard]

    def sample(self, i: int) -> np.ndarray:
        if self.source.encoded:
            return np.fromfile(self.source.files[i], dtype=np.uint8)
        return self.source.images[i]

    def __call__(self, info):
        if info.iteration >= self.steps:
            raise StopIteration
        index = self.order[info.iteration * self.batch_size:][:self.batch_size]
        return ([self.sample(i) for i in index],
                [np.array(self.source.labels[i], dtype=np.int64) for i in index])


def read(feeder: Feeder, gpu: bool):
    """The pipeline's input: decoded RGB images (on the GPU when `gpu`) and labels."""
    data, labels = fn.external_source(source=feeder, num_outputs=2, batch=True, batch_info=True,
                                      layout=["B" if feeder.source.encoded else "HWC", ""])
    if feeder.source.encoded:
        images = decode(data, gpu)
    else:
        images = data.gpu() if gpu else data
    return images, labels


@pipeline_def(enable_conditionals=True)
def two_view_pipeline(feeder: Feeder, size: int, aug: Augment, gpu: bool):
    """Decode once, augment twice: (view1, view2, label)."""
    images, labels = read(feeder, gpu)
    return simclr_view(images, size, aug), simclr_view(images, size, aug), labels


@pipeline_def
def eval_pipeline(feeder: Feeder, size: int, gpu: bool):
    """No augmentation: (view, label)."""
    images, labels = read(feeder, gpu)
    return center_view(images, size), labels


class Loader:
    """Iterates one epoch of torch batches from a DALI pipeline; `len()` is the steps in it."""

    def __init__(self, pipe, feeder: Feeder, names: list[str]):
        self.feeder = feeder
        self.iterator = DALIGenericIterator(pipe, names)

    def __len__(self) -> int:
        return self.feeder.steps

    def __iter__(self):
        for batch in self.iterator:
            yield tuple(batch[0][name] for name in self.iterator.output_map)


def placement(device_id: int | None) -> str:
    return "cpu" if device_id is None else "gpu"


def train_loader(source: Source, *, batch_size: int, size: int, aug: Augment, shard: Shard,
                 seed: int, epoch: int, workers: int, device_id: int | None,
                 prefetch: int = 2) -> Loader:
    """One epoch of two-view batches (view1, view2, label) for this process's shard, tail dropped.

    Built afresh each epoch with a seed drawn from (seed, epoch, shard): an epoch's data order and
    augmentations depend on nothing else, so a run resumed at an epoch boundary sees the same data.
    """
    feeder = Feeder(source, batch_size, shard, shuffle=True, drop_last=True, seed=seed, epoch=epoch)
    pipe_seed = int(np.random.default_rng([seed, epoch, shard.index]).integers(2**31))
    pipe = two_view_pipeline(feeder, size, aug, device_id is not None, batch_size=batch_size,
                             num_threads=workers, device_id=device_id, seed=pipe_seed,
                             prefetch_queue_depth=prefetch, py_num_workers=1)
    pipe.build()
    return Loader(pipe, feeder, ["view1", "view2", "label"])


def eval_loader(source: Source, *, batch_size: int, size: int, workers: int,
                device_id: int | None) -> Loader:
    """Every image once, in order, as (view, label)."""
    feeder = Feeder(source, batch_size, Shard(), shuffle=False, drop_last=False)
    pipe = eval_pipeline(feeder, size, device_id is not None, batch_size=batch_size,
                         num_threads=workers, device_id=device_id, seed=0)
    pipe.build()
    return Loader(pipe, feeder, ["view", "label"])


def to_device(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in tensors)
