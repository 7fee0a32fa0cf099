"""WebDataset-style tar shards: one sample = `KEY.jpg` (or .png, ...) + optional `KEY.cls` (class
index as text), read by DALI's webdataset reader through index files beside the shards. Training
shards are named `shard-NNNNNN.tar`; the held-out test shards that `pipelines.pack` writes beside
them, `test-NNNNNN.tar` (a `wds:` source's test split, never read for training).

Index format (DALI's, version v1.2): a header `v1.2 N` then one line per sample listing each of its
components as `ext offset size name`.
"""
from __future__ import annotations

import glob
import io
import tarfile
from pathlib import Path

import numpy as np

from pipelines import IMAGE_EXTENSIONS
from simclr_dali.errors import UserError

IMAGE_EXTS = ";".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))  # DALI's ext: the folder source's list
LABEL_BYTES = 12  # .cls contents are padded to this many bytes on their way through DALI
TRAIN_PREFIX, TEST_PREFIX = "shard-", "test-"  # file names of training and test shards


def is_test_shard(path: str) -> bool:
    return Path(path).name.startswith(TEST_PREFIX)


def test_shards_beside(shards: list[str]) -> list[str]:
    """The test shards in the folders that hold `shards`, sorted."""
    folders = sorted({Path(s).parent for s in shards})
    return sorted(str(p) for folder in folders for p in folder.glob(f"{TEST_PREFIX}*.tar"))


def index_path(shard: str) -> str:
    return str(Path(shard).with_suffix(".idx"))


REINDEX = "write the shards again with 'python -m pipelines.pack', or index them with DALI's wds2idx"


def count_samples(index_file: str, shard: str) -> tuple[int, int]:
    """(samples, their encoded bytes) that a DALI webdataset index lists, after checking it whole: its
    'v1.2 N' header, N lines of 'EXT OFFSET SIZE NAME' components, each inside its tar shard."""
    path, shard = Path(index_file), Path(shard)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a DALI webdataset index (it holds binary data): {REINDEX}") from None
    header = lines[0].split()
    if len(header) != 2 or not header[0].startswith("v1") or not header[1].isdigit():
        raise UserError(f"{path} is not a DALI webdataset index (its first line should be 'v1.2 N'): {REINDEX}")
    count, entries = int(header[1]), [line for line in lines[1:] if line.strip()]
    if len(entries) != count or (count and lines[-1] != ""):
        raise UserError(f"{path} is cut short ({len(entries)} of the {count} samples it announces): {REINDEX}")
    end, nbytes = shard.stat().st_size, 0
    with open(shard, "rb") as tar:
        for number, line in enumerate(entries, start=2):
            parts = line.split()
            ok = parts and len(parts) % 4 == 0 and all(p.isdigit() for p in parts[1::4] + parts[2::4])
            if not ok:
                raise UserError(f"line {number} of {path} is not 'EXT OFFSET SIZE NAME': {REINDEX}")
            places = [(int(o), int(n)) for o, n in zip(parts[1::4], parts[2::4])]
            nbytes += sum(n for _, n in places)
            if max(o + n for o, n in places) > end:
                raise UserError(f"{shard} is cut short: its index {path} places sample {number - 1} past its end "
                                f"({end:,} bytes); {REINDEX}")
            if number in (2, count + 1):  # the first and last samples: their tar headers where the index says
                for offset, size in places:
                    tar.seek(offset - 512)
                    try:
                        header_ok = offset >= 512 and tarfile.TarInfo.frombuf(tar.read(512), "utf-8",
                                                                              "surrogateescape").size == size
                    except tarfile.HeaderError:
                        header_ok = False
                    if not header_ok:
                        raise UserError(f"{shard} is damaged: there is no tar header where its index {path} "
                                        f"places sample {number - 1}; {REINDEX}")
    return count, nbytes


def find_shards(pattern: str) -> list[str]:
    """Shards matching `pattern` (a glob), sorted."""
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise UserError(f"no tar shards match {pattern!r}")
    return shards


def read_indexes(shards: list[str]) -> tuple[list[str], list[int], int]:
    """The shards' index files (each checked whole), the samples in each and their encoded bytes in all."""
    indexes = [index_path(s) for s in shards]
    for shard, index in zip(shards, indexes):
        if not Path(index).is_file():
            raise UserError(f"shard {shard} has no index file {index}: write shards with "
                            f"'python -m pipelines.pack', or index them with DALI's wds2idx")
    counts, sizes = zip(*[count_samples(i, s) for s, i in zip(shards, indexes)])
    return indexes, list(counts), sum(sizes)


def parse_labels(padded: np.ndarray) -> np.ndarray:
    """(B, LABEL_BYTES) uint8 ASCII class indices, zero-padded -> (B,) int64; empty -> -1."""
    out = np.full(len(padded), -1, dtype=np.int64)
    for i, row in enumerate(padded):
        text = bytes(row).rstrip(b"\0").strip()
        if text:
            out[i] = int(text)
    return out


def write_shards(files: list[str], labels: np.ndarray, out: Path, shard_size: int, progress=None, *,
                 order: np.ndarray | None = None, prefix: str = TRAIN_PREFIX) -> list[Path]:
    """Pack encoded image files into tar shards PREFIXNNNNNN.tar of `shard_size` samples, each with its
    index: files[order] in that order (default: as given); a sample's key is its index in `files`."""
    out.mkdir(parents=True, exist_ok=True)
    order = np.arange(len(files)) if order is None else np.asarray(order)
    written = []
    for first in range(0, len(order), shard_size):
        shard = out / f"{prefix}{first // shard_size:06d}.tar"
        lines = []
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in order[first:first + shard_size]:
                key = f"{i:09d}"
                ext = Path(files[i]).suffix.lower().lstrip(".").replace("jpeg", "jpg")
                parts = [(ext, Path(files[i]).read_bytes())]
                if labels[i] >= 0:
                    parts.append(("cls", str(int(labels[i])).encode()))
                components = []
                for part_ext, data in parts:
                    info = tarfile.TarInfo(f"{key}.{part_ext}")
                    info.size, info.mode = len(data), 0o644
                    header_at = tar.offset
                    tar.addfile(info, io.BytesIO(data))
                    # a USTAR header with a short name is one 512-byte block; the data follows it
                    components.append(f"{part_ext} {header_at + 512} {len(data)} {info.name}")
                lines.append(" ".join(components))
                if progress:
                    progress()
        tmp = Path(index_path(str(shard)) + ".tmp")
        tmp.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
        tmp.replace(index_path(str(shard)))
        written.append(shard)
    return written
