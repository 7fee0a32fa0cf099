"""What a training run shows and logs: a rich start-up panel, a progress bar, metrics.jsonl and a
final table. Only the main process prints or writes; the others only take part in the reductions.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def read_back(parts: list[torch.Tensor]) -> list[list[float]]:
    """Every device value a sync point needs, in one transfer: the training loop's only host reads."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in parts]).tolist()
    out, start = [], 0
    for p in parts:
        out.append(flat[start:start + p.numel()])
        start += p.numel()
    return out


def given_line(cfg: dict) -> str:
    """The settings given (flags, API fields, a recorded run's), each with its value; every other value in the
    panel and config.json is derived: the method's, the recipe's, or the fields' own defaults."""
    from simclr_dali.training.layers import shown

    given = {k: v for k, v in cfg.get("given", {}).items() if k not in ("out", "data")}  # shown in their rows
    return ", ".join(f"--{k.replace('_', '-')} {shown(v)}" for k, v in given.items()) or \
        "none but the data: every other value is derived (method, recipe, defaults)"


def world_sizes(cfg: dict) -> str:
    """This invocation's number of processes, and those the run had before (an elastic resume)."""
    earlier = [f"{w} from step {start}" for w, start in cfg.get("world_sizes", [])[:-1]]
    return str(cfg["world_size"]) + (f" (earlier: {', '.join(earlier)})" if earlier else "")


