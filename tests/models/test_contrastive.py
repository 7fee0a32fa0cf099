"""SupCon and MoCo's InfoNCE (models/contrastive.py) against float64 oracles written from their papers'
formulas, value and gradients, on odd shapes; every implementation (reference, tiled, Triton under the
interpreter on the CPU) held to the rounding-error bounds in tests/support/error_bounds.py."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_runs_on
from support.error_bounds import InfoNCEBound, SupConBound, max_abs_error

from simclr_dali.models.contrastive import _class_ids, moco_loss, supcon_loss
from simclr_dali.models.ntxent import nt_xent_loss


def supcon_oracle(z: torch.Tensor, y: list[int], tau: float) -> torch.Tensor:
    """Khosla et al. (2020), eq. 2 (L_out), one term per anchor i, in float64 with explicit sums:
    -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p/tau) / sum_{a in A(i)} exp(z_i.z_a/tau) ), A(i) = all
    rows but i, P(i) = those of A(i) labelled y_i; anchors with P(i) empty add 0; the mean over all."""
    u = z / z.norm(dim=1, keepdim=True)
    m = len(y)
    total = z.new_zeros(())
    for i in range(m):
        others = [a for a in range(m) if a != i]
        positives = [p for p in others if y[p] == y[i]]
        if not positives:
            continue
        denominator = sum(torch.exp(u[i] @ u[a] / tau) for a in others)
        total = total - sum(torch.log(torch.exp(u[i] @ u[p] / tau) / denominator) for p in positives) / len(positives)
    return total / m


def moco_oracle(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """He et al. (2020), eq. 1: -log( exp(q.k+/tau) / (exp(q.k+/tau) + sum_i exp(q.k_i/tau)) ), q and keys
    unit vectors, the queue's keys k_i; the mean over the queries."""
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    terms = []
    for i in range(q.shape[0]):
        positive = torch.exp(qn[i] @ kn[i] / tau)
        negatives = sum(torch.exp(qn[i] @ queue[j] / tau) for j in range(queue.shape[0]))
        terms.append(-torch.log(positive / (positive + negatives)))
    return sum(terms) / len(terms)


def grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), torch.cat([t.grad for t in leaves])


IMPLS = [("reference", None), ("tiled", None), ("tiled", 3), ("triton", (16, 16))]
# many positives, one (a label seen once: its other view), a mix with unlabelled (-1) images
LABELS = {"many": [0, 1, 0, 2, 1, 0, 0], "one": [0, 1, 2, 3, 4, 5, 6], "unlabelled": [0, -1, 0, 1, -1, 1, 2]}


def needs(impl):
    if impl == "triton" and not triton_runs_on("cpu"):
        pytest.skip("Triton runs on the CPU only under TRITON_INTERPRET=1")


