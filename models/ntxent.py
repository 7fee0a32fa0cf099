"""NT-Xent (normalised temperature-scaled cross-entropy), the SimCLR loss.

Each of the 2N embeddings is an anchor; its positive is the other view of the same image and its
negatives are the other 2N - 2 embeddings. The loss is the mean over the 2N anchors of
    -log( exp(s_ip / tau) / sum_{k != i} exp(s_ik / tau) ),   s = cosine similarity.

Three implementations, one algorithm in float32 (float64 inputs stay float64 outside Triton), with
log-sum-exp and a -inf self-mask:
  reference  builds the full (2N, 2N) logits; the oracle.
  tiled      PyTorch over square tiles; forward keeps only the per-row log-sum-exp, backward recomputes
             the tiles. Each pair of tiles (I, J), (J, I) is computed once (the similarity matrix is
             symmetric), and for tau >= 0.025 the exps need no shift (|s| <= 1/tau). Extra memory
             O(N x block + threads x N x D). Any device; on the CPU, one Python thread per core.
  triton     two fused kernels (models/ntxent_triton.py) with an online log-sum-exp. CUDA, or CPU
             tensors under TRITON_INTERPRET=1.
"auto" picks per device and dtype (`resolve_impl`): triton for 16-bit CUDA tensors, tiled otherwise.

Across processes (torch.distributed initialised, world size W > 1, equal shards of n pairs): every rank
normalises its 2n local anchors [z1_r; z2_r] and all-gathers them *with gradients* into (2nW, D) columns
ordered per rank, [z1_0; z2_0; z1_1; z2_1; ...]. Rank r's anchors are the rows r*2n ... r*2n + 2n - 1; the
positive of local row i is local row (i + n) mod 2n. Each rank returns the mean over its OWN 2n anchors,
so the mean of the W rank values equals the single-process loss over the concatenated batch, and the
gradient that reaches rank r's own z is W times the single-process gradient of those rows (the gather's
backward sums every rank's contribution). DDP / accelerate average parameter gradients over the W ranks,
which gives back exactly the single-process gradient.

Layout, as in a Triton tutorial: the reference (the oracle) first, then the tiled "kernels" (the Triton
ones live in ntxent_triton.py), then the autograd.Function, then the public entry point.
"""
from __future__ import annotations

