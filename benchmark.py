"""Throughput benchmarks, one section per part of the trainer: `python benchmark.py SECTION [options]`.

    python benchmark.py pipeline --json pipeline.json                    # DALI vs torchvision, 32 and 224 px
    python benchmark.py model                                            # the compute ceiling
    python benchmark.py train                                            # train.py end to end / model
    python benchmark.py loss --sizes 16384                               # NT-Xent implementations
    python benchmark.py all --json all.json

The same as the `simclr-benchmark` command; the sections are in simclr_dali/tools/benchmark/.
"""
import sys

from simclr_dali.tools.benchmark.command import main

if __name__ == "__main__":
    sys.exit(main())