@pytest.mark.parametrize("impl,block", IMPLS)
@pytest.mark.parametrize("labels", list(LABELS))
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_supcon_two_views_against_the_paper(impl, block, labels, tau):
    needs(impl)
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(7, 11, generator=g, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(7, 11, generator=g, dtype=torch.float64)
    y = torch.tensor(LABELS[labels])
    rows = y.tolist() + y.tolist()  # both views share their image's label; -1 are each their own class
    unique = [label if label >= 0 else -10 - i % 7 for i, label in enumerate(rows)]
    want = grads(lambda a, b: supcon_oracle(torch.cat([a, b]), unique, tau), z1, z2)
    for dtype in ([torch.float64, torch.float32] if impl != "triton" else [torch.float32]):
        got = grads(lambda a, b: supcon_loss(a, b, y, tau, impl=impl, block=block), z1.to(dtype), z2.to(dtype))
        if dtype == torch.float64:  # the same algebra in float64: rounding only, ~1e-15 of O(1 / tau) terms
            assert max_abs_error(got[0], want[0]) < 1e-12 / tau
            assert max_abs_error(got[1], want[1]) < 1e-12 / tau
        else:
            bound = SupConBound(torch.cat([z1, z2]), tau)
            assert max_abs_error(got[0], want[0]) <= bound.loss
            assert bound.grad_fraction(got[1], want[1]) <= 1


@pytest.mark.parametrize("impl,block", IMPLS)
def test_supcon_one_view_with_anchors_without_positives(impl, block):
    """One view per row: rows 3 and 5 have labels seen once, no positive, and add nothing."""
    needs(impl)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = [0, 1, 0, 2, 1, 3, 0, 1]
    want = grads(lambda a: supcon_oracle(a, y, 0.2), z)
    got = grads(lambda a: supcon_loss(a, None, torch.tensor(y), 0.2, impl=impl, block=block), z.float())
    bound = SupConBound(z, 0.2, half=4)
    assert max_abs_error(got[0], want[0]) <= bound.loss
    assert bound.grad_fraction(got[1], want[1]) <= 1
    alone = grads(lambda a: supcon_loss(a, None, torch.arange(8), 0.2, impl=impl, block=block), z.float())
    assert alone[0] == 0 and not alone[1].any()  # nobody has a positive: no loss, no gradient


@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_supcon_with_one_label_per_image_is_nt_xent(impl):
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        a, b = z1.to(dtype), z2.to(dtype)
        sup = grads(lambda x, w: supcon_loss(x, w, torch.arange(9) * 3, 0.1, impl=impl), a, b)
        ntx = grads(lambda x, w: nt_xent_loss(x, w, 0.1, impl=impl), a, b)
        if impl == "reference" and dtype == torch.float64:
            assert torch.allclose(sup[0], ntx[0], rtol=0, atol=1e-13)
        bound = SupConBound(torch.cat([z1, z2]), 0.1)  # two float32 computations of one value: twice a bound
        assert max_abs_error(sup[0], ntx[0]) <= 2 * bound.loss
        assert bound.grad_fraction(sup[1], ntx[1]) <= 2


def test_class_ids_group_equal_keys():
    ids = _class_ids(torch.tensor([5, -3, 3, 5, -2, 3, 9])).tolist()
    assert ids[0] == ids[3] and ids[2] == ids[5] and sorted(set(ids)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("impl,block", IMPLS)
@pytest.mark.parametrize("queue_size,tau", [(1, 0.2), (13, 0.2), (37, 0.05), (20, 1.0)])
def test_moco_against_the_paper(impl, block, queue_size, tau):
    needs(impl)
    g = torch.Generator().manual_seed(queue_size)
    q = torch.randn(9, 10, generator=g, dtype=torch.float64)
    k = q + torch.randn(9, 10, generator=g, dtype=torch.float64)
    queue = F.normalize(torch.randn(queue_size, 10, generator=g, dtype=torch.float64), dim=1)
    want = grads(lambda a: moco_oracle(a, k, queue, tau), q)
    for dtype in ([torch.float64, torch.float32] if impl != "triton" else [torch.float32]):
        got = grads(lambda a, t=dtype: moco_loss(a, k.to(t), queue.to(t), tau, impl=impl, block=block), q.to(dtype))
        if dtype == torch.float64:
            assert max_abs_error(got[0], want[0]) < 1e-12 / tau
            assert max_abs_error(got[1], want[1]) < 1e-12 / tau
        else:
            bound = InfoNCEBound(q, queue_size, tau)
            assert max_abs_error(got[0], want[0]) <= bound.loss
            assert bound.grad_fraction(got[1], want[1]) <= 1


def test_moco_keys_and_queue_take_no_gradient():
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    queue = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    moco_loss(q, k, queue, impl="tiled").backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def test_moco_16_bit_operands_stay_within_rounding_them():
    """bf16 operands against the float64 oracle: the products read rows rounded to 8 bits, so within
    the bound of float32 rows with u = 2^-8 (the rounding of each row dominates)."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    queue = F.normalize(torch.randn(24, 16, generator=g), dim=1)
    want = grads(lambda a: moco_oracle(a, k.double(), queue.double(), 0.2), q.double())
    got = grads(lambda a: moco_loss(a, k, queue, 0.2, impl="tiled", operands=torch.bfloat16), q)
    bound = InfoNCEBound(q, 24, 0.2, u=2.0 ** -8)
    assert max_abs_error(got[0], want[0]) <= bound.loss
    assert bound.grad_fraction(got[1], want[1]) <= 1


@pytest.mark.parametrize("call,match", [
    (lambda: supcon_loss(torch.ones(3, 2), torch.ones(3, 2), torch.zeros(4)), "labels"),
    (lambda: supcon_loss(torch.ones(3, 2), None, torch.zeros(3), temperature=0), "temperature"),
    (lambda: moco_loss(torch.ones(3, 2), torch.ones(3, 2), torch.ones(4, 3)), "queue"),
    (lambda: moco_loss(torch.ones(3, 2), torch.ones(3, 2), torch.ones(0, 2)), "one queued key")])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_oracles_on_a_case_by_hand():
    """Two orthogonal rows and their copies, tau = 1: SupCon with labels [0, 0] on one view is
    -log(e^0 / e^0) = 0; MoCo with key = query and an orthogonal queued key is log(1 + e^-1)."""
    z = torch.eye(2, dtype=torch.float64)
    assert supcon_oracle(z, [0, 0], 1.0).item() == pytest.approx(0.0)
    assert moco_oracle(z[:1], z[:1], z[1:], 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
