"""A finished run, damaged one file at a time (cut short, overwritten with garbage, emptied, deleted):
evaluate.py and train.py --resume each stop with one sentence that names the file and says what to do,
exit 2, and change nothing in the run folder. What the sentence offers works: the previous checkpoint
resumes to the same weights, and the backbone is exported again from the checkpoint. In-process."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_folder, train_here
from safetensors.torch import load_file

from simclr_dali.evaluation import evaluate

pytestmark = pytest.mark.slow  # trains the run it then damages

EPOCHS = ["--epochs", "2"]
TINY_ARGS = ["--epochs", "1", "--backbone", "test_resnet", "--image-size", "32", "--batch-size", "4"]


def cut(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def empty(path: Path):
    path.write_bytes(b"")


def delete(path: Path):
    path.unlink()


DAMAGES = {"cut": cut, "garbage": garbage, "empty": empty, "deleted": delete}
CHECKPOINT_FILES = ["config.json", "progress.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run): two epochs, checkpointed at each end, so checkpoint.prev holds the first."""
    root = tmp_path_factory.mktemp("damaged")
    data, run = make_folder(root / "images", per_class=6), root / "run"
    assert train_here("--data", str(data), "--out", str(run), *EPOCHS, "--save-every-minutes", "0") == 0
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == sorted(CHECKPOINT_FILES)
    return data, run


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished[1], tmp_path / "run"))


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def refused(capsys, main, args: list[str], run: Path) -> str:
    """The one line main(args) prints before exiting 2, with nothing in `run` changed."""
    before = snapshot(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert snapshot(run) == before
    return err


def resume_args(data: Path, run: Path, *more: str) -> list[str]:
    from conftest import TINY

    return ["--data", str(data), "--out", str(run), *EPOCHS, *TINY, *more]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_checkpoint_file_offers_the_previous_checkpoint(finished, copy, capsys, name, damage):
    from simclr_dali import training as train
    DAMAGES[damage](copy / "checkpoint" / name)
    err = refused(capsys, train.main, resume_args(finished[0], copy, "--resume"), copy)
    prev = copy / "checkpoint.prev"
    assert err.startswith(f"error: --resume: {copy / 'checkpoint' / name} ")
    assert err.endswith(f"the checkpoint {prev} (step 2) is whole: continue from it with --resume-from {prev} "
                        f"in place of --resume"), err
    problem = err[len(f"error: --resume: {copy / 'checkpoint' / name} "):].split(":")[0]
    if damage == "deleted":
        assert problem == "is missing"
    elif damage == "empty":
        assert problem == "is empty"
    elif name != "progress.json":  # each file's size and checksum are listed in progress.json
        assert problem.startswith("is cut short (" if damage == "cut" else "is damaged ("), problem
    else:
        assert problem in ("is cut short", "is not JSON (it holds binary data)"), problem


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", [n for n in CHECKPOINT_FILES if n != "progress.json"])
def test_an_older_checkpoint_without_the_list_is_read_back_by_format(finished, copy, capsys, name, damage):
    from simclr_dali import training as train
    progress = copy / "checkpoint" / "progress.json"
    progress.write_text(json.dumps({k: v for k, v in json.loads(progress.read_text()).items() if k != "files"}))
    DAMAGES[damage](copy / "checkpoint" / name)
    err = refused(capsys, train.main, resume_args(finished[0], copy, "--resume"), copy)
    problem = err[len(f"error: --resume: {copy / 'checkpoint' / name} "):].split(":")[0]
    torch_file = "is cut short or is not a file written by torch.save"
    expect = {"deleted": "is missing", "empty": "is empty"}.get(damage) or {
        "config.json": "is cut short" if damage == "cut" else "is not JSON (it holds binary data)",
        "model.safetensors": "is cut short (" if damage == "cut" else "is not a safetensors file",
        "optimizer.bin": torch_file, "random_states_0.pkl": torch_file}[name]
    assert problem.startswith(expect), err
    assert err.endswith(f"continue from it with --resume-from {copy / 'checkpoint.prev'} in place of --resume")


def test_the_offered_checkpoint_resumes_to_the_same_weights(finished, copy, capsys):
    from simclr_dali import training as train
    final = {k: v.clone() for k, v in load_file(str(copy / "checkpoint" / "model.safetensors")).items()}  # not mmapped
    cut(copy / "checkpoint" / "model.safetensors")
    damaged = (copy / "checkpoint" / "model.safetensors").read_bytes()
    prev = copy / "checkpoint.prev"
    assert train.main(resume_args(finished[0], copy, "--resume-from", str(prev))) == 0
    again = load_file(str(copy / "checkpoint" / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    assert (copy / "checkpoint.set-aside" / "model.safetensors").read_bytes() == damaged  # kept, not resumed
    assert '"step": 2' in (prev / "progress.json").read_text()  # the one it resumed from is still the previous
    assert train.main(resume_args(finished[0], copy, "--resume")) == 0  # and the newest is whole


def test_no_whole_checkpoint_says_start_again(finished, copy, capsys):
    from simclr_dali import training as train
    for folder in ("checkpoint", "checkpoint.prev"):
        empty(copy / folder / "model.safetensors")
    err = refused(capsys, train.main, resume_args(finished[0], copy, "--resume"), copy)
    assert err == (f"error: --resume: {copy / 'checkpoint' / 'model.safetensors'} is empty: {copy} holds no other "
                   f"whole checkpoint: start the run again (with another --out)")


def test_weights_of_another_architecture_are_named(finished, copy, capsys):
    from simclr_dali import training as train
    shutil.copy(copy / "backbone.safetensors", copy / "checkpoint" / "model.safetensors")
    (copy / "checkpoint" / "progress.json").write_text('{"epoch": 1, "step": 4}')  # a list-less older checkpoint
    err = refused(capsys, train.main, resume_args(finished[0], copy, "--resume"), copy)
    assert err.startswith(f"error: --resume: {copy / 'checkpoint' / 'model.safetensors'} holds the weights of another "
                          f"architecture than --backbone test_resnet (has no tensor backbone.")
    shutil.copy(copy / "checkpoint" / "model.safetensors", copy / "weights")
    shutil.copy(copy / "checkpoint.prev" / "model.safetensors", copy / "backbone.safetensors")
    err = refused(capsys, evaluate.main, ["--run", str(copy)], copy)
    assert err.startswith(f"error: {copy / 'backbone.safetensors'} holds the weights of another architecture than "
                          f"the run's test_resnet (has an unexpected tensor backbone.")


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_metrics_file(finished, copy, capsys, damage):
    """metrics.jsonl is appended to: a cut last line (a kill) is left out, an empty or deleted one starts
    afresh; garbage is refused by both tools."""
    from simclr_dali import training as train
    text = (copy / "metrics.jsonl").read_text()
    DAMAGES[damage](copy / "metrics.jsonl")
    if damage == "garbage":
        for main, args in ((train.main, resume_args(finished[0], copy, "--resume")),
                           (evaluate.main, ["--run", str(copy)])):
            err = refused(capsys, main, args, copy)
            assert err.startswith(f"error: {copy / 'metrics.jsonl'} is not JSON lines (it holds binary data): "
                                  f"delete what is damaged"), err
        return
    assert train.main(resume_args(finished[0], copy, "--resume")) == 0  # nothing left to train: exports again
    kept = (copy / "metrics.jsonl").read_text() if (copy / "metrics.jsonl").exists() else ""
    whole = text[: len(text) // 2].rpartition("\n")[0] + "\n" if damage == "cut" else ""
    assert kept == whole and (damage != "cut" or kept.count("\n") >= 2)


def test_a_metrics_line_that_is_not_json_is_named(finished, copy, capsys):
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    err = refused(capsys, evaluate.main, ["--run", str(copy)], copy)
    assert err == f"error: {copy / 'metrics.jsonl'} line 2 is not a JSON record: delete what is damaged, or pass --no-plots"


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["config.json", "backbone.safetensors"])
def test_evaluate_on_a_damaged_run(finished, copy, capsys, name, damage):
    DAMAGES[damage](copy / name)
    err = refused(capsys, evaluate.main, ["--run", str(copy)], copy)
    if name == "backbone.safetensors" and damage == "deleted":
        assert err == f"error: {copy} has no backbone.safetensors yet: training has not finished"
        return
    assert err.startswith(f"error: {copy / name} "), err
    if name == "config.json":
        assert err.endswith(f": the checkpoint keeps a copy: copy {copy / 'checkpoint' / 'config.json'} to {copy}")
    else:
        assert err.endswith(f": export it again from the checkpoint with  python train.py --config "
                            f"{copy / 'checkpoint' / 'config.json'} --out {copy} --resume")


def test_the_offered_remedies_for_evaluate_work(finished, copy, capsys):
    from simclr_dali import training as train
    original = (copy / "backbone.safetensors").read_bytes()
    cut(copy / "backbone.safetensors")
    garbage(copy / "config.json")
    err = refused(capsys, evaluate.main, ["--run", str(copy)], copy)
    shutil.copy(copy / "checkpoint" / "config.json", copy / "config.json")  # what the sentence says
    err = refused(capsys, evaluate.main, ["--run", str(copy)], copy)
    command = err.split("with  python train.py ")[1].split()
    assert train.main(command) == 0
    assert (copy / "backbone.safetensors").read_bytes() == original
    assert evaluate.main(["--run", str(copy), "--no-plots", "--probe-epochs", "2"]) == 0


def test_a_damaged_dali_state_of_a_mid_epoch_checkpoint(finished, tmp_path, hooks, capsys):
    """The DALI pipeline's state is listed with the other files; in an older checkpoint without the
    list, DALI's own refusal to restore it is the sentence."""
    import os
    import signal

    from simclr_dali import training as train
    def sigint(loss):
        os.kill(os.getpid(), signal.SIGINT)
        return loss

    data, run = finished[0], tmp_path / "mid"
    hooks[3] = sigint  # stops during epoch 2, checkpointed after its first step
    assert train.main(resume_args(data, run, "--save-every-minutes", "0")) == 130
    state = run / "checkpoint" / "dali_0.state"
    garbage(state)
    err = refused(capsys, train.main, resume_args(data, run, "--resume"), run)
    assert err == (f"error: --resume: {state} is damaged (its contents changed after it was written): the checkpoint "
                   f"{run / 'checkpoint.prev'} (step 2) is whole: continue from it with --resume-from "
                   f"{run / 'checkpoint.prev'} in place of --resume")
    progress = run / "checkpoint" / "progress.json"
    progress.write_text(json.dumps({k: v for k, v in json.loads(progress.read_text()).items() if k != "files"}))
    before = snapshot(run / "checkpoint")
    with pytest.raises(SystemExit):
        train.main(resume_args(data, run, "--resume"))
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --resume: {state} is not a DALI pipeline state this version can restore (")
    assert err.endswith(f"continue from it with --resume-from {run / 'checkpoint.prev'} in place of --resume")
    assert snapshot(run / "checkpoint") == before


# -- the data files the tools read back: image lists from pipelines.verify, shard indexes ------------
@pytest.fixture(scope="module")
def data_files(finished, tmp_path_factory) -> dict[str, Path]:
    from simclr_dali.pipelines.sources import load_folder, write_image_list
    from simclr_dali.pipelines.webdataset import write_shards

    root, folder = tmp_path_factory.mktemp("data"), finished[0]
    source = load_folder(str(folder), "all")
    write_image_list(root / "images.txt", source, folder)
    write_shards(source.files, source.labels, root / "shards", shard_size=6)
    return {"list": root / "images.txt", "shards": root / "shards"}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_image_list(data_files, tmp_path, capsys, damage):
    from simclr_dali import training as train
    listing = Path(shutil.copy(data_files["list"], tmp_path / "images.txt"))
    DAMAGES[damage](listing)
    err = refused(capsys, train.main, ["--data", str(listing), "--out", str(tmp_path / "run"), *TINY_ARGS], tmp_path)
    expect = {"deleted": f"error: data path {listing} does not exist",
              "empty": f"error: data path {listing} is neither a folder of images nor an image list",
              "garbage": f"error: data path {listing} is neither a folder of images nor an image list",
              "cut": f"error: image list {listing} is cut short (its last line is incomplete): run `python -m "
                     f"simclr_dali.pipelines.verify {data_files['list'].parent.parent / 'damaged0' / 'images'}"}[damage]
    assert err.startswith(expect[:60]), err
    if damage == "cut":
        assert err.endswith(f" --out {listing}` again")


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["shard-000001.idx", "shard-000001.tar"])
def test_a_damaged_shard_or_index(data_files, tmp_path, capsys, name, damage):
    from simclr_dali import training as train
    shards = Path(shutil.copytree(data_files["shards"], tmp_path / "shards"))
    DAMAGES[damage](shards / name)
    args = ["--data", f"wds:{shards / 'shard-*.tar'}", "--out", str(tmp_path / "run"), *TINY_ARGS]
    if name.endswith(".tar") and damage == "deleted":
        return  # one shard fewer: a smaller data set, not a damaged one
    index, shard = shards / "shard-000001.idx", shards / "shard-000001.tar"
    if name.endswith(".idx") and damage == "deleted":  # a shard without an index is indexed where it is loaded
        from simclr_dali.pipelines.sources import load_source
        assert len(load_source(args[1], "train")) == 18
        assert index.read_text() == (data_files["shards"] / "shard-000001.idx").read_text()  # as pack wrote it
        return
    err = refused(capsys, train.main, args, tmp_path)
    if name.endswith(".tar"):
        problem = "is damaged: there is no tar header where" if damage == "garbage" else "is cut short:"
        assert err.startswith(f"error: {shard} {problem} its index {index} places sample "), err
    elif damage == "garbage":
        assert err.startswith(f"error: {index} is not a DALI webdataset index (it holds binary data)")
    elif damage == "empty":
        assert err.startswith(f"error: {index} is not a DALI webdataset index (its first line should be 'v1.2 N')")
    else:
        assert err.startswith(f"error: {index} is cut short (")
    assert "simclr_dali.pipelines.pack" in err


def test_an_image_damaged_inside_a_shard_is_one_sentence(data_files, tmp_path, capsys):
    """Past the index's checks (the first and last samples' tar headers), an image damaged inside a shard
    is found while training (its bytes are no image, so DALI never decodes them): one sentence naming the member."""
    from simclr_dali import training as train
    shards = Path(shutil.copytree(data_files["shards"], tmp_path / "shards"))
    with open(shards / "shard-000000.tar", "r+b") as tar:
        for line in (shards / "shard-000000.idx").read_text().splitlines()[2:-1]:  # every sample but the ends
            _, offset, size, _ = line.split()[:4]
            tar.seek(int(offset))
            tar.write(bytes(int(size)))
    pattern = f"wds:{shards / 'shard-*.tar'}"
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", pattern, "--out", str(tmp_path / "run"), *TINY_ARGS, "--batch-size", "2"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    member = re.fullmatch(rf"error: {re.escape(str(shards / 'shard-000000.tar'))}:(\d+)\.(jpg|png), read from "
                          rf"{re.escape(pattern)}, is not an image in a format DALI decodes: the data changed "
                          rf"after it was checked; check it again with python -m simclr_dali\.pipelines\.pack", err)
    assert member is not None, err
    lines = (shards / "shard-000000.idx").read_text().splitlines()
    assert f"{member[1]}.{member[2]}" in [line.split()[3] for line in lines[2:-1]]  # one of those zeroed


def test_what_the_readers_say(tmp_path):
    """The sentences of readback's checks that the damaged runs above do not reach."""
    from safetensors.torch import save_file

    from simclr_dali.readback import Unreadable, check_safetensors, read_json, read_jsonl
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2, 3)}, str(weights))
    check_safetensors(weights, "fix", expect={"w": (2, 3)})
    with pytest.raises(Unreadable, match=r"w.safetensors holds the weights of another architecture than the model "
                                         r"\(w has shape \[2, 3\], not \[3, 2\]\): fix$"):
        check_safetensors(weights, "fix", expect={"w": (3, 2)})
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(Unreadable, match=r"is damaged \(1 bytes past its last tensor\)"):
        check_safetensors(weights, "fix")
    settings = tmp_path / "settings.json"
    for text, problem in [('{"epoch": 1}', "lacks 'step': it was written by another version of train.py"),
                          ("[1, 2]", "holds a JSON list, not the object train.py writes"),
                          ('{"step": 1,\n "epoch": x}', "is not JSON (line 2: Expecting value)"),
                          ('{"step": 1, "epo', "is cut short")]:
        settings.write_text(text)
        with pytest.raises(Unreadable) as err:
            read_json(settings, "fix", need=("step",))
        assert str(err.value) == f"{settings} {problem}: fix"
    records = tmp_path / "metrics.jsonl"
    records.write_text('{"step": 1}\n[2]\n{"step": 3}\n')
    with pytest.raises(Unreadable, match=r"metrics.jsonl line 2 is not a JSON record: fix$"):
        read_jsonl(records, "fix")
    records.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(records, "fix") == [{"step": 1}, {"step": 2}]
