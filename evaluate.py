"""What the backbone learned: kNN and linear probe on frozen features, optional semi-supervised
fine-tuning, each against the same architecture at random init; plots; frozen embeddings.

    python evaluate.py --run runs/digits                      # kNN, linear probe, plots
    python evaluate.py --run runs/digits --finetune --label-fraction 0.01
    python evaluate.py --run runs/x --data /images/train --test-data /images/val
    python evaluate.py --run runs/x --embed /images/catalogue --to catalogue.npy

The same as the `simclr-evaluate` command; the protocols are in simclr_dali/evaluation/.
"""
import sys

from simclr_dali.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
