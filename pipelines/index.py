"""Index tar shards written by any tool (the webdataset library, img2dataset, `tar -cf`) for `--data wds:...`.

    python -m simclr_dali.pipelines.index '/data/shards/*.tar'
    python -m simclr_dali.pipelines.index /data/shards/00042.tar --force     # replaces the index it has

Training indexes a shard that has none when it loads it; this does it ahead, and replaces an index that
DALI's wds2idx wrote for a tar whose members are out of order (it groups only adjacent members, so a
sample's image and label can become two samples). Each index goes beside its shard (SHARD.idx), or,
where that folder cannot be written, into $XDG_CACHE_HOME/simclr-dali/wds-index (~/.cache/...), where
training looks first. Samples without an image are left out.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from simclr_dali.errors import exit_on_user_error
from simclr_dali.pipelines.webdataset import cache_dir, cached_index_path, find_index, find_shards, write_index
from simclr_dali.settings import Parser, check_args


def build_parser() -> Parser:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("shards", nargs="+", help="tar shards, or glob patterns matching them (quoted)")
    parser.add_argument("--force", action="store_true", help="replace an index a shard already has")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    shards = sorted({s for given in args.shards for s in ([given] if Path(given).is_file() else find_shards(given))})
    kept, written, samples, left_out = [], [], 0, 0
    for shard in shards:
        if find_index(shard) and not args.force:
            kept.append(shard)
            continue
        with contextlib.suppress(OSError):  # training finds the cached index first: --force replaces it too
            cached_index_path(shard).unlink(missing_ok=True)
        where, count, dropped = write_index(shard)
        written.append(where)
        samples, left_out = samples + count, left_out + dropped
    cached = sum(where.parent == cache_dir() for where in written)
    place = ("beside the shards" if not cached else f"in {cache_dir()}" if cached == len(written)
             else f"beside the shards, {cached} of them in {cache_dir()}")
    line = f"wrote {len(written)} index file(s) of {samples} samples {place}" if written else "wrote no index files"
    if left_out:
        line += f"; {left_out} sample(s) without an image left out"
    if kept:
        line += f"; {len(kept)} shard(s) already had one, kept (--force replaces it)"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
