"""The project installs: a wheel built from this checkout, installed with `pip install --no-deps --target`,
gives console commands that run from a directory outside the checkout on the installed copy (a tiny train,
evaluate and export among them); `pip install -e .` into a fresh environment does the same on the
checkout. pyproject.toml pins nothing. Builds use the setuptools in requirements.txt, without a download."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib
from conftest import ROOT

pytestmark = pytest.mark.slow
COMMANDS = ("simclr-train", "simclr-evaluate", "simclr-benchmark", "simclr-export", "simclr-preview",
            "simclr-plots", "simclr-verify", "simclr-pack", "simclr-index")


def run(*args, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def outside_env(site: Path) -> dict:
    """A child that finds the project only in `site` (PYTHONPATH) and its dependencies in this venv."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the checkout, so that the build's own folders land there."""
    source, dist = tmp_path_factory.mktemp("source") / "simclr-dali", tmp_path_factory.mktemp("dist")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source, cwd=dist)
    [built] = dist.glob("simclr_dali-*.whl")
    return built


def test_pyproject_pins_nothing_and_names_every_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    assert deps and not [d for d in deps if any(op in d for op in "=<>~!")]
    assert set(project["scripts"]) == set(COMMANDS)


def test_the_wheel_holds_the_packages_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("simclr_dali-")}
    assert tops == {"simclr_dali"}  # the checkout's pipelines/ and models/ are its subpackages, by no other name
    for folder in ("pipelines", "models"):  # every module of the two folders, and only under simclr_dali
        expect = {f"simclr_dali/{folder}/{p.relative_to(ROOT / folder).as_posix()}"
                  for p in (ROOT / folder).rglob("*.py")}
        assert expect <= set(names), expect - set(names)
    assert "simclr_dali/py.typed" in names and "simclr_dali/training/loop.py" in names
    assert not [n for n in names if n.startswith(("tests/", "scripts/"))]


def test_installed_commands_run_outside_the_checkout(wheel, tmp_path):
    target, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel, cwd=work)
    env = outside_env(target)
    where = run(sys.executable, "-c", "import simclr_dali.pipelines, simclr_dali.models; from simclr_dali import api; "
                "print(api.__file__, simclr_dali.pipelines.__file__, simclr_dali.models.__file__)",
                cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where), where  # the installed copy, not the checkout
    ran = ("simclr-train", "simclr-evaluate", "simclr-export")  # these three run below, as processes of their own
    others = sorted(set(COMMANDS) - set(ran))
    assert all(os.access(target / "bin" / command, os.X_OK) for command in COMMANDS)
    # the others' --help, in one process: each command's entry point, as the installed metadata names it
    script = ("import contextlib, io, sys\nfrom importlib.metadata import entry_points\n"
              "for point in sorted(entry_points(group='console_scripts'), key=lambda p: p.name):\n"
              "    if point.name in sys.argv[1:]:\n"
              "        out = io.StringIO()\n"
              "        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
              "            point.load()(['--help'])\n"
              "        print(point.name, point.value, 'usage:' in out.getvalue())\n")
    r = run(sys.executable, "-c", script, *others, cwd=work, env=env)
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == others and all(line.endswith(" True") for line in lines), r.stdout
    for line in lines:  # each from the installed copy, whose bin/ script calls the same entry point
        name, value, _ = line.split()
        assert value.split(":")[0] in (target / "bin" / name).read_text(), (name, value)
    run(target / "bin" / "simclr-train", "--data", "digits", "--out", "run", "--backbone", "test_resnet",
        "--image-size", "16", "--epochs", "1", "--batch-size", "64", "--workers", "1", cwd=work, env=env)
    r = run(target / "bin" / "simclr-evaluate", "--run", "run", "--probe-epochs", "2", "--no-plots", cwd=work, env=env)
    assert "linear probe top-1" in r.stdout
    r = run(target / "bin" / "simclr-export", "--run", "run", "--format", "torchscript", cwd=work, env=env)
    assert (work / "run" / "export" / "backbone.torchscript.pt").is_file(), r.stdout


def test_the_installed_copy_leaves_a_users_models_and_pipelines_alone(wheel, tmp_path):
    # a notebook's folder with a models.py and a pipelines/ package of its own (the names are common):
    # the API imports simclr_dali's, and the user's stay theirs
    target, work = tmp_path / "site", tmp_path / "notebook"
    (work / "pipelines").mkdir(parents=True)
    (work / "models.py").write_text("MINE = 'models.py'\n")
    (work / "pipelines" / "__init__.py").write_text("MINE = 'pipelines/'\n")
    (work / "pipelines" / "loader.py").write_text("raise ImportError('the user pipelines/loader.py was imported')\n")
    run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel, cwd=work)
    script = ("import models, pipelines\n"
              "from simclr_dali import Augment, Config, EvalConfig, Run, pretrain\n"
              "from simclr_dali.models.methods import METHODS\n"
              "from simclr_dali.pipelines.loader import train_loader\n"
              "print(models.MINE, pipelines.MINE, sorted(METHODS), Config(aug=Augment(blur_p=0.0)).aug.blur_p)\n")
    r = run(sys.executable, "-c", script, cwd=work, env=outside_env(target))
    assert r.stdout.split("\n")[0] == "models.py pipelines/ ['byol', 'moco', 'simclr', 'supcon'] 0.0", r.stdout


def test_an_editable_install_runs_the_checkout(tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this venv's packages beside it
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run(python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", ROOT, cwd=work, env=env)
    where = run(python, "-c", "import simclr_dali; print(simclr_dali.__file__)", cwd=work, env=env).stdout.strip()
    assert Path(where) == ROOT / "simclr_dali" / "__init__.py"
    r = run(venv / "bin" / "simclr-train", "--help", cwd=work, env=env)
    assert "--log-with" in r.stdout
