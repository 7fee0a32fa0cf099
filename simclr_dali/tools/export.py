"""A run's backbone in the formats other tools load.

    simclr-export --run runs/x --format onnx          # RUN/export/backbone.onnx: onnxruntime, TensorRT, OpenVINO
    simclr-export --run runs/x --format timm          # RUN/export/timm: timm.create_model("local-dir:...")
    simclr-export --run runs/x --format torchscript   # RUN/export/backbone.torchscript.pt: torch.jit.load, C++

Every format takes what the run's DALI evaluation view gives: (N, 3, S, S) float32, RGB, normalised with
the ImageNet mean and std, S the run's --image-size; it returns the pooled features (N, F) of the frozen
backbone in eval mode (BatchNorm's running statistics, no projection head). The batch is dynamic. Each
export is checked against PyTorch on a batch of two before it is written in place (--no-check skips
it). The run's own backbone.safetensors (the weights alone, for this project's loaders) is left as it is.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from simclr_dali.errors import UserError, exit_on_user_error
from simclr_dali.models.backbone import fixed_input_size
from simclr_dali.pipelines import eval_crop
from simclr_dali.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD
from simclr_dali.settings import Parser, add_dataclass_flags, check_args, dataclass_from_args, setting
from simclr_dali.training.checkpoint import as_umask_allows

FILES = {"onnx": "backbone.onnx", "timm": "timm", "torchscript": "backbone.torchscript.pt"}
ATOL = 1e-4  # largest |exported - PyTorch| accepted on the check batch (float32 features of O(1))


@dataclass
class ExportConfig:
    run: str = setting("", help="the training run's output folder (holds config.json and backbone.safetensors)")
    format: str = setting("onnx", choices=tuple(FILES), help="onnx, timm (a folder timm loads) or torchscript")
    out: str = setting("", help="where to write it (default: RUN/export/backbone.onnx, RUN/export/timm, "
                       "RUN/export/backbone.torchscript.pt)")
    opset: int = setting(18, low=13, help="ONNX opset")
    check: bool = setting(True, help="compare the export with PyTorch on a batch of two (onnx: needs onnxruntime); "
                          "--no-check skips it")


def needs(module: str, what: str, package: str | None = None) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the {package or module} package: pip install {package or module}")


def example_batch(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """n normalised RGB images of side `size`, as the evaluation view emits them."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, size, size, generator=g)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) / 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (pixels - mean) / std


