"""NT-Xent (normalised temperature-scaled cross-entropy), the SimCLR loss.

Each of the 2N embeddings is an anchor; its positive is the other view of the same image and its
negatives are the other 2N - 2 embeddings. The loss is the mean over the 2N anchors of
    -log( exp(s_ip / tau) / sum_{k != i} exp(s_ik / tau) ),   s = cosine similarity.

Three implementations, one algorithm in float32 (float64 inputs stay float64 outside Triton), with
log-sum-exp and a -inf self-mask:
  reference  builds the full (2N, 2N) logits; the oracle.
  tiled      PyTorch over square tiles (models/ntxent_tiled.py); forward keeps only the per-row
             log-sum-exp, backward recomputes the tiles. Each pair of tiles (I, J), (J, I) is computed once
             (the similarity matrix is symmetric), and for tau >= 0.025 the exps need no shift
             (|s| <= 1/tau). Extra memory O(N x block + threads x N x D). Any device; on the CPU, one
             Python thread per core.
  triton     two fused kernels (models/ntxent_triton.py) with an online log-sum-exp. CUDA, or CPU
             tensors under TRITON_INTERPRET=1.
"auto" picks per device and operand dtype (`loss_core.resolve_impl`): triton for 16-bit operands on CUDA, tiled
otherwise.

Operands: the similarity products read the normalised embeddings in `operands` (16-bit when the inputs
are, or when asked: train.py asks for the run's 16-bit type under bf16/fp16 mixed precision, where
accelerate hands the loss float32 embeddings), rounded once after a float32 normalisation; products
accumulate, and the log-sum-exp and the loss are computed, in float32 in every implementation. The
gradient passes straight through that rounding, back to the float32 normalisation.

Across processes (torch.distributed initialised, world size W > 1, equal shards of n pairs): every rank
normalises its 2n local anchors [z1_r; z2_r] and all-gathers them *with gradients* into (2nW, D) columns
ordered per rank, [z1_0; z2_0; z1_1; z2_1; ...]. Rank r's anchors are the rows r*2n ... r*2n + 2n - 1; the
positive of local row i is local row (i + n) mod 2n. Each rank returns the mean over its OWN 2n anchors,
so the mean of the W rank values equals the single-process loss over the concatenated batch, and the
gradient that reaches rank r's own z is W times the single-process gradient of those rows (the gather's
backward sums every rank's contribution). DDP / accelerate average parameter gradients over the W ranks,
which gives back exactly the single-process gradient.

Layout, as in a Triton tutorial: the reference (the oracle) first, then the public entry point. What it
shares with SupCon and MoCo (the autograd function over the kernels, the choice of implementation, tile
sizes, precision, the cross-process gather) is in models/loss_core.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simclr_dali.models.loss_core import (
    GatherRows,
    RowLogSumExp,
    as_read,
    block_size,
    kernel_operands,
    precision,
    world_of,
)


# --------------------------------------------------------------------------------------------
# Reference: builds the full logits. The oracle for every other implementation.
# --------------------------------------------------------------------------------------------
def _reference_rows(z: torch.Tensor, row_offset: int, n: int, temperature: float) -> torch.Tensor:
    """Mean loss of the 2n anchors z[row_offset : row_offset + 2n] against all rows of z (normalised)."""
    rows = z[row_offset:row_offset + 2 * n]  # (2n, D) this rank's [z1; z2]
    logits = (rows / temperature) @ z.T  # (2n, M); scaling the rows first keeps one big matrix
    logits.diagonal(row_offset).fill_(float("-inf"))  # in place: mm's backward needs only its inputs
    positives = row_offset + torch.arange(2 * n, device=z.device).roll(n)  # i <-> i + n
    return F.cross_entropy(logits, positives)


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain NT-Xent in float32 (float64 for float64 inputs) with log-sum-exp and a -inf self-mask."""
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2N, D)
        return _reference_rows(z, 0, z1.shape[0], temperature)


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, *,
                 impl: str = "auto", block: int | tuple[int, int] | None = None,
                 distributed: bool | None = None, operands: torch.dtype | None = None) -> torch.Tensor:
    """Mean NT-Xent over this process's 2N anchors of two views z1, z2, each (N, D) un-normalised.

    impl: "auto", "reference", "tiled" or "triton". block: tile size, an int (square tiles) or, for
    triton, a (rows, columns) pair; None picks one.
    distributed: gather negatives from every rank (None: when torch.distributed runs with world size > 1).
    Across W ranks each returns the mean over its own anchors (see the module docstring); shards must be
    equal.
    operands: what the similarity products read: torch.bfloat16 or torch.float16 (the normalised
    embeddings rounded once; float32 sums), torch.float32; None: the inputs' dtype when 16-bit, else
    float32 (float64 inputs stay float64 outside Triton).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] == 0:
        raise ValueError("NT-Xent needs at least one pair of views, got an empty batch")
    dtype, operands, impl = precision(z1, temperature, impl, operands)
    n = z1.shape[0]
    world, rank = world_of(distributed)
    block = block_size(impl, block, z1.device, 2 * n * world)
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2n, D) this rank's [z1; z2]
        if world > 1:
            z = GatherRows.apply(z, world, rank)  # (2nW, D), per rank [z1_r; z2_r]
        offset = rank * 2 * n
        if impl == "reference":  # the same rounded operands (the gradient straight through), sums in dtype
            return _reference_rows(as_read(z, operands, dtype), offset, n, temperature)
        return RowLogSumExp.apply(z, offset, n, temperature, impl, block, kernel_operands(impl, operands))
