"""NT-Xent: reference against a NumPy oracle, tiled and Triton against the float64 reference.

Every comparison is held to a worst-case rounding-error bound of the computation it checks
(tests/support/error_bounds.py: `NTXentBound`, from the unit roundoff, D, M, 1/tau, the normalisation's
Jacobian and the softmax's column sums), for the loss and for each row of both gradients; the bound
holds on any CPU or GPU, whatever the BLAS does. `python -m tests.support.margins` runs this grid over 20 seeds
and 1 and 2 threads and prints how much of its bound each case uses. On a machine without CUDA the
Triton kernels run on CPU tensors under the interpreter (switched on in conftest.py, before triton is
imported). Tests taking `device` run on the CPU and, where there is a GPU, on CUDA (conftest.py).
"""
import math

import numpy as np
import pytest
import torch
from conftest import triton_runs_on
from support.error_bounds import NTXentBound, max_abs_error
from support.ntxent_grid import TEMPERATURES, fractions_of_bound, products, views

from simclr_dali.models.loss_core import RowLogSumExp, resolve_impl
from simclr_dali.models.ntxent import _reference_rows, nt_xent_loss, nt_xent_reference


def numpy_oracle(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """NT-Xent by explicit loops in float64: anchors i, candidates k, feature d."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    m, dim = z.shape
    norms = [math.sqrt(math.fsum(z[i, d] ** 2 for d in range(dim))) for i in range(m)]
    total = 0.0
    for i in range(m):
        sims = [math.fsum(z[i, d] * z[k, d] for d in range(dim)) / (norms[i] * norms[k]) for k in range(m)]
        denom = math.fsum(math.exp(sims[k] / tau) for k in range(m) if k != i)
        total += math.log(denom) - sims[(i + m // 2) % m] / tau
    return total / m


def check_against_float64(z1, z2, tau, **kwargs):
    loss, grad = fractions_of_bound(z1, z2, tau, **kwargs)
    assert loss <= 1, f"loss error {loss:.3g} of its bound"
    assert grad <= 1, f"gradient error {grad:.3g} of its bound"


# ---------------------------------------------------------------------------- reference vs oracle
@pytest.mark.parametrize("n,d", [(1, 3), (4, 5), (7, 3)])
@pytest.mark.parametrize("tau", TEMPERATURES)
def test_reference_matches_numpy_oracle(n, d, tau):
    z1, z2 = views(n, d, torch.float64)
    expected = numpy_oracle(z1.numpy(), z2.numpy(), tau)
    z = torch.cat([z1, z2])
    # the oracle's own error (exact sums by fsum, one rounding per exp, log, sqrt and division) is below
    # the float64 reference's bound, so twice that bound covers both
    f64 = NTXentBound(z, tau, operand=torch.float64, u=2.0 ** -53)
    assert abs(nt_xent_reference(z1, z2, tau).item() - expected) <= 2 * f64.loss
    # float32 inputs are computed in float32 (against the oracle on the same, float32-rounded, inputs)
    a, b = z1.float(), z2.float()
    expected = numpy_oracle(a.double().numpy(), b.double().numpy(), tau)
    assert abs(nt_xent_reference(a, b, tau).item() - expected) <= NTXentBound(torch.cat([a, b]), tau).loss


@pytest.mark.parametrize("n,d", [(3, 5), (5, 3)])
@pytest.mark.parametrize("tau", [0.05, 0.3, 1.0])
def test_reference_gradient_finite_differences(n, d, tau):
    z1, z2 = views(n, d, torch.float64)
    z1.requires_grad_(), z2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_reference(a, b, tau), (z1, z2))


# ---------------------------------------------------------------------------- tiled
@pytest.mark.parametrize("tau", [0.01, 0.02, 0.025] + TEMPERATURES)  # < 0.025: running max
@pytest.mark.parametrize("n,d,block", [(37, 70, 5), (37, 70, 16), (37, 70, None), (1, 9, 3), (1, 9, 1),
                                       (7, 5, 1), (20, 16, 40), (33, 128, 13), (33, 128, (13, 13))])
def test_tiled_fp32_matches_float64(device, tau, n, d, block):
    z1, z2 = views(n, d, device=device)
    check_against_float64(z1, z2, tau, impl="tiled", block=block)


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_tiled_bf16_inputs(device, tau):  # 16-bit inputs: 16-bit operands
    z1, z2 = views(37, 70, torch.bfloat16, device)
    check_against_float64(z1, z2, tau, impl="tiled", block=8)


@pytest.mark.parametrize("impl", ["tiled", "reference"])
def test_16_bit_inputs_on_float32_operands(device, impl):  # --loss-precision fp32 under mixed precision
    z1, z2 = views(37, 70, torch.bfloat16, device)
    check_against_float64(z1, z2, 0.1, impl=impl, operands=torch.float32)


# What trains under bf16 / fp16 mixed precision: accelerate hands the loss float32 embeddings, train.py asks
# for 16-bit operands (products of the normalised rows rounded once; float32 sums, log-sum-exp and loss).
MIXED = [(n, d, tau) for n, d in [(37, 70), (1, 9), (20, 16)] for tau in (0.05, 0.2, 1.0)]


@pytest.mark.parametrize("operands", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,d,tau", MIXED)
@pytest.mark.parametrize("impl,block", [("tiled", 8), ("tiled", None), ("reference", None)])
def test_16_bit_operands_from_float32_embeddings(device, impl, block, operands, n, d, tau):
    check_against_float64(*views(n, d, device=device), tau, impl=impl, block=block, operands=operands)


@pytest.mark.parametrize("operands", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,d,tau", MIXED[:1] + MIXED[4:6])
def test_triton_16_bit_operands_from_float32_embeddings(device, operands, n, d, tau):
    needs_triton(device)
    check_against_float64(*views(n, d, device=device), tau, impl="triton", block=(16, 32), operands=operands)


def test_16_bit_operands_read_the_rounded_rows():
    """The operands are the float32-normalised rows rounded once: tiled and reference agree on them to
    their float32 sums, and differ from the float32 operands by the rounding."""
    z1, z2 = views(20, 16)
    tiled, reference, fp32 = (nt_xent_loss(z1, z2, 0.2, impl=i, operands=o).item()
                              for i, o in (("tiled", torch.bfloat16), ("reference", torch.bfloat16),
                                           ("tiled", torch.float32)))
    bound = NTXentBound(torch.cat([z1, z2]), 0.2, rows="exact", operand=torch.bfloat16).loss
    assert abs(tiled - reference) <= 2 * bound and abs(tiled - fp32) > 2 * bound


def test_tiled_ignores_autocast():
    z1, z2 = views(37, 70)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_against_float64(z1, z2, 0.1, impl="tiled", block=8)


def test_tiled_cpu_threads_leave_thread_count_alone():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # row blocks go to 3 Python threads, each single-threaded
        check_against_float64(*views(37, 70), 0.1, impl="tiled", block=4)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_single_pair_has_zero_loss():
    z1, z2 = views(1, 4)
    bound = NTXentBound(torch.cat([z1, z2]), 0.1).loss  # absolute: the exact loss is log(e^l) - l = 0
    for impl in ("reference", "tiled"):
        assert abs(nt_xent_loss(z1, z2, 0.1, impl=impl).item()) <= bound


# ---------------------------------------------------------------------------- triton
def needs_triton(device: str) -> None:
    if not triton_runs_on(device):
        pytest.skip("Triton runs CPU tensors only under the interpreter, which is off where there is a GPU")


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("n,d,block", [(37, 70, (16, 32)), (40, 70, (32, 16)), (1, 5, (16, 16)), (37, 70, None)])
def test_triton_fp32_matches_float64(device, tau, n, d, block):
    needs_triton(device)
    z1, z2 = views(n, d, device=device)
    check_against_float64(z1, z2, tau, impl="triton", block=block)


@pytest.mark.parametrize("dtype,tau", [(torch.float16, 0.05), (torch.bfloat16, 0.05), (torch.bfloat16, 0.5)])
def test_triton_16bit_inputs(device, dtype, tau):
    needs_triton(device)
    z1, z2 = views(37, 70, dtype, device)
    check_against_float64(z1, z2, tau, impl="triton", block=(16, 32))


def test_fp16_low_temperature_where_naive_overflows(device):
    """exp(1 / 0.05) = 4.9e8 overflows float16; log-sum-exp in float32 does not."""
    z1, z2 = views(37, 70, torch.float16, device)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    assert torch.isinf(torch.exp(z @ z.T / 0.05)).any()
    check_against_float64(z1, z2, 0.05, impl="tiled")
    needs_triton(device)
    check_against_float64(z1, z2, 0.05, impl="triton", block=(16, 32))


# ---------------------------------------------------------------------------- rows against gathered columns
@pytest.mark.parametrize("impl,block", [("tiled", 5), ("triton", (16, 16))])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_local_rows_against_gathered_columns(device, impl, block, tau):
    """The distributed form in one process: rank r's rows are z[r*2n : r*2n + 2n] of 3 ranks' columns.

    Covers the row offsets of the compiled kernels on CUDA, where the two-process test runs on the CPU.
    """
    if impl == "triton":
        needs_triton(device)
    n, world = 7, 3
    z = torch.nn.functional.normalize(torch.randn(world * 2 * n, 20, dtype=torch.float64), dim=1)
    for rank in range(world):
        want_z = z.clone().requires_grad_()
        want = _reference_rows(want_z, rank * 2 * n, n, tau)
        want.backward()
        got_z = z.float().to(device).requires_grad_()
        got = RowLogSumExp.apply(got_z, rank * 2 * n, n, tau, impl, block, torch.float32)
        got.backward()
        bound = NTXentBound(z, tau, row_offset=rank * 2 * n, half=n, rows="rounded",
                            products=products(impl, torch.float32, device))
        assert max_abs_error(got.detach(), want.detach()) <= bound.loss
        # other ranks' rows get the column-side term only
        assert bound.grad_fraction(got_z.grad, want_z.grad) <= 1
        assert got_z.grad[:rank * 2 * n].abs().sum() > 0 or rank == 0


# ---------------------------------------------------------------------------- selection and errors
def test_resolve_impl_picks_per_device_and_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert resolve_impl("auto", torch.device("cpu"), dtype) == "tiled"
    assert resolve_impl("auto", "cuda", torch.float32) == "tiled"  # 3xTF32 Triton lost to it on an H100
    assert resolve_impl("auto", "cuda", torch.float64) == "tiled"  # Triton computes in fp32 at most
    assert resolve_impl("auto", "cuda", torch.bfloat16) == "triton"  # triton is a requirement of this project
    assert resolve_impl("auto", "cuda:1", torch.float16) == "triton"
    assert resolve_impl("reference", "cpu", torch.bfloat16) == "reference"
    with pytest.raises(ValueError, match="unknown NT-Xent"):
        resolve_impl("fused", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_matches_the_float64_reference(device, dtype):
    if resolve_impl("auto", device, dtype) == "triton":
        needs_triton(device)
    check_against_float64(*views(9, 12, dtype, device), 0.2)  # impl="auto"


@pytest.mark.parametrize("kwargs,match", [(dict(temperature=0.0), "temperature"), (dict(impl="x"), "unknown"),
                                          (dict(distributed=True), "not initialised"),
                                          (dict(impl="tiled", block=(4, 8)), "square"), (dict(block=0), "positive")])
def test_bad_arguments(kwargs, match):
    z1, z2 = views(4, 8)
    with pytest.raises(ValueError, match=match):
        nt_xent_loss(z1, z2, **kwargs)
    with pytest.raises(ValueError, match="must both be"):
        nt_xent_loss(z1, z2[:3])
