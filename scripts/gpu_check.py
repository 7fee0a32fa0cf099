"""The GPU acceptance run: every GPU line of the trainer exercised and measured, offline, by one command.

    bash scripts/gpu_check.sh                  # one CUDA GPU: full sizes (a few minutes on an H100/H200)
    bash scripts/gpu_check.sh --dry-run        # the same steps at toy sizes on the CPU (the tests run this)
    bash scripts/gpu_check.sh --out DIR        # where the report goes (default: $OUT, else runs/gpu_check)

Steps, each timed and reported passed or failed; a failed step does not stop the later ones:
  environment   GPU, driver and package versions; without DALI, how to install it offline (exit 2)
  tests         the test suite's device cases (`pytest --device cuda`): DALI pipelines with the mixed decoder
                and the augmentations on the GPU, the NT-Xent kernels compiled, train/evaluate smoke runs
  train         train.py through `accelerate launch --mixed_precision bf16` on generated 500x375 JPEGs
  evaluate      evaluate.py on that run (features, kNN and linear probe on the device)
  pipeline      benchmark.py pipeline: DALI against torchvision with one worker per CPU core, 224 and 32 px
  model+train   benchmark.py train per backbone: train.py against the model alone, same precision
  loss          benchmark.py loss: every implementation of NT-Xent, SupCon and MoCo in fp32 and bf16
  auto          which implementation `auto` picks per dtype, against those timings
A step passes when it ran and its outputs hold what they must; speed targets are judged apart (the targets
table). Writes OUT/gpu_check.json (every figure, hardware, versions, commands), OUT/gpu_check.md (tables for
docs/results.md) and OUT/gpu_check.log (every command's output). Needs no network and no weights.
Exit status: 0 when every step passed, 1 when one failed, 2 when the machine cannot run the check.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from scripts.gpu_env import environment
from scripts.gpu_report import judge_targets, write_markdown


@dataclass(frozen=True)
class Plan:
    """How big each step is: full sizes on a GPU, toy sizes for --dry-run on the CPU."""
    device: str  # what the device cases run on: cuda, or cpu for the dry run
    images: int  # generated JPEGs (500x375 for views over 64 px, else 32x32), 10 class folders
    image_size: int  # side of the augmented views
    batch_size: int  # images per step (two views each)
    train_backbone: str  # the end-to-end run's backbone
    train_epochs: int  # its epochs (a folder keeps 10% aside: images * 0.9 // batch steps each)
    probe_epochs: int  # evaluate.py's linear probe epochs
    pipeline_images: int  # images per epoch of the pipeline benchmark
    bench_backbones: tuple[str, ...]  # benchmark.py train, one run each
    bench_epochs: int  # epochs of each (the first, start-up, is not counted)
    loss_sizes: tuple[int, ...]  # NT-Xent N (2N embeddings)
    loss_dtypes: tuple[str, ...]  # NT-Xent input dtypes
    repeats: int  # timed repeats of each benchmark measurement
    timeout_s: float  # longest a single command may run
    # the dry run's small parts: the tests step runs only these device cases (the suite runs them all
    # itself), and this small timm model trains wherever a step names a backbone (bf16 autocast is
    # emulated, and slow, on CPUs without AVX512-BF16), so the script's every line runs in seconds
    tests: tuple[str, ...] = ()  # () runs every device case
    stand_in: str = ""  # "" trains the backbones named
    matmul_size: int = 0  # side of the matrix product that gives the machine's rate (0: the benchmark's default)


GPU_PLAN = Plan("cuda", images=4096, image_size=224, batch_size=256, train_backbone="resnet50", train_epochs=14,
                probe_epochs=50, pipeline_images=2048, bench_backbones=("resnet50", "resnet18"), bench_epochs=3,
                loss_sizes=(4096, 16384), loss_dtypes=("float32", "bfloat16"), repeats=5, timeout_s=240)
# the dry run at the GPU run's 224 px (500x375 JPEGs, the imagenet recipe with its blur): a step that fails only at
# the size users train at fails here too
DRY_PLAN = Plan("cpu", images=40, image_size=224, batch_size=8, train_backbone="resnet50", train_epochs=2,
                probe_epochs=5, pipeline_images=24, bench_backbones=("resnet50",), bench_epochs=2,
                loss_sizes=(64,), loss_dtypes=("float32", "bfloat16"), repeats=1, timeout_s=900,
                tests=("tests/data/test_pipeline.py::test_flip_always_mirrors",
                       "tests/models/test_ntxent.py::test_auto_matches_the_float64_reference"),
                stand_in="test_resnet", matmul_size=512)  # bf16 at 4096 is emulated, and slow, on such CPUs
MIXED_PRECISION = "bf16"  # what a GPU run trains in (tensor cores); the dry run exercises the same path


@dataclass
class Step:
    name: str
    status: str = "not run"  # passed / failed
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    error: str = ""
    commands: list[str] = field(default_factory=list)


class StepFailed(Exception):
    """A step ran and found something wrong; the message is one sentence."""


def expect(ok: bool, sentence: str) -> None:
    if not ok:
        raise StepFailed(sentence)


# -- running commands -----------------------------------------------------------------------------
class Check:
    """Runs the steps in order, each command's output to the log, the report rewritten after each step."""

    def __init__(self, plan: Plan, out: Path, work: Path, dry_run: bool):
        self.plan, self.out, self.work, self.dry_run = plan, out, work, dry_run
        self.steps: list[Step] = []
        self.current: Step | None = None
        self.environment: dict = {}
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.log = open(out / "gpu_check.log", "w")
        self._images: Path | None = None

    def run(self, name: str, fn) -> Step:
        step = self.current = Step(name)
        self.steps.append(step)
        print(f"[{len(self.steps)}] {name} ...", flush=True)
        t = time.perf_counter()
        try:
            step.figures = fn() or {}
            step.status = "passed"
        except StepFailed as err:
            step.status, step.error = "failed", str(err)
        except Exception as err:  # a bug in a step must not cost the later ones
            step.status, step.error = "failed", f"{type(err).__name__}: {err}"
            self.log.write(traceback.format_exc())
        step.seconds = round(time.perf_counter() - t, 1)
        print(f"    {step.status} in {step.seconds:.1f} s" + (f": {step.error}" if step.error else ""), flush=True)
        self.write()
        return step

    def command(self, args: list[str], env: dict | None = None) -> str:
        """Runs a command (in the repository, this Python), its output appended to the log; its output, or
        StepFailed naming the command, its status and its last line."""
        shown = " ".join(shlex.quote(a) for a in args).replace(str(self.work), "$WORK")
        self.current.commands.append(shown.replace(sys.executable, "python"))
        self.log.write(f"\n$ {shown}\n")
        self.log.flush()
        # a session of its own: a timeout ends the command's children too (accelerate launch starts one)
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=self.plan.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            self.log.write(output)
            raise StepFailed(f"`{_short(args)}` did not finish within {self.plan.timeout_s:.0f} s") from None
        self.log.write(output)
        self.log.flush()
        if proc.returncode != 0:
            last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
            raise StepFailed(f"`{_short(args)}` exited with status {proc.returncode}: {last.strip()[:300]}")
        return output

    def python(self, *args: str, env: dict | None = None) -> str:
        return self.command([sys.executable, *args], env)

    def images(self) -> Path:
        """The generated JPEGs, made once (in parallel) for every step that reads images."""
        if self._images is None:
            from simclr_dali.tools.benchmark.throughput import generated_jpegs
            self._images = Path(generated_jpegs(self.work / "images", self.plan.images, self.plan.image_size))
        return self._images

    def write(self) -> None:
        report = {"mode": "dry-run" if self.dry_run else "gpu", "started": self.started,
                  "command": "bash scripts/gpu_check.sh" + (" --dry-run" if self.dry_run else ""),
                  "plan": asdict(self.plan), "environment": self.environment,
                  "steps": [asdict(s) for s in self.steps],
                  "passed": bool(self.steps) and all(s.status == "passed" for s in self.steps)}
        report["targets"] = judge_targets(report)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(self.out / "gpu_check.json")
        write_markdown(report, self.out / "gpu_check.md")


