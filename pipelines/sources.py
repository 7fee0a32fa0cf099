"""Where images come from: a folder, the built-in digits, CIFAR pickles.

A source is either a list of encoded files (decoded by DALI) or an array of decoded RGB images
(fed through `external_source`, skipping the decoder). Labels are only for evaluation; -1 = none.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cli import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm", ".pgm"}
HOLDOUT_FRACTION = 0.1  # a single folder keeps this much aside as its test split
DIGITS_SIZE = 32


@dataclass
class Source:
    name: str
    labels: np.ndarray  # (N,) int64, -1 when unlabeled
    files: list[str] | None = None  # encoded images, decoded by DALI
    images: np.ndarray | None = None  # (N, H, W, 3) uint8, already decoded
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def encoded(self) -> bool:
        return self.files is not None

    def subset(self, index: np.ndarray) -> "Source":
        files = [self.files[i] for i in index] if self.files is not None else None
        images = self.images[index] if self.images is not None else None
        return Source(self.name, self.labels[index], files, images, self.classes)


def load_source(spec: str, split: str = "train", test_spec: str | None = None) -> Source:
    """The `split` ("train" or "test") of the data named by `spec` (see README: Data)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split == "test" and test_spec:
        return _load(test_spec, "all")
    if split == "train" and test_spec:
        return _load(spec, "all")
    return _load(spec, split)


def _load(spec: str, split: str) -> Source:
    if spec == "digits":
        return load_digits(split)
    kind, sep, path = spec.partition(":")
    if sep and kind in ("cifar10", "cifar100"):
        return load_cifar(kind, path, split)
    return load_folder(spec, split)


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
def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def load_folder(path: str, split: str) -> Source:
    root = Path(path)
    if not root.exists():
        raise UserError(f"data path {root} does not exist (expected a folder of images, 'digits', "
                        f"'cifar10:PATH' or 'cifar100:PATH')")
    if not root.is_dir():
        raise UserError(f"data path {root} is not a folder of images")
    if not any(root.iterdir()):
        raise UserError(f"data folder {root} is empty")
    files = list_images(root)
    if not files:
        raise UserError(f"data folder {root} holds no images "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    top = {f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1}
    classes = sorted(top)
    if classes and all(len(f.relative_to(root).parts) > 1 for f in files):
        lookup = {c: i for i, c in enumerate(classes)}
        labels = np.array([lookup[f.relative_to(root).parts[0]] for f in files], dtype=np.int64)
    else:  # a flat (or mixed) folder is unlabeled
        classes, labels = [], np.full(len(files), -1, dtype=np.int64)
    source = Source(str(root), labels, files=[str(f) for f in files], classes=classes)
    if split == "all":
        return source
    order = np.random.default_rng(0).permutation(len(files))  # deterministic held-out split
    n_test = max(1, int(round(HOLDOUT_FRACTION * len(files)))) if len(files) > 1 else 0
    index = np.sort(order[:n_test] if split == "test" else order[n_test:])
    return source.subset(index)
