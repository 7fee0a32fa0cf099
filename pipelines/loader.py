"""The DALI pipelines and their iterators: two augmented views for training, one plain view for
evaluation. Sharding, shuffling and epoch length are ours (`shard_order`), so every process runs the
same number of steps and a run can be resumed at any step. Files are read by DALI's own reader threads
(`FileReader`), never by the Python thread that runs the training loop.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from simclr_dali.pipelines import EVAL_CROP, eval_crop
from simclr_dali.pipelines.augment import Augment, center_view, decode, simclr_view, two_views
from simclr_dali.pipelines.failures import UnreadableData, check_again, dali_errors, first_unreadable
from simclr_dali.pipelines.sources import Source
from simclr_dali.pipelines.webdataset import IMAGE_EXTS, LABEL_BYTES, parse_labels


@dataclass
class Shard:
    index: int = 0  # this process's shard (accelerate's process_index)
    count: int = 1  # number of shards (accelerate's num_processes)


def epoch_steps(n: int, shards: int, batch_size: int, drop_last: bool = True) -> int:
    """Steps in an epoch for each of `shards` processes: equal shards of n // shards images, the
    tail batch dropped (training) or kept (evaluation, one shard)."""
    per_shard = n // shards if drop_last else -(-n // shards)
    return per_shard // batch_size if drop_last else -(-per_shard // batch_size)


def shard_order(n: int, shard: Shard, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                epoch: int, skip: int = 0) -> np.ndarray:
    """Indices this process reads in an epoch, in order.

    Training (drop_last): an epoch draws one permutation of the whole data set (the same on every
    process, from the seed and the epoch) and cuts it into global batches of count x batch_size
    images, the tail dropped; process i takes the i-th slice of each. Which images make global batch
    j does not depend on the number of processes, so a run resumed mid-epoch on another number of
    processes reads the rest of the epoch (`skip` global batches done) once, none twice.
    Evaluation: every image once, in order, in `count` contiguous parts."""
    perm = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if not drop_last:
        per_shard = -(-n // shard.count)
        return perm[shard.index * per_shard:][:per_shard]
    steps = epoch_steps(n, shard.count, batch_size)
    batches = perm[:steps * shard.count * batch_size].reshape(steps, shard.count, batch_size)
    return batches[skip:, shard.index].reshape(-1)


class _Input:
    """What a pipeline reads for this process in one epoch: `read()` gives the (data, labels) nodes,
    `steps` the batches of the epoch, `order` the source indices in the order they come out."""
    reader_name: str | None = None  # set where DALI must tell the iterator where the epoch ends

    def __init__(self, source: Source, batch_size: int, shard: Shard, *, shuffle: bool,
                 drop_last: bool, seed: int = 0, epoch: int = 0, skip: int = 0):
        self.source, self.batch_size, self.shard = source, batch_size, shard
        self.drop_last, self.epoch = drop_last, epoch
        self.steps = epoch_steps(len(source), shard.count, batch_size, drop_last) - skip
        self.order = shard_order(len(source), shard, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                                 epoch=epoch, skip=skip)


class FileReader(_Input):
    """Encoded files through DALI's file reader, given this epoch's shard as its file list in order:
    DALI's threads read them ahead (the training thread never touches a file), and its checkpoint
    holds the position for a mid-epoch resume. The bytes are decoded by DALI (`read`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reader_name = None if self.drop_last else "Reader"  # evaluation: the last batch is partial

    def read(self):
        files, labels = fn.readers.file(files=[self.source.files[i] for i in self.order],
                                        labels=[int(y) for y in self.source.labels[self.order]],
                                        random_shuffle=False, pad_last_batch=not self.drop_last, name="Reader")
        return files, fn.cast(fn.squeeze(labels, axes=[0]), dtype=types.INT64)  # (1,) int32 -> int64 scalar


class ArrayFeeder(_Input):
    """Decoded images held in memory (digits, CIFAR), fed through `external_source` by batch index:
    slicing an array is all the Python thread does, and DALI's checkpoint resumes at the next batch."""

    def __call__(self, info):
        if info.iteration >= self.steps:
            raise StopIteration
        index = self.order[info.iteration * self.batch_size:][:self.batch_size]
        return [self.source.images[i] for i in index], [np.array(self.source.labels[i], np.int64) for i in index]

    def read(self):
        """(data, labels) nodes: HWC images and int64 labels."""
        return fn.external_source(source=self, num_outputs=2, batch=True, batch_info=True, layout=["HWC", ""])


SHUFFLE_BYTES = 1 << 30  # per process: the encoded samples a training epoch's shuffle buffer may hold


def dali_part(n: int, shard: Shard) -> int:
    """Samples in this process's part when DALI's reader splits n into shard.count: [n i / c, n (i + 1) / c)."""
    return n * (shard.index + 1) // shard.count - n * shard.index // shard.count


def shuffle_buffer(part: int, sample_bytes: float, batch_size: int) -> int:
    """Samples the reader shuffles among: this process's whole part of the epoch where its encoded
    samples fit in SHUFFLE_BYTES (an exact shuffle of the part), else as many as fit (4 batches at least)."""
    fits = int(SHUFFLE_BYTES // max(sample_bytes, 1.0))
    return max(1, min(part, max(fits, 4 * batch_size)))


class ShardReader:
    """WebDataset tar shards through DALI's own reader.

    Training: the shards in an order drawn from (seed, epoch), the same on every process; DALI cuts
    their samples into `count` contiguous parts and this process reads part `index`, so which shards a
    process reads changes every epoch. Each sample is drawn at random from a buffer of `buffer`
    samples of the part (DALI draws only among the epoch's samples, so each comes once), which mixes
    the classes of many shards whatever order they were written in. We count the steps, so every
    process runs `steps` batches however unequal the parts are. Evaluation: every sample once, in
    stored order."""

    def __init__(self, source: Source, batch_size: int, shard: Shard, *, shuffle: bool,
                 drop_last: bool, seed: int = 0, epoch: int = 0, skip: int = 0):
        if skip:
            raise ValueError("tar shards are split by DALI's reader: an epoch cannot resume on another world size")
        self.source, self.batch_size, self.shard = source, batch_size, shard
        self.shuffle, self.drop_last, self.epoch = shuffle, drop_last, epoch
        if source.remote:  # before DALI's S3 client is made, in every process (the main one listed the shards)
            from simclr_dali.pipelines import bucket
            bucket.patient()
        self.steps = epoch_steps(len(source), shard.count, batch_size, drop_last)
        self.reader_name = None if drop_last else "Reader"  # evaluation: every sample once
        n_shards = len(source.shards)
        order = np.random.default_rng([seed, epoch]).permutation(n_shards) if shuffle else np.arange(n_shards)
        self.paths = [source.shards[i] for i in order]
        self.index_paths = [source.indexes[i] for i in order]
        mean_bytes = source.nbytes / max(len(source), 1)
        self.buffer = shuffle_buffer(dali_part(len(source), shard), mean_bytes, batch_size) if shuffle else 1

    def members(self):
        """("SHARD:MEMBER", read(n bytes)) of each sample's image in this epoch's shards, in the reader's
        order (webdataset.image_members)."""
        from simclr_dali.pipelines.webdataset import image_members

        return image_members(self.paths, self.index_paths)

    def read(self):
        # stick_to_shard: refilling the buffer after the part's last sample reads the part's first ones
        # again (as its next epoch would), not the next process's part; extensions match whatever their case
        # (`.JPEG` is an image, as in a folder: a case-sensitive ext gives the decoder empty samples)
        encoded, cls = fn.readers.webdataset(
            paths=self.paths, index_paths=self.index_paths, ext=[IMAGE_EXTS, "cls"], case_sensitive_extensions=False,
            missing_component_behavior="empty", shard_id=self.shard.index, num_shards=self.shard.count,
            random_shuffle=self.shuffle, initial_fill=self.buffer, stick_to_shard=True,
            pad_last_batch=not self.drop_last, name="Reader")
        return encoded, fn.pad(cls, axes=[0], shape=[LABEL_BYTES], fill_value=0)  # parsed by the Loader


def make_input(source: Source, batch_size: int, shard: Shard, **kwargs):
    kind = ShardReader if source.shards is not None else FileReader if source.encoded else ArrayFeeder
    return kind(source, batch_size, shard, **kwargs)


def decodes(source: Source) -> bool:
    """Whether the pipeline reads encoded bytes (files, shards) and decodes them, not arrays."""
    return source.encoded or source.shards is not None


def read(data, gpu: bool):
    """The pipeline's input: decoded RGB images (on the GPU when `gpu`), labels, and the `unreadable` flags
    of encoded samples that are no image (augment.decode; none for arrays): a tuple to end the outputs with."""
    data_node, labels = data.read()
    if decodes(data.source):
        images, unreadable = decode(data_node, gpu)
        return images, labels, (unreadable,)
    return (data_node.gpu() if gpu else data_node), labels, ()


@pipeline_def(enable_conditionals=True)
def two_view_pipeline(feeder, size: int, aug: Augment, gpu: bool, layout: str = "CHW"):
    """Decode once, augment twice (each view with its settings): (view1, view2, label[, unreadable])."""
    images, labels, flags = read(feeder, gpu)
    return *two_views(images, size, aug, layout), labels, *flags


@pipeline_def(enable_conditionals=True)
def one_view_pipeline(feeder, size: int, aug: Augment, gpu: bool, layout: str = "CHW"):
    """Decode, augment once with the first view's settings: (view, label[, unreadable]) (fine-tuning's)."""
    images, labels, flags = read(feeder, gpu)
    return simclr_view(images, size, aug.views()[0], layout), labels, *flags


@pipeline_def(enable_conditionals=True)
def eval_pipeline(feeder, size: int, gpu: bool, layout: str = "CHW", crop: float = EVAL_CROP):
    """No augmentation: (view, label[, unreadable])."""
    images, labels, flags = read(feeder, gpu)
    return center_view(images, size, layout, crop), labels, *flags


def layout_for(channels_last: bool) -> str:
    """What the pipeline emits: HWC for a channels-last model (Loader turns it into an NCHW view with
    channels-last strides, no copy), CHW otherwise."""
    return "HWC" if channels_last else "CHW"


class Loader:
    """Iterates one epoch of torch batches from a DALI pipeline; `len()` is the steps in it (those
    still to come when `done` steps of the epoch were taken before a restored checkpoint). Views are
    (N, 3, S, S) whatever the pipeline's layout: HWC batches come out as channels-last views."""

    def __init__(self, pipe, feeder, names: list[str], done: int = 0, layout: str = "CHW"):
        self.feeder, self.done, self.layout = feeder, done, layout
        self.flagged = decodes(feeder.source)  # the last output is `unreadable` (augment.decode)
        self.taken = 0  # batches yielded
        self.ahead = pipe.prefetch_queue_depth if isinstance(pipe.prefetch_queue_depth, int) else 2
        with dali_errors(feeder, self.candidates):  # the iterator reads its first batch
            self.iterator = DALIGenericIterator(pipe, names + (["unreadable"] if self.flagged else []),
                                                reader_name=feeder.reader_name,
                                                last_batch_policy=LastBatchPolicy.PARTIAL)

    def __len__(self) -> int:
        return self.feeder.steps - self.done

    def state(self) -> bytes:
        """DALI's checkpoint after the batches consumed so far (readers' positions, every random
        operator's state; external_source resumes at the next batch index): build the pipeline with
        it (train_loader's `state`) and the rest of the epoch comes out bit for bit the same."""
        return self.iterator.checkpoints()[0]

    def __iter__(self):
        for batch in self.batches():
            outputs = [batch[0][name] for name in self.iterator.output_map]
            if self.flagged:  # a host tensor from DALI's CPU operators, whatever the device: no device sync
                unreadable = outputs.pop().numpy().reshape(-1)
                if unreadable.any():
                    raise self.unreadable(int(np.flatnonzero(unreadable)[0]))
                self.taken += 1
            if outputs[-1].dim() == 2:  # WebDataset labels arrive as padded ASCII
                outputs[-1] = torch.from_numpy(parse_labels(outputs[-1].numpy()))
            if self.layout == "HWC":  # (N, S, S, 3) -> (N, 3, S, S), channels-last strides, no copy
                outputs[:-1] = [view.permute(0, 3, 1, 2) for view in outputs[:-1]]
            yield tuple(outputs)

    def batches(self):
        batches = iter(itertools.islice(self.iterator, len(self)))
        while True:
            with dali_errors(self.feeder, self.candidates):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def position(self) -> int:
        """Where the next batch starts in the epoch's file order (FileReader.order)."""
        return (self.done + self.taken) * self.feeder.batch_size

    def candidates(self):
        """What DALI may have been decoding when it raised: the files of the batches from the next one up to
        those the pipeline prefetches; for shards, the members of this epoch's shards in reading order."""
        feeder = self.feeder
        if isinstance(feeder, ShardReader):
            return feeder.members()
        if not isinstance(feeder, FileReader):
            return []
        start = self.position()
        return [feeder.source.files[i] for i in feeder.order[start:start + (self.ahead + 2) * feeder.batch_size]]

    def unreadable(self, sample: int) -> UnreadableData:
        """The sentence for sample `sample` of the next batch, which augment.decode found to be no image (DALI
        did not fail: it decoded a stand-in)."""
        from simclr_dali.pipelines.verify import signature_problem

        feeder, source = self.feeder, self.feeder.source
        if isinstance(feeder, FileReader):
            found = first_unreadable([source.files[feeder.order[self.position() + sample]]])
        else:
            found = first_unreadable(feeder.members(), check=signature_problem)
        name, reason = found if found is not None else (f"a sample of {source.name}", "not an image")
        return UnreadableData(f"{name}, read from {source.name}, is {reason}: the data changed after it "
                              f"was checked; check it again with {check_again(source)}", False)


def graph_operators(pipe) -> int:
    """The operators in a built pipeline's graph (DALI's Python-side list of them): what each batch runs, each with
    its own cost per sample and its scheduling per batch."""
    return len(pipe._ops)


def placement(device_id: int | None) -> str:
    return "cpu" if device_id is None else "gpu"


def train_loader(source: Source, *, batch_size: int, size: int, aug: Augment, shard: Shard,
                 seed: int, epoch: int, workers: int, device_id: int | None, channels_last: bool = False,
                 prefetch: int = 2, state: bytes | None = None, done: int = 0, views: int = 2) -> Loader:
    """One epoch of two-view batches (view1, view2, label) for this process's shard, tail dropped; with
    `views=1`, (view, label) batches of one augmented view (fine-tuning's).

    Built afresh each epoch with a seed drawn from (seed, epoch, shard): an epoch's data order and
    augmentations depend on nothing else, so a run resumed at an epoch boundary sees the same data.
    Mid-epoch, `state` (Loader.state() after `done` steps) continues the epoch where it stopped, bit for
    bit; without it (a checkpoint written by another number of processes) the pipeline reads the
    global batches after the first `done`, with augmentations drawn afresh.
    """
    pipe, feeder, names, layout = train_pipeline(**locals())
    return Loader(pipe, feeder, names, done=done if state is not None else 0, layout=layout)


def train_pipeline(source: Source, *, batch_size: int, size: int, aug: Augment, shard: Shard, seed: int,
                   epoch: int, workers: int, device_id: int | None, channels_last: bool = False, prefetch: int = 2,
                   state: bytes | None = None, done: int = 0, views: int = 2):
    """The built DALI pipeline behind train_loader (its arguments), with its feeder, output names and layout: on
    DALI's dynamic executor, which schedules the graph's many small operators at about half the cost per sample
    of the default one (docs/results.md, The pipeline)."""
    skip = done if state is None else 0
    feeder = make_input(source, batch_size, shard, shuffle=True, drop_last=True, seed=seed, epoch=epoch, skip=skip)
    pipe_seed = int(np.random.default_rng([seed, epoch, shard.index] + ([skip] if skip else [])).integers(2**31))
    layout = layout_for(channels_last)
    make, names = (two_view_pipeline, ["view1", "view2"]) if views == 2 else (one_view_pipeline, ["view"])
    pipe = make(feeder, size, aug, device_id is not None, layout, batch_size=batch_size, num_threads=workers,
                device_id=device_id, seed=pipe_seed, prefetch_queue_depth=prefetch, enable_checkpointing=True,
                checkpoint=state, exec_dynamic=True)
    with dali_errors(feeder):  # the reader lists its files or shards now
        pipe.build()
    return pipe, feeder, [*names, "label"], layout


def eval_loader(source: Source, *, batch_size: int, size: int, workers: int,
                device_id: int | None, channels_last: bool = False, crop: float | None = None) -> Loader:
    """Every image once, in order, as (view, label): the central `crop` of each (augment.center_view); by default
    the whole image at 32 px and below, else the central 87.5% (pipelines.eval_crop)."""
    crop = eval_crop(size) if crop is None else crop
    feeder = make_input(source, batch_size, Shard(), shuffle=False, drop_last=False)
    layout = layout_for(channels_last)
    pipe = eval_pipeline(feeder, size, device_id is not None, layout, crop, batch_size=batch_size,
                         num_threads=workers, device_id=device_id, seed=0)
    with dali_errors(feeder):
        pipe.build()
    return Loader(pipe, feeder, ["view", "label"], layout=layout)
