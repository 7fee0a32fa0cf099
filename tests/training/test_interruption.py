"""Never lose work: signals, kill -9 while saving, non-finite steps, unsafe checkpoint files, an output
folder that cannot take a checkpoint. CPU only, generated data."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ENV, ROOT, TINY, make_folder, nan, progress, run_cli, train_here
from safetensors.torch import load_file

from simclr_dali.readback import check_manifest, manifest

pytestmark = pytest.mark.slow  # training runs, signalled, killed and resumed


# -- interruption ---------------------------------------------------------------------------------
RUN = ["--epochs", "3", *TINY, "--save-every-steps", "3"]  # 36 + 6 good images -> 38 train, 4 steps/epoch


@pytest.fixture(scope="module")
def straight(bad_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    r = run_cli("train.py", "--data", str(bad_folder), "--out", str(out), *RUN, env=ENV)
    assert r.returncode == 0, r.stderr
    return load_file(str(out / "backbone.safetensors"))


def start_training(folder: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", "--data", str(folder), "--out", str(out), *RUN],
                            cwd=ROOT, env={**os.environ, **ENV, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not get there in time"
        time.sleep(0.002)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logged_step(out: Path, step: int) -> bool:
    path = out / "metrics.jsonl"
    return path.is_file() and f'"step": {step},' in path.read_text()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def resume_to_the_end(folder: Path, out: Path) -> dict:
    r = run_cli("train.py", "--data", str(folder), "--out", str(out), *RUN, "--resume", env=ENV)
    assert r.returncode == 0, r.stderr
    # the lines a killed run wrote after its checkpoint are dropped
    assert [rec["step"] for rec in records(out) if rec["kind"] == "step"] == list(range(1, 13))
    return load_file(str(out / "backbone.safetensors"))


def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(bad_folder, straight, tmp_path):
    out = tmp_path / "run"
    proc = start_training(bad_folder, out)
    wait_for(lambda: logged_step(out, 5), proc)  # epoch 2 has begun; it ends at step 8
    proc.send_signal(signal.SIGSTOP)  # freeze it, so that the signal lands inside the epoch
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    saved = progress(out / "checkpoint")
    assert saved["step"] % 4 != 0, saved  # stopped mid-epoch, and saved there
    assert (out / "checkpoint" / "dali_0.state").is_file()
    line = stdout.strip().splitlines()[-1]
    assert line.startswith(f"SIGTERM at step {saved['step']}: the checkpoint is in {out / 'checkpoint'}")
    assert f"; continue with  python train.py --data {bad_folder} --out {out} " in line
    assert line.endswith(" --save-every-steps 3 --resume")
    assert_same_weights(resume_to_the_end(bad_folder, out), straight)


def test_kill_9_while_saving_leaves_the_last_checkpoint_whole(bad_folder, straight, tmp_path):
    from simclr_dali.training import checkpoint
    out = tmp_path / "run"
    proc = start_training(bad_folder, out)
    wait_for(lambda: logged_step(out, 4), proc)  # step 3 was checkpointed mid-epoch
    # kill -9 once a save is seen under way (or at step 7 at the latest): any moment must do
    wait_for(lambda: (out / "checkpoint.tmp").exists() or logged_step(out, 7), proc)
    proc.kill()
    proc.communicate()
    saved = progress(checkpoint.find_checkpoint(out))
    assert saved["step"] >= 3  # whichever save the kill hit, the one before it is whole
    assert_same_weights(resume_to_the_end(bad_folder, out), straight)


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs, nothing catches it."""


class FakeAccelerator:
    is_main_process, process_index, wait_for_everyone = True, 0, staticmethod(lambda: None)

    def save_state(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"weights")


def test_a_crash_at_any_point_of_a_save_leaves_a_whole_checkpoint(tmp_path, monkeypatch):
    from simclr_dali.training import checkpoint
    calls = {"n": 0, "crash_at": None}

    def crashing(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["crash_at"]:
                raise Crash
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(Path, "rename", crashing(Path.rename))
    monkeypatch.setattr(shutil, "rmtree", crashing(shutil.rmtree))
    acc = FakeAccelerator()
    for crash_at in range(1, 8):
        out = tmp_path / f"c{crash_at}"
        out.mkdir()
        for step in (1, 2):
            checkpoint.save_checkpoint(acc, out, {"step": step}, {})
        (out / "checkpoint.drop").mkdir()  # a half-deleted leftover of an earlier crash
        calls.update(n=0, crash_at=crash_at)
        try:
            checkpoint.save_checkpoint(acc, out, {"step": 3}, {})
        except Crash:
            pass
        calls["crash_at"] = None
        found = checkpoint.checkpoints(out)
        newest = progress(found[0])["step"]
        assert newest in (2, 3), crash_at
        assert all((f / "model.safetensors").read_bytes() == b"weights" for f in found)
        for f in found:  # every file as listed
            check_manifest(f, json.loads((f / "progress.json").read_text())["files"], "")
        checkpoint.save_checkpoint(acc, out, {"step": 4}, {})  # and the next save goes through
        assert [progress(f)["step"] for f in checkpoint.checkpoints(out)] == [4, newest]
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "checkpoint.prev"]


# -- in one process: non-finite steps, unsafe checkpoint files, the output folder -----------------
def sigint(times: int):  # Ctrl-C pressed `times` times during the step
    def action(loss):
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    return action


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("small") / "images", per_class=6)  # 16 train: 2 steps/epoch


