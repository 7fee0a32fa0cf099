"""The image check's verdicts, kept per data folder on this machine: a folder is decoded once, not at every
start, resume and evaluation. A file's verdict holds while its path, size and modification time do; a file
written again is checked again.

The cache is a text file in pipelines.cache_home()/verdicts, named by the folder's real path: a header line,
then `RELATIVE/PATH<TAB>SIZE<TAB>MTIME_NS<TAB>REASON` per file (REASON empty for a good one), written whole
and swapped in with a rename, so a reader never meets half of one.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from simclr_dali.pipelines import cache_home

HEADER = "# simclr image verdicts v1"
GONE = (-1, -1)  # the (size, mtime) of a file that could not be stat'ed: never matches a verdict


def cache_path(root: Path) -> Path:
    real = os.path.realpath(root)
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return cache_home() / "verdicts" / f"{Path(real).name or 'root'}-{digest}.tsv"


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return GONE
    return st.st_size, st.st_mtime_ns


def stat_keys(files: list[str], workers: int, chunk: int = 8192) -> list[tuple[int, int]]:
    """(size, mtime_ns) of each file, in threads (a stat waits on the file system, not on the GIL), a chunk of
    files per task (a task per file costs more than its stat)."""
    chunks = [files[i:i + chunk] for i in range(0, len(files), chunk)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [key for keys in pool.map(lambda part: [_stat(f) for f in part], chunks) for key in keys]


def read(root: Path) -> dict[str, tuple[int, int, str]]:
    """{relative path: (size, mtime_ns, reason)} from the folder's cache; empty when there is none or it does
    not read back (it is only a cache: the files are checked again)."""
    try:
        with open(cache_path(root), encoding="utf-8", errors="surrogateescape") as f:
            if f.readline().rstrip("\n") != HEADER:
                return {}
            out = {}
            for line in f:
                rel, size, mtime, reason = line.rstrip("\n").split("\t", 3)
                out[rel] = (int(size), int(mtime), reason)
            return out
    except (OSError, ValueError):
        return {}


def write(root: Path, files: list[str], keys: list[tuple[int, int]], reasons: dict[int, str]) -> None:
    """The folder's cache: every file's key and reason (reasons: index -> why it cannot be decoded). A cache
    that cannot be written is left out: the next start checks again."""
    path = cache_path(root)
    start = len(os.fspath(root).rstrip(os.sep)) + 1
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(HEADER + "\n")
            f.writelines(f"{file[start:]}\t{size}\t{mtime}\t{reasons.get(i, '')}\n"
                         for i, (file, (size, mtime)) in enumerate(zip(files, keys)) if (size, mtime) != GONE)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def known(root: Path, files: list[str], keys: list[tuple[int, int]]) -> tuple[dict[int, str], list[int]]:
    """(verdicts still valid: index -> reason, '' for good; indices to check) for `files` under `root`."""
    cached, start = read(root), len(os.fspath(root).rstrip(os.sep)) + 1
    valid, todo = {}, []
    for i, (file, key) in enumerate(zip(files, keys)):
        hit = cached.get(file[start:])
        if hit is not None and hit[:2] == key:
            valid[i] = hit[2]
        else:
            todo.append(i)
    return valid, todo
