"""What the contrastive losses share (NT-Xent in models/ntxent.py; SupCon and MoCo in models/contrastive.py):
the implementations and how one is chosen, the tile sizes, the operand precision, the autograd function over
the kernels (tiled ones in models/ntxent_tiled.py, Triton ones in models/ntxent_triton.py), and the process
group with its gathers, one with gradients and one without.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from simclr_dali.models.ntxent_tiled import tiled_grad, tiled_stats

IMPLS = ("auto", "reference", "tiled", "triton")
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# autograd.Function: forward keeps only the per-row log-sum-exp; backward recomputes the tiles.
# --------------------------------------------------------------------------------------------
class RowLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, row_offset, half, temperature, impl, block, operand_dtype, rows=None, keep=None):
        # z: (M, D) normalised, gathered; returns the mean loss of the R = 2*half local rows. The kernels
        # read z rounded to operand_dtype (fp32 accumulation regardless); the backward keeps that copy.
        # rows, keep (SupCon): R local rows (any half), and a (R,) 0/1 weight of each row's log-sum-exp:
        # the value is sum(keep * lse) / R - mean(pos); the gradient folds keep into the saved lse
        # (lse - log keep: +inf where 0), so the kernels leave those rows' softmax out.
        stats, _ = KERNELS[impl]()
        ctx.in_dtype = z.dtype
        zk = z.to(operand_dtype)
        r = 2 * half if rows is None else rows
        with torch.autocast(z.device.type, enabled=False):
            lse, pos = stats(zk, row_offset, half, 1.0 / temperature, block, r)
        ctx.args = (row_offset, half, temperature, impl, block, r)
        if keep is None:
            ctx.save_for_backward(zk, lse)
            return (lse - pos).mean().to(z.dtype)
        ctx.save_for_backward(zk, lse - keep.log())
        return ((lse * keep).sum() / r - pos.mean()).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        zk, lse = ctx.saved_tensors
        row_offset, half, temperature, impl, block, r = ctx.args
        _, grad_fn = KERNELS[impl]()
        with torch.autocast(zk.device.type, enabled=False):
            acc = grad_fn(zk, lse, row_offset, half, 1.0 / temperature, block, r)  # (M, D) fp32
        dz = acc.to(ctx.in_dtype) * (grad / (r * temperature))  # d lse_i/dz_i = sum_j P_ij z_j / tau
        return dz, None, None, None, None, None, None, None, None


@functools.cache
def triton_kernels():
    from simclr_dali.models import ntxent_triton  # lazy: this module imports where triton is missing
    return ntxent_triton.triton_stats, ntxent_triton.triton_grad


@functools.cache
def triton_cross_kernels():
    from simclr_dali.models import ntxent_triton  # as triton_kernels: MoCo's queue against its rows
    return ntxent_triton.triton_cross_stats, ntxent_triton.triton_cross_grad


def widened(kernel):
    """A tiled kernel on 16-bit operands widened (exactly) to float32: torch's CPU products of 16-bit
    tensors return 16-bit results, where the Triton kernels accumulate and keep the products in float32.
    The wide copies live for one kernel call; what the backward keeps are the 16-bit operands."""
    def wide(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in SIXTEEN_BIT else x
    return lambda *args: kernel(*map(wide, args))


KERNELS = {"tiled": lambda: (widened(tiled_stats), widened(tiled_grad)), "triton": triton_kernels}


class GatherRows(torch.autograd.Function):
    """All-gather of every rank's rows, concatenated in rank order, with gradients back to each rank.

    The backward sums the gathered gradient over the ranks (all_reduce) and keeps this rank's rows.
    Ours rather than torch.distributed.nn.functional.all_gather: merely importing that module made
    about one process in ten abort at exit ("terminate called without an active exception") in our
    two-process CPU tests with torch 2.14, and it is deprecated.
    """

    @staticmethod
    def forward(ctx, x, world, rank):
        import torch.distributed as dist
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rows, ctx.rank = x.shape[0], rank
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.clone(memory_format=torch.contiguous_format)  # ours to reduce in place
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None



def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, device: torch.device | str, operands: torch.dtype = torch.float32) -> str:
    """The implementation that `impl` selects for products of `operands` on `device`.

    "auto" follows the loss benchmark (docs/results.md; scripts/gpu_check.sh measures it again on any GPU):
    16-bit operands on CUDA go to the Triton kernels, several times faster there than the tiled path and the
    reference, which compute in fp32; fp32 goes to the tiled path, since the fp32 Triton kernels need three
    TF32 products per product to keep 1e-5 and were slower than the tiled path and even the full-matrix
    reference. On the CPU, tiled (Triton runs only under the interpreter there). Under bf16/fp16 mixed
    precision train.py asks for 16-bit operands, so the fused kernels are what trains on a GPU.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown NT-Xent implementation {impl!r}; choose one of {IMPLS}")
    if impl != "auto":
        return impl
    sixteen_bit = operands in SIXTEEN_BIT
    return "triton" if torch.device(device).type == "cuda" and sixteen_bit and triton_installed() else "tiled"


