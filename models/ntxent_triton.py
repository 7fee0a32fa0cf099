"""Triton kernels for NT-Xent; `models.ntxent` is the entry point and imports this module lazily.

Both kernels take the general form "local rows against gathered columns": `z` holds the M normalised
embeddings of every process, laid out per rank as [z1_r; z2_r], and this process owns the R = 2n rows
starting at `row_offset`. Local row i (0 <= i < R) is global row row_offset + i; its positive is global
row row_offset + (i + n) % R and its self-similarity is the column row_offset + i. A single process is the
case row_offset = 0, M = R.

Forward: one program per tile of local rows streams column tiles, keeps a running max and sum per row
(online log-sum-exp, fp32) and writes only two numbers per row: the log-sum-exp over columns != self and
the positive logit. Backward: one program per tile of *global* rows recomputes each similarity tile once
and, by symmetry of the similarity matrix, applies both the row-side softmax P[k, j] (if row k is local)
and the column-side one P[j, k] (if row j is local), so every output row is written by exactly one
program: no atomics, no second pass.

When TRITON_INTERPRET=1 is set before triton is first imported, the kernels run on CPU tensors (slowly);
the tests use that on machines without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # True when triton.jit returned interpreted kernels (TRITON_INTERPRET=1 at import time)
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover - layout of older triton versions
    _Interpreted = ()


@triton.jit
def _dot(a, b, TF32X3: tl.constexpr, DOT_FP32: tl.constexpr):
    # fp32 accumulation always. TF32X3 (fp32 operands): three tf32 tensor-core products that
    # recover about fp32 accuracy (plain tf32 misses 1e-5 relative; "fp32" runs at ~1 TFLOP/s on an H100).
    # DOT_FP32: the interpreter stores bf16 as raw uint16 bits and multiplies those, so give it fp32
    # (bf16 -> fp32 is exact, the result is what a bf16 dot with fp32 accumulation computes).
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if TF32X3:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _ntxent_fwd_kernel(
    z_ptr,    # (M, D) normalised embeddings of all ranks, row stride `stride_z`, fp32 / bf16 / fp16
    lse_ptr,  # (R,) fp32 output: log-sum-exp over the columns != self, per local row
    pos_ptr,  # (R,) fp32 output: positive logit s_ip / tau, per local row
    M, R, D, row_offset, half, stride_z,
    inv_tau,  # fp32 scalar 1 / temperature
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TF32X3: tl.constexpr,  # fp32 operands: near-fp32 "tf32x3" dot instead of plain tf32
    DOT_FP32: tl.constexpr,  # upcast 16-bit operands before tl.dot (the interpreter's bf16 dot is wrong)
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # local row indices
    row_ok = rows < R
    grow = row_offset + rows  # global index = column of the self-similarity
    pos_col = row_offset + (rows + half) % R
    d = tl.arange(0, BLOCK_D)
    q = tl.load(z_ptr + grow[:, None] * stride_z + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)

    # A finite floor instead of -inf: a tile where a row sees only -inf (its self column and padding)
    # would otherwise give exp(-inf - -inf) = nan when rescaling.
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # running max
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp(s - m_i)
    p_i = tl.zeros((BLOCK_M,), tl.float32)  # positive logit
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        k = tl.load(z_ptr + cols[:, None] * stride_z + d[None, :],
                    mask=col_ok[:, None] & (d[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
        s = _dot(q, tl.trans(k), TF32X3, DOT_FP32) * inv_tau  # (BLOCK_M, BLOCK_N) fp32 logits
        p_i += tl.sum(tl.where(cols[None, :] == pos_col[:, None], s, 0.0), axis=1)
        s = tl.where(col_ok[None, :] & (cols[None, :] != grow[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=row_ok)
    tl.store(pos_ptr + rows, p_i, mask=row_ok)


@triton.jit
def _ntxent_bwd_kernel(
    z_ptr,    # (M, D) normalised embeddings of all ranks (as in the forward), row stride `stride_z`
    lse_ptr,  # (R,) fp32 log-sum-exp of the local rows, saved by the forward
    out_ptr,  # (M, D) fp32 output: sum_j W[k, j] z_j, row stride `stride_out` (scaled by the caller)
    M, R, D, row_offset, half, stride_z, stride_out,
    inv_tau,  # fp32 scalar 1 / temperature
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TF32X3: tl.constexpr,  # fp32 operands: near-fp32 "tf32x3" dot instead of plain tf32
    DOT_FP32: tl.constexpr,  # upcast 16-bit operands before tl.dot (the interpreter's bf16 dot is wrong)
):
    # W[k, j] = [k local] P[k, j] + [j local] P[j, k] - 2 [k local and j = pos(k)], P[i, j] = exp(s_ij - lse_i).
    # With s symmetric, P[j, k] = exp(s_kj - lse_j): both terms come from the same tile s[k, j].
    pid = tl.program_id(0)
    ks = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # global row indices
    k_ok = ks < M
    kl = ks - row_offset
    k_local = k_ok & (kl >= 0) & (kl < R)
    kl = tl.where(k_local, kl, 0)
    lse_k = tl.load(lse_ptr + kl, mask=k_local, other=0.0)
    pos_k = row_offset + (kl + half) % R
    d = tl.arange(0, BLOCK_D)
    zk = tl.load(z_ptr + ks[:, None] * stride_z + d[None, :],
                 mask=k_ok[:, None] & (d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)

    # A tile holding a local row needs every column; any other tile only the local columns.
    tile_lo = pid * BLOCK_M
    has_local = (tile_lo < row_offset + R) & (tile_lo + BLOCK_M > row_offset)
    lo = tl.where(has_local, 0, row_offset)
    hi = tl.where(has_local, M, row_offset + R)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        jl = cols - row_offset
        j_local = col_ok & (jl >= 0) & (jl < R)
        lse_j = tl.load(lse_ptr + tl.where(j_local, jl, 0), mask=j_local, other=0.0)
        zj = tl.load(z_ptr + cols[:, None] * stride_z + d[None, :],
                     mask=col_ok[:, None] & (d[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
        s = _dot(zk, tl.trans(zj), TF32X3, DOT_FP32) * inv_tau  # (BLOCK_M, BLOCK_N) fp32 logits
        not_self = cols[None, :] != ks[:, None]
        # masked lanes go through exp(-inf) = 0, never through an overflowing exp
        w = tl.exp(tl.where(k_local[:, None] & col_ok[None, :] & not_self, s - lse_k[:, None], float("-inf")))
        w += tl.exp(tl.where(k_ok[:, None] & j_local[None, :] & not_self, s - lse_j[None, :], float("-inf")))
        w -= tl.where(k_local[:, None] & (cols[None, :] == pos_k[:, None]), 2.0, 0.0)
        acc += _dot(w.to(zj.dtype), zj, TF32X3, DOT_FP32)  # W rounded to the operand type, fp32 sum
    tl.store(out_ptr + ks[:, None] * stride_out + d[None, :], acc,
             mask=k_ok[:, None] & (d[None, :] < D))


@triton.jit
def _cross_fwd_kernel(
    q_ptr,    # (R, D) normalised rows (MoCo's queries), row stride `stride_q`
    c_ptr,    # (K, D) normalised columns without gradient (the queue of keys), row stride `stride_c`
    lse_ptr,  # (R,) fp32 output: log-sum-exp of q_i . c_j / tau over all K columns
    R, K, D, stride_q, stride_c,
    inv_tau,  # fp32 scalar 1 / temperature
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TF32X3: tl.constexpr, DOT_FP32: tl.constexpr,  # as in _ntxent_fwd_kernel
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + rows[:, None] * stride_q + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # running max (finite: see _ntxent_fwd_kernel)
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp(s - m_i)
    for start in range(0, K, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < K
        c = tl.load(c_ptr + cols[:, None] * stride_c + d[None, :], mask=col_ok[:, None] & (d[None, :] < D), other=0.0)
        s = _dot(q, tl.trans(c), TF32X3, DOT_FP32) * inv_tau  # (BLOCK_M, BLOCK_N) fp32 logits
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _cross_bwd_kernel(
    q_ptr,    # (R, D) normalised rows, as in the forward
    c_ptr,    # (K, D) normalised columns without gradient
    lse_ptr,  # (R,) fp32 log-sum-exp per row (+inf: the row takes no gradient)
    out_ptr,  # (R, D) fp32 output: sum_j exp(s_ij - lse_i) c_j (scaled by the caller)
    R, K, D, stride_q, stride_c, stride_out,
    inv_tau,  # fp32 scalar 1 / temperature
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TF32X3: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # The columns take no gradient, so every output row is its own row's softmax against them: one
    # program per row tile, no column side (unlike _ntxent_bwd_kernel).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + rows[:, None] * stride_q + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, K, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < K
        c = tl.load(c_ptr + cols[:, None] * stride_c + d[None, :], mask=col_ok[:, None] & (d[None, :] < D), other=0.0)
        s = _dot(q, tl.trans(c), TF32X3, DOT_FP32) * inv_tau
        w = tl.exp(tl.where(row_ok[:, None] & col_ok[None, :], s - lse[:, None], float("-inf")))
        acc += _dot(w.to(c.dtype), c, TF32X3, DOT_FP32)
    tl.store(out_ptr + rows[:, None] * stride_out + d[None, :], acc, mask=row_ok[:, None] & (d[None, :] < D))


INTERPRETED = isinstance(_ntxent_fwd_kernel, _Interpreted) if _Interpreted else False


def _launch_args(z: torch.Tensor, block: tuple[int, int] | None) -> tuple[int, int, int, bool, int, bool]:
    if z.device.type != "cuda" and not INTERPRETED:
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                         f"imported, to run on the CPU); got a tensor on {z.device}")
    block_d = max(16, triton.next_power_of_2(z.shape[1]))
    fp32 = z.dtype == torch.float32
    if block is None:  # (64, 128) was fastest for bf16, D=128 on an H100 (both kernels); wide rows get less
        block = (64, 64) if fp32 or block_d > 128 else (64, 128)
        if block_d > 256:
            block = (32, 32)
    bm, bn = block
    if bm < 16 or bn < 16:
        raise ValueError(f"Triton NT-Xent tiles must be at least 16 wide, got block={block}")
    return bm, bn, block_d, fp32, 8 if bm * bn >= 128 * 128 else 4, INTERPRETED and z.dtype == torch.bfloat16


def triton_stats(z: torch.Tensor, row_offset: int, half: int, inv_tau: float,
                 block: tuple[int, int] | None = None, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per local row: log-sum-exp over columns != self and the positive logit, each (R,) fp32, R = rows
    (default 2 * half)."""
    z = z.contiguous()
    bm, bn, block_d, fp32, warps, dot_fp32 = _launch_args(z, block)
    m, r = z.shape[0], 2 * half if rows is None else rows
    lse = torch.empty(r, dtype=torch.float32, device=z.device)
    pos = torch.empty(r, dtype=torch.float32, device=z.device)
    _ntxent_fwd_kernel[(triton.cdiv(r, bm),)](
        z, lse, pos, m, r, z.shape[1], row_offset, half, z.stride(0), float(inv_tau),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, TF32X3=fp32, DOT_FP32=dot_fp32, num_warps=warps)
    return lse, pos


