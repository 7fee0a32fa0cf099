"""SupCon and MoCo across two CPU processes (gloo) against one process holding the whole global batch.

SupCon gathers rows and labels: rank r's anchors are its own images' views, its negatives and positives
every rank's, and as for NT-Xent the mean of the rank losses is the one-process loss and rank r's
gradient for its rows is W times the one-process gradient of those rows (the gather's backward sums
every rank's share). MoCo's loss involves no other rank; its queue is filled from the gathered keys, so
both ranks hold the same queue, the one a single process filling it with the whole batch holds.
"""
import pytest
import torch
import torch.nn.functional as F
from support.error_bounds import InfoNCEBound, SupConBound, max_abs_error
from support.gloo import on_ranks

pytestmark = pytest.mark.slow  # two processes over gloo

WORLD, N, DIM, TAU = 2, 5, 9, 0.1
LABELS = torch.tensor([0, 1, 0, -1, 2, 1, 1, 0, -1, 3])  # global; rank r holds r*N ... r*N + N - 1
CASES = [("reference", None, torch.float64), ("tiled", 3, torch.float64), ("tiled", None, torch.float32)]
if not torch.cuda.is_available():  # the interpreter on CPU tensors (see test_ntxent_distributed.py)
    CASES += [("triton", (16, 16), torch.float32)]


def _worker(rank, z1, z2, q, k, keys):
    from simclr_dali.models.backbone import create_backbone
    from simclr_dali.models.contrastive import moco_loss, supcon_loss
    from simclr_dali.models.loss_core import gather
    from simclr_dali.models.methods import MoCo

    rows = slice(rank * N, (rank + 1) * N)
    results = {"supcon": []}
    for impl, block, dtype in CASES:
        a, b = z1[rows].to(dtype).requires_grad_(), z2[rows].to(dtype).requires_grad_()
        loss = supcon_loss(a, b, LABELS[rows], TAU, impl=impl, block=block)
        loss.backward()
        results["supcon"].append((loss.detach(), a.grad, b.grad))
    torch.manual_seed(0)
    moco = MoCo(create_backbone("test_resnet"), proj_hidden=8, proj_dim=DIM, queue_size=13)
    queries = q[rows].clone().requires_grad_()
    loss = moco_loss(queries, k[rows], moco.queue, 0.2, impl="tiled")
    loss.backward()
    results["moco"] = (loss.detach(), queries.grad)
    for step in keys:  # three steps of 2 x 3 keys: the 13 slots wrap around
        moco.enqueue(gather(step[rank * 3:(rank + 1) * 3]))
    results["queue"] = (moco.queue.clone(), moco.queue_next.clone())
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(WORLD * N, DIM, generator=g, dtype=torch.float64)
    z2 = z1 + 0.8 * torch.randn(WORLD * N, DIM, generator=g, dtype=torch.float64)
    q, k = torch.randn(WORLD * N, DIM, generator=g), torch.randn(WORLD * N, DIM, generator=g)
    keys = [F.normalize(torch.randn(WORLD * 3, DIM, generator=g), dim=1) for _ in range(3)]
    return (z1, z2, q, k, keys), on_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("ranks")), z1, z2, q, k, keys)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{i}-{b}-{str(d)[6:]}" for i, b, d in CASES])
def test_supcon_on_two_processes_is_supcon_on_one(ranks, case):
    from simclr_dali.models.contrastive import supcon_loss

    (z1, z2, *_), results = ranks
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    want = supcon_loss(a, b, LABELS, TAU, impl="reference", distributed=False)
    want.backward()
    got = [r["supcon"][case] for r in results]
    mean = sum(loss for loss, _, _ in got) / WORLD
    grads = [torch.cat([g1, g2]) / WORLD for _, g1, g2 in got]  # each rank's rows, W times the share
    expected = [torch.cat([a.grad[r * N:(r + 1) * N], b.grad[r * N:(r + 1) * N]]) for r in range(WORLD)]
    if CASES[case][2] == torch.float64:  # the same sums in another order: rounding of O(1 / tau) terms
        assert max_abs_error(mean, want.detach()) < 1e-12 / TAU
        assert all(max_abs_error(g, e) < 1e-12 / TAU for g, e in zip(grads, expected))
    else:
        bound = SupConBound(torch.cat([z1, z2]), TAU)
        assert max_abs_error(mean, want.detach()) <= bound.loss + 2 ** -24 * abs(want.item())
        for r in range(WORLD):  # rank r's rows of the bound: [z1_r; z2_r]
            rows = torch.cat([torch.arange(r * N, (r + 1) * N), WORLD * N + torch.arange(r * N, (r + 1) * N)])
            assert ((grads[r] - expected[r]).abs().double() <= bound.grads[rows, None]).all()


def test_moco_on_two_processes_is_moco_on_one(ranks):
    from simclr_dali.models.backbone import create_backbone
    from simclr_dali.models.contrastive import moco_loss
    from simclr_dali.models.methods import MoCo

    (_, _, q, k, keys), results = ranks
    torch.manual_seed(0)
    single = MoCo(create_backbone("test_resnet"), proj_hidden=8, proj_dim=DIM, queue_size=13)
    queries = q.clone().requires_grad_()
    want = moco_loss(queries, k, single.queue, 0.2, impl="tiled")
    want.backward()
    bound = InfoNCEBound(q, 13, 0.2)  # two float32 computations of one value: within twice its bound
    assert max_abs_error(sum(r["moco"][0] for r in results) / WORLD, want.detach()) <= 2 * bound.loss
    for r, result in enumerate(results):  # a rank's mean is over its N queries: W times its share
        error = (result["moco"][1] / WORLD - queries.grad[r * N:(r + 1) * N]).abs().double()
        assert (error <= 2 * bound.grads[r * N:(r + 1) * N, None]).all()
    for step in keys:
        single.enqueue(step)
    (q0, next0), (q1, next1) = results[0]["queue"], results[1]["queue"]
    assert torch.equal(q0, q1) and torch.equal(next0, next1)  # the same queue on every rank
    assert torch.equal(q0, single.queue) and next0.item() == single.queue_next.item() == 18 % 13
