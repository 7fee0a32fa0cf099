"""NT-Xent across two CPU processes (gloo) against one process over the concatenated batch.

Convention under test (see models/ntxent.py): rank r holds pairs r*n ... r*n + n - 1 and returns the
mean over its own 2n anchors, with negatives gathered from both ranks. Then
    mean over ranks of the rank losses        == single-process loss over the 2 * n pairs,
    rank r's gradient for its rows / W (= 2)  == single-process gradient of those rows,
so averaging parameter gradients over ranks (DDP, accelerate) gives the single-process gradient.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from support.error_bounds import NTXentBound  # noqa: E402
from support.gloo import on_ranks  # noqa: E402

from simclr_dali.models.ntxent import nt_xent_loss, nt_xent_reference  # noqa: E402

pytestmark = pytest.mark.slow  # two processes over gloo

WORLD = 2
N_PER_RANK, DIM = 7, 13  # odd shapes catch offset and masking bugs
# (impl, block, temperature); blocks that do not divide a rank's 14 rows. Triton runs here under the
# interpreter on CPU tensors, only on machines without CUDA (the interpreter of triton 3.6 with NumPy 2.5
# cannot take a loop bound from a kernel argument; 3.8 can); on CUDA machines test_ntxent.py checks the
# compiled kernels' row offsets in one process (test_local_rows_against_gathered_columns).
CASES = [("reference", None, 0.1), ("tiled", 5, 0.1), ("tiled", None, 0.05), ("tiled", 3, 1.0)]
if not torch.cuda.is_available():
    CASES += [("triton", (16, 16), 0.1), ("triton", (16, 16), 0.05)]


def _worker(rank, z1, z2):
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    results = []
    for impl, block, tau in CASES:
        a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
        loss = nt_xent_loss(a, b, tau, impl=impl, block=block)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad))
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(WORLD * N_PER_RANK, DIM, generator=g)
    z2 = torch.randn(WORLD * N_PER_RANK, DIM, generator=g) + 0.5 * z1
    return z1, z2, on_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("ranks")), z1, z2)


def rows(rank: int) -> slice:
    return slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{i}-{b}-{t}" for i, b, t in CASES])
def test_two_processes_match_one(two_ranks, case):
    z1, z2, ranks = two_ranks
    tau = CASES[case][2]
    a, b = z1.double().requires_grad_(), z2.double().requires_grad_()
    single = nt_xent_reference(a, b, tau)  # float64, one process, all 2 * WORLD * n anchors
    single.backward()

    losses = torch.stack([ranks[r][case][0] for r in range(WORLD)]).double()
    # Rank r's rows of [z1; z2] in the gathered layout [z1_0; z2_0; z1_1; z2_1]: its loss is the mean over
    # them against every column, each within the bound of a one-process loss over its 2n rows and 2nW
    # columns; its gradient is every rank's contributions summed (the gather's all_reduce), divided by W.
    order = torch.cat([torch.cat([z1[rows(r)], z2[rows(r)]]) for r in range(WORLD)])
    bound = [NTXentBound(order, tau, row_offset=2 * N_PER_RANK * r, half=N_PER_RANK, world=WORLD)
             for r in range(WORLD)]
    assert abs(losses.mean().item() - single.item()) <= max(b.loss for b in bound)
    assert losses[0] != losses[1]  # the ranks really saw different anchors
    everyone = NTXentBound(order, tau, world=WORLD)  # every row local: both sides of each gradient
    for r in range(WORLD):
        _, g1, g2 = ranks[r][case]
        got = torch.cat([g1, g2]).double() / WORLD
        want = torch.cat([a.grad[rows(r)], b.grad[rows(r)]])
        mine = slice(2 * N_PER_RANK * r, 2 * N_PER_RANK * (r + 1))
        fraction = (got - want).abs().max(1).values / everyone.grads[mine]  # W is a power of 2: exact
        assert fraction.max() <= 1, f"rank {r}: gradient error {fraction.max():.3g} of its bound"