class Report:
    tracker = None  # accelerator.log, set by train.py when --log-with names a tracker
    knn_text = ""  # the last online kNN top-1, shown on the progress line

    def __init__(self, main: bool, out: Path, reduce, device: torch.device | str = "cpu"):
        self.main, self.out, self.reduce, self.device = main, out, reduce, device  # reduce: accelerator.reduce
        self.console = Console(stderr=False) if main else None
        self.progress: Progress | None = None
        self.t_run = time.perf_counter()
        self.t_end = None  # when the last epoch ended: the next epoch's time includes the boundary
        self.images_seen = 0
        self.last_loss = float("nan")
        self.epoch_rates: list[float] = []

    # -- start-up ---------------------------------------------------------------------------
    def start(self, cfg: dict, *, model, source, start_epoch: int, start_step: int = 0) -> None:
        self.title = model.title
        if not self.main:
            return
        from rich.markup import escape

        from simclr_dali.models.backbone import count_parameters
        from simclr_dali.training.layers import shown

        resumed = ""
        if start_step % cfg["steps_per_epoch"]:
            resumed = f" (resuming at epoch {start_epoch + 1}, after step {start_step})"
        elif start_epoch:
            resumed = f" (resuming at epoch {start_epoch + 1})"
        rows = [
            ("device", f"{cfg['device']}  (mixed precision: {cfg['mixed_precision']})"),
            ("DALI placement", cfg["dali_placement"]),
            ("data", f"{cfg['data']}: {cfg['n_train']} training images"),
            ("backbone", f"{cfg['backbone']}{' + small stem' if cfg['small_stem'] else ''}, "
                         f"{count_parameters(model.backbone) / 1e6:.2f} M parameters"),
            ("world size", world_sizes(cfg)),
            ("batch norm", cfg["batch_norm"]),
            ("global batch", f"{cfg['global_batch']} images ({cfg['batch_size']} per process), "
                             f"{cfg['steps_per_epoch']} steps per epoch"),
            ("optimiser", f"{cfg['optimizer']}, lr {cfg['scaled_lr']:.4g} ({cfg['lr_scaling']} scaling), "
                          f"{cfg['warmup_epochs_resolved']:g} warmup epochs, cosine"),
            ("recipe", recipe_line(cfg)),
            ("method", cfg["method"]),
            ("loss", model.describe() + (f", {cfg['loss_impl_resolved']} implementation, {cfg['loss_operands']} "
                                         "products (fp32 sums)" if model.kernels else "")),
            ("epochs", f"{cfg['epochs']}{resumed}"),
            ("output", str(self.out)),
            ("given", escape(given_line(cfg))),
        ]
        changed = [c for c in cfg.get("changes", []) if c["step"] == start_step and start_step]
        if changed:
            rows.append(("changed", escape(", ".join(f"{c['setting']} {shown(c['from'])} -> {shown(c['to'])}"
                                                     for c in changed) + f" (from step {start_step})")))
        if cfg.get("scan"):  # a folder checked at start-up for files DALI cannot decode (pipelines.verify)
            scan = cfg["scan"]
            cached = f" ({scan['cached']} verdicts from the cache)" if scan.get("cached") else ""
            rows.insert(3, ("image check", f"{scan['checked']} files in {scan['seconds']:.1f} s{cached}"))
            if scan["skipped"]:
                names = [os.path.relpath(p, cfg["data"]) for p in scan["first_skipped"]]
                more = ", ..." if scan["skipped"] > len(names) else ""
                rows.insert(4, ("skipped", f"[yellow]{scan['skipped']} that cannot be decoded[/]: "
                                           f"{escape(', '.join(names))}{more} (all in skipped.txt)"))
        grid = Table.grid(padding=(0, 2))
        for key, value in rows:
            grid.add_row(f"[bold]{key}[/]", value)
        self.console.print(Panel(grid, title=model.title, expand=False))
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                                 TextColumn("lr {task.fields[lr]:.3g}"),
                                 TextColumn("{task.fields[rate]:.0f} img/s"), TextColumn("{task.fields[knn]}"),
                                 TimeRemainingColumn(),
                                 console=self.console, transient=False,
                                 disable=not self.console.is_terminal)
        self.progress.start()

    # -- per step and per epoch ---------------------------------------------------------------
    def epoch_start(self, epoch: int, steps: int, done: int = 0) -> None:
        """`done`: steps of this epoch taken before a mid-epoch resume. An epoch's images/s count the
        boundary before it (the last epoch's checkpoint, the pipeline build, the first batch)."""
        self.epoch, self.boundary_s = epoch, None
        self.window = self.epoch_sums = None  # (loss sum, applied steps) on the device
        self.t_epoch = self.t_log = self.t_end or time.perf_counter()
        self.images_epoch = self.images_log = 0
        if self.progress:
            self.task = self.progress.add_task("", total=steps, completed=done, epoch=epoch + 1,
                                               loss=float("nan"), lr=0.0, rate=0.0, knn=self.knn_text)

    def first_batch(self) -> None:
        """The epoch's first batch is in: the boundary (from the last epoch's end) is over."""
        if self.t_end is not None:
            self.boundary_s = time.perf_counter() - self.t_end

    def step(self, loss: torch.Tensor, ok: torch.Tensor, lr: float, global_batch: int) -> None:
        """Accumulates the loss of an applied step (`ok`: finite.FiniteGuard's decision) on the
        device; nothing is read back here (see pending / logged)."""
        sums = torch.stack([torch.where(ok, loss.detach().float(), 0.0), ok.float()])
        self.window = sums if self.window is None else self.window + sums
        self.epoch_sums = sums if self.epoch_sums is None else self.epoch_sums + sums
        self.images_epoch += global_batch
        self.images_log += global_batch
        self.lr = lr
        if self.progress:
            self.progress.advance(self.task)

    def pending(self) -> torch.Tensor:
        """(loss sum, applied steps) since the last log line, then over the epoch: the mean over the
        processes of their sums (an all-reduce, no host read), for the next sync point."""
        sums = [torch.zeros(2, device=self.device) if x is None else x for x in (self.window, self.epoch_sums)]
        return self.reduce(torch.cat(sums), "mean")

    def logged(self, step: int, values: list[float], *, log: bool, epoch_end: bool) -> None:
        """Writes the log line (`log`) and the epoch's line (`epoch_end`) from pending()'s values, read
        at a sync point. A log line holds the mean loss of the applied steps since the last one (none
        applied: no line)."""
        now = time.perf_counter()
        total, applied = values[:2]
        if log:
            rate = self.images_log / (now - self.t_log)
            self.t_log, self.images_log, self.window = now, 0, None
            if applied:
                self.write({"kind": "step", "epoch": self.epoch + 1, "step": step, "loss": total / applied,
                            "lr": self.lr, "images_per_s": rate})
                if self.progress:
                    self.progress.update(self.task, loss=total / applied, lr=self.lr, rate=rate)
        if not epoch_end:
            return
        total, applied = values[2:]
        mean = total / applied if applied else float("nan")  # every step skipped as non-finite
        rate = self.images_epoch / (now - self.t_epoch)
        self.t_end = now
        self.last_loss, self.images_seen = mean, self.images_seen + self.images_epoch
        self.epoch_rates.append(rate)
        record = {"kind": "epoch", "epoch": self.epoch + 1, "step": step, "loss": mean, "lr": self.lr,
                  "images_per_s": rate}
        if self.boundary_s is not None:  # seconds from the last epoch's last step to this one's first batch
            record["boundary_s"] = self.boundary_s
        self.write(record)
        if self.progress:
            self.progress.update(self.task, loss=mean, rate=rate)
            if not self.console.is_terminal:  # a log file gets one line per epoch instead of a bar
                self.console.print(f"epoch {self.epoch + 1}: loss {mean:.4f}, lr {self.lr:.3g}, {rate:.0f} images/s")

    def nonfinite(self, step: int, count: int, problem: str) -> None:
        """Steps skipped by --max-nonfinite since the last sync point, the last of them at `step`."""
        self.write({"kind": "nonfinite", "epoch": self.epoch + 1, "step": step, "skipped": count, "problem": problem})

    def rewind(self, step: int) -> None:
        """On resume, forget metrics.jsonl lines written after the checkpoint (a killed run's)."""
        def before(line: str) -> bool:
            try:
                return json.loads(line).get("step", 0) <= step
            except ValueError:  # a line cut short by kill -9
                return False

        path = self.out / "metrics.jsonl"
        if self.main and path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if before(line)]
            if len(kept) != len(lines):
                path.write_text("".join(kept))

    def interrupted(self, text: str) -> None:
        if self.main:
            self.progress.stop()
            self.console.print(text, highlight=False, soft_wrap=True)

    def knn(self, epoch: int, step: int, top1: float) -> None:
        """The online kNN top-1 (train.py's --knn-every; main process only)."""
        self.knn_text = f"kNN {top1:.1%}"
        self.write({"kind": "knn", "epoch": epoch + 1, "step": step, "knn_top1": top1})
        if self.progress:
            self.progress.update(self.task, knn=self.knn_text)
            if not self.console.is_terminal:
                self.console.print(f"epoch {epoch + 1}: kNN top-1 {top1:.2%}")

    def write(self, record: dict) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracker is not None:  # e.g. "step/loss", "epoch/images_per_s", "knn/knn_top1"
                self.tracker({f"{record['kind']}/{k}": v for k, v in record.items()
                              if k not in ("kind", "epoch", "step")}, step=record["step"])

    # -- the end --------------------------------------------------------------------------------
    def finish(self, done: bool = True) -> None:
        if not self.main:
            return
        self.progress.stop()
        title = f"{self.title} run" + ("" if done else " (stopped early: continue with --resume)")
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


def recipe_line(cfg: dict) -> str:
    """The panel's recipe row: which, why (auto), and what it set."""
    name = cfg["recipe_resolved"]
    why = f" (auto: {cfg['image_size']} px {'<=' if name == 'small' else '>'} 64)" if cfg["recipe"] == "auto" else ""
    values = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in cfg["recipe_values"].items())
    return f"{name}{why}" + (f": {values}" if values else "")
