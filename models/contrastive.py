"""SupCon and MoCo's InfoNCE on NT-Xent's kernels; `models.ntxent` holds those kernels' entry point.

SupCon (Khosla et al. 2020, L_out): the positives P(i) of anchor i are every other row of the global
batch with its label, and
    L_i = lse_i - (1 / |P(i)|) sum_{p in P(i)} s_ip / tau,   lse_i = log sum_{a != i} exp(s_ia / tau).
The first term is NT-Xent's log-sum-exp over all others, from the same fused tiles. The second is linear
in the rows, so it needs no tile at all: with S_y the sum of the (normalised) rows labelled y and c_i =
|P(i)|, sum_p s_ip = z_i . (S_{y_i} - z_i) / tau, O(M D) by an index_add. No mask is built, and the
(2N x 2N) matrix is never formed outside the reference. An anchor without positives (a label seen once,
with one view per row) adds nothing, and the mean is over all anchors, as the official implementation
does. Labels of -1 (unlabelled) are each their own class, so with two views such an image's positive is
its other view alone, as in SimCLR. With one label per image the loss is NT-Xent's.

MoCo v2 (He et al. 2020; Chen et al. 2020): a query q_i against its positive key k_i and a queue of K
keys from earlier batches, none of which take a gradient,
    L_i = log(exp(q_i . k_i / tau) + sum_j exp(q_i . queue_j / tau)) - q_i . k_i / tau.
The queue's log-sum-exp is a rows-against-constant-columns kernel (tiled: ntxent_tiled.cross_*, Triton:
ntxent_triton.triton_cross_*), forward and backward in tiles: the (R x K) logits are never formed
outside the reference. Every rank holds the same queue (models/methods.py fills it from the gathered
keys); the loss of a query involves no other rank's query, so each rank's mean over its own queries,
averaged by DDP, is the single-process loss.

Precision as in NT-Xent: float32 normalisation, sums and loss; products read `operands`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simclr_dali.models.loss_core import (
    GatherRows,
    RowLogSumExp,
    as_read,
    block_size,
    gather,
    kernel_operands,
    precision,
    triton_cross_kernels,
    widened,
    world_of,
)
from simclr_dali.models.ntxent_tiled import cross_grad, cross_stats


# --------------------------------------------------------------------------------------------
# SupCon
# --------------------------------------------------------------------------------------------
def _supcon_reference_rows(z: torch.Tensor, y: torch.Tensor, row_offset: int, rows: int,
                           temperature: float) -> torch.Tensor:
    """SupCon of the local rows z[row_offset : row_offset + rows] (normalised) against all rows of z,
    building the full logits and the label mask: the oracle of the kernel path."""
    local = torch.arange(row_offset, row_offset + rows, device=z.device)
    logits = (z[local] / temperature) @ z.T  # (R, M)
    self_mask = local[:, None] == torch.arange(z.shape[0], device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positive = (y[local, None] == y[None, :]) & ~self_mask  # (R, M)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = positive.sum(1)
    mean_pos = torch.where(positive, log_prob, 0.0).sum(1) / count.clamp(min=1)
    return -(mean_pos * (count > 0)).sum() / rows


def _class_ids(key: torch.Tensor) -> torch.Tensor:
    """(M,) dense ids in [0, M), equal for equal keys. By sorting, so that nothing waits for the device
    (torch.unique would)."""
    order = key.argsort(stable=True)
    ordered = key[order]
    new = torch.ones_like(key)
    new[1:] = (ordered[1:] != ordered[:-1]).long()
    ids = torch.empty_like(key)
    ids[order] = new.cumsum(0) - 1
    return ids


def supcon_loss(z1: torch.Tensor, z2: torch.Tensor | None, labels: torch.Tensor, temperature: float = 0.1, *,
                impl: str = "auto", block: int | tuple[int, int] | None = None, distributed: bool | None = None,
                operands: torch.dtype | None = None) -> torch.Tensor:
    """Mean SupCon (L_out) over this process's anchors: two views z1, z2 (N, D) of N images labelled by
    labels (N,), or one view z1 (N, D) per labelled row with z2=None. Arguments as nt_xent_loss's; across
    processes the rows and labels are gathered, and each rank returns the mean over its own anchors."""
    views = [z1] if z2 is None else [z1, z2]
    if z1.dim() != 2 or any(v.shape != z1.shape for v in views) or labels.shape != (z1.shape[0],):
        raise ValueError(f"SupCon takes views (N, D) and labels (N,), got {[tuple(v.shape) for v in views]} "
                         f"and {tuple(labels.shape)}")
    if z1.shape[0] == 0:
        raise ValueError("SupCon needs at least one row, got an empty batch")
    dtype, operands, impl = precision(z1, temperature, impl, operands)
    n, rows = z1.shape[0], z1.shape[0] * len(views)
    world, rank = world_of(distributed)
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat(views).to(dtype), dim=1)  # (R, D)
        y = labels.to(z.device, torch.long)
        image = rank * n + torch.arange(n, device=z.device)  # unlabelled (-1): a class per image
        y = torch.where(y >= 0, y, -2 - image).repeat(len(views))  # (R,) both views share their label
        if world > 1:
            z, y = GatherRows.apply(z, world, rank), gather(y)  # (RW, D), gradients back to every rank
        offset = rank * rows
        ids, read = _class_ids(y), as_read(z, operands, dtype)
        if impl == "reference":
            return _supcon_reference_rows(read, ids, offset, rows, temperature)
        sums = torch.zeros_like(read).index_add_(0, ids, read)  # (M, D) S per class id
        count = torch.zeros(z.shape[0], dtype=dtype, device=z.device).index_add_(0, ids, torch.ones_like(read[:, 0]))
        mine = read[offset:offset + rows]  # (R, D)
        positives = count[ids[offset:offset + rows]] - 1  # (R,) |P(i)|
        keep = (positives > 0).to(dtype)
        mean_pos = (mine * (sums[ids[offset:offset + rows]] - mine)).sum(1) / (temperature * positives.clamp(min=1))
        half = n if z2 is not None else 0  # the kernels' own positive (partner, or self), taken back out below
        partner = (mine * mine.roll(half, 0)).sum(1) / temperature
        lse_part = RowLogSumExp.apply(z, offset, half, temperature, impl, block_size(impl, block, z.device, z.shape[0]),
                                 kernel_operands(impl, operands), rows, keep)  # sum(keep lse) / R - mean(its pos)
        return lse_part + partner.mean() - (keep * mean_pos).sum() / rows


# --------------------------------------------------------------------------------------------
# MoCo: InfoNCE over the positive key and a queue of keys
# --------------------------------------------------------------------------------------------
def _reference_queue_lse(q: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.logsumexp((q / temperature) @ queue.T, dim=1)  # (R,) builds (R, K)


_CROSS = {"tiled": lambda: (widened(cross_stats), widened(cross_grad)), "triton": triton_cross_kernels}


class _QueueLSE(torch.autograd.Function):
    """(R,) log-sum-exp of each row of q against the queue's rows, which take no gradient. Forward keeps
    the per-row log-sum-exp; backward recomputes the tiles: dq_i = g_i sum_j P_ij queue_j / tau."""

    @staticmethod
    def forward(ctx, q, queue, temperature, impl, block, operand_dtype):
        stats, _ = _CROSS[impl]()
        qk, ck = q.to(operand_dtype), queue.to(operand_dtype)
        with torch.autocast(q.device.type, enabled=False):
            lse = stats(qk, ck, 1.0 / temperature, block)
        ctx.save_for_backward(qk, ck, lse)
        ctx.args = (temperature, impl, block, q.dtype)
        return lse.to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        qk, ck, lse = ctx.saved_tensors
        temperature, impl, block, dtype = ctx.args
        _, grad_fn = _CROSS[impl]()
        with torch.autocast(qk.device.type, enabled=False):
            acc = grad_fn(qk, ck, lse, 1.0 / temperature, block)  # (R, D) fp32
        return acc.to(dtype) * (grad[:, None] / temperature), None, None, None, None, None


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2, *,
              impl: str = "auto", block: int | tuple[int, int] | None = None,
              operands: torch.dtype | None = None) -> torch.Tensor:
    """Mean InfoNCE of queries q (R, D) against their keys k (R, D) and the queue (K, D) of normalised keys;
    k and the queue take no gradient. q and k are normalised here. Arguments as nt_xent_loss's."""
    if q.dim() != 2 or k.shape != q.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"MoCo takes queries and keys (R, D) and a queue (K, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(queue.shape)}")
    if q.shape[0] == 0 or queue.shape[0] == 0:
        raise ValueError("MoCo needs at least one query and one queued key")
    dtype, operands, impl = precision(q, temperature, impl, operands)
    with torch.autocast(q.device.type, enabled=False):
        qn = as_read(F.normalize(q.to(dtype), dim=1), operands, dtype)  # (R, D)
        kn = F.normalize(k.detach().to(dtype), dim=1).to(operands).to(dtype)
        cols = queue.detach().to(operands).to(dtype)
        positive = (qn * kn).sum(1) / temperature  # (R,)
        if impl == "reference":
            negatives = _reference_queue_lse(qn, cols, temperature)
        else:
            negatives = _QueueLSE.apply(qn, cols, temperature, impl, block_size(impl, block, q.device,
                                        q.shape[0] + queue.shape[0]), kernel_operands(impl, operands))
        return (torch.logaddexp(positive, negatives) - positive).mean()
