"""Tar shards written by other tools train and evaluate without an index beside them: the webdataset
library's TarWriter, img2dataset's layout (00000.tar holding 000000000.jpg, .txt, .json) and a plain tar of
a folder (a `./` entry, members in the folder's order, upper-case .JPEG). Each sample i is a solid grey
JPEG of value 20 + 4 i with i as its .cls (img2dataset's have none), so a view names its sample by its
grey and a label by its text, and a pairing of one sample's image with another's label shows.
"""
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_here
from PIL import Image
from wds2idx import IndexCreator

from simclr_dali.errors import UserError
from simclr_dali.pipelines import index as index_command
from simclr_dali.pipelines import webdataset as wds
from simclr_dali.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, Augment
from simclr_dali.pipelines.loader import Shard, eval_loader, train_loader
from simclr_dali.pipelines.sources import load_source
from simclr_dali.pipelines.webdataset import index_tar, write_shards

N, BATCH = 48, 8  # samples in every layout: 6 training steps of 8, every sample once an epoch


def grey(i: int) -> int:
    return 20 + 4 * i


def tiny_jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(root: Path) -> str:
    import webdataset

    for shard in range(2):
        with webdataset.TarWriter(str(root / f"shard-{shard:06d}.tar")) as sink:
            for i in range(shard * N // 2, (shard + 1) * N // 2):
                sink.write({"__key__": f"sample{i:04d}", "jpg": tiny_jpeg(grey(i)), "cls": str(i)})
    return f"wds:{root / 'shard-*.tar'}"


def write_img2dataset(root: Path) -> str:
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * N // 2, (shard + 1) * N // 2):
                key = f"{shard:05d}{i - shard * N // 2:04d}"
                add(tar, f"{key}.jpg", tiny_jpeg(grey(i)))
                add(tar, f"{key}.txt", f"a grey square, {grey(i)}".encode())
                add(tar, f"{key}.json", json.dumps({"key": key, "status": "success", "width": 8}).encode())
    return f"wds:{root / '*.tar'}"


def write_tar_of_folder(root: Path, seed: int = 0) -> str:
    """A folder tarred the way `tar -C folder -cf images.tar .` does: a `./` entry, then the folder's files
    in the order it lists them (here shuffled), so a sample's image and label are rarely adjacent. Half the
    images are .JPEG; a label without an image and a text file are samples without one."""
    folder = root / "folder"
    folder.mkdir()
    for i in range(N):
        (folder / f"{i:06d}.{'JPEG' if i % 2 else 'jpg'}").write_bytes(tiny_jpeg(grey(i)))
        (folder / f"{i:06d}.cls").write_text(str(i))
    (folder / "000999.cls").write_text("999")
    (folder / "notes.txt").write_text("no image here")
    names = np.random.default_rng(seed).permutation(sorted(os.listdir(folder)))
    with tarfile.open(root / "images.tar", "w") as tar:
        tar.add(folder, arcname=".", recursive=False)
        for name in names:
            tar.add(folder / name, arcname=f"./{name}")
    shutil.rmtree(folder)
    return f"wds:{root / 'images.tar'}"


LAYOUTS = {"webdataset": write_webdataset, "img2dataset": write_img2dataset, "tar of a folder": write_tar_of_folder}
LABELLED = {"webdataset": True, "img2dataset": False, "tar of a folder": True}


@pytest.fixture(params=list(LAYOUTS))
def foreign(request, tmp_path) -> tuple[str, str]:
    """(layout, `wds:` spec) of freshly written shards with no index beside them."""
    root = tmp_path / "shards"
    root.mkdir()
    return request.param, LAYOUTS[request.param](root)


def greys(views: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) normalised views of solid images -> (B,) their sample numbers, read from the grey."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3), torch.tensor(IMAGENET_STD).view(1, 3)
    pixel = (views.float().mean(dim=(2, 3)) * std + mean).mean(dim=1).numpy()  # (B,) 0-255
    samples = np.round((pixel - 20) / 4).astype(int)
    assert np.abs(pixel - (20 + 4 * samples)).max() < 1.5  # JPEG rounds a solid grey by a level at most
    return samples


def test_foreign_shards_load_with_every_sample_counted_once(foreign):
    layout, spec = foreign
    shards = sorted(Path(spec[4:]).parent.glob("*.tar"))
    assert not list(Path(spec[4:]).parent.glob("*.idx"))  # the premise: nobody indexed them
    for source in (load_source(spec, "train"), load_source(spec, "train", spec)):  # "train", then "all"
        assert len(source) == N, layout
        assert source.indexes == [str(s.with_suffix(".idx")) for s in shards]  # written beside them


def test_foreign_shards_evaluate_every_sample_once_with_its_label(foreign):
    layout, spec = foreign
    source = load_source(spec, "train")
    seen, labels = [], []
    for view, label in eval_loader(source, batch_size=BATCH, size=8, workers=1, device_id=None):
        seen += greys(view).tolist()
        labels += label.tolist()
    assert sorted(seen) == list(range(N))
    assert labels == (seen if LABELLED[layout] else [-1] * N)  # each image with its own label


def test_foreign_shards_train_every_sample_once_with_its_label(foreign):
    """A training epoch (colour jitter off, so that a view keeps its grey: crops, flips, greyscale and blur
    of a solid image do not change it) reads every sample once, each image with its own label."""
    layout, spec = foreign
    source = load_source(spec, "train")
    loader = train_loader(source, batch_size=BATCH, size=8, aug=Augment(jitter_p=0.0), shard=Shard(), seed=0,
                          epoch=0, workers=1, device_id=None)
    seen, labels = [], []
    for view1, view2, label in loader:
        assert greys(view1).tolist() == greys(view2).tolist()
        seen += greys(view1).tolist()
        labels += label.tolist()
    assert len(loader) == N // BATCH and sorted(seen) == list(range(N))
    assert labels == (seen if LABELLED[layout] else [-1] * N)


def test_our_index_is_wds2idx_s_and_pack_s_where_members_are_in_order(tmp_path):
    """Where a sample's members are adjacent, our index is byte for byte what DALI's wds2idx writes of the
    webdataset library's shards, and what pipelines.pack writes beside its own."""
    write_webdataset(tmp_path)
    for shard in sorted(tmp_path.glob("*.tar")):
        with IndexCreator(str(shard), str(tmp_path / "theirs.idx"), verbose=False) as creator:
            creator.create_index()
        assert index_tar(str(shard)) == ((tmp_path / "theirs.idx").read_text(), N // 2, 0)
    files = []
    for i in range(5):
        files.append(tmp_path / "images" / f"{i}.{'png' if i % 2 else 'jpg'}")
        files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), grey(i), np.uint8)).save(files[-1])
    [packed] = write_shards([str(f) for f in files], np.array([0, 1, -1, 1, 0]), tmp_path / "packed", shard_size=5)
    assert index_tar(str(packed)) == (packed.with_suffix(".idx").read_text(), 5, 0)


