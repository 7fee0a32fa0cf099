"""The NT-Xent cases tests/models/test_ntxent.py checks and `python -m tests.support.margins` measures: correlated
views, and a case's errors as fractions of its rounding-error bound (error_bounds.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simclr_dali.models.loss_core import resolve_impl
from simclr_dali.models.ntxent import _reference_rows, nt_xent_loss, nt_xent_reference

from .error_bounds import NTXentBound, max_abs_error

TEMPERATURES = [0.05, 0.1, 0.5, 1.0]


def views(n, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z2 + 0.5 * z1  # correlated views, like real positives
    return z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)


def loss_and_grads(fn, z1, z2):
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    loss = fn(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def products(impl: str, operand: torch.dtype, device) -> str:
    """How the similarity products round: 16-bit operands multiply exactly in float32; the compiled fp32
    Triton kernels use three tf32 products (the interpreter multiplies in plain float32)."""
    if operand in (torch.bfloat16, torch.float16):
        return "exact"
    return "tf32x3" if impl == "triton" and torch.device(device).type == "cuda" else "fp32"


def reference_on_operands(z1, z2, tau, operand):
    """The float64 reference on the operands 16-bit kernels read: the float32-normalised rows rounded to
    `operand`, the gradient passed straight through that rounding (as the implementation's cast passes
    it) and back through an exact normalisation. What is left between it and the kernels is their float32
    arithmetic; what rounding the operands costs against the exact loss is in docs/results.md."""
    a, b = z1.detach().double().cpu().requires_grad_(), z2.detach().double().cpu().requires_grad_()
    exact = F.normalize(torch.cat([a, b]), dim=1)
    read = F.normalize(torch.cat([z1, z2]).detach().float(), dim=1).to(operand).double().cpu()
    loss = _reference_rows(exact + (read - exact).detach(), 0, z1.shape[0], tau)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def fractions_of_bound(z1, z2, tau, **kwargs) -> tuple[float, float]:
    """nt_xent_loss(**kwargs) against float64 references: the largest loss error and the largest row error
    of either gradient, each as a fraction of its bound (a case passes at <= 1)."""
    got = loss_and_grads(lambda a, b: nt_xent_loss(a, b, tau, **kwargs), z1, z2)
    assert got[0].dtype == torch.promote_types(z1.dtype, torch.float32)  # the loss is float32 (or 64)
    assert got[1].dtype == got[2].dtype == z1.dtype
    sixteen = (torch.bfloat16, torch.float16)
    operands = kwargs.get("operands") or (z1.dtype if z1.dtype in sixteen else torch.float32)
    impl = resolve_impl(kwargs.get("impl", "auto"), z1.device, operands)
    if z1.dtype in sixteen:
        # 16-bit inputs are normalised in float32: their gradient is the float32 one of the very same
        # computation on the same (widened) values, rounded once to the inputs' dtype, bit for bit. A single
        # rounding has no margin to its bound (u |g| is reached near powers of two), so the float32
        # gradient is the one held to the bound.
        fp32 = loss_and_grads(lambda a, b: nt_xent_loss(a, b, tau, **{**kwargs, "impl": impl, "operands": operands}),
                              z1.float(), z2.float())
        assert torch.equal(fp32[0], got[0])
        assert all(torch.equal(g.to(z1.dtype), h) for g, h in zip(fp32[1:], got[1:]))
        got = fp32
    z = torch.cat([z1, z2])
    exact = loss_and_grads(lambda a, b: nt_xent_reference(a, b, tau), z1.double().cpu(), z2.double().cpu())
    if operands in sixteen:
        # the Triton kernels multiply the 16-bit operands as they are and round their softmax weights to
        # them; the tiled path and the reference scale and widen them to float32 first
        triton = impl == "triton"
        kind = dict(operand=operands, products="exact" if triton else "fp32",
                    weights=operands if triton else torch.float32)
        checks = [  # tight: against the very operands read; and within rounding them of the exact loss
            (reference_on_operands(z1, z2, tau, operands), NTXentBound(z, tau, rows="exact", **kind)),
            (exact, NTXentBound(z, tau, rows="normalised", **kind))]
    else:
        checks = [(exact, NTXentBound(z, tau, products=products(impl, torch.float32, z1.device)))]
    loss = max(max_abs_error(got[0], ref[0]) / bound.loss for ref, bound in checks)
    grad = max(bound.grad_fraction(torch.cat(got[1:]), torch.cat(ref[1:])) for ref, bound in checks)
    return loss, grad
