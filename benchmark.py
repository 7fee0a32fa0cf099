"""Throughput benchmarks, one section per part of the trainer: `python benchmark.py SECTION [options]`.

Sections are functions registered in SECTIONS, each with its own argparse subcommand; the helpers
above them (hardware and versions, timing, isolated measurements, tables, JSON) are shared.

    python benchmark.py loss --sizes 1024 4096 16384 --dim 128 --json loss.json

Every measurement runs in a fresh subprocess, so that peak memory is this measurement's alone: on the
CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set just
before the work; on CUDA torch.cuda.max_memory_allocated minus the memory allocated before it.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


# --------------------------------------------------------------------------------------------
# Shared helpers
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


def run_isolated(func: str, timeout_s: float = 1800, **kwargs) -> dict:
    """Run benchmark.<func>(**kwargs) in a fresh Python process; its dict result, or a failure dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "_isolated", func, json.dumps(kwargs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode == -9 else proc.stderr.strip().splitlines()[-1:]
        return {"status": "failed", "reason": str(why)}
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


# --------------------------------------------------------------------------------------------
# Section: loss
# --------------------------------------------------------------------------------------------
def loss_measure(impl: str, n: int, dim: int, device: str, dtype: str, temperature: float,
                 repeats: int, budget_s: float) -> dict:
    """Forward + backward of nt_xent_loss on (n, dim) random views; runs inside a fresh process."""
    import torch
    from models.ntxent import nt_xent_loss
    dt = getattr(torch, dtype)
    tiny = [torch.randn(8, dim, device=device, dtype=dt, requires_grad=True) for _ in range(2)]
    nt_xent_loss(*tiny, temperature, impl=impl).backward()  # lazy init (threads, kernels) outside
    torch.manual_seed(0)
    z1 = torch.randn(n, dim, device=device, dtype=dt, requires_grad=True)
    z2 = torch.randn(n, dim, device=device, dtype=dt, requires_grad=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def step():
        z1.grad = z2.grad = None
        nt_xent_loss(z1, z2, temperature, impl=impl).backward()

    with PeakMemory(device) as mem:
        timing = time_fn(step, repeats=repeats, budget_s=budget_s, sync=sync)
    return {"status": "ok", **timing, "peak_extra_mb": mem.peak_mb, "threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0]}  # other processes on the machine skew CPU timings


def _reference_bytes(n: int, dtype: str) -> int:
    # (2n)^2 fp32 logits; forward keeps logits and log-softmax, backward adds about two more (measured)
    return 4 * (2 * n) ** 2 * 4  # 3.1 copies measured at n=4096 on the CPU; 4 leaves a margin


def loss_section(args: argparse.Namespace) -> list[dict]:
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    impls = args.impls or (["reference", "tiled", "triton"] if device == "cuda" else ["reference", "tiled"])
    results = []
    for n in args.sizes:
        for dtype in args.dtypes:
            for impl in impls:
                row = {"impl": impl, "n": n, "embeddings": 2 * n, "dim": args.dim, "dtype": dtype,
                       "device": device}
                need = _reference_bytes(n, dtype) if impl == "reference" else 0
                if impl == "triton" and device != "cuda":
                    row.update(status="skipped", reason="the Triton kernel needs CUDA")
                elif need > 0.9 * available_memory_bytes(device):
                    row.update(status="skipped", reason=f"needs ~{need / 2**30:.1f} GiB, "
                               f"{available_memory_bytes(device) / 2**30:.1f} GiB available")
                else:
                    console.print(f"loss: {impl} n={n} {dtype} on {device} ...")
                    row.update(run_isolated("loss_measure", impl=impl, n=n, dim=args.dim, device=device,
                                            dtype=dtype, temperature=args.temperature,
                                            repeats=args.repeats, budget_s=args.budget))
                results.append(row)
    base = {(r["n"], r["dtype"]): r["median_s"] for r in results
            if r["impl"] == "reference" and r["status"] == "ok"}
    for r in results:
        if r["status"] == "ok" and (r["n"], r["dtype"]) in base:
            r["speedup_vs_reference"] = base[r["n"], r["dtype"]] / r["median_s"]
    print_table(f"NT-Xent forward+backward, D={args.dim}, tau={args.temperature}",
                ["impl", "N", "dtype", "device", "median s", "min s", "repeats", "peak extra MB",
                 "vs reference", "status"],
                [[r["impl"], r["n"], r["dtype"], r["device"], r.get("median_s"), r.get("min_s"),
                  r.get("repeats"), r.get("peak_extra_mb"), r.get("speedup_vs_reference"),
                  r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"]
                 for r in results])
    return results


def _loss_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384], help="images N (2N embeddings)")
    p.add_argument("--dim", type=int, default=128, help="embedding size D")
    p.add_argument("--impls", nargs="+", choices=["reference", "tiled", "triton"],
                   help="implementations (default: reference, tiled, and triton on CUDA)")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                   help="input dtype(s) of the embeddings")
    p.add_argument("--temperature", type=float, default=0.1, help="NT-Xent tau")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


SECTIONS: dict[str, tuple[Callable[[argparse.Namespace], list[dict]], Callable, str]] = {
    "loss": (loss_section, _loss_args, "NT-Xent forward+backward: reference vs tiled vs Triton"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_isolated"]:  # child of run_isolated: one measurement, JSON on the last line
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print(json.dumps(globals()[argv[1]](**json.loads(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="section", required=True)
    for name, (_, add_args, help_text) in SECTIONS.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (median)")
        p.add_argument("--budget", type=float, default=60.0, help="seconds of timed repeats per measurement")
        p.add_argument("--json", help="also write the results, hardware and versions to this file")
    args = parser.parse_args(argv)
    section = SECTIONS[args.section][0]
    results = section(args)
    if args.json:
        write_json(args.json, args.section, {k: v for k, v in vars(args).items() if k != "json"}, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
