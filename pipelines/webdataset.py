"""WebDataset-style tar shards: one sample = `KEY.jpg` (or .png, ...) + optional `KEY.cls` (class
index as text), read by DALI's webdataset reader through index files beside the shards. Training
shards are named `shard-NNNNNN.tar`; the held-out test shards that `pipelines.pack` writes beside
them, `test-NNNNNN.tar` (a `wds:` source's test split, never read for training).

Index format (DALI's, version v1.2): a header `v1.2 N` then one line per sample listing each of its
components as `ext offset size name`. Shards written by any tool (the webdataset library, img2dataset,
`tar -cf` on a folder) are indexed here (`index_tar`) where they come without one: written beside the
shard, or in a cache folder where that folder cannot be written (`python -m simclr_dali.pipelines.index` does it
ahead).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import re
import shlex
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from simclr_dali.errors import UserError
from simclr_dali.pipelines import IMAGE_EXTENSIONS, cache_home

IMAGE_SUFFIXES = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # a component's ext, lower-cased
IMAGE_EXTS = ";".join(sorted(IMAGE_SUFFIXES))  # DALI's ext (matched case-insensitively): the folder source's list
LABEL_BYTES = 12  # .cls contents are padded to this many bytes on their way through DALI
TRAIN_PREFIX, TEST_PREFIX = "shard-", "test-"  # file names of training and test shards


def is_test_shard(path: str) -> bool:
    return Path(path).name.startswith(TEST_PREFIX)


def test_shards_beside(shards: list[str]) -> list[str]:
    """The test shards in the folders that hold `shards`, sorted."""
    from simclr_dali.pipelines import bucket

    if shards and bucket.is_remote(shards[0]):
        folders = sorted({s.rsplit("/", 1)[0] for s in shards})
        return sorted(url for folder in folders for url in bucket.list_matching(f"{folder}/{TEST_PREFIX}*.tar"))
    folders = sorted({Path(s).parent for s in shards})
    return sorted(str(p) for folder in folders for p in folder.glob(f"{TEST_PREFIX}*.tar"))


def index_path(shard: str) -> str:
    return str(Path(shard).with_suffix(".idx"))


def index_command(shard: str) -> str:
    """The command that writes our index of `shard`, replacing the one it has."""
    return f"python -m simclr_dali.pipelines.index {shlex.quote(str(shard))} --force"


def reindex(shard: str) -> str:
    """How a bad index is made good: the end of every sentence about one."""
    return (f"write the shards again with 'python -m simclr_dali.pipelines.pack', or index the shard again with "
            f"'{index_command(shard)}'")


def count_samples(index_file: str, shard: str, end: int | None = None) -> tuple[int, int]:
    """(samples, their encoded bytes) that a DALI webdataset index lists, after checking it whole: its
    'v1.2 N' header, N lines of 'EXT OFFSET SIZE NAME' components, each sample with an image, each component
    inside its tar shard (of `end` bytes; default: its size on disk). A shard in a bucket (pipelines.bucket)
    is read the same way, its index whole and the tar headers checked by ranged reads."""
    from simclr_dali.pipelines import bucket

    remote = bucket.is_remote(shard)
    path, shard = (index_file, shard) if remote else (Path(index_file), Path(shard))
    again = reindex(str(shard))
    try:
        lines = (bucket.read_bytes(path).decode("utf-8") if remote else path.read_text(encoding="utf-8")).split("\n")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a DALI webdataset index (it holds binary data): {again}") from None
    header = lines[0].split()
    if len(header) != 2 or not header[0].startswith("v1") or not header[1].isdigit():
        raise UserError(f"{path} is not a DALI webdataset index (its first line should be 'v1.2 N'): {again}")
    count, entries = int(header[1]), [line for line in lines[1:] if line.strip()]
    if len(entries) != count or (count and lines[-1] != ""):
        raise UserError(f"{path} is cut short ({len(entries)} of the {count} samples it announces): {again}")
    end, nbytes = (end if end is not None else shard.stat().st_size), 0
    with (contextlib.nullcontext(bucket.RangedObject(shard)) if remote else open(shard, "rb")) as tar:
        for number, line in enumerate(entries, start=2):
            parts = line.split()
            ok = parts and len(parts) % 4 == 0 and all(p.isdigit() for p in parts[1::4] + parts[2::4])
            if not ok:
                raise UserError(f"line {number} of {path} is not 'EXT OFFSET SIZE NAME': {again}")
            if not any(ext.lower() in IMAGE_SUFFIXES for ext in parts[0::4]):  # DALI would hand the decoder b""
                raise UserError(f"{path} lists sample {number - 1} of shard {shard} ({parts[3]}) without an image, as "
                                f"DALI's wds2idx does where a sample's members are not next to each other in the tar: "
                                f"index the shard with '{index_command(str(shard))}'")
            places = [(int(o), int(n)) for o, n in zip(parts[1::4], parts[2::4])]
            nbytes += sum(n for _, n in places)
            if max(o + n for o, n in places) > end:
                raise UserError(f"{shard} is cut short: its index {path} places sample {number - 1} past its end "
                                f"({end:,} bytes); {again}")
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
                                        f"places sample {number - 1}; {again}")
    return count, nbytes


def find_shards(pattern: str) -> list[str]:
    """Shards matching `pattern` (a glob, or s3://BUCKET/PREFIX/GLOB), sorted."""
    from simclr_dali.pipelines import bucket

    if bucket.is_remote(pattern):
        shards = sorted(url for url in bucket.list_matching(pattern) if url.endswith(".tar"))
        if not shards:
            raise UserError(f"no tar shards match {pattern!r}{bucket.where(pattern)}")
        return shards
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise UserError(f"no tar shards match {pattern!r}")
    folder = next((s for s in shards if os.path.isdir(s)), None)
    if folder is not None:
        raise UserError(f"{folder}, which {pattern!r} matches, is a folder, not a tar shard: narrow the pattern to the "
                        f"shards' files (for a folder of images, pass the folder itself without wds:)")
    return shards


def read_indexes(shards: list[str]) -> tuple[list[str], list[int], int]:
    """The shards' index files (each checked whole; a shard without one is indexed now), the samples in
    each and their encoded bytes in all. What a check found is kept on this machine (`checked_path`), keyed by
    each shard's and index's size and modification time, so an index is parsed once per data set, not at every
    start: a shard or index written again is checked again."""
    from simclr_dali.pipelines import bucket

    if shards and bucket.is_remote(shards[0]):
        indexes, keys = bucket.indexes_beside(shards)
    else:
        indexes = [find_index(s) or str(write_index(s)[0]) for s in shards]
        keys = [_stat_key(s) + _stat_key(i) for s, i in zip(shards, indexes)]
    cache = checked_path(indexes)
    known = _read_checked(cache)
    found = [known.get((i, k)) or count_samples(i, s, end=k[0]) for s, i, k in zip(shards, indexes, keys)]
    if any((i, k) not in known for i, k in zip(indexes, keys)):
        _write_checked(cache, indexes, keys, found)
    counts, sizes = zip(*found)
    return indexes, list(counts), sum(sizes)


CHECKED_HEADER = "# simclr checked indexes v1"


def checked_path(indexes: list[str]) -> Path:
    """The file that keeps what the check of these indexes found, named by their real paths (their URLs)."""
    from simclr_dali.pipelines import bucket

    ident = "\0".join(i if bucket.is_remote(i) else os.path.realpath(i) for i in indexes).encode(
        "utf-8", "surrogateescape")
    return cache_home() / "wds-checked" / f"{hashlib.sha256(ident).hexdigest()[:24]}.tsv"


def _stat_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _read_checked(path: Path) -> dict:
    """{(index, (shard size, mtime, index size, mtime)): (samples, bytes)}; empty where there is none or it does
    not read back (it is only a cache: the indexes are checked again)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            if f.readline().rstrip("\n") != CHECKED_HEADER:
                return {}
            out = {}
            for line in f:
                index, *numbers = line.rstrip("\n").split("\t")
                numbers = [int(n) for n in numbers]
                if len(numbers) != 6:
                    return {}
                out[index, tuple(numbers[:4])] = tuple(numbers[4:])
            return out
    except (OSError, ValueError):
        return {}


def _write_checked(path: Path, indexes: list[str], keys: list[tuple], found: list[tuple[int, int]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(CHECKED_HEADER + "\n" + "".join(
            "\t".join(map(str, (index, *key, *counts))) + "\n" for index, key, counts in zip(indexes, keys, found)),
            path)
    except OSError:  # a cache that cannot be written is left out: the next start checks again
        pass


# -- our indexer: DALI's format, samples grouped across the whole tar --------------------------------
def index_tar(shard: str) -> tuple[str, int, int]:
    """(index text, samples in it, samples left out for holding no image) of a tar shard.

    A sample is every regular member with one key (the path up to the first dot of the file name, as the
    webdataset library splits it: `dir/abc.seg.jpg` is key `dir/abc`, ext `seg.jpg`) wherever it lies in
    the tar: DALI's wds2idx groups only adjacent members, and `tar -cf x.tar folder` writes them in the
    folder's order. A sample without an image component is left out, since DALI would give the decoder
    an empty tensor for it."""
    samples: dict[str, dict[str, str]] = {}  # key -> ext -> "ext offset size name", in tar order
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed only: DALI reads the offsets as they are
            for member in tar:
                base = member.name.rfind("/") + 1
                dot = member.name.find(".", base)
                if not member.isfile() or member.issparse() or dot <= base:  # dirs, links; `.hidden`, no ext
                    continue
                ext = member.name[dot + 1:]
                if ext and not re.search(r"\s", ext):  # DALI's index is split on whitespace
                    samples.setdefault(member.name[:dot], {})[ext] = (  # a later member of a tar replaces one
                        f"{printable(ext)} {member.offset_data} {member.size} {printable(member.name)}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{shard} cannot be read as an uncompressed tar file ({err}): DALI reads only those") from None
    lines = [" ".join(parts.values()) for parts in samples.values()
             if any(ext.lower() in IMAGE_SUFFIXES for ext in parts)]
    if not lines:
        raise UserError(f"shard {shard} holds no images (members named KEY.EXT, EXT one of {IMAGE_EXTS}), so there "
                        f"is nothing in it to train on")
    return f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n", len(lines), len(samples) - len(lines)


def printable(name: str) -> str:
    """A member's name as the index's last field: one word of UTF-8 (DALI only reports it)."""
    if name.isprintable() and " " not in name:  # nearly every name: no whitespace, nothing to escape
        return name
    return re.sub(r"\s", "_", name.encode("utf-8", "backslashreplace").decode("utf-8"))


def cache_dir() -> Path:
    return cache_home() / "wds-index"


def cached_index_path(shard: str) -> Path:
    """Where the index of a shard in a folder we cannot write goes: named by the shard's path, size and
    modification time, so a shard written again is indexed again."""
    stat = os.stat(shard)
    ident = f"{os.path.realpath(shard)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8", "surrogateescape")
    return cache_dir() / f"{Path(shard).stem}-{hashlib.sha256(ident).hexdigest()[:24]}.idx"


def find_index(shard: str) -> str | None:
    """The shard's index: ours in the cache (written only where its folder could not be), else the one
    beside it; None where there is neither."""
    for path in (cached_index_path(shard), Path(index_path(shard))):
        if path.is_file():
            return str(path)
    return None


def write_atomically(text: str, path: Path) -> None:
    """A temporary file of a unique name, then a rename: processes indexing one shard at once never
    read each other's half-written index."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared data set
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_index(shard: str) -> tuple[Path, int, int]:
    """Indexes a shard (index_tar) beside it, or in the cache where its folder cannot be written:
    (where, samples, samples left out for holding no image)."""
    text, count, left_out = index_tar(shard)
    beside = Path(index_path(shard))
    try:
        write_atomically(text, beside)
        return beside, count, left_out
    except OSError:  # a read-only folder (or file system): the cache
        pass
    cached = cached_index_path(shard)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(text, cached)
    except OSError as err:
        raise UserError(f"shard {shard} has no index file {beside}, and neither its folder nor the cache "
                        f"{cached.parent} can be written ({err.strerror}): set XDG_CACHE_HOME to a folder you can "
                        f"write") from None
    return cached, count, left_out


def parse_labels(padded: np.ndarray) -> np.ndarray:
    """(B, LABEL_BYTES) uint8 ASCII class indices, zero-padded -> (B,) int64; empty -> -1."""
    out = np.full(len(padded), -1, dtype=np.int64)
    for i, row in enumerate(padded):
        text = bytes(row).rstrip(b"\0").strip()
        if text:
            out[i] = int(text)
    return out


def write_shards(files: list[str], labels: np.ndarray, out: Path, shard_size: int, progress=None, *,
                 order: np.ndarray | None = None, prefix: str = TRAIN_PREFIX, written=None) -> list[Path]:
    """Pack encoded image files into tar shards PREFIXNNNNNN.tar of `shard_size` samples, each with its
    index: files[order] in that order (default: as given); a sample's key is its index in `files`.
    `written(shard)`, where given, is called once each shard and its index are whole (pipelines.pack
    uploads them to a bucket there, and removes them)."""
    out.mkdir(parents=True, exist_ok=True)
    order = np.arange(len(files)) if order is None else np.asarray(order)
    done = []
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
        done.append(shard)
        if written is not None:
            written(shard)
    return done


def image_members(shards: list[str], indexes: list[str]):
    """("SHARD:MEMBER", read) for each sample's image component, shard by shard in their index's order (the
    order DALI's reader reads them): read(n) gives its first n bytes (all with None). For naming a sample
    DALI could not decode: the indexes were checked whole when the source was loaded."""
    from simclr_dali.pipelines import bucket

    for shard, index in zip(shards, indexes):
        remote = bucket.is_remote(index)
        lines = (bucket.read_bytes(index).decode() if remote else Path(index).read_text(encoding="utf-8")).split("\n")[1:]
        for parts in (line.split() for line in lines if line.strip()):
            image = next(i for i in range(0, len(parts), 4) if parts[i].lower() in IMAGE_SUFFIXES)
            offset, size = int(parts[image + 1]), int(parts[image + 2])
            yield f"{shard}:{parts[image + 3]}", _member_reader(shard, offset, size)


def _member_reader(shard: str, offset: int, size: int):
    def read(n: int | None) -> bytes:
        from simclr_dali.pipelines import bucket

        if bucket.is_remote(shard):
            return bucket.read_bytes(shard, offset, size if n is None else min(n, size))
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size if n is None else min(n, size))
    return read
