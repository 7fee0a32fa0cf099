"""Rounding-error bounds behind the tests' float comparisons.

A tolerance in these tests is an upper bound on the rounding error of the computation it checks, derived
from the dtype's unit roundoff, the number of terms summed and the magnitudes involved, not a number
tuned on one machine: what BLAS blocks, vectorises or fuses differently on another CPU changes the
error, never the bound. The bounds are first order in u (the products of two rounding errors are below
u^2 and left out) and worst case: observed errors are typically a few per cent of them
(`python -m tests.support.margins` measures that).

Notation (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3): u is the unit roundoff of
a dtype; gamma(n, u) = n u / (1 - n u) bounds the relative error of any sum of n terms computed in
any order, |fl(sum x_i) - sum x_i| <= gamma(n, u) sum |x_i|, and of an n-term dot product likewise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
                 torch.float16: 2.0 ** -11}


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next number of `dtype`: the largest relative rounding error."""
    return UNIT_ROUNDOFF[dtype]


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n: relative error bound of a sum (or dot product) of n terms, in any order."""
    if n * u >= 1:
        raise ValueError(f"gamma({n}) is unbounded at unit roundoff {u}")
    return n * u / (1 - n * u)


def max_abs_error(actual, expected) -> float:
    """max |actual - expected|, in float64 on the CPU."""
    actual = torch.as_tensor(actual).double().cpu()
    expected = torch.as_tensor(expected).double().cpu()
    assert torch.isfinite(actual).all(), "a computed value is not finite"
    return (actual - expected).abs().max().item()


# -- NT-Xent ----------------------------------------------------------------------------------------
def exp_error(x_max: float, u: float) -> float:
    """Relative error of a computed exp(x), |x| <= x_max, whose argument was formed in floating point:
    a few ulps of the function itself (libm, SLEEF, the GPU's ex2.approx: at most 4 u) plus u |x| for
    rounding the argument when it is formed (s - m) and again when it is scaled (by log2 e on a GPU)."""
    return (4 + 2 * x_max) * u


class NTXentBound:
    """Worst-case rounding-error bounds of NT-Xent computed in float32 (any of the implementations), for
    the loss and, per embedding row, the gradient's max abs error.

    z: (M, D) the float64 values the computation starts from. Rows [row_offset, row_offset + 2 half) are
    this process's anchors; the others only columns. How the unit rows the products read relate to the
    exact ones (`rows`): "normalised" (z un-normalised, normalised in float32, then cast to `operand`:
    nt_xent_loss against the exact reference), "rounded" (z unit rows, rounded to float32: the kernels
    on gathered rows) or "exact" (the reference was given the very operands the kernels read).
    jacobian: the gradient goes back through the float32 normalisation (nt_xent_loss), not to the rows.
    operand: the dtype of the similarity products' operands. products: "fp32" (each product rounded to
    float32), "exact" (16-bit operands multiplied as they are: exact in float32), "tf32x3" (the fp32 Triton
    kernels on CUDA: three tf32 products each, 3 * 2^-22 relative). scaled_in: the dtype in which the
    products are scaled by 1 / tau. weights: the dtype the backward rounds its softmax weights to before
    their product (the Triton kernels: the operands'). world: processes whose gradient contributions are
    summed (all_reduce) into each row. grad_dtype: the dtype the gradient is returned in.

    The derivation, first order in u = 2^-24 (float32 accumulation) and v = unit_roundoff(operand):
      rows read: componentwise relative error e_u = gamma_D / 2 + 2u (sum of squares, sqrt, division)
        + v for 16-bit operands ("normalised"), u ("rounded") or 0 ("exact");
      similarity s_ij of two unit rows: |ds| <= 2 e_u + e_dot since sum_d |u_id u_jd| <= 1, with e_dot
        = gamma_D (or gamma_3D + 12u for tf32x3); logits s / tau: e_l = (|ds| + u + u_scaled) / tau;
      log-sum-exp over the M - 1 columns != self: the logits' errors pass through unamplified (lse is
        1-Lipschitz in the max norm); the exps (|argument| <= 2 / tau), the sum (gamma_{M+16}, 16 per-
        thread partial sums), up to M running-max rescales (5u each, u |dm| with sum |dm| <= 2 / tau) and
        the log add e_S + (4 + 3 / tau + 2 log M) u;
      loss: lse_i - pos_i per row (each within its bound, |lse_i - pos_i| <= 2 / tau + log M), then the
        mean of the R = 2 half rows (gamma_{R+1} of the largest row);
      gradient: the softmax weights P_kj = exp(s_kj - lse_k) have relative error e_P = expm1(e_l + e_lse
        + the exp's), W_kj = P_kj [k local] + P_jk [j local] - 2 [j = pos(k)] has sum_j |W_kj| <= A_k =
        [k local] (1 + 2) + C_k with C_k = sum_{local j} P_jk the column sum of the exact softmax (the one
        data-dependent magnitude, taken from float64), so ||d(sum_j W_kj u_j)||_2 <= e_P (A_k - 2[k local])
        + (v_W + 4u + e_u + gamma_{M+17+world}) A_k (v_W: W rounded to 16-bit `weights`; 4u: forming W
        and scaling by 1 / (R tau)); then through the normalisation's Jacobian (I - u_k u_k^T) / ||z_k||,
        of norm 1 / ||z_k||, which adds 2 (gamma_D + 2 e_norm + 8u) ||a_k|| / ||z_k|| of its own. The
        2-norm bounds the max abs error.
      A gradient returned in 16 bits adds v_in |g| per component.
    """

    def __init__(self, z: torch.Tensor, temperature: float, *, row_offset: int = 0, half: int | None = None,
                 rows: str = "normalised", jacobian: bool | None = None, operand: torch.dtype = torch.float32,
                 products: str = "fp32", scaled_in: torch.dtype = torch.float32,
                 weights: torch.dtype = torch.float32, world: int = 1, grad_dtype: torch.dtype = torch.float32,
                 u: float = 2.0 ** -24):
        z = z.detach().double().cpu()
        m, d = z.shape
        half = m // 2 if half is None else half
        r, tau, lo, hi = 2 * half, temperature, row_offset, row_offset + 2 * half
        jacobian = rows != "rounded" if jacobian is None else jacobian
        sixteen = operand in (torch.bfloat16, torch.float16)
        v = unit_roundoff(operand) if sixteen else u
        u_scaled = unit_roundoff(scaled_in) if scaled_in in (torch.bfloat16, torch.float16) else u
        log_m = math.log(max(m - 1, 1))
        x_max = 2 / tau + log_m  # |s - m| and |s - lse| never exceed this

        e_norm = gamma(d, u) / 2 + 2 * u
        e_u = {"normalised": e_norm + (v if sixteen else 0.0), "rounded": u, "exact": 0.0}[rows]
        e_dot = {"fp32": gamma(d, u), "exact": gamma(d, u), "tf32x3": gamma(3 * d, u) + 12 * u}[products]
        e_logit = (2 * e_u + e_dot + u + u_scaled) / tau
        e_sum = gamma(m + 16, u) + 5 * m * u + 4 * u / tau + exp_error(2 / tau, u)
        e_lse = e_logit + e_sum + (4 + 3 / tau + 2 * log_m) * u
        self.loss = e_lse + e_logit + u * x_max + gamma(r + 1, u) * x_max

        unit = z / z.norm(dim=1, keepdim=True)
        logits = (unit[lo:hi] @ unit.T) / tau  # (R, M) exact (float64) logits of the local rows
        logits[torch.arange(r), torch.arange(lo, hi)] = float("-inf")
        local = torch.zeros(m, dtype=torch.float64)
        local[lo:hi] = 1.0
        a = 3 * local + torch.softmax(logits, dim=1).sum(0)  # A_k
        e_p = math.expm1(e_logit + e_lse + exp_error(x_max, u) + 6 * u)
        v_w = unit_roundoff(weights) if weights in (torch.bfloat16, torch.float16) else 0.0
        e_a = e_p * (a - 2 * local) + (v_w + 4 * u + e_u + gamma(m + 17 + world, u)) * a
        grads = e_a / (r * tau)
        if jacobian:
            grads = (grads + 2 * (gamma(d, u) + 2 * e_norm + 8 * u) * a / (r * tau)) / z.norm(dim=1)
        self.grads = grads  # (M,) per row of z
        self.v_in = unit_roundoff(grad_dtype) if grad_dtype in (torch.bfloat16, torch.float16) else 0.0

    def grad_bound(self, expected: torch.Tensor) -> torch.Tensor:
        """(M, 1) per-row bound for a gradient whose exact value is `expected` (M, D)."""
        expected = expected.detach().double().cpu()
        return (self.grads + self.v_in * (expected.abs().amax(dim=1) + self.grads))[:, None]

    def grad_fraction(self, actual: torch.Tensor, expected: torch.Tensor) -> float:
        """Largest |actual - expected| of a row as a fraction of that row's bound."""
        actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
        assert torch.isfinite(actual).all(), "a computed gradient is not finite"
        return ((actual - expected).abs() / self.grad_bound(expected)).max().item()


# -- SupCon and MoCo (models/contrastive.py) ---------------------------------------------------------
class SupConBound:
    """NT-Xent's bound (its log-sum-exp and its kernel positive, which the SupCon path takes back out)
    plus the two terms SupCon computes in PyTorch, first order in u:
      partner logit z_i . z_p / tau, taken back out: e_logit of NT-Xent;
      mean positive logit z_i . (S_y - z_i) / (tau c): S sums c + 1 unit rows (gamma_M per component,
        each read with e_u), the subtraction u, the dot gamma_D, and by Cauchy-Schwarz
        sum_d |z_id| sum_j |z_jd| <= c + 1 <= 2c, so 2 (2 e_u + gamma_M + gamma_D + 4u) / tau;
      the three means over R anchors: gamma_{R+1} of 2 / tau + log M each.
    Gradient, per row k: the kernels' part is NT-Xent's (keep = 0 rows only shrink W); the PyTorch
    terms give row k at most (2 + 2 + 2) / (R tau) in norm (its partner, its class sum, its class
    mates' weights 1/c_i summing to <= 2), each within (gamma_M + gamma_D + 2 e_u + 6u), then the
    normalisation's Jacobian of norm 1 / ||z_k|| and its own error as in NTXentBound."""

    def __init__(self, z: torch.Tensor, temperature: float, u: float = 2.0 ** -24, **kwargs):
        self.ntxent = NTXentBound(z, temperature, u=u, **kwargs)
        m, d = z.shape
        r, tau = 2 * (kwargs.get("half") or m // 2), temperature
        e_norm = gamma(d, u) / 2 + 2 * u
        e_u = e_norm if kwargs.get("rows", "normalised") == "normalised" else u
        e_logit = (2 * e_u + gamma(d, u) + 2 * u) / tau
        e_pos = 2 * (2 * e_u + gamma(m, u) + gamma(d, u) + 4 * u) / tau
        self.loss = self.ntxent.loss + e_logit + e_pos + 3 * gamma(r + 1, u) * (2 / tau + math.log(m))
        extra = 6 * (gamma(m, u) + gamma(d, u) + 2 * e_u + 6 * u) / (r * tau)
        extra = (extra + 2 * (gamma(d, u) + 2 * e_norm + 8 * u) * 6 / (r * tau)) / z.detach().double().norm(dim=1)
        self.grads = self.ntxent.grads + extra

    def grad_fraction(self, actual: torch.Tensor, expected: torch.Tensor) -> float:
        actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
        assert torch.isfinite(actual).all(), "a computed gradient is not finite"
        return ((actual - expected).abs() / self.grads[:, None]).max().item()


class InfoNCEBound:
    """MoCo's InfoNCE in float32: queries q (R, D) normalised in float32, keys likewise, the queue's unit
    rows rounded to float32. As NTXentBound: logits within e_logit = (2 e_norm + gamma_D + 2u) / tau; the
    log-sum-exp over K + 1 terms within e_logit + e_sum + (4 + 3 / tau + 2 log(K+1)) u; the loss adds the
    positive's e_logit, logaddexp's few u |x| and the mean's gamma_{R+1}. Gradient per query: W = P - e_pos
    sums to at most 2 in magnitude; each weight within e_P, the weighted sum within (4u + e_norm +
    gamma_{K+17}), over R tau; then the normalisation's Jacobian as in NTXentBound."""

    def __init__(self, q: torch.Tensor, queue_size: int, temperature: float, products: str = "fp32",
                 u: float = 2.0 ** -24):
        q = q.detach().double().cpu()
        r, d = q.shape
        k, tau = queue_size + 1, temperature
        log_k = math.log(k)
        x_max = 2 / tau + log_k
        e_norm = gamma(d, u) / 2 + 2 * u
        e_dot = gamma(3 * d, u) + 12 * u if products == "tf32x3" else gamma(d, u)
        e_logit = (2 * e_norm + e_dot + 2 * u) / tau
        e_sum = gamma(k + 16, u) + 5 * k * u + 4 * u / tau + exp_error(2 / tau, u)
        e_lse = e_logit + e_sum + (4 + 3 / tau + 2 * log_k) * u
        self.loss = e_lse + 2 * e_logit + 4 * u * x_max + gamma(r + 1, u) * x_max
        e_p = math.expm1(e_logit + e_lse + exp_error(x_max, u) + 6 * u)
        grads = (2 * e_p + 2 * (4 * u + e_norm + gamma(k + 17, u))) / (r * tau)
        self.grads = (grads + 2 * (gamma(d, u) + 2 * e_norm + 8 * u) * 2 / (r * tau)) / q.norm(dim=1)

    def grad_fraction(self, actual: torch.Tensor, expected: torch.Tensor) -> float:
        actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
        assert torch.isfinite(actual).all(), "a computed gradient is not finite"
        return ((actual - expected).abs() / self.grads[:, None]).max().item()


def feature_error(backbone: torch.nn.Module, dtype: torch.dtype) -> float:
    """How far eval-mode features computed in `dtype` may be from the exact ones, as a fraction of the
    image's largest feature. A rounding bound through 20 layers is not practical (products of |W| are
    astronomically loose), so an allowance: each of the L sums on a path adds at most gamma(K) of its
    output's scale (K: the longest dot product), and eval BN, ReLU and residual adds carry that on
    without growth. L counts every convolution and linear layer (at least those on any path) + the pool
    (whose sum, over the last feature map's few positions, is shorter than K)."""
    k, layers = 1, 1
    for m in backbone.modules():
        if isinstance(m, torch.nn.Conv2d):
            k, layers = max(k, m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups), layers + 1
        elif isinstance(m, torch.nn.Linear):
            k, layers = max(k, m.in_features), layers + 1
    return layers * gamma(k, unit_roundoff(dtype))


def knn_fragile(train_x, train_y, test_x, k: int, temperature: float, feature_rel: float) -> int:
    """How many queries' kNN decisions could differ between two computations of knn_top1 (in the features'
    dtype) on features that differ by `feature_rel` of their 2-norm: their k-th and (k+1)-th cosines, or
    their two largest class votes, closer than both computations' errors."""
    u, dim, k = unit_roundoff(train_x.dtype), train_x.shape[1], min(k, len(train_x))
    # a cosine: both directions move by feature_rel (the normalisation's Jacobian is 1/|f|), plus its own
    # rounding (two norms, a division, a dim-term dot product); a vote: exp(s / T) makes that relative, / T
    cosine = 2 * feature_rel + 2 * gamma(dim, u) + 4 * u
    vote = (cosine + u) / temperature + 2 * u + gamma(k, u)
    sims = F.normalize(test_x.double(), dim=1) @ F.normalize(train_x.double(), dim=1).T  # (queries, train)
    top, idx = sims.sort(dim=1, descending=True)
    votes = torch.zeros(len(sims), int(train_y.max()) + 1, dtype=sims.dtype)
    votes.scatter_add_(1, train_y[idx[:, :k]], (top[:, :k] / temperature).exp())
    first, second = votes.topk(2, dim=1).values.unbind(1)
    near_k = top[:, k - 1] - top[:, k] <= 2 * cosine if k < len(train_x) else torch.zeros(len(sims), dtype=bool)
    return int((near_k | (first - second <= vote * (first + second))).sum())
