"""Costs that must not grow with every start: a folder is listed without a stat per file, its images are
decoded once per data set (verdicts cached by path, size and modification time), the first check is split
over the processes, which exchange through the run's store, and each process's threads come from its node.
Small N here; the scale itself is measured by the benchmark."""
import os
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, make_folder, train_here
from support.bad_images import BAD, add_odd_files

from simclr_dali.pipelines import verify
from simclr_dali.pipelines.sources import list_images, load_source
from simclr_dali.pipelines.verify import Screening
from simclr_dali.training import peers
from simclr_dali.training.setup import threads_per_process


def old_listing(root: Path) -> list[str]:
    """The oracle: what the listing was before (Path.rglob, a stat per file), in Path's order."""
    from simclr_dali.pipelines import IMAGE_EXTENSIONS
    return [str(p) for p in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())]


def test_the_listing_is_the_one_rglob_gave_without_a_stat_per_file(tmp_path):
    root = make_folder(tmp_path / "data", classes=("a", "a-b", "b"), per_class=3)
    (root / "a" / "deep" / "er").mkdir(parents=True)
    (root / "a" / "deep" / "er" / "x.JPEG").write_bytes((root / "a" / "001.jpg").read_bytes())
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "b" / ".hidden.jpg").write_bytes(b"")  # a name with a suffix: listed, as rglob did
    os.symlink(root / "a" / "001.jpg", root / "b" / "link.jpg")  # a linked file: listed
    os.symlink(root / "gone.jpg", root / "b" / "broken.jpg")  # a broken link: not a file
    os.symlink(root / "a", root / "b" / "linked-folder")  # a linked folder: not entered (and no loop)
    os.symlink(root, root / "a" / "loop")
    assert list_images(root) == old_listing(root)
    assert str(root / "a" / "deep" / "er" / "x.JPEG") in list_images(root)


def test_a_folder_is_decoded_once_and_a_changed_file_again(tmp_path, monkeypatch):
    root = add_odd_files(make_folder(tmp_path / "images", per_class=4))
    decoded = []
    real = verify.check_image
    monkeypatch.setattr(verify, "check_image", lambda path: decoded.append(path) or real(path))
    first = Screening("skip", workers=2)
    kept = load_source(str(root), "train", str(root), screen=first)
    files = list_images(root)
    assert len(decoded) == len(files) and first.cached == 0 and len(first.bad) == len(BAD)
    decoded.clear()
    again = Screening("skip", workers=2)  # a second start, a resume, evaluate.py
    assert load_source(str(root), "train", str(root), screen=again).files == kept.files
    assert decoded == [] and again.cached == len(files) and sorted(again.bad) == sorted(first.bad)
    (root / "cat" / "001.jpg").write_bytes(b"overwritten with text, a new size and time")
    (root / "cat" / "empty.jpg").write_bytes((root / "cat" / "002.jpg").read_bytes())  # mended
    third = Screening("skip", workers=2)
    kept3 = load_source(str(root), "train", str(root), screen=third)
    assert sorted(decoded) == sorted([str(root / "cat" / "001.jpg"), str(root / "cat" / "empty.jpg")])
    assert str(root / "cat" / "001.jpg") not in kept3.files and str(root / "cat" / "empty.jpg") in kept3.files
    assert third.summary()["cached"] == len(files) - 2


def test_a_damaged_cache_is_only_a_cache(tmp_path):
    from simclr_dali.pipelines import verdicts
    root = make_folder(tmp_path / "images", per_class=2)
    Screening("skip")(list_images(root), root)
    verdicts.cache_path(root).write_text("# simclr image verdicts v1\nnot\ta\tverdict\n")
    screen = Screening("skip")
    assert screen(list_images(root), root) == list(range(6)) and screen.cached == 0


