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
from test_bad_images import BAD, add_odd_files

from pipelines import verify
from pipelines.sources import list_images, load_source
from pipelines.verify import Screening
from simclr_dali.training import peers
from simclr_dali.training.setup import threads_per_process


def old_listing(root: Path) -> list[str]:
    """The oracle: what the listing was before (Path.rglob, a stat per file), in Path's order."""
    from pipelines import IMAGE_EXTENSIONS
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
    from pipelines import verdicts
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


@pytest.mark.parametrize("memory_mb", [4096.0, 0.05, 0.002])  # the whole bank; parts of 1/3 of it; of k rows
def test_the_knn_reads_a_bank_larger_than_its_memory_a_part_at_a_time_and_votes_alike(memory_mb):
    """The oracle: the full similarity matrix's top k, in float64 (ties apart, the same neighbours)."""
    from models.features import knn_top1
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(300, 16, generator=gen, dtype=torch.float64), torch.randn(70, 16, generator=gen,
                                                                                            dtype=torch.float64)
    train_y, test_y = torch.randint(0, 5, (300,), generator=gen), torch.randint(0, 5, (70,), generator=gen)
    sim = torch.nn.functional.normalize(test_x, dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
    top_sim, top_idx = sim.topk(20, dim=1)
    votes = torch.zeros(70, 5, dtype=torch.float64).scatter_add_(1, train_y[top_idx], (top_sim / 0.1).exp())
    expected = (votes.argmax(1) == test_y).double().mean().item()
    assert knn_top1(train_x, train_y, test_x, test_y, k=20, temperature=0.1, chunk=32, memory_mb=memory_mb) == expected
