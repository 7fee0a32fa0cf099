"""Where images come from: a folder, the built-in digits, CIFAR pickles.

A source is either a list of encoded files (decoded by DALI) or an array of decoded RGB images
(fed through `external_source`, skipping the decoder). Labels are only for evaluation; -1 = none.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from simclr_dali.errors import UserError
from simclr_dali.pipelines import IMAGE_EXTENSIONS

HOLDOUT_FRACTION = 0.1  # a single folder keeps this much aside as its test split (pipelines.pack: of each class)
DIGITS_SIZE = 32
LIST_HEADER = "# simclr image list v1"  # first line of a list written by `python -m simclr_dali.pipelines.verify`
Screen = Callable[[list[str], Path], list[int]]  # (files, their folder) -> indices of the ones to keep


@dataclass
class Source:
    name: str
    labels: np.ndarray  # (N,) int64, -1 when unlabeled
    files: list[str] | None = None  # encoded images, decoded by DALI
    images: np.ndarray | None = None  # (N, H, W, 3) uint8, already decoded
    classes: list[str] = field(default_factory=list)
    shards: list[str] | None = None  # WebDataset tar shards, read by DALI (labels come with them)
    indexes: list[str] | None = None  # their DALI index files
    nbytes: int = 0  # tar shards: their samples' encoded bytes (what a shuffle buffer holds)
    counts: list[int] | None = None  # tar shards: the samples in each

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def encoded(self) -> bool:
        return self.files is not None

    @property
    def remote(self) -> bool:
        """Tar shards in a bucket (pipelines.bucket)."""
        from simclr_dali.pipelines import bucket
        return bool(self.shards) and bucket.is_remote(self.shards[0])

    def subset(self, index: np.ndarray) -> "Source":
        files = [self.files[i] for i in index] if self.files is not None else None
        images = self.images[index] if self.images is not None else None
        return Source(self.name, self.labels[index], files, images, self.classes)

    def part(self, rank: int, world: int) -> "Source":
        """Process `rank`'s part of `world`, for work split across processes: a contiguous run of the images,
        or of tar shards every world-th shard (DALI reads a shard whole); parts in rank order hold each image
        once."""
        if world == 1:
            return self
        if self.shards is not None:
            return self.pick_shards(range(rank, len(self.shards), world))
        per = -(-len(self) // world)
        return self.subset(np.arange(rank * per, min(len(self), (rank + 1) * per)))

    def joined_order(self, world: int) -> np.ndarray:
        """Where each image of the parts (`part`), joined in rank order, stands in this source: the identity
        for images, a reordering for tar shards (every world-th shard to a part)."""
        if self.shards is None or world == 1:
            return np.arange(len(self))
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        return np.concatenate([np.arange(starts[j], starts[j + 1]) for r in range(world)
                               for j in range(r, len(self.shards), world)] or [np.zeros(0, dtype=np.int64)])

    def pick_shards(self, pick) -> "Source":
        """The tar shards at positions `pick`, as a source of their own."""
        counts = [self.counts[i] for i in pick]
        return Source(self.name, np.full(sum(counts), -1, dtype=np.int64), classes=self.classes,
                      shards=[self.shards[i] for i in pick], indexes=[self.indexes[i] for i in pick],
                      nbytes=self.nbytes * sum(counts) // max(1, len(self)), counts=counts)


def load_source(spec: str, split: str = "train", test_spec: str | None = None,
                screen: Screen | None = None) -> Source:
    """The `split` ("train" or "test") of the data named by `spec` (README, Training on your own images).

    `screen` sees every file of a folder before the held-out split and returns the indices of the
    ones to keep (pipelines.verify drops files DALI cannot decode); image lists are already screened.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split == "test" and test_spec:
        return _load(test_spec, "all", screen)
    if split == "train" and test_spec:
        return _load(spec, "all", screen)
    return _load(spec, split, screen)


def _load(spec: str, split: str, screen: Screen | None = None) -> Source:
    if spec == "digits":
        return load_digits(split)
    kind, sep, path = spec.partition(":")
    if sep and kind == "wds":
        return on_main(screen, lambda: load_webdataset(path, split))
    if sep and kind in ("cifar10", "cifar100"):
        return load_cifar(kind, path, split)
    if sep and kind == "list":
        return on_main(screen, lambda: load_list(path, split))
    if is_image_list(spec):
        return on_main(screen, lambda: load_list(spec, split))
    return load_folder(spec, split, screen)


def on_main(screen: Screen | None, work: Callable):
    """work() done once: with several processes (a screen that shares), by the main process, its result given
    to the others, which neither parse the shards' indexes nor stat an image list's files themselves."""
    share = getattr(screen, "share", None)
    if share is None:
        return work()
    return share(work() if screen.main else None)


