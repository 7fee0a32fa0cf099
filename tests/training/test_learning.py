"""Tests that would fail with a trainer that does not learn: the optimiser moves the weights and lowers
the loss, LARS treats biases and norm weights as SimCLR wants, the logged learning rate is the warmup +
cosine closed form, and the evaluation protocols against independent NumPy computations."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import fixed_batch, make_folder, train_here
from support.error_bounds import gamma, unit_roundoff

from simclr_dali import training as train
from simclr_dali.evaluation.evaluate import EvalConfig
from simclr_dali.evaluation.probes import FinetuneSettings, finetune, finetune_augment, linear_probe_top1
from simclr_dali.models.features import knn_top1
from simclr_dali.pipelines.sources import load_folder


def small_cfg(*args):
    return train.parse_args(["--backbone", "test_resnet", "--batch-size", "16", "--warmup-epochs", "0", *args])


def test_a_step_moves_the_weights_and_steps_on_a_fixed_batch_lower_the_loss():
    from simclr_dali.models.ntxent import nt_xent_loss

    cfg, model, optimizer, views = fixed_batch("--lr", "4.8")  # 0.3 per 256 images at batch 16, times 16
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for step in range(8):
        loss = nt_xent_loss(*model(views).chunk(2), cfg.temperature)
        loss.backward()
        if step == 0:  # timm zero-initialises each block's last BN, so the layers before it start at 0
            pushed = {n for n, p in model.named_parameters() if p.grad.abs().sum() > 0}
            assert len(pushed) > len(start) / 2
        optimizer.found_inf = torch.tensor(0.0)  # as finite.FiniteGuard hands over its decision
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
        if step == 0:
            assert pushed <= moved  # a step moves every weight that has a gradient (decay moves others)
    assert moved == set(start)  # and in a few steps every weight, biases and BatchNorm too
    assert losses[-1] < 0.8 * losses[0], losses


def test_lars_exempts_biases_and_norm_weights_from_adaptation_and_decay():
    cfg = small_cfg("--weight-decay", "0.1", "--momentum", "0.9")
    torch.manual_seed(0)
    model = train.build_model(cfg)
    lr = 0.5
    optimizer, _ = train.build_optimizer(cfg, model, lr, steps_per_epoch=10)
    for group in optimizer.param_groups:
        group["lr"] = lr
    gen = torch.Generator().manual_seed(2)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    optimizer.found_inf = torch.tensor(0.0)
    optimizer.step()
    for n, p in model.named_parameters():  # the first step: momentum buffer (zeros) = 0.9 * 0 + g' = g'
        w, g = before[n].numpy(), grads[n].double().numpy()
        buf = optimizer.state[p]["momentum_buffer"].double().numpy()
        if p.ndim <= 1:  # biases, BatchNorm weights and biases: plain SGD, no decay, no trust ratio
            assert np.array_equal(buf, g), n  # g' = g, exactly
        else:
            trust = 0.001 * np.linalg.norm(w) / (np.linalg.norm(g) + 0.1 * np.linalg.norm(w) + 1e-8)
            expected = trust * (g + 0.1 * w)
            # GuardedLars in float32, this oracle in float64: each within its dtype's bound of the exact g'
            bound = sum(scaled_gradient_bound(w, g, 0.1, trust, unit_roundoff(dtype))
                        for dtype in (torch.float32, torch.float64))
            # largest observed: 0.09 of it (20 seeds, 1 and 2 threads); a trust ratio without wd |w|: 450 x it
            assert (np.abs(buf - expected) <= bound).all(), (n, (np.abs(buf - expected) / bound).max())
        # w - lr buf (lr = 0.5: the product is exact) is exact in float64 unless one term is below 2^-29 of
        # the other, and then the larger is the float32 result either way: one rounding to float32 gives the
        # correctly rounded step, which the fused kernel's single rounding must equal bit for bit
        assert np.array_equal(p.detach().numpy(), (w - lr * buf).astype(np.float32)), n


def scaled_gradient_bound(w: np.ndarray, g: np.ndarray, wd: float, trust: float, u: float) -> np.ndarray:
    """Elementwise bound (first order in u) on the rounding error of LARS's g' = trust (g + wd w) with
    trust = 0.001 |w| / (|g| + wd |w| + 1e-8), computed in a dtype of unit roundoff u."""
    norm = gamma(w.size, u) / 2 + u  # a 2-norm: n squares summed, then a square root
    trust_rel = 2 * norm + 8 * u  # two norms; 0.001, wd and 1e-8 rounded to the dtype; 5 operations
    # g + wd w: wd rounded, one product, one sum; then the product with trust
    return trust * (np.abs(g + wd * w) * (trust_rel + 2 * u) + 2 * u * wd * np.abs(w))


@pytest.mark.slow
@pytest.mark.parametrize("scaling", ["linear", "sqrt"])
def test_the_logged_learning_rate_is_the_warmup_cosine_closed_form(scaling, tmp_path):
    folder = make_folder(tmp_path / "images", per_class=8)  # 22 training images: 2 steps of 8 per epoch
    out = tmp_path / "run"
    assert train_here("--data", str(folder), "--out", str(out), "--epochs", "4", "--lr", "0.6",
                      "--lr-scaling", scaling) == 0  # TINY: batch 8, one warmup epoch, a log line per step
    base = 0.6 * (8 / 256 if scaling == "linear" else math.sqrt(8 / 256))
    warmup, total = 2, 8  # one epoch of 2 steps; 4 epochs
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "step"}
    assert sorted(lrs) == list(range(1, 9))
    u = unit_roundoff(torch.float64)  # timm's schedule and this closed form: Python floats
    for step, lr in lrs.items():
        t = step - 1  # the schedule is set before the step runs
        if t < warmup:  # base (3 roundings), base * 1e-3 (2), the step (base - init) / warmup * t (3), the sum
            expected, rel = base * 1e-3 + t * (base - base * 1e-3) / warmup, 9 * u
        else:  # x = pi t / T (3 roundings); cos within an ulp (2u); 1 + cos(x) divides its error by 1 + cos(x)
            x = math.pi * (t - warmup) / (total - warmup)
            expected = 0.5 * base * (1 + math.cos(x))
            rel = 5 * u + (2 * u * abs(math.cos(x)) + 3 * u * x * math.sin(x)) / (1 + math.cos(x))
        # two evaluations: 0 of it here (the same operations), up to 0.11 over 40 other schedules
        assert abs(lr - expected) <= 2 * rel * expected, step


def test_knn_is_the_weighted_vote_computed_independently():
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(60, 12)), rng.normal(size=(25, 12))
    train_y, test_y = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    k, t = 7, 0.1
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    q = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    # Both in float64. A cosine: two normalisations (norm gamma(D)/2 + u, a division) and a D-term dot product
    # of unit vectors; a vote: exp(s / t) turns the cosine's error into a relative one over t (and rounds the
    # division and the exp), summed over k. A query whose neighbours or winning class are closer than both
    # computations' errors could go either way; none may differ otherwise.
    u, dim = unit_roundoff(torch.float64), train_x.shape[1]
    cosine = 2 * gamma(dim, u) + 4 * u
    vote = (cosine + u) / t + 2 * u + gamma(k, u)
    correct = fragile = 0
    for i in range(len(q)):
        sims = a @ q[i]
        order = np.argsort(-sims)
        top = order[:k]
        votes = np.zeros(4)
        for j in top:
            votes[train_y[j]] += math.exp(sims[j] / t)
        correct += int(np.argmax(votes) == test_y[i])
        first, second = np.sort(votes)[::-1][:2]
        fragile += int(sims[order[k - 1]] - sims[order[k]] <= 2 * 2 * cosine
                       or first - second <= 2 * vote * (first + second))
    got = knn_top1(*(torch.tensor(x) for x in (train_x, train_y, test_x, test_y)), k=k, temperature=t)
    assert fragile == 0  # the closest decision is 1e9 x its bound away: the same counts, divided alike
    assert got == correct / len(q) and 0 < got < 1


def test_the_linear_probe_separates_linearly_separable_features():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(5, 32)) * 3

    def draw(n):
        y = rng.integers(0, 5, n)
        return torch.tensor(centres[y] + rng.normal(size=(n, 32)), dtype=torch.float32), torch.tensor(y)

    (train_x, train_y), (test_x, test_y) = draw(300), draw(100)
    assert linear_probe_top1(train_x, train_y, test_x, test_y, epochs=30, lr=1e-2) >= 0.95
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    assert linear_probe_top1(train_x, shuffled, test_x, test_y, epochs=30, lr=1e-2) < 0.6  # labels matter


def test_fine_tuning_changes_the_backbone(tmp_path):
    from simclr_dali.evaluation.backbone import load_backbone
    from simclr_dali.pipelines.loader import eval_loader

    folder = load_folder(str(make_folder(tmp_path / "images", per_class=8)), "all")
    backbone = load_backbone({"backbone": "test_resnet"}, None)
    start = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    settings = FinetuneSettings(epochs=2, batch_size=8, lr=0.05, augment=finetune_augment({}, True), image_size=32,
                                workers=1, device_id=None)
    test = eval_loader(folder, batch_size=8, size=32, workers=1, device_id=None)
    scores = finetune(backbone, folder, 3, test, settings, torch.device("cpu"))
    assert 0 <= scores["top1"] <= 1 and EvalConfig().finetune is False
    moved = [n for n, p in backbone.named_parameters() if not torch.equal(p, start[n])]
    assert len(moved) == len(start), set(start) - set(moved)
