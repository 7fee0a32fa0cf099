"""SimCLR pretraining: DALI two-view pipeline -> timm backbone + head -> NT-Xent -> LARS.

    python train.py --data digits --epochs 30 --out runs/digits
    accelerate launch train.py --data /images/train --image-size 224 --batch-size 256 --out runs/x

The same as the `simclr-train` command; the loop is simclr_dali/training/loop.py.
"""
import sys

from simclr_dali.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
