"""Shared fixtures: small generated image folders and CIFAR-style pickles (tests make their data)."""
from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# The Triton kernels run on CPU tensors only when the interpreter is chosen before triton is first
# imported, and other test modules import it indirectly (timm, torch's compiler): decide here, first.
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# What the trainer caches per data set (shard indexes, image verdicts) goes to a folder of this test session,
# for this process and the ones it starts: never the user's ~/.cache, never a verdict from another session.
import tempfile  # noqa: E402

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="simclr-test-cache-")


# -- devices ----------------------------------------------------------------------------------------
# A test that takes the `device` argument runs once per device: the CPU, and CUDA where there is a GPU
# (DALI's mixed decoder and GPU operators, Triton compiled). `--device NAME` runs only those cases on
# NAME, plus the end-to-end runs marked `on_device` (which use whatever device the process finds):
# scripts/gpu_check.sh runs `--device cuda` on a GPU machine and `--device cpu` for its dry run.
def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default=None,
                     help="run only the device cases (tests taking `device`, and those marked on_device), on this device")


def pytest_configure(config):
    if config.getoption("--device") == "cuda" and not CUDA:
        raise pytest.UsageError("--device cuda needs a CUDA GPU, and torch sees none")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        only = metafunc.config.getoption("--device")
        metafunc.parametrize("device", [only] if only else ["cpu", "cuda"] if CUDA else ["cpu"])


def pytest_collection_modifyitems(config, items):
    only = config.getoption("--device")
    if only is None:
        return
    def kept(item) -> bool:
        params = getattr(getattr(item, "callspec", None), "params", {})
        return item.get_closest_marker("on_device") is not None or params.get("device") == only

    config.hook.pytest_deselected(items=[item for item in items if not kept(item)])
    items[:] = [item for item in items if kept(item)]


def triton_runs_on(device: str) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (machines without CUDA)."""
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def dali_device_id(device: str) -> int | None:
    """The DALI pipeline's device_id for a test device: GPU 0, or None for a CPU-only pipeline."""
    return 0 if device == "cuda" else None


def write_image(path: Path, rng: np.random.Generator, size=(40, 32), mode="RGB", colour=None) -> Path:
    """A smooth random image (or a solid `colour`), saved in the format its suffix names."""
    w, h = size
    if colour is not None:
        arr = np.broadcast_to(np.asarray(colour, np.uint8), (h, w, 3)).copy()
    else:
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_folder(root: Path, classes=("cat", "dog", "fox"), per_class=8, size=(40, 32), seed=0) -> Path:
    """Class sub-folders of JPEG and PNG images."""
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            write_image(root / c / f"{i:03d}.{'png' if i % 3 == 0 else 'jpg'}", rng, size)
    return root


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state, whose mixed precision the first Accelerator fixes (a later
    one with another silently trains in the first's): start and leave each test with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images")


def write_cifar(root: Path, kind: str = "cifar10", n: int = 20, seed: int = 0) -> Path:
    """CIFAR-style python pickles with random pixels and known labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    if kind == "cifar10":
        names, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        names, key = ["train", "test"], b"fine_labels"
        meta = ("meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    for j, name in enumerate(names):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key: [(j + i) % 10 for i in range(n)], b"batch_label": name.encode()}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    (root / meta[0]).write_bytes(pickle.dumps(meta[1], protocol=2))
    return root


def panel_words(text: str) -> str:
    """What a rich panel or table says, as one line: box characters and line wrapping gone."""
    return " ".join(re.sub("[│╭╮╰╯─┏┓┗┛┃━┡┩╇┳┻╋┼├┤┬┴┌┐└┘]", " ", text).split())


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (for a test's own process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    """Run one of the project's scripts the way a user would; returns CompletedProcess. The child imports
    this checkout (PYTHONPATH), whatever else the environment has installed."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# -- train.py in this process ----------------------------------------------------------------------
# A tiny timm model, one BLAS thread: each run trains in about a second on a busy 2-core machine.
TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "8", "--warmup-epochs", "1",
        "--log-every", "1", "--workers", "1"]
ENV = {"OMP_NUM_THREADS": "1"}


def train_here(*args: str) -> int:
    """train.main in this process (no start-up cost) with TINY after `args`; a UserError becomes
    SystemExit(2)."""
    from simclr_dali import training as train
    return train.main([*args, *TINY])


def fixed_batch(*flags: str):
    """(cfg, model, LARS, views) of a test_resnet run at batch 16 with `flags`: one fixed two-view batch of
    16 random 32 px images, each view the image plus its own noise, for the tests that step on it."""
    from simclr_dali import training as train
    cfg = train.parse_args(["--backbone", "test_resnet", "--batch-size", "16", "--warmup-epochs", "0", *flags])
    torch.manual_seed(0)
    model = train.build_model(cfg).train()
    optimizer, _ = train.build_optimizer(cfg, model, cfg.lr, steps_per_epoch=10)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=gen)
    views = torch.cat([images + 0.3 * torch.randn(16, 3, 32, 32, generator=gen) for _ in range(2)])
    return cfg, model, optimizer, views


def state_after(loader, steps: int) -> bytes:
    """Loader.state() once `steps` of its batches are read; the loader is dropped with the iterator."""
    batches = iter(loader)
    for _ in range(steps):
        next(batches)
    return loader.state()


def progress(checkpoint: Path) -> dict:
    """A checkpoint's progress.json, less its list of files."""
    return {k: v for k, v in json.loads((checkpoint / "progress.json").read_text()).items() if k != "files"}


class StepHooks(dict):
    """{step: action(loss) -> loss}: runs while that 1-based step of a run computes its loss."""
    count = 0


def nan(loss):  # the loss, and so every gradient, becomes NaN
    return loss * float("nan")


@pytest.fixture
def hooks(monkeypatch) -> StepHooks:
    from simclr_dali.models import ntxent

    real, hooks = ntxent.nt_xent_loss, StepHooks()

    def loss(*args, **kwargs):
        hooks.count += 1
        return hooks.get(hooks.count, lambda value: value)(real(*args, **kwargs))

    monkeypatch.setattr(ntxent, "nt_xent_loss", loss)
    return hooks


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    """A folder of 3 classes x 12 good images plus the files of support/bad_images.py: some DALI cannot decode."""
    from support.bad_images import add_odd_files  # it builds on this module's writers

    return add_odd_files(make_folder(tmp_path_factory.mktemp("bad") / "images", per_class=12))
