"""Section `loss`: NT-Xent forward+backward time and peak memory, reference vs tiled vs Triton."""
from __future__ import annotations

import argparse
import os

from bench.common import PeakMemory, available_memory_bytes, console, print_table, run_isolated, time_fn


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
    # the reference last: right after it frees its gigabytes, the kernel is still reclaiming pages,
    # which slowed the next measurement by a quarter on a 2-core machine
    impls = sorted(impls, key=lambda impl: impl == "reference")
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
                    row.update(run_isolated("bench.loss:loss_measure", impl=impl, n=n, dim=args.dim, device=device,
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
