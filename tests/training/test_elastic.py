"""Elastic resume: a run stopped on one number of processes continues on another, with the same global
batch, every image of the interrupted epoch trained on once (CPU processes over gloo)."""
import json
import signal

import pytest
import torch
from conftest import make_folder
from safetensors.torch import load_file
from support.elastic import launch, seen_per_epoch

from simclr_dali.errors import UserError
from simclr_dali.training.checkpoint import Saved, resumed_batch

pytestmark = pytest.mark.slow  # two processes, stopped and resumed

GLOBAL_BATCH, STEPS = 8, 4  # 36 training images: 4 global batches of 8 per epoch, 4 images dropped


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 images, each in a class of its own: a label names its image (10% is kept aside: 36 train)."""
    return make_folder(tmp_path_factory.mktemp("elastic") / "images", classes=[f"c{i:02d}" for i in range(40)],
                       per_class=1)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_run_stopped_mid_epoch_resumes_on_another_number_of_processes(folder, tmp_path, before, after):
    out = tmp_path / "run"
    first = launch(before, folder, out, tmp_path, "first", "--batch-size", str(GLOBAL_BATCH // before), stop_at=6)
    # one process exits 128 + SIGTERM; accelerate's launcher reports 1 for two (and ends the other)
    assert first.returncode == (128 + signal.SIGTERM if before == 1 else 1), first.stderr[-3000:]
    assert "SIGTERM at step 6: the checkpoint is in" in first.stdout
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    assert progress["step"] == 6  # inside epoch 2 (steps 5-8)
    stopped = load_file(str(out / "checkpoint" / "model.safetensors"))
    second = launch(after, folder, out, tmp_path, "second", "--resume")  # the batch follows from the run's
    assert second.returncode == 0, second.stderr[-3000:]

    epochs = seen_per_epoch(tmp_path)
    assert sorted(epochs) == [0, 1, 2]
    for epoch, counts in epochs.items():  # every epoch: 32 different images, none trained on twice
        assert sum(counts.values()) == STEPS * GLOBAL_BATCH and max(counts.values()) == 1, (epoch, counts)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_sizes"] == [[before, 0], [after, 6]] and cfg["global_batch"] == GLOBAL_BATCH
    assert cfg["batch_size"] == GLOBAL_BATCH // after and cfg["steps_per_epoch"] == STEPS
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 13))
    assert all(r["loss"] == r["loss"] and 0 < r["loss"] < 10 for r in records if r["kind"] != "nonfinite")
    final = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert any(not torch.equal(final[k], stopped[k]) for k in final)  # it trained on
    assert f"world size      {after} (earlier: {before} from step 0)" in second.stdout


def test_a_global_batch_that_does_not_split_is_one_sentence(tmp_path):
    saved = Saved(tmp_path, {"global_batch": 8, "world_size": 2}, {"epoch": 0, "step": 4})
    assert resumed_batch(saved, 4, None) == 2 and resumed_batch(saved, 1, 8) == 8
    with pytest.raises(UserError, match=r"global batch of 8 images does not split over 3 processes; "
                                        r"resume it on 1, 2, 4, 8 process\(es\)"):
        resumed_batch(saved, 3, None)
    with pytest.raises(UserError, match=r"--batch-size on 2 process\(es\) is 4, not 8 \(or leave --batch-size out\)"):
        resumed_batch(saved, 2, 8)