# -- WebDataset tar shards (see pipelines/webdataset.py) ------------------------------------------
def load_webdataset(pattern: str, split: str) -> Source:
    """Tar shards. "train": those matching the pattern, less any test shard; "test": the test shards
    (test-NNNNNN.tar, a stratified held-out part written by pipelines.pack --holdout) beside them;
    "all": every match. Labels arrive with the samples (.cls), so they are unknown (-1) here."""
    from simclr_dali.pipelines.webdataset import (
        TEST_PREFIX,
        TRAIN_PREFIX,
        find_shards,
        is_test_shard,
        read_indexes,
        test_shards_beside,
    )

    shards = find_shards(pattern)
    if split == "train":
        shards = [s for s in shards if not is_test_shard(s)]
        if not shards:
            raise UserError(f"wds:{pattern} matches only test shards ({TEST_PREFIX}NNNNNN.tar), which training "
                            f"never reads: name the training shards ({TRAIN_PREFIX}NNNNNN.tar)")
    elif split == "test":
        shards = test_shards_beside(shards)
        if not shards:
            raise UserError(f"wds:{pattern} has no test shards ({TEST_PREFIX}NNNNNN.tar beside its shards, which "
                            f"'python -m simclr_dali.pipelines.pack' writes with --holdout): evaluate it with "
                            f"--test-data")
    indexes, counts, nbytes = read_indexes(shards)
    return Source(f"wds:{pattern}", np.full(sum(counts), -1, dtype=np.int64), shards=shards, indexes=indexes,
                  nbytes=nbytes, counts=counts)


# -- built-in: scikit-learn's digits, upscaled to 32 px RGB ------------------------------------
def load_digits(split: str) -> Source:
    from PIL import Image
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    small = (data.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC))
                    for im in small])
    images = np.repeat(big[..., None], 3, axis=-1)  # (1797, 32, 32, 3)
    labels = data.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels)
    index = {"train": train, "test": test, "all": np.arange(len(labels))}[split]
    index = np.sort(index)
    return Source("digits", labels[index], images=images[index], classes=[str(d) for d in range(10)])


# -- CIFAR-10/100 python pickles, through a restricted unpickler ---------------------------------
class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes and NumPy arrays; refuses every other global (no code runs)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes; pure
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_restricted_pickle(path: Path):
    try:
        with open(path, "rb") as f:
            return _ArrayOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise UserError(f"{path} is not a plain CIFAR batch ({err}); refusing to load it") from None
    except Exception as err:  # truncated or not a pickle at all
        raise UserError(f"{path} cannot be read as a CIFAR batch ({type(err).__name__})") from None


def read_cifar_batch(path: Path) -> dict:
    batch = read_restricted_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch:
        raise UserError(f"{path} is not a CIFAR batch: it has no 'data' entry")
    return batch


def load_cifar(kind: str, path: str, split: str) -> Source:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"CIFAR folder {root} does not exist")
    if kind == "cifar10":
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key, meta_name, meta_key = b"labels", "batches.meta", b"label_names"
    else:
        names = {"train": ["train"], "test": ["test"]}
        label_key, meta_name, meta_key = b"fine_labels", "meta", b"fine_label_names"
    names["all"] = names["train"] + names["test"]
    images, labels = [], []
    for name in names[split]:
        file = root / name
        if not file.is_file():
            raise UserError(f"{kind} batch {file} is missing")
        batch = read_cifar_batch(file)
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        images.append(np.ascontiguousarray(data))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    classes = []
    if (root / meta_name).is_file():
        meta = read_restricted_pickle(root / meta_name)
        classes = [c.decode() for c in meta.get(meta_key, [])] if isinstance(meta, dict) else []
    return Source(kind, np.concatenate(labels), images=np.concatenate(images), classes=classes)


# -- a folder of images; class sub-folders give labels -------------------------------------------
def list_images(root: Path) -> list[str]:
    """The image files under `root`, sorted, as paths below it (`root/a/b.jpg`). os.scandir tells files from
    folders by the entry's type, without a stat per file (only a symbolic link is followed, to see what it
    points to); linked folders are not entered (as Path.rglob). A few microseconds per file, where a stat per
    file cost about 25 at ImageNet's size."""
    found, folders = [], [os.fspath(root)]
    while folders:
        try:
            entries = list(os.scandir(folders.pop()))
        except OSError:  # unreadable, or gone meanwhile: skipped, as rglob does
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                found.append(entry.path)
    found.sort(key=lambda path: path.replace(os.sep, "\0"))  # Path's order, folder by folder: the separator first
    return found