def test_the_first_check_is_split_over_the_processes_and_exchanged_through_the_store(tmp_path, monkeypatch):
    """Two ranks in two threads, with a real TCPStore as the run's store: each decodes its half of the files,
    and both end with every bad file, found once."""
    root = add_odd_files(make_folder(tmp_path / "images", per_class=4))
    files = list_images(root)
    port = free_port()
    stores = [dist.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=False) for rank in (0, 1)]
    seen: dict[int, list[str]] = {0: [], 1: []}
    real = verify.scan
    where = threading.local()

    def scan(files, workers, progress=False):  # the real scan, noting which rank decodes what
        seen[where.rank].extend(files)
        return real(files, workers, progress)

    monkeypatch.setattr(verify, "scan", scan)
    results = {}

    def rank(r: int) -> None:
        where.rank = r
        exchange = peers.Exchange(r, 2)
        monkeypatch.setattr(peers, "_store", stores[0])  # the one store both ranks reach
        screen = Screening("skip", workers=1, main=r == 0, share=exchange.share, gather=exchange.gather, rank=r,
                           world=2)
        results[r] = (screen(files, root), screen.bad)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] == results[1] and len(results[0][1]) == len(BAD)
    assert sorted(seen[0] + seen[1]) == sorted(files) and not set(seen[0]) & set(seen[1])
    assert abs(len(seen[0]) - len(seen[1])) <= 1


