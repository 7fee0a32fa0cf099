"""NT-Xent (normalised temperature-scaled cross-entropy), the SimCLR loss.

Each of the 2N embeddings is an anchor; its positive is the other view of the same image and its
negatives are the other 2N - 2 embeddings. The loss is the mean over the 2N anchors of
    -log( exp(s_ip / tau) / sum_{k != i} exp(s_ik / tau) ),   s = cosine similarity.

Layout, as in a Triton tutorial: the reference (the oracle) first, then the public entry point.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Reference: builds the full (2N, 2N) matrix. The oracle for every other implementation.
# --------------------------------------------------------------------------------------------
def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain NT-Xent in float32 with log-sum-exp and a -inf self-mask."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D)
    logits = z @ z.T / temperature  # (2N, 2N)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.arange(2 * n, device=z.device).roll(n)  # i <-> i + N
    return F.cross_entropy(logits, positives)


IMPLS = ("auto", "reference")


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, *,
                 impl: str = "auto") -> torch.Tensor:
    """Mean NT-Xent over the 2N anchors of two views z1, z2, each (N, D) un-normalised projections."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if impl not in IMPLS:
        raise ValueError(f"unknown NT-Xent implementation {impl!r}; choose one of {IMPLS}")
    return nt_xent_reference(z1, z2, temperature)


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation that `impl` selects on `device` (for the start-up panel)."""
    return "reference" if impl == "auto" else impl