def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(small_folder, tmp_path, hooks, capsys):
    out = tmp_path / "run"
    hooks[4] = nan
    with pytest.raises(SystemExit) as stop:  # a checkpoint at every epoch end (2 steps each)
        train_here("--data", str(small_folder), "--out", str(out), "--epochs", "3", "--save-every-minutes", "0")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the loss became nan at step 4: lower --lr, raise --temperature, "
                          "or train in bf16 rather than fp16 (pass --max-nonfinite K")
    assert f"the last checkpoint, {out / 'checkpoint'} (step 2), is from before it" in err
    assert len(err.splitlines()) == 1
    assert progress(out / "checkpoint") == {"epoch": 0, "step": 2}
    assert [r["step"] for r in records(out) if r["kind"] == "step"] == [1, 2, 3]


def test_max_nonfinite_skips_steps_without_touching_the_weights(small_folder, tmp_path, hooks):
    from accelerate.utils import set_seed

    from simclr_dali import training as train
    out = tmp_path / "run"
    hooks.update({1: nan, 2: nan, 3: nan, 4: nan})  # every step of two epochs
    assert train_here("--data", str(small_folder), "--out", str(out), "--epochs", "2", "--max-nonfinite", "4") == 0
    skips = [(r["kind"], r["step"]) for r in records(out) if r["kind"] != "epoch"]
    assert skips == [("nonfinite", s) for s in range(1, 5)]
    assert records(out)[0]["problem"] == "the loss became nan"
    set_seed(0)  # as train.main does before it builds the model
    initial = train.build_model(train.parse_args(["--backbone", "test_resnet"])).backbone
    exported = load_file(str(out / "backbone.safetensors"))
    for name, weight in initial.named_parameters():  # BatchNorm's running statistics did move
        torch.testing.assert_close(exported[name], weight.detach(), rtol=0, atol=0, msg=name)


def test_max_nonfinite_is_a_budget(small_folder, tmp_path, hooks, capsys):
    out = tmp_path / "run"
    hooks.update({2: nan, 3: nan})
    with pytest.raises(SystemExit):
        train_here("--data", str(small_folder), "--out", str(out), "--epochs", "2", "--max-nonfinite", "1")
    err = capsys.readouterr().err
    assert "the loss became nan at step 3 (2 non-finite steps since step 2): " in err
    assert "(2 non-finite steps, more than --max-nonfinite 1)" in err
    kinds = [(r["kind"], r["step"]) for r in records(out)]
    assert kinds == [("step", 1), ("nonfinite", 2), ("epoch", 2)]


class Payload:
    """Unpickling this creates a folder: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_checkpoint_files_that_would_run_code_are_refused(small_folder, tmp_path, name, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    assert train_here("--data", str(small_folder), "--out", str(out), "--epochs", "2", "--stop-after", "1") == 0
    torch.save({"state": Payload(marker), "param_groups": []}, out / "checkpoint" / name)
    listed = json.loads((out / "checkpoint" / "progress.json").read_text())  # whoever wrote it listed it too
    listed["files"] = manifest(out / "checkpoint", leave_out=("progress.json",))
    (out / "checkpoint" / "progress.json").write_text(json.dumps(listed))
    with pytest.raises(SystemExit) as stop:
        train_here("--data", str(small_folder), "--out", str(out), "--epochs", "2", "--resume")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"error: --resume: {out / 'checkpoint' / name} " in err and err.strip().endswith("refusing to load it")
    assert not marker.exists()
    torch.load(out / "checkpoint" / name, weights_only=False)  # the payload is real
    assert marker.is_dir()


def test_an_output_folder_that_cannot_be_written_is_one_sentence(small_folder, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    for out, sentence in [(tmp_path / "a-file" / "run", "cannot write to output folder {}: Not a directory"),
                          (tmp_path / "a-file", "output folder {} is a file")]:
        with pytest.raises(SystemExit) as stop:  # a file where a folder should be stops root too
            train_here("--data", str(small_folder), "--out", str(out), "--epochs", "1")
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip() == "error: " + sentence.format(out)


def test_a_full_disk_is_found_before_training(small_folder, tmp_path, monkeypatch, capsys):
    from simclr_dali.training import room
    free = shutil.disk_usage(tmp_path)._replace(free=2**20)
    monkeypatch.setattr(room.shutil, "disk_usage", lambda path: free)
    with pytest.raises(SystemExit):
        train_here("--data", str(small_folder), "--out", str(tmp_path / "run"), "--epochs", "1")
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: output folder {tmp_path / 'run'} has 1 MiB free, but its checkpoints need about")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    linear = torch.nn.Linear(10, 10)  # 110 float32 weights: three checkpoints of weights + momentum, one export
    assert room.checkpoint_bytes(linear, "lars") == 440 * 7
    assert room.checkpoint_bytes(linear, "adamw") == 440 * 10


def test_sigint_stops_at_the_step_boundary_and_a_second_one_at_once(small_folder, tmp_path, hooks, capsys):
    before = signal.getsignal(signal.SIGINT)
    hooks[3] = sigint(1)
    out = tmp_path / "run"
    every_epoch = ["--save-every-minutes", "0"]
    assert train_here("--data", str(small_folder), "--out", str(out), "--epochs", "3", *every_epoch) == 130
    assert progress(out / "checkpoint") == {"epoch": 0, "step": 3}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        f"SIGINT at step 3: the checkpoint is in {out / 'checkpoint'}; continue with  python train.py --data")
    hooks.clear()
    hooks.count, hooks[2] = 0, sigint(2)  # during step 5, after step 4 ended epoch 2 with a checkpoint
    assert train_here("--data", str(small_folder), "--out", str(out), "--epochs", "3", "--resume", *every_epoch) == 130
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"stopped at once at step 4 by a second signal; the checkpoint of step 4 in {out / 'checkpoint'} is whole")
    assert progress(out / "checkpoint") == {"epoch": 1, "step": 4}
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are given back