def test_our_index_of_an_out_of_order_tar_places_each_sample_where_the_tar_holds_it(tmp_path):
    """Each line of the index reads back, at its offsets in the tar, a JPEG of the grey of the label beside
    it: the members of one sample, wherever they lie. The two samples without an image are left out."""
    spec = write_tar_of_folder(tmp_path)
    text, count, left_out = index_tar(spec[4:])
    lines = text.splitlines()
    assert (lines[0], count, left_out, len(lines)) == (f"v1.2 {N}", N, 2, N + 1)
    data = Path(spec[4:]).read_bytes()
    found = {}
    for line in lines[1:]:
        parts = line.split()
        components = {ext.lower(): data[int(o):int(o) + int(n)] for ext, o, n in zip(parts[::4], parts[1::4],
                                                                                     parts[2::4])}
        i = int(components["cls"])
        assert components["jpeg" if i % 2 else "jpg"] == tiny_jpeg(grey(i)) and set(components) == {
            "cls", "jpeg" if i % 2 else "jpg"}
        found[i] = parts[3::4]
    assert sorted(found) == list(range(N))
    assert sorted(found[7]) == ["./000007.JPEG", "./000007.cls"]


def wds2idx(shard: str) -> Path:
    index = Path(shard).with_suffix(".idx")
    with IndexCreator(shard, str(index), verbose=False) as creator:
        creator.create_index()
    return index


