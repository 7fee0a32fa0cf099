"""Tests that would fail with a trainer that does not learn: the optimiser moves the weights and lowers
the loss, LARS treats biases and norm weights as SimCLR wants, the logged learning rate is the warmup +
cosine closed form, and the evaluation protocols against independent NumPy computations."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_folder, train_here

import train
from evaluate import EvalConfig
from pipelines.sources import load_folder
from probes import FinetuneSettings, finetune, finetune_augment, knn_top1, linear_probe_top1


def small_cfg(*args):
    return train.parse_args(["--backbone", "test_resnet", "--batch-size", "16", "--warmup-epochs", "0", *args])


def test_a_step_moves_the_weights_and_steps_on_a_fixed_batch_lower_the_loss():
    from models.ntxent import nt_xent_loss

    cfg = small_cfg("--lr", "4.8")  # 0.3 per 256 images at batch 16, times 16
    torch.manual_seed(0)
    model = train.build_model(cfg).train()
    optimizer, _ = train.build_optimizer(cfg, model, cfg.lr, steps_per_epoch=10)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=gen)
    views = torch.cat([images + 0.3 * torch.randn(16, 3, 32, 32, generator=gen) for _ in range(2)])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for step in range(8):
        loss = nt_xent_loss(*model(views).chunk(2), cfg.temperature)
        loss.backward()
        if step == 0:  # timm zero-initialises each block's last BN, so the layers before it start at 0
            pushed = {n for n, p in model.named_parameters() if p.grad.abs().sum() > 0}
            assert len(pushed) > len(start) / 2
        optimizer.found_inf = torch.tensor(0.0)  # as safeguards.FiniteGuard hands over its decision
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
    for n, p in model.named_parameters():  # the first step: momentum buffer = g'
        w, g = before[n].numpy(), grads[n].double().numpy()
        if p.ndim <= 1:  # biases, BatchNorm weights and biases: plain SGD, no decay, no trust ratio
            expected = w - lr * g
        else:
            trust = 0.001 * np.linalg.norm(w) / (np.linalg.norm(g) + 0.1 * np.linalg.norm(w) + 1e-8)
            expected = w - lr * trust * (g + 0.1 * w)
        np.testing.assert_allclose(p.detach().double().numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=n)


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
    for step, lr in lrs.items():
        t = step - 1  # the schedule is set before the step runs
        expected = (base * 1e-3 + t * (base - base * 1e-3) / warmup if t < warmup
                    else 0.5 * base * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))))
        assert lr == pytest.approx(expected, rel=1e-9), step


def test_knn_is_the_weighted_vote_computed_independently():
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(60, 12)), rng.normal(size=(25, 12))
    train_y, test_y = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    k, t = 7, 0.1
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    q = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    correct = 0
    for i in range(len(q)):
        sims = a @ q[i]
        top = np.argsort(-sims)[:k]
        votes = np.zeros(4)
        for j in top:
            votes[train_y[j]] += math.exp(sims[j] / t)
        correct += int(np.argmax(votes) == test_y[i])
    got = knn_top1(*(torch.tensor(x) for x in (train_x, train_y, test_x, test_y)), k=k, temperature=t)
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
    from evaluate import load_backbone
    from pipelines.loader import eval_loader

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