@pytest.mark.parametrize("local,expected", [(None, 2), ("1", 2), ("2", 1), ("8", 1)])
def test_threads_come_from_this_nodes_cores_and_processes(local, expected, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # this machine's two cores
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert threads_per_process(world=1 if local is None else 32) == expected


@pytest.mark.slow
def test_the_next_epochs_pipeline_is_built_while_the_last_steps_train_and_changes_nothing(tmp_path, monkeypatch):
    """Epochs 2 and 3 come from loaders built in a thread during the epoch before; the weights are bit for bit
    those of a run that builds each at the boundary (an epoch's data depends on the seed and the epoch alone)."""
    from safetensors.torch import load_file

    from simclr_dali.training import loop
    folder = make_folder(tmp_path / "images", per_class=8)
    built = []
    real = loop.Loop.loader
    monkeypatch.setattr(loop.Loop, "loader", lambda self, epoch, done: built.append(
        (epoch, threading.current_thread().name)) or real(self, epoch, done))
    assert train_here("--data", str(folder), "--out", str(tmp_path / "ahead"), "--epochs", "3") == 0
    assert built == [(0, "MainThread"), (1, "epoch-1-pipeline"), (2, "epoch-2-pipeline")]
    built.clear()
    monkeypatch.setattr(loop.NextEpoch, "start", lambda self, epoch, build: None)  # each built at its boundary
    assert train_here("--data", str(folder), "--out", str(tmp_path / "boundary"), "--epochs", "3") == 0
    assert built == [(0, "MainThread"), (1, "MainThread"), (2, "MainThread")]
    ahead, boundary = (load_file(tmp_path / run / "backbone.safetensors") for run in ("ahead", "boundary"))
    assert all(torch.equal(ahead[k], boundary[k]) for k in ahead)


@pytest.mark.parametrize("memory_mb", [4096.0, 0.05, 0.002])  # the whole bank; 3 parts; 60 parts of 5 rows (< k)
def test_the_knn_reads_a_bank_larger_than_its_memory_a_part_at_a_time_and_votes_alike(memory_mb):
    """The oracle: the full similarity matrix's top k, in float64 (ties apart, the same neighbours)."""
    from simclr_dali.models.features import knn_top1
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(300, 16, generator=gen, dtype=torch.float64), torch.randn(70, 16, generator=gen,
                                                                                            dtype=torch.float64)
    train_y, test_y = torch.randint(0, 5, (300,), generator=gen), torch.randint(0, 5, (70,), generator=gen)
    sim = torch.nn.functional.normalize(test_x, dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
    top_sim, top_idx = sim.topk(20, dim=1)
    votes = torch.zeros(70, 5, dtype=torch.float64).scatter_add_(1, train_y[top_idx], (top_sim / 0.1).exp())
    expected = (votes.argmax(1) == test_y).double().mean().item()
    assert knn_top1(train_x, train_y, test_x, test_y, k=20, temperature=0.1, chunk=32, memory_mb=memory_mb) == expected


# -- shards' indexes, parsed once ----------------------------------------------------------------
def test_shard_indexes_are_parsed_once_per_data_set_and_a_changed_one_again(tmp_path, monkeypatch):
    from simclr_dali.pipelines import webdataset
    from simclr_dali.pipelines.sources import load_folder
    from simclr_dali.pipelines.webdataset import index_path, write_shards

    source = load_folder(str(make_folder(tmp_path / "images", per_class=4)), "all")
    shards = write_shards(source.files, source.labels, tmp_path / "shards", shard_size=5)  # 5, 5, 2
    parsed = []
    real = webdataset.count_samples
    monkeypatch.setattr(webdataset, "count_samples",
                        lambda index, shard, end: parsed.append(index) or real(index, shard, end))
    spec = f"wds:{tmp_path / 'shards' / 'shard-*.tar'}"
    first = load_source(spec, "train")
    assert len(parsed) == 3 and first.counts == [5, 5, 2] and len(first) == 12
    parsed.clear()
    again = load_source(spec, "train")  # a second start, a resume, evaluate.py
    assert parsed == [] and (again.counts, again.nbytes) == (first.counts, first.nbytes)
    st = os.stat(index_path(str(shards[1])))
    os.utime(index_path(str(shards[1])), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # written again
    assert load_source(spec, "train").counts == [5, 5, 2] and parsed == [index_path(str(shards[1]))]
    webdataset.checked_path(first.indexes).write_text("# simclr checked indexes v1\ndamaged\n")
    parsed.clear()
    assert load_source(spec, "train").counts == [5, 5, 2] and len(parsed) == 3  # only a cache


class Follower:
    """A process other than the main one: it takes what the main process shares (here, `given`)."""
    main = False

    def __init__(self, given):
        self.given = given

    def share(self, obj):
        assert obj is None  # it has nothing of its own to share
        return self.given


@pytest.mark.parametrize("spec", ["wds:{root}/missing/shard-*.tar", "list:{root}/missing.tsv"])
def test_the_other_processes_take_the_main_processs_shards_and_lists_without_reading_them(spec, tmp_path):
    from simclr_dali.pipelines.sources import Source
    main_source = Source("main's", torch.zeros(3, dtype=torch.long).numpy(), files=["a", "b", "c"])
    # the path does not exist: a process that read it would stop with a sentence
    assert load_source(spec.format(root=tmp_path), "train", screen=Follower(main_source)) is main_source


def test_parts_hold_each_image_once_and_join_in_the_sources_order():
    import numpy as np

    from simclr_dali.pipelines.sources import Source
    shards = Source("s", np.full(18, -1), shards=[f"{i}.tar" for i in range(4)], indexes=[f"{i}.idx" for i in range(4)],
                    counts=[5, 5, 5, 3], nbytes=1800)
    for world in (1, 2, 3, 5):
        parts = [shards.part(r, world) for r in range(world)]
        assert sum(len(p) for p in parts) == 18 and sorted(s for p in parts for s in p.shards) == shards.shards
        order = shards.joined_order(world)
        # a row of the joined parts lands on the rows its shard holds in the source
        joined = [s for p in parts for s, n in zip(p.shards, p.counts) for _ in range(n)]
        source_rows = [s for s, n in zip(shards.shards, shards.counts) for _ in range(n)]
        assert sorted(order) == list(range(18)) and all(source_rows[o] == s for o, s in zip(order, joined))
    files = Source("f", np.arange(7), files=[str(i) for i in range(7)])
    for world in (1, 2, 3, 8):
        joined = [f for r in range(world) for f in files.part(r, world).files]
        assert joined == files.files and list(files.joined_order(world)) == list(range(7))


# -- features and the probe at ImageNet's size -------------------------------------------------------
class Scaled(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, images):
        return images.flatten(1)[:, :64] * self.scale


@pytest.mark.parametrize("scale,dtype", [(1.0, torch.float16), (1e6, torch.float32)])
def test_features_go_into_one_16_bit_buffer_unless_beyond_its_range(scale, dtype):
    from simclr_dali.models.features import extract
    from simclr_dali.pipelines.loader import eval_loader
    source = load_source("digits", "test")
    loader = eval_loader(source, batch_size=64, size=32, workers=1, device_id=None)
    x, y = extract(Scaled(scale), loader, torch.device("cpu"))
    assert x.dtype == dtype and x.shape == (len(source), 64) and y.tolist() == source.labels.tolist()
    again, _ = extract(Scaled(1.0), eval_loader(source, batch_size=100, size=32, workers=1, device_id=None),
                       torch.device("cpu"))  # the oracle: the float32 features of one pass, rounded once
    assert torch.equal(x, (again.float() * scale).to(dtype)) if scale == 1.0 else torch.isfinite(x).all()


def test_the_probe_standardises_from_column_statistics_without_a_copy():
    from simclr_dali.evaluation.probes import column_stats
    x = torch.randn(1000, 32, dtype=torch.float64) * torch.linspace(0.1, 100, 32) + torch.linspace(-50, 50, 32)
    mean, std = column_stats(x.half(), rows=128)  # blocks of rows, summed in float64
    oracle = x.half().double()
    assert torch.allclose(mean.double(), oracle.mean(0), rtol=1e-6, atol=1e-6)
    assert torch.allclose(std.double(), oracle.std(0), rtol=1e-5)


def test_the_monitors_bank_is_drawn_per_class():
    import numpy as np

    from simclr_dali.training.monitor import per_class_draw
    labels = np.array([0] * 50 + [1] * 3 + [2] * 30 + [-1] * 5)
    picked = per_class_draw(labels, 20, np.random.default_rng(0))
    assert np.bincount(labels[picked]).tolist() == [20, 3, 20] and len(set(picked)) == len(picked)
    assert list(picked) == sorted(picked)


def test_the_monitor_reads_shards_draws_once_per_class_and_scores_as_an_offline_knn(tmp_path):
    """Tar shards carry their labels: the first call draws the test images and the bank's shards and images,
    every call reads the same ones; the score is the kNN of those images' features, computed apart."""
    import numpy as np

    from simclr_dali.models.features import extract, knn_top1
    from simclr_dali.pipelines.loader import eval_loader
    from simclr_dali.pipelines.sources import load_folder
    from simclr_dali.pipelines.webdataset import TEST_PREFIX, write_shards
    from simclr_dali.training.monitor import KnnMonitor
    source = load_folder(str(make_folder(tmp_path / "images", per_class=12)), "all")  # 3 classes of 12
    order = np.random.default_rng(1).permutation(len(source))  # classes mixed, as pipelines.pack writes them
    write_shards(source.files, source.labels, tmp_path / "shards", shard_size=4, order=order)
    write_shards(source.files, source.labels, tmp_path / "shards", shard_size=4, order=order[:12], prefix=TEST_PREFIX)
    spec = f"wds:{tmp_path / 'shards' / 'shard-*.tar'}"
    train, test = load_source(spec, "train"), load_source(spec, "test")
    monitor = KnnMonitor(train, test, per_class=2, n_train=3, n_test=5, size=32, batch_size=4, workers=1,
                         device_id=None, k=3)
    model, cpu = Scaled(1.0), torch.device("cpu")
    first = monitor(model, cpu)
    assert len(monitor.test.keep) == 5 and len(monitor.bank.source.shards) >= 3  # 3 x 2 x 3 images read
    kwargs = dict(batch_size=4, size=32, workers=1, device_id=None)
    bx, by = extract(model, eval_loader(monitor.bank.source, **kwargs), cpu)
    tx, ty = extract(model, eval_loader(monitor.test.source, **kwargs), cpu)
    bank, tests = torch.from_numpy(monitor.bank.keep), torch.from_numpy(monitor.test.keep)
    assert np.bincount(by[bank].numpy()).tolist() == [2, 2, 2]
    assert first == knn_top1(bx[bank], by[bank], tx[tests], ty[tests], k=3)
    assert monitor(model, cpu) == first and len(monitor) == 11  # the same images again
