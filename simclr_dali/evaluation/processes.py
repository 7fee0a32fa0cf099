"""The processes of an evaluation: one, or those `accelerate launch evaluate.py` starts, which split the
feature extraction (models.features.split_extract) while the main process scores, writes and draws."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Processes:
    """This evaluation's processes: one, or those `accelerate launch evaluate.py` starts, which split the
    feature extraction; the main process scores, fine-tunes, writes and draws."""
    rank: int
    world: int
    device: torch.device
    device_id: int | None  # DALI's: this process's GPU, or None for the CPU pipeline
    accelerator: object = None  # several processes: accelerate's, which made the process group

    @property
    def main(self) -> bool:
        return self.rank == 0

    def end(self) -> None:
        """Several processes: this one's part of the process group taken down (left to the interpreter's exit,
        gloo has been seen to abort there: "terminate called without an active exception")."""
        if self.accelerator is not None:
            self.accelerator.end_training()

    @staticmethod
    def start() -> "Processes":
        if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
            cuda = torch.cuda.is_available()
            return Processes(0, 1, torch.device("cuda" if cuda else "cpu"), 0 if cuda else None)
        from simclr_dali.training.peers import watch
        from simclr_dali.training.setup import dali_device_id, make_accelerator

        acc = make_accelerator()
        watch(acc.num_processes)
        return Processes(acc.process_index, acc.num_processes, acc.device, dali_device_id(acc), acc)
