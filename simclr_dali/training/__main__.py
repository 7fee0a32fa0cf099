"""python -m simclr_dali.training: the same as train.py and simclr-train."""
import sys

from simclr_dali.training.loop import main

sys.exit(main())
