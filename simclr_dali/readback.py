"""Files the tools read back (a run's settings, its checkpoints, metrics and weights): each is checked
before any work starts, and a damaged one is one sentence that names the file, says what is wrong with
it and what to do, without touching it or anything beside it.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

from simclr_dali.errors import UserError


class Unreadable(UserError):
    """A file that cannot be used as it is: "[PREFIX]PATH PROBLEM: FIX"."""

    def __init__(self, path: Path | str, problem: str, fix: str = "", prefix: str = ""):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{prefix}{path} {problem}" + (f": {fix}" if fix else ""))

    def fixed_by(self, fix: str, prefix: str = "") -> Unreadable:
        """The same problem with the caller's remedy (and a prefix such as "--resume: ")."""
        return Unreadable(self.path, self.problem, fix, prefix)


def present(path: Path, fix: str) -> int:
    """The size of `path`; missing or empty is Unreadable."""
    if not path.is_file():
        raise Unreadable(path, "is missing", fix)
    size = path.stat().st_size
    if size == 0:
        raise Unreadable(path, "is empty", fix)
    return size


def read_json(path: Path, fix: str, need: tuple[str, ...] = (), writer: str = "train.py") -> dict:
    """A JSON object holding at least the keys in `need`."""
    present(path, fix)
    try:
        text = path.read_text(encoding="utf-8")
        obj = json.loads(text)
    except UnicodeDecodeError:
        raise Unreadable(path, "is not JSON (it holds binary data)", fix) from None
    except json.JSONDecodeError as err:
        cut = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated")  # ran out before the end
        raise Unreadable(path, "is cut short" if cut else f"is not JSON (line {err.lineno}: {err.msg})", fix) from None
    if not isinstance(obj, dict):
        raise Unreadable(path, f"holds a JSON {type(obj).__name__}, not the object {writer} writes", fix)
    missing = [k for k in need if k not in obj]
    if missing:
        raise Unreadable(path, f"lacks {missing[0]!r}: it was written by another version of {writer}", fix)
    return obj


def read_jsonl(path: Path, fix: str) -> list[dict]:
    """The records of a JSON-lines file that is appended to: a last line cut short (a process killed
    while writing it) is left out; any other line that is not a JSON object is Unreadable."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise Unreadable(path, "is not JSON lines (it holds binary data)", fix) from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if n == len(lines):  # no newline after it: cut short by a kill
                break
            raise Unreadable(path, f"line {n} is not a JSON record", fix)
        records.append(record)
    return records


def check_safetensors(path: Path, fix: str, expect: dict[str, tuple[int, ...]] | None = None,
                      what: str = "the model") -> None:
    """A whole safetensors file (its header read, its size checked against it; no tensor loaded) whose
    tensors, if `expect` is given, have exactly those names and shapes."""
    size = present(path, fix)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(min(length, 100 * 2**20)) if 0 < length else b""
    if len(head) < 8 or length > size - 8:
        cut = header[:1] == b"{"
        raise Unreadable(path, "is cut short (its header ends past the end of the file)" if cut
                         else "is not a safetensors file", fix)
    try:
        meta = json.loads(header)
        tensors = {k: v for k, v in meta.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
        raise Unreadable(path, "is not a safetensors file (its header is not valid)", fix) from None
    if 8 + length + end > size:
        raise Unreadable(path, f"is cut short ({size:,} of {8 + length + end:,} bytes)", fix)
    if 8 + length + end < size:
        raise Unreadable(path, f"is damaged ({size - 8 - length - end:,} bytes past its last tensor)", fix)
    if expect is not None:
        shapes = {k: tuple(v["shape"]) for k, v in tensors.items()}
        odd = sorted(set(shapes) ^ set(expect)) or sorted(k for k in shapes if shapes[k] != expect[k])
        if odd:
            name = odd[0]
            if name in shapes and name in expect:
                detail = f"{name} has shape {list(shapes[name])}, not {list(expect[name])}"
            else:
                detail = f"{'has no' if name in expect else 'has an unexpected'} tensor {name}"
            raise Unreadable(path, f"holds the weights of another architecture than {what} ({detail})", fix)


def check_torch_file(path: Path, fix: str) -> None:
    """A whole file written by torch.save (a zip archive whose every record passes its checksum)."""
    present(path, fix)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise Unreadable(path, "is cut short or is not a file written by torch.save", fix) from None
    if bad is not None:
        raise Unreadable(path, f"is damaged (its record {bad} fails its checksum)", fix)


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, list]:
    """{name: [bytes, sha256]} of the files in `folder`: written beside them, it lets `check_manifest`
    tell later whether each is still whole."""
    return {p.name: [p.stat().st_size, digest(p)] for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in leave_out}


def check_manifest(folder: Path, files: dict, fix: str) -> None:
    """Every file that `manifest` listed is there with its size and its contents."""
    try:
        listed = [(str(name), int(size), str(sha)) for name, (size, sha) in files.items()]
    except (AttributeError, TypeError, ValueError):
        raise Unreadable(folder / "progress.json", "lists its files in a form this version does not read",
                         fix) from None
    for name, size, sha in listed:
        have = present(folder / name, fix)
        if have < size:
            raise Unreadable(folder / name, f"is cut short ({have:,} of {size:,} bytes)", fix)
        if have > size:
            raise Unreadable(folder / name, f"is damaged ({have - size:,} bytes longer than written)", fix)
        if digest(folder / name) != sha:
            raise Unreadable(folder / name, "is damaged (its contents changed after it was written)", fix)
