"""The tiled NT-Xent "kernels" in PyTorch, and the thread scheduler that runs them on the CPU;
`models.ntxent` is the entry point (its autograd.Function calls `tiled_stats` and `tiled_grad`).

The algorithm is the Triton kernels' (models/ntxent_triton.py), one (b x b) tile at a time: the forward
keeps only the per-row log-sum-exp, the backward recomputes the tiles. z is (M, D) normalised, gathered
per rank; this rank owns rows [lo, hi) = [row_offset, row_offset + 2*half). The similarity matrix is
symmetric, so each tile pair is computed once: tile (I, J) with I a block of local rows and J a local
block at or after I, or any non-local block, serves rows I (along its rows) and rows J (along its
columns). Per task (one block I and its tiles) the partial results go to a per-thread buffer, O(M x D)
at most, summed at the end: no two threads write the same row. Any device; on the CPU, one Python
thread per core (`_tasks`).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch


def _mask_self(s: torch.Tensor, row0: int, col0: int) -> None:
    """-inf on the entries of tile s (rows from global row0, columns from col0) where row == column."""
    offset = row0 - col0  # self entries are s[a, a + offset]
    if -s.shape[0] < offset < s.shape[1]:
        s.diagonal(offset).fill_(float("-inf"))


def _blocks(m: int, lo: int, hi: int, b: int) -> tuple[list[int], list[int]]:
    """Starts of the b-row blocks of [lo, hi) (local) and of [0, lo) and [hi, m) (non-local)."""
    return (list(range(lo, hi, b)), list(range(0, lo, b)) + list(range(hi, m, b)))


def _tasks(work, local: list[int], make_buffer, device: torch.device, block: int) -> list:
    """work(t, i0, buffer, scratch) for every local block start i0; returns the buffers to be reduced.

    scratch is the thread's own (2, block, block) workspace for tiles. Every tile op writes into it
    (`out=`, in place) rather than allocating: a fresh 1 MB tile is often a fresh mmap whose first
    touches page-fault (a quarter of one backward tile's time; docs/results.md).

    On the CPU the tasks are shared among one Python thread per intra-op thread, each running
    single-threaded ops: thousands of small multi-threaded ops would each end in an OpenMP barrier, and
    those stall whenever another process holds a core (about ten times slower on 2 shared cores:
    docs/results.md).
    """
    intra_op = torch.get_num_threads()
    threads = min(intra_op, len(local), 16) if device.type == "cpu" else 1  # 16: bounds the buffers
    buffers = [make_buffer() for _ in range(max(threads, 1))]
    scratches = [torch.empty(2, block * block, dtype=buffers[0].dtype, device=device) for _ in buffers]
    if threads <= 1:
        for t, i0 in enumerate(local):
            work(t, i0, buffers[0], scratches[0])
        return buffers

    ready = threading.Barrier(threads)

    def worker(k: int) -> None:
        # MKL's thread count is per thread: a new thread's matmuls use every core unless the thread
        # itself asks for one (measured: 2 threads' worth of CPU per worker). set_num_threads also
        # sizes torch's process-wide pthreadpool, which should not change under another worker's
        # running op: the caller has already set 1, so here that part is a no-op, and the barrier
        # keeps every worker's call ahead of every op anyway.
        try:
            torch.set_num_threads(1)
        finally:
            ready.wait()  # even on failure, or the other workers would wait forever
        with torch.no_grad():  # grad mode is per thread
            for t in range(k, len(local), threads):  # interleaved: early blocks have more tiles
                work(t, local[t], buffers[k], scratches[k])

    torch.set_num_threads(1)  # with no op in flight: sizes the shared pool (see worker)
    try:
        with ThreadPoolExecutor(threads) as pool:
            for job in [pool.submit(worker, k) for k in range(threads)]:
                job.result()
    finally:
        torch.set_num_threads(intra_op)
    return buffers


def _tile(scratch: torch.Tensor, k: int, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows, cols) view into slot k of a thread's scratch."""
    return scratch[k, :rows * cols].view(rows, cols)


def _no_shift(inv_tau: float) -> bool:
    """Whether exp(s) is safe without a shift: cosine similarity bounds every logit s by 1/tau in
    magnitude, so for tau >= 0.025 every exp(s) lies in [e^-40, e^40] and sums of up to e^40 terms stay
    inside float32. Then one exp per entry serves the tile's rows and columns alike; for smaller tau,
    a running max per row (online log-sum-exp, as in the Triton kernel)."""
    return inv_tau <= 40


def tiled_stats(z: torch.Tensor, row_offset: int, half: int, inv_tau: float,
                block: int, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per local row: log-sum-exp over the columns != self, and the positive logit; each (R,), R = rows
    (default 2 * half; the positive of local row i is (i + half) mod R)."""
    m, lo, hi = z.shape[0], row_offset, row_offset + (2 * half if rows is None else rows)
    local, remote = _blocks(m, lo, hi, block)
    unshifted = _no_shift(inv_tau)
    ones = torch.ones(block, dtype=z.dtype, device=z.device)

    def work(t: int, i0: int, acc: torch.Tensor, scratch: torch.Tensor) -> None:
        # acc: (M,) sum of exp(s), or running lse
        i1 = min(i0 + block, hi)
        q = z[i0:i1] * inv_tau  # (b, D), 1/tau folded into the small operand
        for j0 in local[t:] + remote:
            j1 = min(j0 + block, hi if lo <= j0 < hi else (lo if j0 < lo else m))
            s = torch.mm(q, z[j0:j1].T, out=_tile(scratch, 0, i1 - i0, j1 - j0))  # (b, b) logits
            _mask_self(s, i0, j0)
            both = j0 != i0 and lo <= j0 < hi  # the tile also serves rows J, read down its columns
            if unshifted:
                e = s.exp_()  # self entries: exp(-inf) = 0
                acc[i0:i1].addmv_(e, ones[:j1 - j0])  # row sums, in place (no temporaries)
                if both:
                    acc[j0:j1].addmv_(e.T, ones[:i1 - i0])
            else:  # online log-sum-exp
                acc[i0:i1] = torch.logaddexp(acc[i0:i1], torch.logsumexp(s, dim=1))
                if both:
                    acc[j0:j1] = torch.logaddexp(acc[j0:j1], torch.logsumexp(s, dim=0))

    accs = torch.stack(_tasks(work, local, lambda: torch.full((m,), 0.0 if unshifted else float("-inf"),
                                                             dtype=z.dtype, device=z.device), z.device, block))
    lse = accs[:, lo:hi].sum(0).log() if unshifted else torch.logsumexp(accs[:, lo:hi], dim=0)
    rows = z[lo:hi]
    pos = (rows * rows.roll(half, 0)).sum(1) * inv_tau  # (R,) s_{i, i+n} / tau
    return lse, pos


def tiled_grad(z: torch.Tensor, lse: torch.Tensor, row_offset: int, half: int, inv_tau: float,
               block: int, rows: int | None = None) -> torch.Tensor:
    """(M, D): sum_j W[k, j] z_j, W = [k local] P[k, j] + [j local] P[j, k] - 2 [positive pair, k local].

    P[i, j] = exp(s_ij - lse_i) is row i's softmax. W is symmetric, so tile (I, J) gives rows I their
    W[I, J] @ z_J and rows J their W[I, J]^T @ z_I; and since s is symmetric, P[j, k] = exp(s_kj - lse_j)
    comes from the same tile as P[k, j]. Rows of other ranks only receive the column-side term.
    """
    m, lo, hi = z.shape[0], row_offset, row_offset + (2 * half if rows is None else rows)
    local, remote = _blocks(m, lo, hi, block)
    unshifted = _no_shift(inv_tau)
    scale = torch.exp(-lse) if unshifted else None  # (R,) P[i, j] = exp(s_ij) * scale_i

    def work(t: int, i0: int, out: torch.Tensor, scratch: torch.Tensor) -> None:
        i1 = min(i0 + block, hi)
        zi, qi = z[i0:i1], z[i0:i1] * inv_tau
        for j0 in local[t:] + remote:
            j_local = lo <= j0 < hi
            j1 = min(j0 + block, hi if j_local else (lo if j0 < lo else m))
            s = torch.mm(qi, z[j0:j1].T, out=_tile(scratch, 0, i1 - i0, j1 - j0))  # (b, b) logits
            _mask_self(s, i0, j0)
            if unshifted:  # one exp for both softmaxes: W = exp(s) * (scale_I + scale_J)
                w = s.exp_()
                if j_local:  # P[I, J] + P[J, I]^T
                    w *= torch.add(scale[i0 - lo:i1 - lo, None], scale[j0 - lo:j1 - lo],
                                   out=_tile(scratch, 1, i1 - i0, j1 - j0))
                else:
                    w *= scale[i0 - lo:i1 - lo, None]  # P[I, J]
            else:
                w = torch.sub(s, lse[i0 - lo:i1 - lo, None], out=_tile(scratch, 1, i1 - i0, j1 - j0))
                w.exp_()  # P[I, J]
                if j_local:
                    w += s.sub_(lse[j0 - lo:j1 - lo]).exp_()  # + P[J, I]^T, in place on s
            out[i0:i1].addmm_(w, z[j0:j1])
            if j0 != i0:
                out[j0:j1].addmm_(w.T, zi)

    outs = _tasks(work, local, lambda: torch.zeros_like(z), z.device, block)
    out = outs[0]
    for other in outs[1:]:
        out += other
    out[lo:hi] -= 2 * z[lo:hi].roll(half, 0)  # positives: row side and column side
    return out


# -- rows against columns without gradient (MoCo's queue) ----------------------------------------
def cross_stats(q: torch.Tensor, c: torch.Tensor, inv_tau: float, block: int) -> torch.Tensor:
    """(R,): per row of q (R, D), the log-sum-exp of q_i . c_j / tau over every row of c (K, D). No mask,
    no symmetry: the columns are constants (MoCo's queue of keys), so each row block streams them alone."""
    r, k = q.shape[0], c.shape[0]
    unshifted = _no_shift(inv_tau)
    ones = torch.ones(block, dtype=q.dtype, device=q.device)
    starts = list(range(0, r, block))

    def work(t: int, i0: int, acc: torch.Tensor, scratch: torch.Tensor) -> None:
        i1 = min(i0 + block, r)
        qi = q[i0:i1] * inv_tau  # (b, D)
        for j0 in range(0, k, block):
            j1 = min(j0 + block, k)
            s = torch.mm(qi, c[j0:j1].T, out=_tile(scratch, 0, i1 - i0, j1 - j0))  # (b, b) logits
            if unshifted:
                acc[i0:i1].addmv_(s.exp_(), ones[:j1 - j0])
            else:
                acc[i0:i1] = torch.logaddexp(acc[i0:i1], torch.logsumexp(s, dim=1))

    start = 0.0 if unshifted else float("-inf")
    accs = torch.stack(_tasks(work, starts, lambda: torch.full((r,), start, dtype=q.dtype, device=q.device),
                              q.device, block))
    return accs.sum(0).log() if unshifted else torch.logsumexp(accs, dim=0)


def cross_grad(q: torch.Tensor, c: torch.Tensor, lse: torch.Tensor, inv_tau: float, block: int) -> torch.Tensor:
    """(R, D): sum_j exp(q_i . c_j / tau - lse_i) c_j, the softmax-weighted columns of each row (the
    caller scales by its row's gradient and 1 / tau). lse may be +inf for rows that take no gradient."""
    r, k = q.shape[0], c.shape[0]
    unshifted = _no_shift(inv_tau)
    starts = list(range(0, r, block))

    def work(t: int, i0: int, out: torch.Tensor, scratch: torch.Tensor) -> None:
        i1 = min(i0 + block, r)
        qi, li = q[i0:i1] * inv_tau, lse[i0:i1, None]
        scale = torch.exp(-li) if unshifted else None
        for j0 in range(0, k, block):
            j1 = min(j0 + block, k)
            s = torch.mm(qi, c[j0:j1].T, out=_tile(scratch, 0, i1 - i0, j1 - j0))
            w = s.exp_().mul_(scale) if unshifted else s.sub_(li).exp_()  # P[I, J]
            out[i0:i1].addmm_(w, c[j0:j1])

    outs = _tasks(work, starts, lambda: torch.zeros_like(q), q.device, block)
    out = outs[0]
    for other in outs[1:]:
        out += other
    return out
