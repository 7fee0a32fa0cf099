"""Find the images DALI cannot decode before training meets them; write the list of the good ones.

    python -m simclr_dali.pipelines.verify /data/train --out train.tsv --workers 16
    python train.py --data train.tsv ...

A folder of a million images is scanned once; train.py takes the list as it is. Without a list,
train.py scans the folder at every start (`--on-bad-image skip` drops what fails, `error` stops).

What counts as good is what DALI's CPU decoder (nvImageCodec: libjpeg-turbo, libpng, ...) accepts:
- the content, not the name, decides the format: a PNG named .jpg decodes, so it is good;
- JPEG, PNG, BMP, TIFF, WebP, PNM and JPEG 2000 are read; GIF, ICO and TGA are not;
- grayscale, palette, RGBA, CMYK and 16-bit images all come out as 8-bit RGB, as do 1x1 images;
- any truncation fails, even a JPEG missing its last byte or a PNG missing its closing IEND chunk
  (Pillow alone accepts the latter, so PNG chunks are walked here);
- damaged data inside a JPEG that still reaches its end decodes (libjpeg only warns), in both.
Each file is read once and decoded by Pillow (JPEGs at 1/8 scale: every byte of the entropy-coded
data is still parsed, so truncation is still seen), in threads: Pillow decodes without the GIL.
"""
from __future__ import annotations

import io
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from simclr_dali.errors import UserError, exit_on_user_error

# Signatures of the formats DALI decodes (at offset 0), with the name of Pillow's plugin for each.
from simclr_dali.settings import Check, Parser, check_args, checked