def test_upper_case_extensions_are_images(tmp_path):
    """.JPEG members, in order and indexed by DALI's wds2idx (as it wrote them, upper case), are read:
    DALI matches extensions case-sensitively unless told not to, and gave the decoder empty samples."""
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(N):
            add(tar, f"{i:06d}.JPEG", tiny_jpeg(grey(i)))
            add(tar, f"{i:06d}.CLS" if i % 3 == 0 else f"{i:06d}.cls", str(i).encode())
    assert "JPEG" in wds2idx(str(shard)).read_text()
    source = load_source(f"wds:{shard}", "train")
    assert source.indexes == [str(shard.with_suffix(".idx"))] and len(source) == N
    batches = list(eval_loader(source, batch_size=BATCH, size=8, workers=1, device_id=None))
    assert [i for view, _ in batches for i in greys(view)] == list(range(N))
    assert [i for _, label in batches for i in label.tolist()] == list(range(N))


def test_a_wds2idx_index_of_an_out_of_order_tar_is_one_sentence_naming_the_command(tmp_path):
    spec = write_tar_of_folder(tmp_path)
    shard = spec[4:]
    index = wds2idx(shard)
    entries = index.read_text().splitlines()[1:]
    assert len(entries) > 2 * N - 10  # the defect: most members a sample of their own
    number, first = next((k, line.split()) for k, line in enumerate(entries, start=1)
                         if not any(e.lower() in ("jpg", "jpeg") for e in line.split()[::4]))
    with pytest.raises(UserError) as err:
        load_source(spec, "train")
    assert str(err.value) == (
        f"{index} lists sample {number} of shard {shard} ({first[3]}) without an image, as DALI's wds2idx does "
        f"where a sample's members are not next to each other in the tar: index the shard with "
        f"'python -m simclr_dali.pipelines.index {shard} --force'")


def test_the_index_command_writes_what_loading_writes_and_force_replaces_a_bad_index(tmp_path, capsys):
    spec = write_tar_of_folder(tmp_path)
    shard = Path(spec[4:])
    other = tmp_path / "copy" / "images.tar"
    other.parent.mkdir()
    shutil.copy(shard, other)
    load_source(f"wds:{other}", "train")  # loading indexes it
    assert index_command.main([str(shard)]) == 0
    assert capsys.readouterr().out == ("wrote 1 index file(s) of 48 samples beside the shards; 2 sample(s) "
                                       "without an image left out\n")
    assert shard.with_suffix(".idx").read_text() == other.with_suffix(".idx").read_text() == index_tar(str(shard))[0]
    assert index_command.main([str(tmp_path / "*.tar")]) == 0  # a glob; the index is kept without --force
    assert capsys.readouterr().out == "wrote no index files; 1 shard(s) already had one, kept (--force replaces it)\n"
    wds2idx(str(shard))
    with pytest.raises(UserError, match="without an image"):
        load_source(spec, "train")
    assert index_command.main([str(shard), "--force"]) == 0
    assert shard.with_suffix(".idx").read_text() == index_tar(str(shard))[0]
    assert len(load_source(spec, "train")) == N


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder this process cannot write (as root, chmod does not stop it: writes there are refused as the
    file system would), and an empty cache."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    spec = write_tar_of_folder(folder)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = wds.write_atomically

    def refused(text, path):
        if path.parent == folder:
            raise PermissionError(13, "Permission denied", str(path))
        real(text, path)

    if os.geteuid() == 0:
        monkeypatch.setattr(wds, "write_atomically", refused)
    folder.chmod(0o555)
    yield spec, folder, tmp_path / "cache" / "simclr-dali" / "wds-index"
    folder.chmod(0o755)


