"""The DALI pipelines and their iterators: two augmented views for training, one plain view for
evaluation. Sharding, shuffling and epoch length are ours (see `Feeder`), so every process runs the
same number of steps and a run can be resumed at any step.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import nvidia.dali.fn as fn
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipelines.augment import Augment, center_view, decode, simclr_view
from pipelines.sources import Source
from pipelines.webdataset import IMAGE_EXTS, LABEL_BYTES, parse_labels


@dataclass
class Shard:
    index: int = 0  # this process's shard (accelerate's process_index)
    count: int = 1  # number of shards (accelerate's num_processes)


def epoch_steps(n: int, shards: int, batch_size: int, drop_last: bool = True) -> int:
    """Steps in an epoch for each of `shards` processes: equal shards of n // shards images, the
    tail batch dropped (training) or kept (evaluation, one shard)."""
    per_shard = n // shards if drop_last else -(-n // shards)
    return per_shard // batch_size if drop_last else -(-per_shard // batch_size)


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
        self.per_shard = len(source) // shard.count if drop_last else -(-len(source) // shard.count)
        self.steps = epoch_steps(len(source), shard.count, batch_size, drop_last)
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

    def read(self):
        """(data, labels) nodes: encoded bytes or HWC images, and int64 labels."""
        return fn.external_source(source=self, num_outputs=2, batch=True, batch_info=True,
                                  layout=["B" if self.source.encoded else "HWC", ""])


class ShardReader:
    """WebDataset tar shards through DALI's own reader: DALI splits the samples into `count`
    contiguous, disjoint shards (rotated by the epoch) and shuffles within a buffer; we count the
    steps, so every process runs `steps` batches however unequal the shards are."""

    def __init__(self, source: Source, batch_size: int, shard: Shard, *, shuffle: bool,
                 drop_last: bool, seed: int = 0, epoch: int = 0):
        self.source, self.batch_size, self.shard = source, batch_size, shard
        self.shuffle, self.drop_last, self.epoch = shuffle, drop_last, epoch
        self.steps = epoch_steps(len(source), shard.count, batch_size, drop_last)

    def read(self):
        encoded, cls = fn.readers.webdataset(
            paths=self.source.shards, index_paths=self.source.indexes, ext=[IMAGE_EXTS, "cls"],
            missing_component_behavior="empty", shard_id=(self.shard.index + self.epoch) % self.shard.count,
            num_shards=self.shard.count, random_shuffle=self.shuffle, initial_fill=4 * self.batch_size,
            pad_last_batch=not self.drop_last, name="Reader")
        return encoded, fn.pad(cls, axes=[0], shape=[LABEL_BYTES], fill_value=0)  # parsed by the Loader


def make_input(source: Source, batch_size: int, shard: Shard, **kwargs):
    kind = ShardReader if source.shards is not None else Feeder
    return kind(source, batch_size, shard, **kwargs)


def read(data, gpu: bool):
    """The pipeline's input: decoded RGB images (on the GPU when `gpu`) and labels."""
    data_node, labels = data.read()
    if data.source.encoded or data.source.shards is not None:
        images = decode(data_node, gpu)
    else:
        images = data_node.gpu() if gpu else data_node
    return images, labels


@pipeline_def(enable_conditionals=True)
def two_view_pipeline(feeder, size: int, aug: Augment, gpu: bool):
    """Decode once, augment twice: (view1, view2, label)."""
    images, labels = read(feeder, gpu)
    return simclr_view(images, size, aug), simclr_view(images, size, aug), labels


@pipeline_def
def eval_pipeline(feeder, size: int, gpu: bool):
    """No augmentation: (view, label)."""
    images, labels = read(feeder, gpu)
    return center_view(images, size), labels


class Loader:
    """Iterates one epoch of torch batches from a DALI pipeline; `len()` is the steps in it (those
    still to come when `done` steps of the epoch were taken before a restored checkpoint)."""

    def __init__(self, pipe, feeder, names: list[str], done: int = 0):
        self.feeder, self.done = feeder, done
        reader = isinstance(feeder, ShardReader) and not feeder.drop_last  # every sample once
        self.iterator = DALIGenericIterator(pipe, names, reader_name="Reader" if reader else None,
                                            last_batch_policy=LastBatchPolicy.PARTIAL)

    def __len__(self) -> int:
        return self.feeder.steps - self.done

    def state(self) -> bytes:
        """DALI's checkpoint after the batches consumed so far (readers' positions, every random
        operator's state; external_source resumes at the next batch index): build the pipeline with
        it (train_loader's `state`) and the rest of the epoch comes out bit for bit the same."""
        return self.iterator.checkpoints()[0]

    def __iter__(self):
        for batch in itertools.islice(self.iterator, len(self)):
            outputs = [batch[0][name] for name in self.iterator.output_map]
            if outputs[-1].dim() == 2:  # WebDataset labels arrive as padded ASCII
                outputs[-1] = torch.from_numpy(parse_labels(outputs[-1].numpy()))
            yield tuple(outputs)


def placement(device_id: int | None) -> str:
    return "cpu" if device_id is None else "gpu"


def train_loader(source: Source, *, batch_size: int, size: int, aug: Augment, shard: Shard,
                 seed: int, epoch: int, workers: int, device_id: int | None,
                 prefetch: int = 2, state: bytes | None = None, done: int = 0) -> Loader:
    """One epoch of two-view batches (view1, view2, label) for this process's shard, tail dropped.

    Built afresh each epoch with a seed drawn from (seed, epoch, shard): an epoch's data order and
    augmentations depend on nothing else, so a run resumed at an epoch boundary sees the same data.
    Mid-epoch, `state` (Loader.state() after `done` steps) continues the epoch where it stopped.
    """
    feeder = make_input(source, batch_size, shard, shuffle=True, drop_last=True, seed=seed, epoch=epoch)
    pipe_seed = int(np.random.default_rng([seed, epoch, shard.index]).integers(2**31))
    pipe = two_view_pipeline(feeder, size, aug, device_id is not None, batch_size=batch_size,
                             num_threads=workers, device_id=device_id, seed=pipe_seed,
                             prefetch_queue_depth=prefetch, py_num_workers=1,
                             enable_checkpointing=True, checkpoint=state)
    pipe.build()
    return Loader(pipe, feeder, ["view1", "view2", "label"], done=done if state is not None else 0)


def eval_loader(source: Source, *, batch_size: int, size: int, workers: int,
                device_id: int | None) -> Loader:
    """Every image once, in order, as (view, label)."""
    feeder = make_input(source, batch_size, Shard(), shuffle=False, drop_last=False)
    pipe = eval_pipeline(feeder, size, device_id is not None, batch_size=batch_size,
                         num_threads=workers, device_id=device_id, seed=0)
    pipe.build()
    return Loader(pipe, feeder, ["view", "label"])


def to_device(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in tensors)
