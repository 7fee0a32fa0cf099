"""What reading tar shards' indexes costs at a start: the first time (each index parsed and checked whole) and
again (what the check found, read back from the cache). N shards of 1,280 samples (tiny JPEG + .cls each, as
ImageNet's 1,000 shards hold), written once under ROOT.

    python -m bench.index_parse [--root /tmp/index-parse] [--shards 100]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np

PER_SHARD = 1280


def write(root: Path, shards: int) -> None:
    from PIL import Image

    done = root / f".complete-{shards}"
    if done.exists():
        return
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        lines = []
        with tarfile.open(root / f"shard-{s:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(PER_SHARD):
                parts = []
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(f"{s * PER_SHARD + i:09d}.{ext}")
                    info.size, at = len(data), tar.offset
                    tar.addfile(info, io.BytesIO(data))
                    parts.append(f"{ext} {at + 512} {len(data)} {info.name}")
                lines.append(" ".join(parts))
        (root / f"shard-{s:06d}.idx").write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
    done.write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/index-parse")
    parser.add_argument("--shards", type=int, default=100)
    args = parser.parse_args()
    root = Path(args.root)
    write(root / "shards", args.shards)
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")  # a cache of its own, empty at first
    shutil.rmtree(root / "cache", ignore_errors=True)
    from simclr_dali.pipelines.sources import load_source

    for what in ("first start (parsed)", "again (cached)"):
        t = time.perf_counter()
        source = load_source(f"wds:{root / 'shards'}/shard-*.tar", "train")
        seconds = time.perf_counter() - t
        print(f"{what}: {seconds:.3f} s for {len(source):,} samples in {len(source.shards)} shards, "
              f"{seconds / len(source) * 1e6:.2f} us per sample")


if __name__ == "__main__":
    main()
