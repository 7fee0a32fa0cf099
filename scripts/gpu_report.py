"""gpu_check's report: the speed targets and the Markdown tables that go into docs/results.md."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Target:
    text: str
    value: Callable[[dict], float | None]  # from the passed steps' figures, by step name
    met: Callable[[float], bool]


def _efficiency(backbone: str) -> Callable[[dict], float | None]:
    return lambda f: f.get(f"model+train {backbone}", {}).get("efficiency")


def _auto_worst(f: dict) -> float | None:
    """auto's time over the fastest's, at the worst size of 4,096 or more (below, every choice takes a
    fraction of a millisecond on a GPU and the choice does not matter)."""
    ratios = [c["auto_over_fastest"] for c in f.get("auto", {}).get("choices", []) if c["n"] >= 4096]
    return max(ratios) if ratios else None


TARGETS = (
    Target("DALI two-view pipeline at 224 px: at least 3x the torchvision DataLoader with one worker per core",
           lambda f: f.get("pipeline", {}).get("speedup"), lambda v: v >= 3.0),
    Target("train.py, resnet50, 224 px, bf16: at least 0.95 of the model alone", _efficiency("resnet50"),
           lambda v: v >= 0.95),
    Target("train.py, resnet18, 224 px, bf16: at least 0.90 of the model alone", _efficiency("resnet18"),
           lambda v: v >= 0.90),
    Target("NT-Xent `auto` within 10% of the fastest implementation, per dtype, N >= 4,096", _auto_worst,
           lambda v: v <= 1.10),
)


def judge_targets(report: dict) -> list[dict]:
    """Each speed target against its figure; on the CPU's toy sizes nothing is judged."""
    figures = {s["name"]: s["figures"] for s in report["steps"] if s["status"] == "passed"}
    rows = []
    for target in TARGETS:
        value = target.value(figures)
        met = None if value is None or report["mode"] != "gpu" else target.met(value)
        rows.append({"target": target.text, "value": value, "met": met})
    return rows


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    return str(v)


def _table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def _summary(step: dict) -> str:
    """What a passed step found, in a few words."""
    f, name = step["figures"], step["name"]
    if step["status"] != "passed":
        return step["error"]
    if name == "environment":
        return f"{f.get('gpu', 'no GPU')}, torch {f['torch']}, DALI {f['dali']}"
    if name == "tests":
        return ", ".join(f"{n} {kind}" for kind, n in f.items() if kind != "deselected")
    if name == "train":
        return (f"{f['steps']} steps of {f['backbone']} at {f['image_size']} px, batch {f['batch_size']}, "
                f"{f['mixed_precision']}, DALI on the {f['dali_placement']}, NT-Xent {f['loss_impl']} on "
                f"{f['loss_operands']} operands, loss {f['first_loss']:.3g} -> {f['last_loss']:.3g}, "
                f"{_fmt(f['images_per_s'])} images/s")
    if name == "evaluate":
        return f"kNN {f['knn_top1']:.3f}, linear probe {f['linear_top1']:.3f} on {f['device']} (random data)"
    if name == "pipeline":
        return f"DALI {_fmt(f['dali_images_per_s'])} images/s, torchvision {_fmt(f['torchvision_images_per_s'])}"
    if name.startswith("model+train"):
        return f"train.py {_fmt(f['train_images_per_s'])} images/s, model alone {_fmt(f['model_images_per_s'])}"
    if name == "loss":
        return f"{sum(r['impl'] != 'matmul' for r in f['rows'])} measurements and the matmul rate"
    if name == "auto":
        return "; ".join(f"{c['dtype']} N={c['n']}: {c['auto']} (fastest {c['fastest']})" for c in f["choices"])
    return ""


# (path, the steps that must all have passed for it), as docs/verification.md's "What was verified where"
# names them
VERIFIED = (
    ("DALI pipeline, GPU placement (mixed decoder, `.gpu()`, augmentations on the GPU)", ("tests", "train", "pipeline")),
    ("NT-Xent: tiled and Triton kernels compiled (fp32, bf16, fp16), `auto` per dtype", ("tests", "loss", "auto")),
    ("training loop on CUDA through accelerate, bf16, NT-Xent by the Triton kernels on bf16 operands",
     ("tests", "train")),
    ("evaluation on CUDA (features, kNN, linear probe)", ("tests", "evaluate")),
)


