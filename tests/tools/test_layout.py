"""The layout follows the data's way through the trainer: every import, at the top of a module or inside a
function, points down the flow (or within its own layer, without cycles), no module edits sys.path, and the
scripts at the top level are thin. The checkout's pipelines/ and models/ are imported only as
simclr_dali.pipelines and simclr_dali.models (links inside simclr_dali/), the one import name an installed copy has."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("pipelines", "models", "simclr_dali")  # the folders; the first two are simclr_dali's subpackages
# The flow, lowest first: what every layer may build on. A module belongs to the first prefix it matches.
LAYERS = [
    ("base", ("simclr_dali.errors", "simclr_dali.settings", "simclr_dali.readback", "simclr_dali.lock",
              "simclr_dali.environment")),
    ("data", ("simclr_dali.pipelines",)),
    ("model", ("simclr_dali.models",)),
    ("training", ("simclr_dali.training",)),
    ("evaluation", ("simclr_dali.evaluation",)),
    ("tools", ("simclr_dali.tools", "simclr_dali.api", "simclr_dali")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts if parts[0] == "simclr_dali" else ("simclr_dali", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer")


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (`from a.b import c` counts a.b.c where that
    is a module, else a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == "simclr_dali"}
    return found


def python_files() -> list[Path]:
    """Every Python file of the checkout (the links inside simclr_dali/ are not followed: their folders are here)."""
    return [p for p in sorted(ROOT.rglob("*.py")) if not {".venv", ".git", "build"} & set(p.parts)]


def test_the_subpackages_are_links_to_the_checkouts_folders():
    for name in ("pipelines", "models"):
        link = ROOT / "simclr_dali" / name
        assert link.is_symlink() and link.resolve() == ROOT / name, link


def test_nothing_imports_the_folders_by_their_own_names():
    # `import models` from the checkout would load a second copy of the modules (two Loader classes, two
    # registries) and fails where the project is installed
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("models", "pipelines")]
    assert not offenders, offenders


def test_every_import_points_down_the_flow_and_there_is_no_cycle():
    modules = project_modules()
    graph = {m: imports(p, set(modules)) - {m} for m, p in modules.items()}
    upward = [f"{m} -> {t}" for m, targets in graph.items() for t in targets if layer(t) > layer(m)]
    assert not upward, upward
    unknown = sorted(t for targets in graph.values() for t in targets if t not in modules)
    assert not unknown, unknown  # every import names a module that exists
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:  # depth-first; a grey node met again closes a cycle
        state[m] = 1
        for t in sorted(graph[m]):
            if t.startswith(m + "."):
                continue  # a package's __init__ may re-export its own modules
            assert state.get(t) != 1, " -> ".join(path + [m, t])
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_pipeline_knows_nothing_of_models_and_training_nothing_of_evaluation():
    # the two arrows the layout was rearranged for, named so that a regression reads plainly
    modules = project_modules()
    for m, p in modules.items():
        got = imports(p, set(modules))
        if m.startswith("simclr_dali.pipelines"):
            assert not {t for t in got if t.startswith(("simclr_dali.models", "simclr_dali.training",
                                                        "simclr_dali.evaluation"))}, m
        if m.startswith("simclr_dali.training"):
            assert not {t for t in got if t.startswith(("simclr_dali.evaluation", "simclr_dali.tools"))}, m


def test_no_module_edits_sys_path():
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                offenders.append(str(path.relative_to(ROOT)))
                break
    assert not offenders, offenders


def test_the_scripts_at_the_top_are_thin_and_name_their_command():
    for script, command in (("train.py", "simclr-train"), ("evaluate.py", "simclr-evaluate"),
                            ("benchmark.py", "simclr-benchmark")):
        text = (ROOT / script).read_text()
        tree = ast.parse(text)
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs and len(text.splitlines()) <= 20, script
        assert command in text, script
    pyproject = (ROOT / "pyproject.toml").read_text()
    for command in ("simclr-train", "simclr-evaluate", "simclr-benchmark", "simclr-export"):
        assert f"\n{command} = " in pyproject, command


def test_files_hold_one_idea_each():
    # DESIGN.md: about 400 lines at most; a file past that is two ideas
    long = {str(p.relative_to(ROOT)): n for p in project_modules().values()
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
