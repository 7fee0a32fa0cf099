"""scripts/gpu_check.sh, the GPU acceptance run: its --dry-run runs every step at toy sizes on the CPU, so
that a broken step shows here rather than on the day a GPU machine is lent. No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest
from conftest import CUDA, ROOT

pytestmark = pytest.mark.slow  # the acceptance script's dry run: every step, each a process

# the dry run measures one backbone of the GPU run's two (the same step; each is three processes)
STEPS = ["environment", "tests", "train", "evaluate", "pipeline", "model+train resnet50", "loss", "auto"]


def gpu_check(*args: str, env: dict | None = None, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    r = gpu_check("--dry-run", "--out", str(out))
    return r, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), out


def test_dry_run_passes_every_step(dry_run):
    r, report, _, _ = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert report["mode"] == "dry-run" and report["passed"] is True
    assert [s["name"] for s in report["steps"]] == STEPS
    for step in report["steps"]:
        assert step["status"] == "passed" and step["error"] == "", step
    assert "8 of 8 steps passed" in r.stdout


def test_dry_run_figures_come_from_the_paths_they_name(dry_run):
    _, report, _, _ = dry_run
    f = {s["name"]: s["figures"] for s in report["steps"]}
    env = f["environment"]
    assert env["dali"] and env["torch"] and env["hardware"]["cpu_cores"] >= 1 and "gpu" not in env
    # the dry run's tests step runs a named handful of device cases (the suite runs every one itself)
    assert f["tests"] == {"passed": 3}  # flip on the CPU; auto against float64 for fp32 and bf16
    train = f["train"]
    assert (train["dali_placement"], train["device"], train["mixed_precision"]) == ("cpu", "cpu", "bf16")
    assert train["image_size"] == f["pipeline"]["image_size"] == 224  # the GPU run's size: the imagenet recipe, blur on
    assert train["steps"] == 2 * train["steps_per_epoch"] == 8 and train["backbone"] == "test_resnet"
    assert (train["loss_impl"], train["loss_operands"]) == ("tiled", "bfloat16") and train["images_per_s"] > 0
    assert f["evaluate"]["device"] == "cpu" and f["evaluate"]["n_test"] == 4  # 10% of 40 kept aside
    assert f["pipeline"]["dali_device"] == "cpu" and f["pipeline"]["n_images"] == 24
    assert f["pipeline"]["at_32"]["image_size"] == 32 and f["pipeline"]["at_32"]["dali_images_per_s"] > 0
    assert f["pipeline"]["speedup"] == f["pipeline"]["dali_images_per_s"] / f["pipeline"]["torchvision_images_per_s"]
    row = f["model+train resnet50"]
    assert row["backbone"] == "test_resnet" and row["mixed_precision"] == "bf16" and row["device"] == "cpu"
    assert row["efficiency"] == row["train_images_per_s"] / row["model_images_per_s"]
    measured = {(r["impl"], r["dtype"], r.get("n")) for r in f["loss"]["rows"] if r["status"] == "ok"}
    assert measured == {(i, d, 64) for i in ("reference", "tiled") for d in ("float32", "bfloat16")} | {
        ("matmul", "float32", None)}  # the CPU computes every row in fp32
    assert [(c["dtype"], c["auto"]) for c in f["auto"]["choices"]] == [("float32", "tiled"), ("bfloat16", "tiled")]
    for c in f["auto"]["choices"]:
        assert c["auto_over_fastest"] == c["auto_s"] / c["fastest_s"] >= 1.0
    # toy sizes on the CPU decide no speed target
    assert [t["met"] for t in report["targets"]] == [None] * 4
    assert report["targets"][0]["value"] == f["pipeline"]["speedup"]


def test_dry_run_writes_tables_for_the_readme(dry_run):
    _, report, md, out = dry_run
    assert md.startswith("# GPU acceptance run: the CPU (dry run")
    for heading in ("## Steps", "## Throughput", "## NT-Xent `auto`", "## What was verified where", "## Targets"):
        assert heading in md
    for name in STEPS:
        assert f"| {name} | passed |" in md
    assert "`python benchmark.py train --data $WORK/images --backbone test_resnet" in md  # the stand-in
    assert "(no GPU line ran)" in md and "not verified" not in md
    log = (out / "gpu_check.log").read_text()
    assert log.count("\n$ ") == 7  # every command (pytest, train, evaluate, 4 benchmarks), with its output
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]


def test_a_failed_step_does_not_stop_the_later_ones(tmp_path):
    r = gpu_check("--dry-run", "--out", str(tmp_path), "--only", "evaluate", "auto")
    assert r.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["environment", "evaluate", "auto"] and steps["environment"]["status"] == "passed"
    assert steps["evaluate"]["error"] == "there is no trained run to evaluate (the train step failed)"
    assert steps["auto"]["error"] == "there are no loss timings to judge by (the loss step failed)"
    assert "1 of 3 steps passed; failed: evaluate, auto" in r.stdout
    assert "not verified: tests, evaluate did not pass" in (tmp_path / "gpu_check.md").read_text()


def test_without_dali_one_sentence_says_how_to_install_it_offline(tmp_path):
    # a DALI that cannot be imported, ahead of the real one (nvidia/ is a regular package: extend it)
    shadow = tmp_path / "shadow" / "nvidia"
    (shadow / "dali").mkdir(parents=True)
    (shadow / "__init__.py").write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    (shadow / "dali" / "__init__.py").write_text("raise ImportError('no DALI here')\n")
    r = gpu_check("--dry-run", "--out", str(tmp_path / "out"), env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: NVIDIA DALI is not installed for ")
    assert "pip install --no-index" in r.stderr and "unpack.sh" in r.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("environment", "failed")]


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without a GPU")
def test_the_full_run_refuses_a_machine_without_a_gpu(tmp_path):
    r = gpu_check("--out", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: no CUDA GPU is visible to torch") and "--dry-run" in r.stderr