def _short(args: list[str]) -> str:
    """A command as a reader knows it: `train.py`, `benchmark.py loss`, `pytest`."""
    words = [Path(a).name if a.endswith(".py") else a for a in args[1:4] if not a.startswith("-")]
    return " ".join(words[:2]) or Path(args[0]).name


# -- steps ------------------------------------------------------------------------------------------
def step_tests(check: Check) -> dict:
    """The device cases of the test suite, on this run's device (tests/conftest.py: --device)."""
    try:
        output = check.python("-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", check.plan.device,
                              *(check.plan.tests or ["tests"]))
    except StepFailed as err:
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", _log_tail(check), re.M)
        raise StepFailed(f"{err}" + (f" (first: {', '.join(failed[:3])})" if failed else "")) from None
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", output)}
    expect(counts.get("passed", 0) > 0, "pytest selected no device test")
    return counts


def _log_tail(check: Check, chars: int = 20000) -> str:
    check.log.flush()
    text = (check.out / "gpu_check.log").read_text(errors="replace")
    return text[-chars:]


def step_train(check: Check) -> dict:
    """train.py as a user starts it on a GPU: accelerate launch, bf16, the plan's backbone and batch."""
    p, run = check.plan, check.work / "run"
    check.python("-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                 "--mixed_precision", MIXED_PRECISION, "--dynamo_backend", "no",
                 "train.py", "--data", str(check.images()), "--out", str(run),
                 "--backbone", p.stand_in or p.train_backbone,
                 "--image-size", str(p.image_size), "--batch-size", str(p.batch_size), "--epochs", str(p.train_epochs),
                 "--warmup-epochs", "1", "--log-every", "10")
    cfg = json.loads((run / "config.json").read_text())
    placement = "gpu" if p.device == "cuda" else "cpu"
    expect(cfg["dali_placement"] == placement, f"DALI ran on the {cfg['dali_placement']}, not the {placement}")
    expect(cfg["device"].startswith(p.device), f"training ran on {cfg['device']}, not {p.device}")
    expect(cfg["mixed_precision"] == MIXED_PRECISION, f"training ran in {cfg['mixed_precision']}, not bf16")
    # under bf16 the loss reads bf16 operands: the fused Triton kernels on a GPU, the tiled path on the CPU
    path = ("triton" if p.device == "cuda" else "tiled", "bfloat16")
    expect((cfg["loss_impl_resolved"], cfg["loss_operands"]) == path,
           f"NT-Xent trained as {cfg['loss_impl_resolved']} on {cfg['loss_operands']} operands, not {path[0]} on bf16")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    total = p.train_epochs * cfg["steps_per_epoch"]
    expect(len(epochs) == p.train_epochs and epochs[-1]["step"] == total,
           f"metrics.jsonl ends at step {epochs[-1]['step'] if epochs else 0}, not {total}")
    losses = [r["loss"] for r in steps] or [r["loss"] for r in epochs]
    expect(all(map(_finite, losses)), "a logged loss is not finite")
    expect((run / "backbone.safetensors").is_file(), "backbone.safetensors was not written")
    rates = [r["images_per_s"] for r in epochs][1:] or [epochs[-1]["images_per_s"]]
    return {"steps": total, "steps_per_epoch": cfg["steps_per_epoch"], "images": cfg["n_train"],
            "backbone": cfg["backbone"], "image_size": p.image_size, "batch_size": p.batch_size,
            "dali_placement": cfg["dali_placement"], "device": cfg["device"], "mixed_precision": cfg["mixed_precision"],
            "loss_impl": cfg["loss_impl_resolved"], "loss_operands": cfg["loss_operands"],
            "first_loss": losses[0], "last_loss": losses[-1],
            "images_per_s": statistics.median(rates)}


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def step_evaluate(check: Check) -> dict:
    run = check.work / "run"
    expect((run / "backbone.safetensors").is_file(), "there is no trained run to evaluate (the train step failed)")
    check.python("evaluate.py", "--run", str(run), "--probe-epochs", str(check.plan.probe_epochs),
                 "--workers", str(os.cpu_count() or 1), "--plot-points", "500")
    result = json.loads((run / "eval.json").read_text())
    expect(result["device"].startswith(check.plan.device), f"evaluation ran on {result['device']}")
    for scores in (result, result["random_init"]):
        expect(all(0 <= scores[k] <= 1 for k in ("knn_top1", "linear_top1")), f"a top-1 is out of [0, 1]: {scores}")
    expect(all((run / f"{name}.png").is_file() for name in ("embeddings", "retrieval", "training_curves")),
           "a plot is missing")
    return {k: result[k] for k in ("knn_top1", "linear_top1", "n_train", "n_test", "device")} | \
        {"random_init": result["random_init"]}


