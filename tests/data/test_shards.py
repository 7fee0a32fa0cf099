"""Tar shards: batches that mix the classes whatever order the shards were written in
(the shard order permuted per epoch, a shuffle buffer spanning shards), bitwise mid-epoch and elastic
resume, and a held-out test split of every class written by `pipelines.pack --holdout`.

The class-sorted shards here are written the way most people convert an ImageFolder: the folder's
files in order into tar files with Python's tarfile, indexed with DALI's own wds2idx; not by pack."""
import io
import json
import os
import signal
import tarfile
from collections import Counter
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dali_device_id, make_folder, state_after, train_here
from PIL import Image
from safetensors.torch import load_file
from wds2idx import IndexCreator

from simclr_dali.errors import UserError
from simclr_dali.pipelines import loader as loader_module
from simclr_dali.pipelines import pack
from simclr_dali.pipelines.augment import Augment
from simclr_dali.pipelines.loader import SHUFFLE_BYTES, Shard, ShardReader, eval_loader, shuffle_buffer, train_loader
from simclr_dali.pipelines.sources import load_source

CLASSES, PER_CLASS, SHARD, BATCH = 8, 64, 4, 16  # 512 samples in 128 class-sorted shards, 16 per class


def tiny_jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_sorted_shards(root: Path, classes=CLASSES, per_class=PER_CLASS, shard_size=SHARD) -> str:
    """Class-sorted shards shard-NNNNNN.tar: sample i (class i // per_class) holds a JPEG and i as its
    .cls, so that a label names its sample; returns the `wds:` spec."""
    root.mkdir(parents=True)
    images = [tiny_jpeg(40 + 20 * c) for c in range(classes)]
    n = classes * per_class
    for first in range(0, n, shard_size):
        path = root / f"shard-{first // shard_size:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(first, min(first + shard_size, n)):
                for ext, data in (("jpg", images[i // per_class]), ("cls", str(i).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with IndexCreator(str(path), str(path.with_suffix(".idx")), verbose=False) as index:
            index.create_index()
    return f"wds:{root / 'shard-*.tar'}"


@pytest.fixture(scope="module")
def sorted_shards(tmp_path_factory) -> str:
    return write_sorted_shards(tmp_path_factory.mktemp("sorted") / "shards")


def samples_in(shard: str) -> range:
    """The samples that write_sorted_shards put in `shard`, in order."""
    first = int(Path(shard).stem.removeprefix("shard-")) * SHARD
    return range(first, first + SHARD)


def iid_distinct(counts: list[int], batch: int) -> float:
    """Expected distinct classes in `batch` samples drawn at random without replacement from classes of
    `counts` samples (hypergeometric): the sum over classes of P(the class is in the batch)."""
    n = sum(counts)
    return sum(1 - comb(n - k, batch) / comb(n, batch) for k in counts)


def epoch_labels(source, shard: Shard, epoch: int, batch: int = BATCH, seed: int = 0) -> list[list[int]]:
    loader = train_loader(source, batch_size=batch, size=8, aug=Augment(), shard=shard, seed=seed, epoch=epoch,
                          workers=1, device_id=None)
    return [y.view(-1).tolist() for _, _, y in loader]


def test_the_shards_are_class_sorted_as_written(sorted_shards):
    """The control: in their stored order, every batch of these shards is one class."""
    source = load_source(sorted_shards, "train")
    assert len(source) == CLASSES * PER_CLASS and len(source.shards) == CLASSES * PER_CLASS // SHARD
    ids = torch.cat([y for _, y in eval_loader(source, batch_size=BATCH, size=8, workers=1, device_id=None)])
    assert ids.tolist() == list(range(len(source)))
    assert {len(set(b // PER_CLASS)) for b in ids.view(-1, BATCH).numpy()} == {1}


@pytest.mark.parametrize("world", [1, 2])
def test_batches_of_class_sorted_shards_mix_classes_like_an_iid_draw(sorted_shards, world):
    """The mean number of distinct classes per batch, over two epochs, within 10% of an i.i.d. draw.

    Why 10% holds with room (8 classes of 64, batches of 16): an i.i.d. batch (without replacement)
    holds 7.087 classes on average, with a standard deviation of 0.773 (the variance of a sum of
    class-present indicators, exact). One process holds its whole part in the buffer (512 samples,
    well under SHUFFLE_BYTES), so an epoch is a uniform permutation: the mean over 64 batches is
    unbiased with a standard deviation of 0.773 / 8 = 0.097, and the 10% band (0.709) is 7.3 of them.
    Two processes: each epoch's part is 64 of the 128 shards drawn at random, so its classes are a
    little uneven; simulated 2,000 times, the mean over 2 x 2 x 16 batches is 6.99 with a standard
    deviation of 0.10: the band's edge (6.38) is 5.9 of them away. Read in stored order (the control
    above) the mean is 1, and the reader before this change gave 3.4 (one process) and 3.0 (two)."""
    source = load_source(sorted_shards, "train")
    distinct, seen = [], Counter()
    for epoch in range(2):
        for rank in range(world):
            batches = epoch_labels(source, Shard(rank, world), epoch)
            assert len(batches) == len(source) // world // BATCH
            distinct += [len({i // PER_CLASS for i in b}) for b in batches]
            seen.update((epoch, i) for b in batches for i in b)
    assert max(seen.values()) == 1  # no sample twice in an epoch, on any process
    assert sum(seen.values()) == 2 * len(source) // world // BATCH * world * BATCH
    expected = iid_distinct([PER_CLASS] * CLASSES, BATCH)
    assert abs(np.mean(distinct) - expected) <= 0.1 * expected, (np.mean(distinct), expected)


def test_the_shard_order_is_permuted_every_epoch_the_same_on_every_process(sorted_shards):
    source = load_source(sorted_shards, "train")
    reader = lambda shard, epoch, seed=0, shuffle=True: ShardReader(  # noqa: E731
        source, BATCH, shard, shuffle=shuffle, drop_last=shuffle, seed=seed, epoch=epoch)
    first = reader(Shard(0, 2), 0).paths
    assert sorted(first) == source.shards and first != source.shards
    assert reader(Shard(1, 2), 0).paths == first == reader(Shard(0, 2), 0).paths  # every process, every time
    assert reader(Shard(0, 2), 1).paths != first and reader(Shard(0, 2), 0, seed=1).paths != first
    assert [Path(p).with_suffix(".idx") for p in first] == [Path(i) for i in reader(Shard(0, 2), 0).index_paths]
    assert reader(Shard(), 0, shuffle=False).paths == source.shards  # evaluation: stored order


def test_the_buffer_holds_the_part_up_to_its_budget():
    assert shuffle_buffer(part=500, sample_bytes=1000, batch_size=16) == 500  # fits: an exact shuffle
    fits = SHUFFLE_BYTES // 110_000  # ImageNet's mean JPEG: about 9,760 samples, 1 GiB
    assert shuffle_buffer(part=160_000, sample_bytes=110_000, batch_size=256) == fits
    assert shuffle_buffer(part=160_000, sample_bytes=10 ** 9, batch_size=8) == 32  # 4 batches at least
    assert shuffle_buffer(part=20, sample_bytes=10 ** 9, batch_size=8) == 20  # never more than the part


def test_the_buffer_spans_shards_when_the_part_does_not_fit(sorted_shards, monkeypatch):
    """With a budget of 96 samples' bytes the buffer holds 96 samples (24 shards of 4) of this process's
    part, read in the epoch's shard order: the d-th sample drawn was read at position <= 95 + d of the
    part, none comes twice, and the first batch reaches past position 48 (each of its draws falls below
    it with probability <= 1/2, all 16 with probability <= 2^-16)."""
    source = load_source(sorted_shards, "train")
    mean = source.nbytes / len(source)
    monkeypatch.setattr(loader_module, "SHUFFLE_BYTES", int(96 * mean) + 1)
    for shard in (Shard(0, 1), Shard(1, 2)):
        reader = ShardReader(source, BATCH, shard, shuffle=True, drop_last=True, seed=0, epoch=3)
        assert reader.buffer == 96
        stream = [i for p in reader.paths for i in samples_in(p)]  # DALI's order: the shards' samples in turn
        part = stream[len(stream) * shard.index // shard.count:len(stream) * (shard.index + 1) // shard.count]
        drawn = [i for b in epoch_labels(source, shard, epoch=3) for i in b]
        position = {i: k for k, i in enumerate(part)}
        assert all(position[i] <= 95 + d for d, i in enumerate(drawn)) and len(set(drawn)) == len(drawn)
        assert max(position[i] for i in drawn[:BATCH]) >= 48


def test_the_buffer_costs_the_encoded_bytes_the_indexes_list(sorted_shards):
    """What the buffer holds per sample is read from the indexes: every component's bytes, here each
    sample's JPEG and the digits of its .cls."""
    source = load_source(sorted_shards, "train")
    n = CLASSES * PER_CLASS
    assert source.nbytes == sum(len(tiny_jpeg(40 + 20 * (i // PER_CLASS))) + len(str(i)) for i in range(n))
    reader = ShardReader(source, BATCH, Shard(), shuffle=True, drop_last=True)
    assert reader.buffer == n and reader.buffer * source.nbytes / n < SHUFFLE_BYTES  # all of it: 330 kB


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_a_mid_epoch_checkpoint_of_shards_resumes_the_rest_bitwise(sorted_shards, rank, world, device):
    """Loader.state() after 2 batches, given to a new pipeline over the same (seed, epoch) shard order,
    yields the rest of the epoch bit for bit: DALI's reader position in its buffer and every random
    operator's state."""
    source = load_source(sorted_shards, "train")
    kwargs = dict(batch_size=BATCH, size=16, aug=Augment(), shard=Shard(rank, world), seed=5, epoch=2, workers=1,
                  device_id=dali_device_id(device))
    straight = [tuple(t.cpu().clone() for t in b) for b in train_loader(source, **kwargs)]
    state = state_after(train_loader(source, **kwargs), 2)
    rest = [tuple(t.cpu().clone() for t in b) for b in train_loader(source, **kwargs, state=state, done=2)]
    assert len(rest) == len(straight) - 2 == len(source) // world // BATCH - 2
    for got, want in zip(rest, straight[2:]):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(rest[0][2], straight[1][2])  # the rest, not the start again


@pytest.mark.slow  # trains
def test_a_run_on_shards_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path, hooks):
    spec = write_sorted_shards(tmp_path / "shards", classes=4, per_class=12, shard_size=4)  # 48: 6 steps of 8
    run = ["--data", spec, "--epochs", "2"]
    assert train_here(*run, "--out", str(tmp_path / "straight")) == 0
    hooks[4] = lambda loss: (os.kill(os.getpid(), signal.SIGTERM), loss)[1]  # step 4 of 6: mid-epoch
    hooks.count = 0
    assert train_here(*run, "--out", str(tmp_path / "run")) == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "run" / "checkpoint" / "progress.json").read_text())["step"] == 4
    assert (tmp_path / "run" / "checkpoint" / "dali_0.state").is_file()
    assert train_here(*run, "--out", str(tmp_path / "run"), "--resume") == 0
    straight, resumed = (load_file(str(tmp_path / r / "backbone.safetensors")) for r in ("straight", "run"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow  # two processes, stopped and resumed
def test_elastic_resume_of_shards_holds_at_epoch_boundaries(tmp_path, capsys):
    """Shards are split by DALI's reader, so an epoch must end on the number of processes it began on:
    2 processes stopped mid-epoch, a resume on 1 is refused in one sentence, the epoch is finished on
    2 (--stop-after 1), and the run goes on from the boundary on 1. Every epoch trains on 32 different
    samples, none twice."""
    from support.elastic import RUN, launch, seen_per_epoch

    from simclr_dali import training as train

    spec = write_sorted_shards(tmp_path / "shards", classes=4, per_class=9, shard_size=4)  # 36: 4 steps of 8
    out, record = tmp_path / "run", tmp_path / "seen"
    record.mkdir()
    first = launch(2, spec, out, record, "first", "--batch-size", "4", stop_at=6)
    assert first.returncode == 1 and "SIGTERM at step 6: the checkpoint is in" in first.stdout, first.stderr[-3000:]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", spec, "--out", str(out), *RUN, "--resume"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err == (
        f"error: --resume: the checkpoint in {out / 'checkpoint'} stops inside an epoch of tar shards, which DALI "
        f"splits by process: finish that epoch on 2 process(es), then resume on 1")
    finish = launch(2, spec, out, record, "finish", "--resume", "--stop-after", "1")
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 8
    rest = launch(1, spec, out, record, "rest", "--resume")
    assert rest.returncode == 0, rest.stderr[-3000:]
    epochs = seen_per_epoch(record)
    assert sorted(epochs) == [0, 1, 2]
    for epoch, counts in epochs.items():
        assert sum(counts.values()) == 32 and max(counts.values()) == 1, (epoch, counts)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_sizes"] == [[2, 0], [1, 8]] and cfg["global_batch"] == 8 and cfg["steps_per_epoch"] == 4


# -- the held-out split: pack --holdout writes test shards of every class --------------------------
def test_the_holdout_takes_a_seeded_share_of_every_class():
    sizes = [1, 2, 3, 10, 25, 40]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    train, test = pack.stratified_holdout(labels, 0.1, seed=3)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    per_class = np.bincount(labels[test], minlength=len(sizes)).tolist()
    assert per_class == [0, 1, 1, 1, 3, 4]  # round(0.1 n), at least one of two or more, never a whole class
    again, other = pack.stratified_holdout(labels, 0.1, seed=3), pack.stratified_holdout(labels, 0.1, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, test)))
    assert set(other[1].tolist()) != set(test.tolist())
    assert len(pack.stratified_holdout(labels, 0.0, seed=3)[1]) == 0
    assert len(pack.stratified_holdout(np.full(20, -1), 0.1, seed=0)[1]) == 2  # unlabelled: one class


def shard_classes(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]


def test_pack_mixes_every_shard_and_writes_test_shards_the_reader_recognises(tmp_path, capsys):
    """pack writes a seeded random order, so a shard of 16 is a draw without replacement from the
    training set: the mean number of classes in its 27 full shards is within 10% of the hypergeometric
    expectation (7.13 of 9 classes, a standard deviation of 0.79 a shard, exact, and at most 0.15 for
    the mean of 27: the band of 0.71 is 4.7 of them; the folder's order, as pack wrote it before, gives
    1.2)."""
    folder = make_folder(tmp_path / "images", classes=[f"c{i}" for i in range(8)], per_class=60, size=(8, 8))
    make_folder(folder, classes=["tiny"], per_class=2, size=(8, 8), seed=1)  # a 9th class of 2 images
    out = tmp_path / "shards"
    assert pack.main([str(folder), str(out), "--shard-size", "16", "--workers", "1"]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote 433 samples in 28 shard(s) and 49 test samples (0.1 of each "
                                               f"class) in 4 test shard(s) to {out}")
    shards, tests = sorted(out.glob("shard-*.tar")), sorted(out.glob("test-*.tar"))
    assert [t.name for t in tests] == [f"test-{i:06d}.tar" for i in range(4)]
    counts = Counter(c for s in shards for c in shard_classes(s))
    full = [len(set(shard_classes(s))) for s in shards[:-1]]  # the last shard holds the one sample left over
    expected = iid_distinct(list(counts.values()), 16)
    assert abs(np.mean(full) - expected) <= 0.1 * expected, (np.mean(full), expected)

    spec = f"wds:{out / 'shard-*.tar'}"
    train, test = load_source(spec, "train"), load_source(spec, "test")
    assert train.shards == [str(s) for s in shards] and test.shards == [str(t) for t in tests]
    assert (len(train), len(test)) == (433, 49) and load_source(spec, "train", spec).shards == train.shards
    labels = torch.cat([y for _, y in eval_loader(test, batch_size=8, size=8, workers=1, device_id=None)])
    assert sorted(Counter(labels.tolist()).items()) == [(c, 6) for c in range(8)] + [(8, 1)]  # every class
    assert sorted(labels.tolist()) == sorted(c for t in tests for c in shard_classes(t))


def test_a_shard_set_without_test_shards_is_evaluated_only_with_test_data(sorted_shards):
    train = load_source(sorted_shards, "train")
    assert len(train) == CLASSES * PER_CLASS  # every shard trains: nothing is "the last shards"
    with pytest.raises(UserError) as err:
        load_source(sorted_shards, "test")
    assert str(err.value) == (f"{sorted_shards} has no test shards (test-NNNNNN.tar beside its shards, which "
                              f"'python -m simclr_dali.pipelines.pack' writes with --holdout): evaluate it with "
                              f"--test-data")
    assert len(load_source(sorted_shards, "test", sorted_shards)) == CLASSES * PER_CLASS  # --test-data


def test_test_shards_are_never_read_for_training(tmp_path, capsys):
    folder = make_folder(tmp_path / "images", per_class=10, size=(8, 8))
    out = tmp_path / "shards"
    assert pack.main([str(folder), str(out), "--shard-size", "8", "--workers", "1"]) == 0
    every = f"wds:{out / '*.tar'}"
    assert len(load_source(every, "train")) == 27 and len(load_source(every, "test")) == 3
    with pytest.raises(UserError, match=r"matches only test shards \(test-NNNNNN.tar\), which training never reads"):
        load_source(f"wds:{out / 'test-*.tar'}", "train")
    assert len(load_source(f"wds:{out / 'test-*.tar'}", "test", f"wds:{out / 'test-*.tar'}")) == 3  # --test-data


def test_pack_refuses_a_folder_that_holds_shards(tmp_path, capsys):
    folder = make_folder(tmp_path / "images", per_class=4, size=(8, 8))
    out = tmp_path / "shards"
    assert pack.main([str(folder), str(out), "--shard-size", "5", "--workers", "1"]) == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        pack.main([str(folder), str(out), "--holdout", "0", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err == (f"error: {out} already holds shards (shard-000000.tar and 2 more), which "
                                            f"would be read with the new ones: pack into a new folder, or delete "
                                            f"them first")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
