"""Pack a folder of images into WebDataset tar shards (with DALI index files) for `--data wds:...`.

    python -m pipelines.pack /data/images /data/shards --shard-size 10000
    python train.py --data 'wds:/data/shards/shard-*.tar' ...

Every image is checked first as training checks a folder (pipelines.verify): files DALI cannot decode
are left out and listed in OUT/skipped.txt, or, with --on-bad-image error, named in one sentence.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from cli import Check, Parser, check_args, checked, exit_on_user_error
from pipelines.sources import load_folder
from pipelines.verify import Screening
from pipelines.webdataset import write_shards


def build_parser() -> Parser:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("src", help="a folder of images (class sub-folders give labels)")
    parser.add_argument("out", help="folder for shard-NNNNNN.tar and .idx files")
    checked(parser, "--shard-size", type=int, default=10000, check=Check(low=1),
            help="samples per shard (default: 10000)")
    checked(parser, "--on-bad-image", default="skip", check=Check(choices=("skip", "error")),
            help="images DALI cannot decode: skip (listed in OUT/skipped.txt) or error")
    checked(parser, "--workers", type=int, default=os.cpu_count() or 1, check=Check(low=1),
            help="threads that check images")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    screen = Screening(args.on_bad_image, args.workers)
    source = load_folder(args.src, "all", screen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    screen.write_skipped(out / "skipped.txt")
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("packing", total=len(source))
        shards = write_shards(source.files, source.labels, out, args.shard_size,
                              progress=lambda: progress.advance(task))
    skipped = f"; {len(screen.bad)} that cannot be decoded left out (see {out / 'skipped.txt'})" if screen.bad else ""
    print(f"wrote {len(source)} samples in {len(shards)} shard(s) to {args.out}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