def benchmark(check: Check, name: str, *args: str) -> list[dict]:
    """benchmark.py SECTION ARGS --json; its rows, each of which must have run."""
    path = check.work / f"bench_{name}.json"
    check.python("benchmark.py", *args, "--repeats", str(check.plan.repeats), "--json", str(path))
    payload = json.loads(path.read_text())
    failed = [r for r in payload["results"] if r.get("status") == "failed"]
    expect(not failed, f"benchmark.py {args[0]}: {failed[0].get('reason') if failed else ''}")
    check.current.commands[-1] = check.current.commands[-1].replace(f" --json $WORK/bench_{name}.json", "")
    return payload["results"]


def step_pipeline(check: Check) -> dict:
    """DALI (on the GPU when there is one) against torchvision with one DataLoader worker per CPU core, at the
    run's size (its row) and at 32 px (`at_32`)."""
    from simclr_dali.pipelines.sources import load_source, write_image_list

    p = check.plan
    source = load_source(str(check.images()), "train", str(check.images()))
    listed = check.work / "pipeline_images.txt"
    write_image_list(listed, source.subset(_first(p.pipeline_images)), check.images())
    small, row = benchmark(check, "pipeline", "pipeline", "--data", str(listed), "--image-size", "32",
                           str(p.image_size), "--batch-size", str(p.batch_size), "--workers", str(os.cpu_count() or 1))
    for r in (small, row):
        expect(r["dali_device"] == p.device, f"the DALI pipeline ran on {r['dali_device']}, not {p.device}")
    return {**row, "at_32": small}