def compare(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want|; more than ATOL is one sentence (nothing is written)."""
    diff = (got.float() - want.float()).abs().max().item()
    if not diff <= ATOL:
        raise UserError(f"the {name} export differs from PyTorch by up to {diff:.3g} (more than {ATOL:g}) on the "
                        f"check batch; nothing was written (report this with the run's backbone name)")
    return diff


# -- the formats ---------------------------------------------------------------------------------
def write_onnx(backbone: torch.nn.Module, path: Path, size: int, opset: int, check: bool) -> float | None:
    """torch.onnx's exporter (torch.export underneath), input "images" and output "features", the batch
    dimension dynamic; checked in onnxruntime on a batch of a size the trace never saw."""
    needs("onnxscript", "--format onnx")
    if check:
        needs("onnxruntime", "--format onnx's check (or pass --no-check)")
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(backbone, (example_batch(size),), dynamo=True, input_names=["images"],
                                output_names=["features"], dynamic_shapes=({0: batch},), opset_version=opset,
                                verbose=False)
    program.save(str(path))
    if not check:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = example_batch(size, n=3, seed=1)
    got = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
    with torch.no_grad():
        return compare("ONNX", got, backbone(x))


def write_timm(backbone: torch.nn.Module, path: Path, run_cfg: dict, check: bool, crop: float) -> float | None:
    """timm's own save_for_hf: model.safetensors and a config.json whose pretrained_cfg holds the
    preprocessing (mean, std, input size, the evaluation view's crop), so that timm.data.resolve_data_config
    finds it; a model built for one input size (a ViT) records it as its img_size."""
    from timm.models import save_for_hf

    if run_cfg.get("small_stem"):
        raise UserError(f"--format timm: {run_cfg['backbone']} with --small-stem is not an architecture timm can "
                        f"build from its name (its stem was replaced); export it with --format onnx or "
                        f"--format torchscript, or load it with simclr_dali.Run(RUN).backbone()")
    size = run_cfg["image_size"]
    data = {"input_size": (3, size, size), "mean": tuple(v / 255 for v in IMAGENET_MEAN),
            "std": tuple(v / 255 for v in IMAGENET_STD), "crop_pct": crop, "crop_mode": "center",
            "interpolation": "bilinear"}
    sized = {"img_size": size} if fixed_input_size(run_cfg["backbone"]) else None
    save_for_hf(backbone, str(path), safe_serialization=True, data_config=data, model_args=sized)
    config = json.loads((path / "config.json").read_text())
    pretrained = config["pretrained_cfg"]
    for key in ("origin_url", "license", "paper_ids", "paper_name", "notes", "hf_hub_id"):  # timm's weights', not these
        pretrained.pop(key, None)
    pretrained.update(tag="simclr", notes=f"SimCLR pretraining by simclr-dali ({run_cfg['epochs']} epochs on "
                                          f"{run_cfg['data']}, {size} px)")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    as_umask_allows(*path.iterdir())
    if not check:
        return None
    import timm

    loaded = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0).eval()
    x = example_batch(size)
    with torch.no_grad():
        return compare("timm", loaded(x), backbone(x))


def write_torchscript(backbone: torch.nn.Module, path: Path, size: int, check: bool) -> float | None:
    """A trace (timm models are traceable; the batch is not fixed by it), saved with torch.jit."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(backbone, example_batch(size), check_trace=False)
    traced.save(str(path))
    if not check:
        return None
    with warnings.catch_warnings():  # torch deprecates TorchScript for torch.export; the format is still loaded
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path))
    x = example_batch(size, n=3, seed=1)
    with torch.no_grad():
        return compare("TorchScript", loaded(x), backbone(x))


def evaluation_crop(run: Path, size: int) -> float:
    """The crop evaluate.py used on this run (its eval.json), else the one it would use (pipelines.eval_crop)."""
    from simclr_dali.readback import Unreadable, read_json

    file = run / "eval.json"
    try:
        return float(read_json(file, "", need=("crop",))["crop"]) if file.is_file() else eval_crop(size)
    except Unreadable:  # a damaged eval.json: the rule
        return eval_crop(size)


def export(cfg: ExportConfig) -> tuple[Path, float | None]:
    """Writes the export (beside it first, then moved in place) and returns (path, check difference)."""
    from simclr_dali.evaluation.backbone import load_backbone, load_run

    if not cfg.run:
        raise UserError("--run is required: the training run's output folder")
    run = Path(cfg.run)
    run_cfg = load_run(run)
    backbone = load_backbone(run_cfg, run / "backbone.safetensors").eval()
    out = Path(cfg.out) if cfg.out else run / "export" / FILES[cfg.format]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.is_dir():  # left by an export that stopped half way
        shutil.rmtree(tmp)
    else:
        tmp.unlink(missing_ok=True)
    size = run_cfg["image_size"]
    if cfg.format == "onnx":
        diff = write_onnx(backbone, tmp, size, cfg.opset, cfg.check)
        as_umask_allows(tmp)
    elif cfg.format == "timm":
        diff = write_timm(backbone, tmp, run_cfg, cfg.check, evaluation_crop(run, size))
    else:
        diff = write_torchscript(backbone, tmp, size, cfg.check)
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out, diff


def build_parser() -> Parser:
    parser = Parser(description="Export a run's backbone as ONNX, a timm folder or TorchScript.")
    add_dataclass_flags(parser, ExportConfig)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    cfg = dataclass_from_args(ExportConfig, args)
    path, diff = export(cfg)
    checked = f"; max |difference| from PyTorch on the check batch {diff:.2g}" if diff is not None else ""
    print(f"wrote {path} ({cfg.format}){checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