def test_a_shard_in_a_read_only_folder_is_indexed_in_the_cache(read_only, capsys):
    spec, folder, cache = read_only
    shard = spec[4:]
    source = load_source(spec, "train")
    assert len(source) == N and sorted(os.listdir(folder)) == ["images.tar"]
    [index] = source.indexes
    assert Path(index).parent == cache and Path(index).read_text() == index_tar(shard)[0]
    written = Path(index).stat().st_mtime_ns
    assert load_source(spec, "train").indexes == [index] and Path(index).stat().st_mtime_ns == written  # found
    labels = torch.cat([y for _, y in eval_loader(source, batch_size=BATCH, size=8, workers=1, device_id=None)])
    assert sorted(labels.tolist()) == list(range(N))
    assert index_command.main([shard, "--force"]) == 0
    assert capsys.readouterr().out == (f"wrote 1 index file(s) of 48 samples in {cache}; 2 sample(s) without an "
                                       f"image left out\n")
    stat = os.stat(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the shard written again
    again = load_source(spec, "train").indexes
    assert again != [index] and Path(again[0]).parent == cache and len(os.listdir(cache)) == 2


def test_names_with_spaces_or_bytes_outside_utf8_are_indexed(tmp_path):
    """DALI's index splits on whitespace and is read as UTF-8: such a name is written escaped (DALI only
    reports it), the sample read all the same, and an extension with a space is no component of it."""
    shard = tmp_path / "shard-000000.tar"
    names = ["a photo", "caf\u00e9", "raw\udcff", "tab\there"]  # \udcff: the byte 0xff of a Latin-1 name
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for i, key in enumerate(names):
            add(tar, f"{key}.jpg", tiny_jpeg(grey(i)))
            add(tar, f"{key}.cls", str(i).encode())
        add(tar, "a photo.my notes", b"left out")
    text, count, left_out = index_tar(str(shard))
    assert (count, left_out) == (4, 0)
    assert [line.split()[3::4] for line in text.splitlines()[1:]] == [
        ["a_photo.jpg", "a_photo.cls"], ["caf\u00e9.jpg", "caf\u00e9.cls"], ["raw\\udcff.jpg", "raw\\udcff.cls"],
        ["tab_here.jpg", "tab_here.cls"]]
    source = load_source(f"wds:{shard}", "train")
    batches = list(eval_loader(source, batch_size=4, size=8, workers=1, device_id=None))
    assert [i for view, label in batches for i in greys(view)] == [0, 1, 2, 3]
    assert [i for view, label in batches for i in label.tolist()] == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["compressed", "no images", "not a tar"])
def test_a_tar_that_cannot_be_indexed_is_one_sentence(tmp_path, kind):
    shard = tmp_path / "shard-000000.tar"
    if kind == "compressed":
        with tarfile.open(shard, "w:gz") as tar:
            add(tar, "a.jpg", tiny_jpeg(20))
        said = f"{shard} cannot be read as an uncompressed tar file ("
    elif kind == "no images":
        with tarfile.open(shard, "w") as tar:
            add(tar, "a.cls", b"1")
            add(tar, "a.gif", b"GIF89a")
        said = f"shard {shard} holds no images (members named KEY.EXT, EXT one of bmp;jpeg;jpg;"
    else:
        shard.write_bytes(b"not a tar file" * 100)
        said = f"{shard} cannot be read as an uncompressed tar file ("
    with pytest.raises(UserError) as err:
        load_source(f"wds:{shard}", "train")
    assert str(err.value).startswith(said) and len(str(err.value).splitlines()) == 1
    assert not shard.with_suffix(".idx").exists()


@pytest.mark.slow  # trains
def test_a_run_trains_and_evaluates_on_a_tar_of_a_folder(tmp_path, capsys):
    from simclr_dali.evaluation import evaluate

    spec = write_tar_of_folder(tmp_path)
    out = tmp_path / "run"
    assert train_here("--data", spec, "--out", str(out), "--epochs", "1") == 0
    assert json.loads((out / "config.json").read_text())["n_train"] == N
    assert evaluate.main(["--run", str(out), "--test-data", spec, "--batch-size", "8", "--workers", "1",
                          "--probe-epochs", "2", "--knn-k", "5", "--no-plots"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (result["n_train"], result["n_test"]) == (N, N)
