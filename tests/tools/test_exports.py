"""simclr-export: the ONNX export runs in onnxruntime and the timm folder loads through timm's own
`local-dir:` loader, each giving the features of the run's PyTorch backbone (the oracle) on the same batch;
a small-stem run is refused for timm in one sentence; TorchScript loads back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_folder

from simclr_dali.errors import UserError
from simclr_dali.evaluation.backbone import load_backbone
from simclr_dali.tools import export

pytestmark = pytest.mark.slow
ONNX_ATOL = 1e-4  # float32 features of O(1) through onnxruntime's kernels (the bound)


def tiny_run(root: Path, *flags: str) -> Path:
    from simclr_dali import training as train

    out = root / "run"
    assert train.main(["--data", str(make_folder(root / "images", per_class=6)), "--epochs", "1", "--out", str(out),
                       *TINY, "--image-size", "24", *flags]) == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("export"))


def pytorch_features(run: Path, x: torch.Tensor) -> torch.Tensor:
    model = load_backbone(json.loads((run / "config.json").read_text()), run / "backbone.safetensors").eval()
    with torch.no_grad():
        return model(x)


def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(run, capsys):
    import onnxruntime

    assert export.main(["--run", str(run), "--format", "onnx"]) == 0
    path = run / "export" / "backbone.onnx"
    assert f"wrote {path}" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("images", "features") and inp.shape[1:] == [3, 24, 24]
    assert not isinstance(inp.shape[0], int)  # the batch dimension is symbolic
    for n in (1, 5):  # neither is the traced batch of two
        x = export.example_batch(24, n=n, seed=n)
        got = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
        want = pytorch_features(run, x)
        assert got.shape == want.shape == (n, want.shape[1])
        assert (got - want).abs().max().item() <= ONNX_ATOL


def test_timm_export_loads_with_its_pretrained_config(run):
    import timm
    from timm.data import resolve_data_config

    assert export.main(["--run", str(run), "--format", "timm"]) == 0
    folder = run / "export" / "timm"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0).eval()
    data = resolve_data_config(model=model)
    assert data["input_size"] == (3, 24, 24) and data["crop_pct"] == 1.0
    assert data["mean"] == pytest.approx((0.485, 0.456, 0.406)) and data["std"] == pytest.approx((0.229, 0.224, 0.225))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["pretrained_cfg"]["tag"] == "simclr"
    assert "origin_url" not in cfg["pretrained_cfg"]  # not timm's ImageNet weights: nothing says they are
    x = export.example_batch(24, n=3, seed=3)
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, pytorch_features(run, x))  # the same modules and weights: bit for bit


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_loads_back(run):
    assert export.main(["--run", str(run), "--format", "torchscript", "--out", str(run / "b.pt")]) == 0
    loaded = torch.jit.load(str(run / "b.pt"))
    x = export.example_batch(24, n=4, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), pytorch_features(run, x))


def test_small_stem_is_refused_for_timm_in_one_sentence(tmp_path):
    out = tiny_run(tmp_path, "--backbone", "resnet18", "--small-stem")  # conv1 + maxpool: a stem to replace
    with pytest.raises(UserError) as err:
        export.export(export.ExportConfig(run=str(out), format="timm"))
    said = str(err.value)
    assert "--small-stem" in said and "--format onnx" in said and "\n" not in said
    assert not (out / "export" / "timm").exists()  # nothing half written


def test_a_run_that_is_not_a_run_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        export.main(["--run", str(tmp_path), "--format", "onnx"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is not a training run" in err and len(err.splitlines()) == 1
