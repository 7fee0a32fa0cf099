"""Section `loss`: forward+backward time and peak memory of NT-Xent, SupCon and MoCo's InfoNCE, reference
vs tiled vs Triton, each against this machine's own matrix-product rate measured in the same run.

Every implementation is credited with the products the algorithm needs. NT-Xent and SupCon, 4 M^2 D FLOP
for M = 2N embeddings of size D (550 GFLOP at N = 16,384, D = 128): the similarity tiles once in the
forward (M^2 D: each symmetric pair of tiles once), once more in the backward (M^2 D), and the gradient
product (2 M^2 D); SupCon's positives through class sums are O(M D). MoCo, 6 M K D for M = 2N queries
against a queue of K keys: the logits forward (2 M K D), again in the backward, and the gradient product.
The reference computes more (the whole matrix) and is credited the same.
"""
from __future__ import annotations

import argparse
import os

from simclr_dali.settings import Check, checked
from simclr_dali.tools.benchmark.common import (
    PeakMemory,
    available_memory_bytes,
    console,
    print_table,
    run_isolated,
    time_fn,
)


# --------------------------------------------------------------------------------------------
def loss_measure(impl: str, n: int, dim: int, device: str, dtype: str, temperature: float,
                 repeats: int, budget_s: float, loss: str = "ntxent", queue: int = 65536) -> dict:
    """Forward + backward of one loss on (n, dim) random views; runs inside a fresh process. SupCon's
    labels: 100 classes (ImageNet's 1000 at a batch of 16k gives a few positives per anchor too); MoCo:
    a queue of `queue` unit keys."""
    import torch
    import torch.nn.functional as F

    from simclr_dali.models.contrastive import moco_loss, supcon_loss
    from simclr_dali.models.ntxent import nt_xent_loss
    dt = getattr(torch, dtype)
    keys = F.normalize(torch.randn(queue, dim, device=device), dim=1).to(dt)

    def compute(a, b):
        if loss == "supcon":
            return supcon_loss(a, b, torch.arange(a.shape[0], device=device) % 100, temperature, impl=impl)
        if loss == "moco":
            return moco_loss(torch.cat([a, b]), torch.cat([b, a]).detach(), keys, temperature, impl=impl)
        return nt_xent_loss(a, b, temperature, impl=impl)

    tiny = [torch.randn(8, dim, device=device, dtype=dt, requires_grad=True) for _ in range(2)]
    compute(*tiny).backward()  # lazy init (threads, kernels) outside
    torch.manual_seed(0)
    z1 = torch.randn(n, dim, device=device, dtype=dt, requires_grad=True)
    z2 = torch.randn(n, dim, device=device, dtype=dt, requires_grad=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def step():
        z1.grad = z2.grad = None
        compute(z1, z2).backward()

    with PeakMemory(device) as mem:
        timing = time_fn(step, repeats=repeats, budget_s=budget_s, sync=sync)
    return {"status": "ok", **timing, "peak_extra_mb": mem.peak_mb, "threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0]}  # other processes on the machine skew CPU timings


def loss_flop(n: int, dim: int, loss: str = "ntxent", queue: int = 0) -> float:
    """The products a loss needs for N pairs of D-dimensional embeddings (module docstring)."""
    return 6.0 * (2 * n) * queue * dim if loss == "moco" else 4.0 * (2 * n) ** 2 * dim


def compute_dtype(impl: str, dtype: str, device: str) -> str:
    """The matrix-product precision an implementation works in: 16-bit operands for Triton on 16-bit
    CUDA inputs, fp32 otherwise (the tiled path and the reference upcast; fp32 Triton keeps fp32
    accuracy with three TF32 products)."""
    return dtype if impl == "triton" and device == "cuda" and dtype != "float32" else "float32"


def matmul_measure(dtype: str, device: str, size: int, repeats: int, budget_s: float) -> dict:
    """GFLOP/s of one large square matrix product in `dtype` on `device` (fp32 stays IEEE fp32 on CUDA:
    TF32 off, as in the kernels' products); runs inside a fresh process."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = (torch.randn(size, size, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    timing = time_fn(lambda: a @ b, warmup=2, repeats=repeats, budget_s=budget_s,
                     sync=torch.cuda.synchronize if device.startswith("cuda") else None)
    return {"status": "ok", "gflops": 2.0 * size ** 3 / timing["min_s"] / 1e9, "size": size, **timing}


def _reference_bytes(n: int, loss: str = "ntxent", queue: int = 0) -> int:
    # (2n)^2 fp32 logits (MoCo: 2n x K); forward keeps logits and log-softmax, backward adds about two more
    # (measured); SupCon's label mask and masked copies about three more
    columns = queue if loss == "moco" else 2 * n
    return 4 * (2 * n) * columns * (7 if loss == "supcon" else 4)  # NT-Xent: 3.1 copies measured at n=4096


def loss_section(args: argparse.Namespace) -> list[dict]:
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    impls = args.impls or (["reference", "tiled", "triton"] if device == "cuda" else ["reference", "tiled"])
    # the reference last: right after it frees its gigabytes, the kernel is still reclaiming pages,
    # which slowed the next measurement by a quarter on a 2-core machine
    impls = sorted(impls, key=lambda impl: impl == "reference")
    peaks = {}  # the machine's own matmul rate per compute dtype: the ceiling for the loss rows
    for dtype in sorted({compute_dtype(i, d, device) for i in impls for d in args.dtypes}):
        console.print(f"loss: {dtype} matrix products on {device} ...")
        peaks[dtype] = run_isolated("simclr_dali.tools.benchmark.loss:matmul_measure", dtype=dtype, device=device,
                                    size=args.matmul_size or (4096 if device == "cpu" else 8192),
                                    repeats=args.repeats, budget_s=args.budget)
    results = [{"impl": "matmul", "dtype": d, "device": device, **peak} for d, peak in peaks.items()]
    for loss, n, dtype, impl in ((lo, n, d, i) for lo in args.losses for n in args.sizes for d in args.dtypes
                                 for i in impls):
                row = {"loss": loss, "impl": impl, "n": n, "embeddings": 2 * n, "dim": args.dim, "dtype": dtype,
                       "device": device, **({"queue": args.queue} if loss == "moco" else {})}
                need = _reference_bytes(n, loss, args.queue) if impl == "reference" else 0
                if impl == "triton" and device != "cuda":
                    row.update(status="skipped", reason="the Triton kernel needs CUDA")
                elif need > 0.9 * available_memory_bytes(device):
                    row.update(status="skipped", reason=f"needs ~{need / 2**30:.1f} GiB, "
                               f"{available_memory_bytes(device) / 2**30:.1f} GiB available")
                else:
                    console.print(f"loss: {loss} {impl} n={n} {dtype} on {device} ...")
                    row.update(run_isolated("simclr_dali.tools.benchmark.loss:loss_measure", impl=impl, n=n,
                                            dim=args.dim, device=device, dtype=dtype, temperature=args.temperature,
                                            repeats=args.repeats, budget_s=args.budget, loss=loss, queue=args.queue))
                results.append(row)
    rows = [r for r in results if r["impl"] != "matmul"]
    base = {(r["loss"], r["n"], r["dtype"]): r["median_s"] for r in rows
            if r["impl"] == "reference" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if (r["loss"], r["n"], r["dtype"]) in base:
            r["speedup_vs_reference"] = base[r["loss"], r["n"], r["dtype"]] / r["median_s"]
        peak = peaks[compute_dtype(r["impl"], r["dtype"], device)]
        flop = loss_flop(r["n"], args.dim, r["loss"], args.queue)
        r["gflops"] = flop / r["median_s"] / 1e9  # median repeat
        r["gflops_best"] = flop / r["min_s"] / 1e9  # fastest repeat
        if peak.get("status") == "ok":  # against the matmul's fastest repeat: its peak
            r["fraction_of_matmul"] = r["gflops"] / peak["gflops"]
            r["fraction_of_matmul_best"] = r["gflops_best"] / peak["gflops"]
    print_table(f"Losses forward+backward, D={args.dim}, tau={args.temperature}, MoCo queue {args.queue}",
                ["loss", "impl", "N", "dtype", "device", "median s", "min s", "repeats", "peak extra MB", "GFLOP/s",
                 "of matmul", "vs reference", "status"],
                [[r.get("loss", ""), r["impl"], r.get("n"), r["dtype"], r["device"], r.get("median_s"), r.get("min_s"),
                  r.get("repeats"), r.get("peak_extra_mb"), r.get("gflops"), r.get("fraction_of_matmul"),
                  r.get("speedup_vs_reference"),
                  r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"]
                 for r in results])
    return results


def _loss_args(p: argparse.ArgumentParser) -> None:
    checked(p, "--sizes", type=int, nargs="+", default=[1024, 4096, 16384], check=Check(low=1),
            help="images N (2N embeddings)")
    checked(p, "--dim", type=int, default=128, check=Check(low=1), help="embedding size D")
    checked(p, "--impls", nargs="+", check=Check(choices=("reference", "tiled", "triton")),
            help="implementations (default: reference, tiled, and triton on CUDA)")
    checked(p, "--dtypes", nargs="+", default=["float32"], check=Check(choices=("float32", "bfloat16", "float16")),
            help="input dtype(s) of the embeddings")
    checked(p, "--temperature", type=float, default=0.1, check=Check(low=0, above=True), help="the losses' tau")
    checked(p, "--losses", nargs="+", default=["ntxent", "supcon", "moco"],
            check=Check(choices=("ntxent", "supcon", "moco")), help="losses on the fused kernels (default: all three)")
    checked(p, "--queue", type=int, default=65536, check=Check(low=1), help="MoCo: keys in the queue")
    checked(p, "--device", check=Check(choices=("cpu", "cuda")), help="cpu or cuda (default: cuda when available)")
    checked(p, "--matmul-size", type=int, default=0, check=Check(low=0),
            help="side of the square matrix product that gives the machine's rate (0: 4096 on the CPU, 8192 on a GPU)")
