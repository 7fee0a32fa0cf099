"""Pack a folder of images into WebDataset tar shards (with DALI index files) for `--data wds:...`.

    python -m simclr_dali.pipelines.pack /data/images /data/shards --shard-size 10000
    python train.py --data 'wds:/data/shards/shard-*.tar' ...
    python -m simclr_dali.pipelines.pack /data/images s3://my-bucket/imagenet     # straight into a bucket

Samples are written in a seeded random order, so that every shard mixes the folder's classes, and a
stratified tenth of each class (--holdout) goes to test shards, test-NNNNNN.tar, beside the training
shards: the `wds:` source's test split. Every image is checked first as training checks a folder
(pipelines.verify): files DALI cannot decode are left out and listed in OUT/skipped.txt, or, with
--on-bad-image error, named in one sentence.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from simclr_dali.errors import UserError, exit_on_user_error
from simclr_dali.pipelines import bucket
from simclr_dali.pipelines.sources import HOLDOUT_FRACTION, load_folder
from simclr_dali.pipelines.verify import Screening
from simclr_dali.pipelines.webdataset import TEST_PREFIX, TRAIN_PREFIX, index_path, write_shards
from simclr_dali.settings import Check, Parser, check_args, checked


def build_parser() -> Parser:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("src", help="a folder of images (class sub-folders give labels)")
    parser.add_argument("out", help="a new folder for shard-NNNNNN.tar, test-NNNNNN.tar and their .idx files")
    checked(parser, "--shard-size", type=int, default=10000, check=Check(low=1),
            help="samples per shard (default: 10000)")
    checked(parser, "--holdout", type=float, default=HOLDOUT_FRACTION, check=Check(low=0, high=1, below=True),
            help="fraction of each class written to the test shards, at least one image of every class that "
                 f"has two or more; 0: no test shards (default: {HOLDOUT_FRACTION})")
    checked(parser, "--seed", type=int, default=0, check=Check(low=0),
            help="seeds the order of the samples and which are held out (default: 0)")
    checked(parser, "--on-bad-image", default="skip", check=Check(choices=("skip", "error")),
            help="images DALI cannot decode: skip (listed in OUT/skipped.txt) or error")
    checked(parser, "--workers", type=int, default=os.cpu_count() or 1, check=Check(low=1),
            help="threads that check images")
    return parser


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, each in a random order: `fraction` of each class (rounded, at least one
    where the class has two or more images, never all of it) is test. Unlabelled images (-1) are one
    class."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = len(members)
        k = min(n - 1, max(1, int(np.floor(fraction * n + 0.5)))) if fraction > 0 and n >= 2 else 0
        test.append(rng.permutation(members)[:k])
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return rng.permutation(train), rng.permutation(test)


def refuse_old_shards(out: str) -> None:
    """Shards already in OUT (a folder, or a bucket's s3:// or gs:// prefix) would be read with the new ones (a
    glob matches both): refuse, writing nothing."""
    if bucket.is_remote(out):
        old = sorted(u.rsplit("/", 1)[1] for prefix in (TRAIN_PREFIX, TEST_PREFIX)
                     for u in bucket.list_matching(f"{out.rstrip('/')}/{prefix}*.tar"))
    else:
        folder = Path(out)
        old = [p.name for prefix in (TRAIN_PREFIX, TEST_PREFIX)
               for p in sorted(folder.glob(f"{prefix}*.tar"))] if folder.is_dir() else []
    if old:
        raise UserError(f"{out} already holds shards ({old[0]} and {len(old) - 1} more), which would be read "
                        f"with the new ones: pack into a new folder, or delete them first")


class Destination:
    """Where the shards go: a folder, or a bucket (s3:// or gs://BUCKET/PREFIX), each shard and its index then
    written to a temporary folder and uploaded once whole, then removed: never more than one shard on local disk."""

    def __init__(self, out: str):
        self.out, self.remote = out.rstrip("/"), bucket.is_remote(out)
        self.tmp = tempfile.TemporaryDirectory(prefix="pack-") if self.remote else None
        self.folder = Path(self.tmp.name) if self.remote else Path(out)

    def written(self, shard: Path) -> None:
        if self.remote:
            for path in (shard, Path(index_path(str(shard)))):
                bucket.upload(path, f"{self.out}/{path.name}")
                path.unlink()

    def file(self, path: Path) -> None:
        """A file written to the folder (skipped.txt), uploaded beside the shards where they go to a bucket."""
        if self.remote and path.exists():
            bucket.upload(path, f"{self.out}/{path.name}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    refuse_old_shards(args.out)
    screen = Screening(args.on_bad_image, args.workers)
    source = load_folder(args.src, "all", screen)
    dest = Destination(args.out)
    out = dest.folder
    out.mkdir(parents=True, exist_ok=True)
    screen.write_skipped(out / "skipped.txt")
    dest.file(out / "skipped.txt")
    train, test = stratified_holdout(source.labels, args.holdout, args.seed)
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("packing", total=len(source))
        advance = lambda: progress.advance(task)  # noqa: E731
        shards = write_shards(source.files, source.labels, out, args.shard_size, advance, order=train,
                              written=dest.written)
        tests = write_shards(source.files, source.labels, out, args.shard_size, advance, order=test, prefix=TEST_PREFIX,
                             written=dest.written)
    share = "each class" if (source.labels >= 0).any() else "the images"
    held = (f" and {len(test)} test samples ({args.holdout:g} of {share}) in {len(tests)} test shard(s)"
            if len(test) else " and no test shards")
    skipped = (f"; {len(screen.bad)} that cannot be decoded left out (see {dest.out}/skipped.txt)"
               if screen.bad else "")
    print(f"wrote {len(train)} samples in {len(shards)} shard(s){held} to {args.out}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
