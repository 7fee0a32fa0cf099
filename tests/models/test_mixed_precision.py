"""Mixed precision: under bf16 (ACCELERATE_MIXED_PRECISION, as `accelerate launch --mixed_precision bf16`
sets it) accelerate hands the loss float32 embeddings, and the loss reads them as bf16 operands (float32
sums); `--loss-precision fp32` keeps float32 products. On CPUs without AVX512-BF16 bf16 autocast is
emulated and slow: tiny images, a few steps."""
import json

import pytest
import torch
from conftest import fixed_batch, make_folder, panel_words, train_here

from simclr_dali import training as train
from simclr_dali.errors import UserError
from simclr_dali.models.ntxent import nt_xent_loss


@pytest.fixture
def losses(monkeypatch) -> list:
    """(embeddings' dtype, operands) of every NT-Xent call a run makes."""
    from simclr_dali.models import ntxent

    calls, real = [], ntxent.nt_xent_loss

    def loss(z1, z2, *args, **kwargs):
        calls.append((z1.dtype, kwargs.get("operands")))
        return real(z1, z2, *args, **kwargs)

    monkeypatch.setattr(ntxent, "nt_xent_loss", loss)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("precision,operands", [("auto", torch.bfloat16), ("fp32", torch.float32)])
def test_a_bf16_run_takes_the_16_bit_loss_path(tmp_path, monkeypatch, capsys, fresh_accelerate, losses,
                                               precision, operands):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    folder = make_folder(tmp_path / "images", per_class=8)  # 22 training images: 2 steps of 8
    assert train_here("--data", str(folder), "--out", str(tmp_path / "run"), "--epochs", "1",
                      "--loss-precision", precision) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    name = str(operands).removeprefix("torch.")
    assert (cfg["mixed_precision"], cfg["loss_precision"], cfg["loss_operands"]) == ("bf16", precision, name)
    assert cfg["loss_impl_resolved"] == "tiled"  # on the CPU; Triton on CUDA (scripts/gpu_check.sh)
    assert losses == [(torch.float32, operands)] * 2  # accelerate's float32 outputs, read as `operands`
    assert f"tiled implementation, {name} products (fp32 sums)" in panel_words(capsys.readouterr().out)


def test_loss_operands_follow_the_mixed_precision():
    assert train.loss_operands("auto", "bf16") == torch.bfloat16
    assert train.loss_operands("auto", "fp16") == torch.float16
    assert train.loss_operands("auto", "no") == train.loss_operands("fp32", "bf16") == torch.float32
    with pytest.raises(UserError, match="--loss-precision must be one of auto, fp32, got bf16"):
        train.parse_args(["--loss-precision", "bf16"])


@pytest.mark.slow
def test_steps_under_bf16_autocast_lower_the_loss_on_a_fixed_batch():
    """What a bf16 run computes: the model under bf16 autocast, the loss on bf16 operands of its float32
    embeddings (as accelerate hands them over), backward, LARS steps."""
    # 32 px: at 16 px this model's last stage works on 1x1 maps, where oneDNN's bf16 convolution backward
    # on AVX-512 returned NaN weight gradients now and then (11 of 60 passes of one fixed batch; 0 at 32 px)
    cfg, model, optimizer, views = fixed_batch("--lr", "1.0")
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model(views).float()  # accelerate converts the forward's outputs to float32
        loss = nt_xent_loss(*z.chunk(2), cfg.temperature, operands=torch.bfloat16)
        loss.backward()
        optimizer.found_inf = torch.tensor(0.0)  # as finite.FiniteGuard hands over its decision
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), losses
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