def load_folder(path: str, split: str, screen: Screen | None = None) -> Source:
    root = Path(path)
    if not root.exists():
        raise UserError(f"data path {root} does not exist (expected a folder of images, 'digits', "
                        f"'cifar10:PATH' or 'cifar100:PATH')")
    if not root.is_dir():
        raise UserError(f"data path {root} is neither a folder of images nor an image list "
                        f"written by `python -m simclr_dali.pipelines.verify`")
    if not any(root.iterdir()):
        raise UserError(f"data folder {root} is empty")
    files = on_main(screen, lambda: list_images(root))  # several processes: one lists, the others take its list
    if not files:
        raise UserError(f"data folder {root} holds no images "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    start = len(os.fspath(root).rstrip(os.sep)) + 1
    tops = [f[start:].partition(os.sep) for f in files]  # (class folder, sep, rest); sep is empty at the top
    classes = sorted({top for top, sep, _ in tops if sep})
    if classes and all(sep for _, sep, _ in tops):
        lookup = {c: i for i, c in enumerate(classes)}
        labels = np.array([lookup[top] for top, _, _ in tops], dtype=np.int64)
    else:  # a flat (or mixed) folder is unlabeled
        classes, labels = [], np.full(len(files), -1, dtype=np.int64)
    source = Source(str(root), labels, files=files, classes=classes)
    if screen is not None:
        source = source.subset(np.asarray(screen(source.files, root), dtype=np.int64))
        if not len(source):
            raise UserError(f"none of the {len(files)} images in {root} can be decoded")
    return holdout(source, split)


def holdout(source: Source, split: str) -> Source:
    """A deterministic held-out split ("test": about HOLDOUT_FRACTION, "train": the rest, "all")."""
    if split == "all":
        return source
    n = len(source)
    order = np.random.default_rng(0).permutation(n)
    n_test = max(1, int(round(HOLDOUT_FRACTION * n))) if n > 1 else 0
    index = np.sort(order[:n_test] if split == "test" else order[n_test:])
    return source.subset(index)


# -- an image list: the files of a folder that `python -m simclr_dali.pipelines.verify` found decodable --------
# A text file: LIST_HEADER, "# root: ROOT", "# classes: A<TAB>B..." (empty when unlabeled), then one
# "RELATIVE/PATH<TAB>LABEL" line per image (label -1 when unlabeled).
def is_image_list(spec: str) -> bool:
    path = Path(spec)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(LIST_HEADER)) == LIST_HEADER.encode()


def write_image_list(path: Path, source: Source, root: Path) -> None:
    """Writes `source` (files under `root`) as an image list, atomically."""
    lines = [LIST_HEADER, f"# root: {root.resolve()}", "# classes: " + "\t".join(source.classes)]
    lines += [f"{Path(f).relative_to(root)}\t{y}" for f, y in zip(source.files, source.labels)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_list(path: str, split: str) -> Source:
    file = Path(path)
    if not is_image_list(path):
        raise UserError(f"{file} is not an image list written by `python -m simclr_dali.pipelines.verify`")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"image list {file} is damaged (it holds binary data): run "
                        f"`python -m simclr_dali.pipelines.verify FOLDER --out {file}` again") from None
    lines = text.splitlines()
    if len(lines) < 3 or not lines[1].startswith("# root: ") or not lines[2].startswith("# classes:"):
        raise UserError(f"image list {file} lacks its '# root:' and '# classes:' header lines: run "
                        f"`python -m simclr_dali.pipelines.verify FOLDER --out {file}` again")
    again = f"run `python -m simclr_dali.pipelines.verify {lines[1][len('# root: '):]} --out {file}` again"
    if not text.endswith("\n"):  # every line ends with one: a list without it was cut short
        raise UserError(f"image list {file} is cut short (its last line is incomplete): {again}")
    root = Path(lines[1][len("# root: "):])
    classes = [c for c in lines[2][len("# classes:"):].strip().split("\t") if c]
    files, labels = [], []
    for number, line in enumerate(lines[3:], start=4):
        name, tab, label = line.rpartition("\t")
        if not tab or not label.lstrip("-").isdigit() or int(label) >= len(classes):
            raise UserError(f"line {number} of image list {file} is not 'PATH<TAB>LABEL' ({line[:80]!r}): {again}")
        files.append(str(root / name))
        labels.append(int(label))
    if not files:
        raise UserError(f"image list {file} names no images: {again}")
    missing = next((f for f in files if not os.path.isfile(f)), None)
    if missing is not None:
        raise UserError(f"{missing}, named in image list {file}, does not exist: "
                        f"run `python -m simclr_dali.pipelines.verify {root}` again")
    return holdout(Source(str(file), np.array(labels, dtype=np.int64), files=files, classes=classes), split)
