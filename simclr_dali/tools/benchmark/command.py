"""Throughput benchmarks, one section per part of the trainer: `python benchmark.py SECTION [options]`.

    python benchmark.py pipeline --json pipeline.json                    # DALI vs torchvision, 32 and 224 px
    python benchmark.py model                                            # the compute ceiling
    python benchmark.py train                                            # train.py end to end / model
    python benchmark.py loss --sizes 16384                               # NT-Xent implementations
    python benchmark.py startup --sizes 10000 100000                     # start-up costs against N
    python benchmark.py all --json all.json

Sections live in simclr_dali/tools/benchmark/ and are registered in SECTIONS, each with its own subcommand; each
measurement runs in a fresh process (common.py). `--json FILE` writes every figure with the
hardware, the package versions and the command. The exit status is 1 when a measurement asked for failed
(each named on stderr, the rest still measured and written), else 0.
"""
from __future__ import annotations

import argparse
import json
import sys

from simclr_dali.errors import exit_on_user_error
from simclr_dali.settings import Check, Parser, check_args, checked
from simclr_dali.tools.benchmark.common import print_table, run_here, write_json
from simclr_dali.tools.benchmark.loss import _loss_args, loss_section
from simclr_dali.tools.benchmark.startup import add_startup_args, startup_section
from simclr_dali.tools.benchmark.throughput import add_throughput_args, model_section, pipeline_section, train_section

KEY_FIGURES = ("dali_images_per_s", "torchvision_images_per_s", "speedup", "model_images_per_s",
               "train_images_per_s", "efficiency", "median_s", "peak_extra_mb", "speedup_vs_reference", "gflops",
               "fraction_of_matmul")


def all_sections(args: argparse.Namespace) -> list[dict]:
    """pipeline, model, train and loss in one run, with one summary table."""
    results = []
    for name, section in (("pipeline", pipeline_section), ("model", model_section), ("train", train_section),
                          ("loss", loss_section)):
        results += [{"section": name, **row} for row in section(args)]
    rows = []
    for r in results:
        label = r["section"]
        if r["section"] == "loss":
            label += f" {r['impl']} N={r['n']}" if "n" in r else f" {r['impl']} {r['dtype']}"
        rows += [[label, key, r[key]] for key in KEY_FIGURES if isinstance(r.get(key), (int, float))]
    print_table("All sections", ["section", "figure", "value"], rows)
    return results


def _all_args(p: argparse.ArgumentParser) -> None:
    add_throughput_args(p)
    _loss_args(p)
    p.set_defaults(sizes=[1024, 4096])


SECTIONS: dict[str, tuple] = {
    "pipeline": (pipeline_section, lambda p: add_throughput_args(p, sides=True),
                 "two-view images/s: our DALI pipeline vs torchvision, at 32 and 224 px"),
    "model": (model_section, add_throughput_args, "backbone + head + loss + step on synthetic tensors"),
    "train": (train_section, add_throughput_args, "train.py end to end, and its ratio to `model`"),
    "loss": (loss_section, _loss_args, "NT-Xent forward+backward: reference vs tiled vs Triton"),
    "startup": (startup_section, add_startup_args, "what a start costs as the data grows: listing, image check, "
                                                   "pipeline build, time to the first step"),
    "all": (all_sections, _all_args, "every section; one table"),
}


def build_parser() -> Parser:
    """The command line; `parser.sections` maps each section to its sub-parser."""
    parser = Parser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="section", required=True)
    parser.sections = {}
    for name, (_, add_args, help_text) in SECTIONS.items():
        p = parser.sections[name] = sub.add_parser(name, help=help_text)
        add_args(p)
        checked(p, "--repeats", type=int, default=5, check=Check(low=1), help="timed repeats after one warm-up (median)")
        checked(p, "--budget", type=float, default=60.0, check=Check(low=0, above=True),
                help="seconds of timed repeats per measurement")
        p.add_argument("--json", help="also write the results, hardware and versions to this file")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_isolated"]:  # child of run_isolated: one measurement, JSON on the last line
        print(json.dumps(run_here(argv[1], json.loads(argv[2]))))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser.sections[args.section], args)
    section = SECTIONS[args.section][0]
    results = section(args)
    if args.json:
        write_json(args.json, args.section, {k: v for k, v in vars(args).items() if k != "json"}, results)
    return 1 if report_failures(args.section, results) else 0


def report_failures(section: str, results: list[dict]) -> int:
    """One line on stderr per measurement that failed (a skipped one, such as Triton without CUDA, is not a
    failure); how many failed. The figures that were measured are in the table and the JSON all the same."""
    failed = [r for r in results if r.get("status") == "failed"]
    for r in failed:
        what = " ".join(f"{k}={r[k]}" for k in ("section", "loss", "impl", "dtype", "n", "backbone") if k in r)
        print(f"error: benchmark.py {section}: {what or 'a measurement'} failed: {r.get('reason', 'no reason given')}",
              file=sys.stderr)
    return len(failed)
