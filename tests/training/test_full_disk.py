"""A full disk while saving is one sentence, whatever library meets it (safetensors, torch's zip writer), with
nothing half-written left and the previous checkpoint whole. The disk is filled with a file-size limit
(`ulimit -f`: Python ignores SIGXFSZ, so a write past it fails with EFBIG), set in this process around one
save only."""
import contextlib
import errno
import resource

import pytest
from conftest import progress, train_here

from simclr_dali.training import loop
from simclr_dali.training.checkpoint import open_checkpoint
from simclr_dali.training.room import no_room

LIMIT = 1 << 20  # 1 MiB: room for config.json and the metrics, not for test_resnet's weights (about 1.5 MiB)


@contextlib.contextmanager
def file_size_limit(limit: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def saves_limited_from(monkeypatch, first: int) -> None:
    """The real save_checkpoint, with the file-size limit from its `first`-th call (1-based) on."""
    real, calls = loop.save_checkpoint, []

    def save(*args, **kwargs):
        calls.append(1)
        with file_size_limit(LIMIT) if len(calls) >= first else contextlib.nullcontext():
            return real(*args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", save)


def test_no_room_reads_the_errno_or_the_words_of_the_library_that_wrapped_it():
    from safetensors import SafetensorError

    assert no_room(OSError(errno.EFBIG, "File too large")) == "a file-size limit was met"
    assert no_room(OSError(errno.ENOSPC, "No space left on device")) == "no space left on the device"
    assert no_room(SafetensorError("Error while serializing: IoError(File too large (os error 27))")) == \
        "a file-size limit was met"
    assert no_room(RuntimeError("No space left on device")) == "no space left on the device"
    assert no_room(OSError(errno.EACCES, "Permission denied")) is None
    assert no_room(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")) is None


@pytest.mark.slow
@pytest.mark.parametrize("first", [1, 2], ids=["first-save", "later-save"])
def test_a_full_disk_while_saving_is_one_sentence_and_the_run_resumes_once_there_is_room(
        first, image_folder, tmp_path, monkeypatch, capsys, fresh_accelerate):
    out = tmp_path / "run"
    flags = ["--data", str(image_folder), "--out", str(out), "--epochs", "2", "--save-every-minutes", "0"]
    saves_limited_from(monkeypatch, first)
    with pytest.raises(SystemExit) as stop:
        train_here(*flags)
    said = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(said) == 1, said
    assert said[0].startswith(f"error: no room in output folder {out} while writing checkpoint.tmp"), said[0]
    assert "(a file-size limit was met): it needs about 3.0 MiB; the disk has " in said[0], said[0]
    assert "files may hold at most 1.0 MiB (ulimit -f); nothing half-written is left, and " in said[0], said[0]
    assert not (out / "checkpoint.tmp").exists()  # nothing half-written
    if first == 1:
        assert said[0].endswith("no checkpoint was written before this one") and not (out / "checkpoint").exists()
        return
    assert said[0].endswith(f"the previous checkpoint, {out / 'checkpoint'}, is whole")
    assert progress(open_checkpoint(out).path)["epoch"] == 0  # read back whole: every file's size and checksum
    monkeypatch.undo()
    assert train_here(*flags, "--resume") == 0  # room again: the run goes on and finishes
    assert progress(out / "checkpoint")["epoch"] == 1
