"""How much of its rounding-error bound each NT-Xent case uses, over many seeds and thread counts.

    .venv/bin/python -m tests.support.margins [--seeds 20] [--threads 1 2] [--json FILE]

The grid of tests/models/test_ntxent.py (every implementation, every temperature, the odd shapes; its cases
in support/ntxent_grid.py) is run on `--seeds` different inputs with each torch thread count, and for each
case the largest error of the loss and of any gradient row is printed as a fraction of its bound
(support/error_bounds.py). The tests pass a
case at a fraction of 1; the margin we keep is at most 0.5 everywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

if not torch.cuda.is_available():  # the kernels run on CPU tensors under Triton's interpreter, chosen before it loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from simclr_dali.models.loss_core import RowLogSumExp  # noqa: E402
from simclr_dali.models.ntxent import _reference_rows  # noqa: E402

from .error_bounds import NTXentBound, max_abs_error  # noqa: E402
from .ntxent_grid import TEMPERATURES, fractions_of_bound, products, views  # noqa: E402


def triton_runs_on(device: str) -> bool:
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

TILED_TAUS = [0.01, 0.02, 0.025] + TEMPERATURES
SHAPES = [(37, 70, 5), (37, 70, 16), (37, 70, None), (1, 9, 3), (1, 9, 1), (7, 5, 1), (20, 16, 40), (33, 128, 13)]


def cases():
    """(name, function of seed -> (loss fraction, gradient fraction))."""
    for tau in TILED_TAUS:
        for n, d, block in SHAPES:
            yield (f"tiled fp32 n={n} d={d} block={block} tau={tau}",
                   lambda s, n=n, d=d, b=block, t=tau: fractions_of_bound(*views(n, d, seed=s), t, impl="tiled",
                                                                          block=b))
        for n, d in [(37, 70), (1, 9), (7, 5)]:
            yield (f"reference fp32 n={n} d={d} tau={tau}",
                   lambda s, n=n, d=d, t=tau: fractions_of_bound(*views(n, d, seed=s), t, impl="reference"))
    for tau in (0.05, 0.5):
        yield (f"tiled bf16-in n=37 d=70 tau={tau}",
               lambda s, t=tau: fractions_of_bound(*views(37, 70, torch.bfloat16, seed=s), t, impl="tiled", block=8))
        yield (f"tiled bf16-in fp32 operands n=37 d=70 tau={tau}",
               lambda s, t=tau: fractions_of_bound(*views(37, 70, torch.bfloat16, seed=s), t, impl="tiled",
                                                   operands=torch.float32))
    for op in (torch.bfloat16, torch.float16):  # fp32 embeddings, 16-bit operands: mixed precision
        for tau in (0.05, 0.2, 1.0):
            for n, d in [(37, 70), (1, 9), (20, 16)]:
                for impl, block in [("tiled", 8), ("reference", None)] + (
                        [("triton", (16, 32))] if triton_runs_on("cpu") else []):
                    yield (f"{impl} fp32-in {str(op)[6:]} operands n={n} d={d} tau={tau}",
                           lambda s, n=n, d=d, t=tau, i=impl, b=block, o=op: fractions_of_bound(
                               *views(n, d, seed=s), t, impl=i, block=b, operands=o))
    if triton_runs_on("cpu"):
        for tau in TEMPERATURES:
            for n, d, block in [(37, 70, (16, 32)), (40, 70, (32, 16)), (1, 5, (16, 16)), (37, 70, None)]:
                yield (f"triton fp32 n={n} d={d} block={block} tau={tau}",
                       lambda s, n=n, d=d, b=block, t=tau: fractions_of_bound(*views(n, d, seed=s), t, impl="triton",
                                                                              block=b))
        for dtype, tau in [(torch.float16, 0.05), (torch.bfloat16, 0.05), (torch.bfloat16, 0.5)]:
            yield (f"triton {str(dtype)[6:]} n=37 d=70 tau={tau}",
                   lambda s, dt=dtype, t=tau: fractions_of_bound(*views(37, 70, dt, seed=s), t, impl="triton",
                                                                 block=(16, 32)))
    for impl, block in [("tiled", 5)] + ([("triton", (16, 16))] if triton_runs_on("cpu") else []):
        for tau in (0.05, 0.5):
            yield (f"{impl} local rows of 3 ranks tau={tau}",
                   lambda s, i=impl, b=block, t=tau: gathered_fractions(i, b, t, s))


def gathered_fractions(impl: str, block, tau: float, seed: int) -> tuple[float, float]:
    """test_local_rows_against_gathered_columns on another seed: the worst rank."""
    n, world = 7, 3
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(world * 2 * n, 20, dtype=torch.float64, generator=g), dim=1)
    worst = (0.0, 0.0)
    for rank in range(world):
        want_z = z.clone().requires_grad_()
        want = _reference_rows(want_z, rank * 2 * n, n, tau)
        want.backward()
        got_z = z.float().requires_grad_()
        got = RowLogSumExp.apply(got_z, rank * 2 * n, n, tau, impl, block, torch.float32)
        got.backward()
        bound = NTXentBound(z, tau, row_offset=rank * 2 * n, half=n, rows="rounded",
                            products=products(impl, torch.float32, "cpu"))
        worst = (max(worst[0], max_abs_error(got.detach(), want.detach()) / bound.loss),
                 max(worst[1], bound.grad_fraction(got_z.grad, want_z.grad)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    rows, start = [], time.perf_counter()
    before = torch.get_num_threads()
    for name, fn in cases():
        loss = grad = 0.0
        for threads in args.threads:
            torch.set_num_threads(threads)
            for seed in range(args.seeds):
                a, b = fn(seed)
                loss, grad = max(loss, a), max(grad, b)
        torch.set_num_threads(before)
        rows.append({"case": name, "loss": loss, "grad": grad})
        print(f"{max(loss, grad):7.4f}  loss {loss:7.4f}  grad {grad:7.4f}  {name}", flush=True)
    worst = max(rows, key=lambda r: max(r["loss"], r["grad"]))
    print(f"\n{len(rows)} cases x {args.seeds} seeds x threads {args.threads} in {time.perf_counter() - start:.0f} s; "
          f"largest fraction of a bound: {max(worst['loss'], worst['grad']):.4f} ({worst['case']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