def block_size(impl: str, block: int | tuple[int, int] | None, device: torch.device, m: int):
    """Tiles: tiled takes square (b x b) tiles, triton (rows, columns); None picks a default."""
    pair = (block, block) if isinstance(block, int) else block
    if pair is not None and (len(pair) != 2 or min(pair) < 1):
        raise ValueError(f"block must be a positive int or a (rows, columns) pair, got {block}")
    if impl == "triton":
        return pair  # None: ntxent_triton picks from dtype and D
    if pair is not None and pair[0] != pair[1]:
        raise ValueError(f"the tiled NT-Xent uses square tiles (it pairs tile (I, J) with (J, I)); got {block}")
    # CPU (m embeddings in all): a 512 x 512 fp32 tile is 1 MB, inside one core's L2 here, and of 384 ...
    # 1024 the fastest at m = 32768 on 2 cores; smaller batches balance their threads better with 256.
    # GPU: big tiles, few Python steps.
    if pair:
        return pair[0]
    return 4096 if device.type != "cpu" else 512 if m >= 16384 else 256


def world_of(distributed: bool | None) -> tuple[int, int]:
    """(world size, rank) of the process group the loss gathers over; (1, 0) when alone."""
    import torch.distributed as dist
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and not active:
        raise ValueError("distributed=True but torch.distributed is not initialised with world size > 1")
    if distributed is False or not active:
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def precision(z: torch.Tensor, temperature: float, impl: str,
              operands: torch.dtype | None) -> tuple[torch.dtype, torch.dtype, str]:
    """(dtype of the normalisation, sums and loss; what the products read; the implementation) for the
    losses on these kernels (NT-Xent here, SupCon and MoCo in models/contrastive.py), checked."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    operands = operands or (z.dtype if z.dtype in SIXTEEN_BIT else dtype)
    if operands not in (*SIXTEEN_BIT, torch.float32, torch.float64):
        raise ValueError(f"operands must be torch.bfloat16, float16, float32 or None, got {operands}")
    impl = resolve_impl(impl, z.device, operands)
    if impl == "triton" and not triton_installed():
        raise ValueError("impl='triton' needs the triton package, which is not installed; use impl='tiled'")
    return dtype, operands, impl


def kernel_operands(impl: str, operands: torch.dtype) -> torch.dtype:
    """What a kernel reads: Triton computes in fp32 at most."""
    return torch.float32 if impl == "triton" and operands == torch.float64 else operands


def as_read(z: torch.Tensor, operands: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """z as the products read it (rounded once to 16-bit operands), the gradient straight through: what
    the full-matrix references and the PyTorch terms beside the kernels compute on."""
    return z + (z.to(operands).to(dtype) - z).detach() if operands in SIXTEEN_BIT else z


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows in rank order, without gradient (labels, MoCo's keys); x itself when alone."""
    world, _ = world_of(None)
    if world == 1:
        return x
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
