"""One output folder, one run: run.lock is taken before anything is written, a second run refuses in one
sentence naming the first, a stale lock (dead process, silent host) is taken over and said."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ENV, ROOT, TINY, make_folder, train_here

from simclr_dali import lock
from simclr_dali.errors import UserError


def write_lock(out, host, pid, started="2026-12-01 10:00:00", age_s=0.0):
    out.mkdir(parents=True, exist_ok=True)
    path = out / lock.NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "started": started, "command": "train.py --data x"}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_lock_held_by_a_live_process_is_refused_in_one_sentence_naming_it(tmp_path):
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            write_lock(tmp_path, socket.gethostname(), other.pid)
            with pytest.raises(UserError) as err:
                lock.take(tmp_path)
        finally:
            other.kill()
    assert str(err.value) == (f"output folder {tmp_path} is in use by another run (process {other.pid} on "
                              f"{socket.gethostname()}, started 2026-12-01 10:00:00 (train.py --data x)): wait for it "
                              f"to finish, or choose another --out (its lock is {tmp_path / lock.NAME})")


@pytest.mark.parametrize("case", ["dead process", "silent host", "this process", "unreadable"])
def test_a_stale_lock_is_taken_over_and_the_take_over_is_said(case, tmp_path):
    pid = dead_pid()
    if case == "dead process":
        write_lock(tmp_path, socket.gethostname(), pid)
        why = f"its process {pid} is gone"
    elif case == "silent host":
        write_lock(tmp_path, "node-7", 4242, age_s=lock.STALE_S + 60)
        why = "node-7 has not touched it for 6 minutes"
    elif case == "this process":
        write_lock(tmp_path, socket.gethostname(), os.getpid())
        why = "this process left it (an earlier run that did not end)"
    else:
        (tmp_path / lock.NAME).write_text('{"host": "')  # a holder that died while writing it
        os.utime(tmp_path / lock.NAME, (time.time() - 20, time.time() - 20))
        why = "it was never filled in"
    held = lock.take(tmp_path)
    try:
        assert held.took_over.startswith(f"took over the lock of {tmp_path} from ") and held.took_over.endswith(why)
        assert json.loads((tmp_path / lock.NAME).read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == [lock.NAME]  # the stale one renamed aside, then gone
    finally:
        held.release()
    assert not (tmp_path / lock.NAME).exists()


def test_a_lock_from_another_host_with_a_fresh_heartbeat_is_refused(tmp_path):
    write_lock(tmp_path, "node-7", 4242, age_s=lock.STALE_S - 60)
    with pytest.raises(UserError, match=r"is in use by another run \(process 4242 on node-7, "):
        lock.take(tmp_path)


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    held = lock.take(tmp_path)
    write_lock(tmp_path, "node-7", 4242)  # taken over by another run meanwhile
    held.release()
    assert json.loads((tmp_path / lock.NAME).read_text())["host"] == "node-7"


def test_train_refuses_a_held_folder_before_writing_anything_there(tmp_path, capsys):
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            write_lock(tmp_path / "run", socket.gethostname(), other.pid)
            with pytest.raises(SystemExit) as stop:
                train_here("--data", "digits", "--out", str(tmp_path / "run"))
        finally:
            other.kill()
    said = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and said.startswith(f"error: output folder {tmp_path / 'run'} is in use by another "
                                                    f"run (process {other.pid} on "), said
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [lock.NAME]


RACER = """
import sys, time
from pathlib import Path
from simclr_dali import lock
from simclr_dali.errors import UserError
out, go, release = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    pass
try:
    held = lock.take(out)
    print("took", flush=True)
except UserError as err:
    held = None
    print("refused", err, flush=True)
while not release.exists():
    time.sleep(0.01)
if held is not None:
    held.release()
"""


@pytest.mark.slow
def test_of_runs_started_together_exactly_one_takes_the_folder_every_time(tmp_path):
    """ROUNDS rounds of three processes that take the lock of one folder at the same instant (each spins until the
    start file appears, then holds what it took until all three have tried): every round, one took it and the
    others name that one."""
    rounds = 25
    for r in range(rounds):
        out, go, release = tmp_path / f"out{r}", tmp_path / f"go{r}", tmp_path / f"release{r}"
        out.mkdir()
        racers = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(go), str(release)], cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
                  for _ in range(3)]
        assert [racer.stdout.readline().strip() for racer in racers] == ["ready"] * 3
        go.touch()
        said = [racer.stdout.readline().strip() for racer in racers]
        release.touch()
        for racer in racers:
            assert racer.wait(timeout=30) == 0
            racer.stdout.close()
        winners = [racer.pid for racer, line in zip(racers, said) if line == "took"]
        assert len(winners) == 1, (r, said)
        for line in said:
            assert line == "took" or line.startswith(f"refused output folder {out} is in use by another run "
                                                     f"(process {winners[0]} on {socket.gethostname()}, "), (r, said)
        assert not (out / lock.NAME).exists()  # released by its holder


@pytest.mark.slow
def test_two_train_py_started_together_into_one_folder_one_trains_and_one_refuses(tmp_path):
    out, data = tmp_path / "run", make_folder(tmp_path / "images")
    flags = ["train.py", "--data", str(data), "--out", str(out), *TINY]
    first = [*flags, "--epochs", "1"]
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    runs = [subprocess.Popen([sys.executable, *first], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    (winner, _), = [(run, e) for run, (code, e) in zip(runs, results) if code == 0]
    refused = next(e for code, e in results if code == 2).strip()
    assert refused.startswith(f"error: output folder {out} is in use by another run (process {winner.pid} on "), refused
    assert not (out / lock.NAME).exists() and (out / "backbone.safetensors").exists()
    assert train_here(*flags[1:], "--resume", "--epochs", "2") == 0  # the folder is free again once its run ended
