"""Training: settings (config), what a run is built from (setup), the optimiser (optim), the loop (loop),
and what keeps it from losing work (checkpoint, signals, finite, peers) or from going unseen (report,
monitor). The names a caller needs, in one place:"""
from simclr_dali.training.config import Config, build_parser, parse_args, parse_command
from simclr_dali.training.loop import main
from simclr_dali.training.optim import build_optimizer, scaled_lr, warmup_epochs
from simclr_dali.training.setup import (
                                        batch_norm,
                                        build_model,
                                        loss_operands,
                                        make_accelerator,
                                        memory_format_and_compile,
)

__all__ = ["Config", "build_parser", "parse_args", "parse_command", "main", "build_optimizer", "scaled_lr",
           "warmup_epochs", "batch_norm", "build_model", "loss_operands", "make_accelerator",
           "memory_format_and_compile"]
