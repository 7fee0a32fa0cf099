"""python -m simclr_dali.tools.benchmark: the same as benchmark.py and simclr-benchmark."""
import sys

from simclr_dali.tools.benchmark.command import main

sys.exit(main())
