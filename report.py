"""What a training run shows and logs: a rich start-up panel, a progress bar, metrics.jsonl and a
final table. Only the main process prints or writes; the others only take part in the reductions.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli import UserError


class Report:
    def __init__(self, main: bool, out: Path, reduce):
        self.main, self.out, self.reduce = main, out, reduce  # reduce: accelerator.reduce
        self.console = Console(stderr=False) if main else None
        self.progress: Progress | None = None
        self.t_run = time.perf_counter()
        self.images_seen = 0
        self.last_loss = float("nan")
        self.epoch_rates: list[float] = []

    # -- start-up ---------------------------------------------------------------------------
    def start(self, cfg: dict, *, model, source, start_epoch: int) -> None:
        if not self.main:
            return
        from models.backbone import count_parameters

        rows = [
            ("device", f"{cfg['device']}  (mixed precision: {cfg['mixed_precision']})"),
            ("DALI placement", cfg["dali_placement"]),
            ("data", f"{cfg['data']}: {cfg['n_train']} training images"),
            ("backbone", f"{cfg['backbone']}{' + small stem' if cfg['small_stem'] else ''}, "
                         f"{count_parameters(model.backbone) / 1e6:.2f} M parameters"),
            ("world size", str(cfg["world_size"])),
            ("global batch", f"{cfg['global_batch']} images ({cfg['batch_size']} per process), "
                             f"{cfg['steps_per_epoch']} steps per epoch"),
            ("optimiser", f"{cfg['optimizer']}, lr {cfg['scaled_lr']:.4g} ({cfg['lr_scaling']} scaling), "
                          f"{cfg['warmup_epochs']} warmup epochs, cosine"),
            ("loss", f"NT-Xent, tau {cfg['temperature']}, {cfg['loss_impl_resolved']} implementation"),
            ("epochs", f"{cfg['epochs']}" + (f" (resuming at epoch {start_epoch + 1})" if start_epoch else "")),
            ("output", str(self.out)),
        ]
        grid = Table.grid(padding=(0, 2))
        for key, value in rows:
            grid.add_row(f"[bold]{key}[/]", value)
        self.console.print(Panel(grid, title="SimCLR", expand=False))
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                                 TextColumn("lr {task.fields[lr]:.3g}"),
                                 TextColumn("{task.fields[rate]:.0f} img/s"), TimeRemainingColumn(),
                                 console=self.console, transient=False,
                                 disable=not self.console.is_terminal)
        self.progress.start()

    # -- per step and per epoch ---------------------------------------------------------------
    def epoch_start(self, epoch: int, steps: int) -> None:
        self.epoch, self.loss_sum, self.n_steps = epoch, None, 0
        self.t_epoch = self.t_log = time.perf_counter()
        self.images_epoch = self.images_log = 0
        if self.progress:
            self.task = self.progress.add_task("", total=steps, epoch=epoch + 1, loss=float("nan"),
                                               lr=0.0, rate=0.0)

    def step(self, step: int, loss: torch.Tensor, lr: float, global_batch: int, *, log: bool) -> None:
        """Accumulates on the device; synchronises only on logging steps."""
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.n_steps += 1
        self.images_epoch += global_batch
        self.images_log += global_batch
        self.lr = lr
        if log:
            value = self.check(self.reduce(loss.float(), "mean").item(), step)
            now = time.perf_counter()
            rate = self.images_log / (now - self.t_log)
            self.t_log, self.images_log = now, 0
            self.write({"kind": "step", "epoch": self.epoch + 1, "step": step, "loss": value, "lr": lr,
                        "images_per_s": rate})
            if self.progress:
                self.progress.update(self.task, loss=value, lr=lr, rate=rate)
        if self.progress:
            self.progress.advance(self.task)

    def epoch_end(self, epoch: int, step: int) -> None:
        mean = self.check(self.reduce(self.loss_sum.float(), "mean").item() / self.n_steps, step)
        rate = self.images_epoch / (time.perf_counter() - self.t_epoch)
        self.last_loss, self.images_seen = mean, self.images_seen + self.images_epoch
        self.epoch_rates.append(rate)
        self.write({"kind": "epoch", "epoch": epoch + 1, "step": step, "loss": mean, "lr": self.lr,
                    "images_per_s": rate})
        if self.progress:
            self.progress.update(self.task, loss=mean, rate=rate)
            if not self.console.is_terminal:  # a log file gets one line per epoch instead of a bar
                self.console.print(f"epoch {epoch + 1}: loss {mean:.4f}, lr {self.lr:.3g}, {rate:.0f} images/s")

    def check(self, loss: float, step: int) -> float:
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} at step {step}: lower --lr, raise --temperature, "
                            f"or train in bf16 rather than fp16; the last checkpoint in {self.out} is intact")
        return loss

    def write(self, record: dict) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- the end --------------------------------------------------------------------------------
    def finish(self, done: bool = True) -> None:
        if not self.main:
            return
        self.progress.stop()
        title = "SimCLR run" if done else "SimCLR run (stopped early: continue with --resume)"
        table = Table(title=title, show_header=False)
        seconds = time.perf_counter() - self.t_run
        rate = sorted(self.epoch_rates)[len(self.epoch_rates) // 2] if self.epoch_rates else 0.0
        for key, value in [("final loss", f"{self.last_loss:.4f}"), ("images trained", f"{self.images_seen}"),
                           ("median images/s", f"{rate:.0f}"), ("wall time", f"{seconds:.1f} s"),
                           ("backbone", str(self.out / "backbone.safetensors")),
                           ("checkpoint", str(self.out / "checkpoint")),
                           ("metrics", str(self.out / "metrics.jsonl"))]:
            table.add_row(key, value)
        self.console.print(table)