MAGIC = [(b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"),
         (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
         (b"\xff\x4f\xff\x51", "JPEG2000")] + [(b"P%d" % k, "PPM") for k in range(1, 7)]
WEBP_PARTS = ((0, b"RIFF"), (8, b"WEBP"))
SIGNATURES = [((0, magic),) for magic, _ in MAGIC] + [WEBP_PARTS]  # (offset, bytes) parts, as the pipeline checks
HEAD_BYTES = 12  # the bytes the signatures span
BLOCK = 2048  # files handed to the thread pool at a time (bounds memory for huge folders)
SHOWN = 3  # bad files named in the start-up panel and in one-sentence errors


def sniff(head: bytes) -> str | None:
    """Pillow's plugin name for a format DALI decodes, from the first bytes; None if none fits."""
    if all(head[o:o + len(m)] == m for o, m in WEBP_PARTS):
        return "WEBP"
    return next((name for magic, name in MAGIC if head.startswith(magic)), None)


def signature_problem(head: bytes) -> str | None:
    """What the first bytes alone say is wrong (empty, no signature of a format DALI decodes), else None."""
    if not head:
        return "empty (0 bytes)"
    return None if sniff(head) else "not an image in a format DALI decodes"


def png_problem(data: bytes) -> str | None:
    """Walks the PNG chunks: every one whole with a matching CRC, up to and including IEND."""
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8].decode("latin-1")
        end = pos + 12 + length
        if end > len(data):
            break
        if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return f"PNG chunk {kind} fails its checksum"
        if kind == "IEND":
            return None
        pos = end
    return "truncated PNG (it does not reach its IEND chunk)"


def check_image(path: str) -> str | None:
    """None when DALI can decode the file, else the reason it cannot, in a few words."""
    if "\n" in path or "\r" in path:
        return "its name holds a line break"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return f"unreadable ({err.strerror})"
    return check_bytes(data)


def check_bytes(data: bytes) -> str | None:
    """None when DALI can decode these encoded bytes, else the reason it cannot, in a few words."""
    from PIL import Image

    if (problem := signature_problem(data[:HEAD_BYTES])) is not None:
        return problem
    fmt = sniff(data[:HEAD_BYTES])
    if fmt == "PNG" and (problem := png_problem(data)):
        return problem
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            if fmt == "JPEG":  # decode at 1/8 scale: the whole entropy-coded stream is still read
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            if im.mode == "I" and fmt == "TIFF":
                return "32-bit integer TIFF, which DALI does not decode"
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad data
        text = str(err).split(" (")[0] or type(err).__name__
        return f"{fmt} that cannot be decoded: {text}"
    return None


def scan(files: list[str], workers: int, progress: bool = False) -> list[tuple[int, str]]:
    """(index, reason) of every file DALI cannot decode, in order; `workers` threads."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bad, console = [], Console(stderr=True)
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            Progress(TextColumn("checking images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                     console=console, transient=True, disable=not (progress and console.is_terminal)) as bar:
        task = bar.add_task("", total=len(files))
        for start in range(0, len(files), BLOCK):
            block = files[start:start + BLOCK]
            for i, reason in enumerate(pool.map(check_image, block), start=start):
                if reason is not None:
                    bad.append((i, reason))
            bar.advance(task, len(block))
    return bad


@dataclass
class Screening:
    """load_source's `screen` for train.py and evaluate.py: the verdicts of a folder's files, shared by all
    processes.

    `policy` is "skip" (drop bad files, keep their names for the report) or "error" (one sentence
    naming the first bad file). A folder's verdicts are cached on this machine (pipelines.verdicts), keyed
    by each file's path, size and modification time: the main process stats the files and reads the cache,
    and only the files without a valid verdict are decoded, split over the `world` processes (each with
    `workers` threads). `share(obj)` gives the main process's obj to every process, `gather(obj)` every
    process's obj to all; the training loop passes ones that wait by polling the run's store, never in a
    collective that a long first check could outlast. The same folder listed again (its test split) is
    not checked again.
    """
    policy: str = "skip"
    workers: int = 1
    main: bool = True
    share: Callable = lambda obj: obj
    gather: Callable = lambda obj: [obj]
    rank: int = 0
    world: int = 1
    checked: int = 0
    cached: int = 0  # of those checked, verdicts read from the cache
    seconds: float = 0.0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), in the order found
    last: tuple = ((), ())  # (files, found) of the last scan

    def __call__(self, files: list[str], root: Path | None = None) -> list[int]:
        if files != list(self.last[0]):
            t0 = time.perf_counter()
            found, cached = self.check(files, root)
            self.checked, self.seconds = self.checked + len(files), self.seconds + time.perf_counter() - t0
            self.cached += cached
            known = {p for p, _ in self.bad}
            self.bad += [(files[i], reason) for i, reason in found if files[i] not in known]
            self.last = (files, found)
        files, found = self.last
        if found and self.policy == "error":
            (i, reason), more = found[0], len(found) - 1
            raise UserError(f"{files[i]} cannot be decoded: {reason}{f' (and {more} more)' if more else ''}; "
                            f"remove it, or pass --on-bad-image skip to train without it")
        dropped = {i for i, _ in found}
        return [i for i in range(len(files)) if i not in dropped]

    def check(self, files: list[str], root: Path | None) -> tuple[list[tuple[int, str]], int]:
        """((index, reason) of every file DALI cannot decode, in order; how many verdicts came from the cache)."""
        from simclr_dali.pipelines import verdicts

        keys, ready, todo = None, {}, list(range(len(files)))
        if self.main and root is not None:
            keys = verdicts.stat_keys(files, self.workers)
            ready, todo = verdicts.known(root, files, keys)
        known_bad, todo = self.share(([(i, r) for i, r in ready.items() if r], todo) if self.main else None)
        mine = todo[self.rank::self.world]
        found_here = [(mine[j], reason) for j, reason in scan([files[i] for i in mine], self.workers, progress=True)]
        found = sorted(known_bad + [item for part in self.gather(found_here) for item in part])
        if keys is not None and todo:
            verdicts.write(root, files, keys, dict(found))
        return found, len(files) - len(todo)

    def summary(self) -> dict:
        """For config.json and the start-up panel."""
        return {"checked": self.checked, "cached": self.cached, "seconds": round(self.seconds, 3),
                "skipped": len(self.bad), "first_skipped": [p for p, _ in self.bad[:SHOWN]]}

    def write_skipped(self, path: Path) -> None:
        """PATH<TAB>REASON for every skipped file (no file when none was skipped)."""
        if self.bad:
            path.write_text("".join(f"{p}\t{r}\n" for p, r in self.bad), encoding="utf-8")
        else:
            path.unlink(missing_ok=True)


def build_parser() -> Parser:
    parser = Parser(description="Check that DALI can decode every image of a folder; write the list of good "
                                "ones for train.py --data.")
    parser.add_argument("path", help="folder of images (class sub-folders give labels)")
    parser.add_argument("--out", default="", help="the list to write (default: ./FOLDER.images.tsv)")
    checked(parser, "--workers", type=int, default=os.cpu_count() or 1, check=Check(low=1), help="threads that decode")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from simclr_dali.pipelines.sources import load_folder, write_image_list

    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    root = Path(args.path)
    source = load_folder(str(root), "all")  # one sentence if it is missing, empty or holds no images
    out = Path(args.out or f"{root.resolve().name}.images.tsv")
    console = Console()
    t0 = time.perf_counter()
    bad = scan(source.files, args.workers, progress=True)
    seconds = time.perf_counter() - t0
    dropped = {i for i, _ in bad}
    good = source.subset([i for i in range(len(source)) if i not in dropped])
    if not len(good):
        raise UserError(f"none of the {len(source)} images in {root} can be decoded")
    try:
        write_image_list(out, good, root)
        skipped = out.with_name(out.name + ".skipped")
        if bad:
            skipped.write_text("".join(f"{source.files[i]}\t{r}\n" for i, r in bad), encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write the image list {out}: {err.strerror}") from None
    console.print(f"checked {len(source)} images in {seconds:.1f} s: {len(good)} good, {len(bad)} cannot be decoded")
    for i, reason in bad[:10]:
        console.print(f"  [red]bad[/] {source.files[i]}: {reason}", highlight=False)
    if bad:
        console.print(f"  all {len(bad)} are listed in {skipped}", highlight=False)
    console.print(f"wrote {out}: train with  python train.py --data {out}", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
