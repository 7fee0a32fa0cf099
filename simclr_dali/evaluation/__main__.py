"""python -m simclr_dali.evaluation: the same as evaluate.py and simclr-evaluate."""
import sys

from simclr_dali.evaluation.evaluate import main

sys.exit(main())
