"""Shared by the benchmark sections: hardware and versions, timing, isolated measurements, tables, JSON.

Every isolated measurement runs in a fresh subprocess, so that peak memory is that measurement's
alone: on the CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident
set just before the work; on CUDA torch.cuda.max_memory_allocated minus the memory allocated before it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


# --------------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def hardware_info() -> dict:
    """CPU, memory, GPU and package versions: what every number in a report must come with."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gb": round(_meminfo_kb("MemTotal") / 2**20, 1), "load_average": os.getloadavg(),
        "gpus": gpus, "cuda": torch.version.cuda if gpus else None, "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in ("torch", "triton", "nvidia-dali-cuda130", "timm", "accelerate")},
    }


def _meminfo_kb(field: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def available_memory_bytes(device: str) -> int:
    """Memory a new measurement may use: MemAvailable on the CPU, free GPU memory on CUDA."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.mem_get_info()[0]
    return _meminfo_kb("MemAvailable") * 1024


def time_fn(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, budget_s: float = 60.0,
            sync: Callable[[], object] | None = None) -> dict:
    """Median and min wall time of fn() after warm-up; fewer repeats when one call is slow."""
    sync = sync or (lambda: None)
    for _ in range(warmup):  # compilation, allocator and thread-pool start-up happen here
        fn()
        sync()
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


class PeakMemory:
    """Peak extra memory of the block it wraps, in MB (see the module docstring)."""

    def __init__(self, device: str):
        self.device, self.peak_mb = device, float("nan")

    def __enter__(self):
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident set
            except OSError:  # older kernels: the peak may then include set-up (imports, inputs)
                console.print("[yellow]cannot reset VmHWM; peak memory includes the set-up[/]")
            self.base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kb("VmHWM") * 1024
        self.peak_mb = (peak - self.base) / 2**20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def same_code_env(**extra: str) -> dict:
    """The environment for a child Python process that imports this very copy of the project (a
    checkout or an installed package) wherever it starts."""
    import simclr_dali

    here = str(Path(simclr_dali.__file__).resolve().parents[1])
    path = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_isolated(func: str, timeout_s: float = 1800, **kwargs) -> dict:
    """Run `func` ("module:function") with **kwargs in a fresh Python process; its dict result, or a
    failure dict."""
    cmd = [sys.executable, "-m", "simclr_dali.tools.benchmark", "_isolated", func, json.dumps(kwargs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=same_code_env())
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:  # its last line: the one-sentence error, where it stopped on one
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        return {"status": "failed", "reason": "killed (out of memory?)" if proc.returncode == -9 else last}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("impl", "status", "device", "dtype") else "right")
    for row in rows:
        table.add_row(*("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in row))
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # pipes default to 80 columns


def write_json(path: str, section: str, settings: dict, results: list[dict]) -> None:
    payload = {"section": section, "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": hardware_info(),
               "settings": settings, "results": results}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    console.print(f"wrote {path}")


def run_here(func: str, kwargs: dict) -> dict:
    """The child side of run_isolated."""
    module, name = func.split(":")
    return getattr(importlib.import_module(module), name)(**kwargs)
