"""The README's commands are ones the tools take: every command line of its shell blocks, and every inline
`python ...` command, that runs one of ours (train.py, evaluate.py, benchmark.py, `python -m simclr_dali...`, also under `accelerate launch`) parses
with that tool's own parser, each flag's value within its declared range. Parsing only: nothing runs."""
from __future__ import annotations

import re
import shlex

import pytest
from conftest import ROOT

from simclr_dali import training as train
from simclr_dali.evaluation import evaluate
from simclr_dali.pipelines import index, pack, verify
from simclr_dali.tools import export, preview
from simclr_dali.tools.benchmark import command as benchmark

PARSERS = {"train.py": train.build_parser, "simclr_dali.training": train.build_parser,
           "evaluate.py": evaluate.build_parser, "benchmark.py": benchmark.build_parser,
           "simclr_dali.pipelines.verify": verify.build_parser, "simclr_dali.pipelines.pack": pack.build_parser,
           "simclr_dali.pipelines.index": index.build_parser, "simclr_dali.tools.export": export.build_parser,
           "simclr_dali.tools.preview": preview.build_parser}
NOT_PARSED = {"simclr_dali.evaluation.plots"}  # one flag (--run), read by its main without a parser of its own


def tool_call(line: str) -> tuple[str, list[str]] | None:
    """(program, its arguments) where `line` runs one of the project's tools, else None."""
    words = shlex.split(line, comments=True)
    for i, word in enumerate(words):
        if word in ("train.py", "evaluate.py", "benchmark.py"):
            return word, words[i + 1:]
        if word == "-m" and i + 1 < len(words) and words[i + 1].startswith("simclr_dali"):
            return words[i + 1], words[i + 2:]
    return None


def commands(text: str) -> list[tuple[str, list[str]]]:
    """The tool calls of every line of the ```bash blocks, and of every inline `...python ...` span that has
    arguments (one without them names the tool)."""
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    spans = [call for span in re.findall(r"`([^`]*python [^`]*)`", prose) if (call := tool_call(span)) and call[1]]
    return [call for line in lines if (call := tool_call(line))] + spans


README_COMMANDS = commands((ROOT / "README.md").read_text())


def test_the_readme_shows_each_tool():
    programs = {program for program, _ in README_COMMANDS}
    assert len(README_COMMANDS) >= 25
    assert {"train.py", "evaluate.py", "benchmark.py", "simclr_dali.pipelines.pack"} <= programs
    assert programs <= set(PARSERS) | NOT_PARSED, programs - set(PARSERS) - NOT_PARSED


@pytest.mark.parametrize("program,argv", [c for c in README_COMMANDS if c[0] in PARSERS],
                         ids=[" ".join([p, *a])[:80] for p, a in README_COMMANDS if p in PARSERS])
def test_a_readme_command_parses(program, argv, capsys):
    try:
        PARSERS[program]().parse_args(argv)
    except SystemExit as stop:
        assert stop.code == 0 and "--help" in argv, capsys.readouterr().err