def triton_grad(z: torch.Tensor, lse: torch.Tensor, row_offset: int, half: int, inv_tau: float,
                block: tuple[int, int] | None = None, rows: int | None = None) -> torch.Tensor:
    """(M, D) fp32: sum_j W[k, j] z_j for every gathered row k (see the kernel); caller scales by g / (R tau)."""
    z = z.contiguous()
    bm, bn, block_d, fp32, warps, dot_fp32 = _launch_args(z, block)
    out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    r = 2 * half if rows is None else rows
    _ntxent_bwd_kernel[(triton.cdiv(z.shape[0], bm),)](
        z, lse, out, z.shape[0], r, z.shape[1], row_offset, half, z.stride(0), out.stride(0),
        float(inv_tau), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, TF32X3=fp32, DOT_FP32=dot_fp32, num_warps=warps)
    return out


def triton_cross_stats(q: torch.Tensor, c: torch.Tensor, inv_tau: float,
                       block: tuple[int, int] | None = None) -> torch.Tensor:
    """(R,) fp32: per row of q, the log-sum-exp of its logits against every row of c (no mask)."""
    q, c = q.contiguous(), c.contiguous()
    bm, bn, block_d, fp32, warps, dot_fp32 = _launch_args(q, block)
    lse = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    _cross_fwd_kernel[(triton.cdiv(q.shape[0], bm),)](
        q, c, lse, q.shape[0], c.shape[0], q.shape[1], q.stride(0), c.stride(0), float(inv_tau),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, TF32X3=fp32, DOT_FP32=dot_fp32, num_warps=warps)
    return lse


def triton_cross_grad(q: torch.Tensor, c: torch.Tensor, lse: torch.Tensor, inv_tau: float,
                      block: tuple[int, int] | None = None) -> torch.Tensor:
    """(R, D) fp32: sum_j exp(s_ij - lse_i) c_j per row of q; the caller scales by its row gradient / tau."""
    q, c = q.contiguous(), c.contiguous()
    bm, bn, block_d, fp32, warps, dot_fp32 = _launch_args(q, block)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    _cross_bwd_kernel[(triton.cdiv(q.shape[0], bm),)](
        q, c, lse.contiguous(), out, q.shape[0], c.shape[0], q.shape[1], q.stride(0), c.stride(0), out.stride(0),
        float(inv_tau), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, TF32X3=fp32, DOT_FP32=dot_fp32, num_warps=warps)
    return out