def _verified(report: dict, steps: dict) -> list[list[str]]:
    env = report["environment"]
    if report["mode"] == "gpu":
        where = f"{env.get('gpu', '?')}, {report['started'][:10]}, `{report['command']}`"
    else:
        where = f"the CPU at toy sizes, {report['started'][:10]}, `{report['command']}` (no GPU line ran)"
    rows = []
    for path, needs in VERIFIED:
        failed = [n for n in needs if steps.get(n, {}).get("status") != "passed"]
        rows.append([path, where if not failed else f"not verified: {', '.join(failed)} did not pass"])
    return rows


def write_markdown(report: dict, path: Path) -> None:
    env, steps = report["environment"], {s["name"]: s for s in report["steps"]}
    ok = {name: s["figures"] for name, s in steps.items() if s["status"] == "passed"}
    where = env.get("gpu", "the CPU") if report["mode"] == "gpu" else "the CPU (dry run: toy sizes, no GPU figure)"
    lines = [f"# GPU acceptance run: {where}", "",
             f"`{report['command']}`, {report['started']}; " + ", ".join(
                 f"{k} {env[k]}" for k in ("torch", "cuda_runtime", "triton", "dali", "timm", "accelerate", "python",
                                           "driver") if env.get(k)) + f"; {env.get('cpu_cores', '?')} CPU cores.",
             "", "## Steps", ""]
    lines += _table(["step", "status", "seconds", "what it found"],
                    [[s["name"], s["status"], s["seconds"], _summary(s)] for s in report["steps"]])

    rows = []
    if "pipeline" in ok:
        f = ok["pipeline"]
        rows.append([f"two-view pipeline, {f['image_size']} px, batch {f['batch_size']}, {f['workers']} threads",
                     f"`{steps['pipeline']['commands'][-1]}`", f"DALI ({f['dali_device']}): "
                     f"{_fmt(f['dali_images_per_s'])} images/s", f"torchvision, {f['workers']} workers: "
                     f"{_fmt(f['torchvision_images_per_s'])}", f"{f['speedup']:.2f}x"])
    for name, f in ok.items():
        if name.startswith("model+train"):
            rows.append([f"training, {f['backbone']}, {f['image_size']} px, {f['mixed_precision']}, batch "
                         f"{f['batch_size']}", f"`{steps[name]['commands'][-1]}`",
                         f"train.py: {_fmt(f['train_images_per_s'])} images/s",
                         f"model alone: {_fmt(f['model_images_per_s'])}", f"efficiency {f['efficiency']:.3f}"])
    if "loss" in ok:
        for r in ok["loss"]["rows"]:
            if r["status"] == "ok" and r["impl"] == "matmul":
                rows.append([f"matrix product {r['size']}^3, {r['dtype']} (the loss rows' ceiling)",
                             f"`{steps['loss']['commands'][0]}`", f"{_fmt(r['gflops'])} GFLOP/s", "", ""])
            elif r["status"] == "ok":
                share, kind = r.get("fraction_of_matmul"), r.get("loss", "ntxent")
                name = {"ntxent": "NT-Xent", "supcon": "SupCon"}.get(kind) or f"MoCo (queue {r.get('queue', 0):,})"
                command = steps["loss"]["commands"][0 if kind == "ntxent" else -1]
                rows.append([f"{name} fwd+bwd, {r['impl']}, N = {r['n']:,}, D = {r['dim']}, {r['dtype']}",
                             f"`{command}`", f"{r['median_s'] * 1e3:.3g} ms, "
                             f"{_fmt(r['gflops'])} GFLOP/s" + (f" ({share:.0%} of matmul)" if share else ""),
                             f"{r['peak_extra_mb']:.0f} MB extra", _fmt(r.get("speedup_vs_reference"))])
    if rows:
        lines += ["", "## Throughput", ""] + _table(["what", "command", "ours", "baseline", "ratio"], rows)
    if "auto" in ok:
        lines += ["", "## NT-Xent `auto` against the timings", ""] + _table(
            ["dtype", "N", "auto picks", "its time (ms)", "fastest", "its time (ms)"],
            [[c["dtype"], c["n"], c["auto"], c["auto_s"] * 1e3, c["fastest"], c["fastest_s"] * 1e3]
             for c in ok["auto"]["choices"]])
    lines += ["", "## What was verified where", ""] + _table(["path", "verified on"], _verified(report, steps))
    lines += ["", "## Targets", ""] + _table(
        ["target", "measured", "met"],
        [[t["target"], t["value"], {True: "yes", False: "no", None: "not judged"}[t["met"]]]
         for t in report["targets"]])
    path.write_text("\n".join(lines) + "\n")