import functools
import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F


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
# Tiled PyTorch "kernels": the Triton kernels' algorithm, one (b x b) tile at a time. z is (M, D)
# normalised, gathered per rank; this rank owns rows [lo, hi) = [row_offset, row_offset + 2*half).
# The similarity matrix is symmetric, so each tile pair is computed once: tile (I, J) with I a block
# of local rows and J a local block at or after I, or any non-local block, serves rows I (along its
# rows) and rows J (along its columns). Per task (one block I and its tiles) the partial results go to
# a per-thread buffer, O(M x D) at most, summed at the end: no two threads write the same row.
# --------------------------------------------------------------------------------------------
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
    touches page-fault (a quarter of one backward tile's time, measured alone; 5-10% end to end).

    On the CPU the tasks are shared among one Python thread per intra-op thread, each running
    single-threaded ops: thousands of small multi-threaded ops would each end in an OpenMP barrier, and
    those stall whenever another process holds a core (on 2 shared cores, 13-16 s instead of 1.4-1.7 s
    for a forward at N = 8192).
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
                block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per local row: log-sum-exp over the columns != self, and the positive logit; each (2 * half,)."""
    m, lo, hi = z.shape[0], row_offset, row_offset + 2 * half
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
               block: int) -> torch.Tensor:
    """(M, D): sum_j W[k, j] z_j, W = [k local] P[k, j] + [j local] P[j, k] - 2 [positive pair, k local].

    P[i, j] = exp(s_ij - lse_i) is row i's softmax. W is symmetric, so tile (I, J) gives rows I their
    W[I, J] @ z_J and rows J their W[I, J]^T @ z_I; and since s is symmetric, P[j, k] = exp(s_kj - lse_j)
    comes from the same tile as P[k, j]. Rows of other ranks only receive the column-side term.
    """
    m, lo, hi = z.shape[0], row_offset, row_offset + 2 * half
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


# --------------------------------------------------------------------------------------------
# autograd.Function: forward keeps only the per-row log-sum-exp; backward recomputes the tiles.
# --------------------------------------------------------------------------------------------
class _NTXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, row_offset, half, temperature, impl, block, operand_dtype):
        # z: (M, D) normalised, gathered; returns the mean loss of the 2*half local rows. The Triton
        # kernels read 16-bit operands when the inputs were 16-bit (fp32 accumulation regardless).
        stats, _ = _KERNELS[impl]()
        ctx.in_dtype = z.dtype
        zk = z.to(operand_dtype)
        with torch.autocast(z.device.type, enabled=False):
            lse, pos = stats(zk, row_offset, half, 1.0 / temperature, block)
        ctx.save_for_backward(zk, lse)
        ctx.args = (row_offset, half, temperature, impl, block)
        return (lse - pos).mean().to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        zk, lse = ctx.saved_tensors
        row_offset, half, temperature, impl, block = ctx.args
        _, grad_fn = _KERNELS[impl]()
        with torch.autocast(zk.device.type, enabled=False):
            acc = grad_fn(zk, lse, row_offset, half, 1.0 / temperature, block)  # (M, D) fp32
        dz = acc.to(ctx.in_dtype) * (grad / (2 * half * temperature))  # d lse_i/dz_i = sum_j P_ij z_j / tau
        return dz, None, None, None, None, None, None


@functools.cache
def _triton_kernels():
    from models import ntxent_triton  # lazy: this module imports where triton is missing
    return ntxent_triton.triton_stats, ntxent_triton.triton_grad


_KERNELS = {"tiled": lambda: (tiled_stats, tiled_grad), "triton": _triton_kernels}


class _GatherRows(torch.autograd.Function):
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


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------
IMPLS = ("auto", "reference", "tiled", "triton")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The implementation that `impl` selects for embeddings of `dtype` on `device`.

    "auto" follows the measurements (H100, N = 16,384, forward + backward; scripts/gpu_check.sh measures
    them again on any GPU): 16-bit inputs on CUDA go to the Triton kernels (bf16: 3.6 ms, where the tiled
    path and the reference compute in fp32: 25.7 and 34.1 ms); fp32 inputs go to the tiled path, since
    the fp32 Triton kernels need three TF32 products per product to keep 1e-5 and took 37.4 ms, slower
    than the tiled path (25.7 ms) and even the full-matrix reference (34.1 ms, 12 GB). On the CPU, tiled
    (Triton runs only under the interpreter there). Under accelerate's mixed precision the embeddings
    reach the loss in fp32 (accelerate converts the forward's outputs), so training takes the fp32 choice.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown NT-Xent implementation {impl!r}; choose one of {IMPLS}")
    if impl != "auto":
        return impl
    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    return "triton" if torch.device(device).type == "cuda" and sixteen_bit and _triton_installed() else "tiled"


def _block(impl: str, block: int | tuple[int, int] | None, device: torch.device, m: int):
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


def _world(distributed: bool | None) -> tuple[int, int]:
    """(world size, rank) of the process group the loss gathers over; (1, 0) when alone."""
    import torch.distributed as dist
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and not active:
        raise ValueError("distributed=True but torch.distributed is not initialised with world size > 1")
    if distributed is False or not active:
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, *,
                 impl: str = "auto", block: int | tuple[int, int] | None = None,
                 distributed: bool | None = None) -> torch.Tensor:
    """Mean NT-Xent over this process's 2N anchors of two views z1, z2, each (N, D) un-normalised.

    impl: "auto", "reference", "tiled" or "triton". block: tile size, an int (square tiles) or, for
    triton, a (rows, columns) pair; None picks one.
    distributed: gather negatives from every rank (None: when torch.distributed runs with world size > 1).
    Across W ranks each returns the mean over its own anchors (see the module docstring); shards must be
    equal.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] == 0:
        raise ValueError("NT-Xent needs at least one pair of views, got an empty batch")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    impl = resolve_impl(impl, z1.device, z1.dtype)
    if impl == "triton" and not _triton_installed():
        raise ValueError("impl='triton' needs the triton package, which is not installed; use impl='tiled'")
    n = z1.shape[0]
    world, rank = _world(distributed)
    block = _block(impl, block, z1.device, 2 * n * world)
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2n, D) this rank's [z1; z2]
        if world > 1:
            z = _GatherRows.apply(z, world, rank)  # (2nW, D), per rank [z1_r; z2_r]
        offset = rank * 2 * n
        if impl == "reference":
            return _reference_rows(z, offset, n, temperature)
        operand = dtype  # what the kernels read; Triton: 16-bit stays 16-bit, the rest becomes fp32
        if impl == "triton":
            operand = z1.dtype if z1.dtype in (torch.bfloat16, torch.float16) else torch.float32
        return _NTXent.apply(z, offset, n, temperature, impl, block, operand)