def _first(n: int):
    import numpy as np
    return np.arange(n)


def step_model_train(check: Check, backbone: str) -> dict:
    p = check.plan
    [row] = benchmark(check, backbone, "train", "--data", str(check.images()),
                      "--backbone", p.stand_in or backbone,
                      "--image-size", str(p.image_size), "--batch-size", str(p.batch_size),
                      "--epochs", str(p.bench_epochs), "--mixed-precision", MIXED_PRECISION)
    expect(row["device"].startswith(p.device), f"the model ran on {row['device']}, not {p.device}")
    return row


def step_loss(check: Check) -> dict:
    p = check.plan
    matmul = ["--matmul-size", str(p.matmul_size)] if p.matmul_size else []
    rows = benchmark(check, "loss", "loss", "--sizes", *map(str, p.loss_sizes), "--dtypes", *p.loss_dtypes,
                     "--budget", "10", "--losses", "ntxent", *matmul)
    # SupCon and MoCo on the same kernels: the largest size, 16-bit (what trains), fused and tiled
    family = benchmark(check, "loss_family", "loss", "--sizes", str(max(p.loss_sizes)), "--dtypes",
                       p.loss_dtypes[-1], "--budget", "10", "--losses", "supcon", "moco", "--impls", "tiled", "triton",
                       *matmul)
    rows += [r for r in family if r["impl"] != "matmul"]  # each against its own run's matmul rate
    if p.device == "cuda":
        expect(any(r["impl"] == "triton" and r["status"] == "ok" for r in rows), "the Triton kernels were not measured")
    return {"rows": rows}


def step_auto(check: Check) -> dict:
    """Per dtype and size: the fastest implementation measured, and the one `auto` picks."""
    import torch

    from simclr_dali.models.loss_core import resolve_impl

    loss = next((s for s in check.steps if s.name == "loss" and s.status == "passed"), None)
    expect(loss is not None, "there are no loss timings to judge by (the loss step failed)")
    rows = [r for r in loss.figures["rows"] if r["status"] == "ok" and r["impl"] != "matmul"
            and r.get("loss", "ntxent") == "ntxent"]  # auto's choice is NT-Xent's; SupCon and MoCo are measured beside
    choices = []
    for dtype in check.plan.loss_dtypes:
        for n in check.plan.loss_sizes:
            timed = {r["impl"]: r["median_s"] for r in rows if r["dtype"] == dtype and r["n"] == n}
            auto = resolve_impl("auto", check.plan.device, getattr(torch, dtype))
            expect(auto in timed, f"auto picks {auto} for {dtype}, which was not measured at N={n}")
            fastest = min(timed, key=timed.get)
            choices.append({"dtype": dtype, "n": n, "auto": auto, "auto_s": timed[auto], "fastest": fastest,
                            "fastest_s": timed[fastest], "auto_over_fastest": timed[auto] / timed[fastest]})
    return {"choices": choices}


# -- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step at toy sizes on the CPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check",
                        help="folder for gpu_check.json, .md and .log (default: $OUT, else runs/gpu_check)")
    parser.add_argument("--work", default="", help="folder for the generated images and runs (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (environment always runs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(plan, out, work, args.dry_run)
    try:
        env = check.run("environment", lambda: environment(plan))
        check.environment = env.figures
        steps = [("tests", step_tests), ("train", step_train), ("evaluate", step_evaluate),
                 ("pipeline", step_pipeline),
                 *[(f"model+train {b}", lambda c, b=b: step_model_train(c, b)) for b in plan.bench_backbones],
                 ("loss", step_loss), ("auto", step_auto)]
        for name, fn in steps:
            if args.only is None or name.split()[0] in args.only or name in args.only:
                check.run(name, lambda fn=fn: fn(check))
    except SystemExit as refusal:  # the machine cannot run the check: one sentence, exit 2
        check.steps[-1].status, check.steps[-1].error = "failed", str(refusal.code)
        check.write()
        print(f"error: {refusal.code}", file=sys.stderr)
        return 2
    finally:
        check.log.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [s.name for s in check.steps if s.status != "passed"]
    print(f"gpu_check: {len(check.steps) - len(failed)} of {len(check.steps)} steps passed"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; report in {out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
