"""Never crash on bad data: files DALI cannot decode are found before training, skipped or refused,
and listed; pipelines.verify writes the list training reads. CPU only, generated data."""
import json
from pathlib import Path

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import pytest
from conftest import panel_words, run_cli, train_here
from nvidia.dali import pipeline_def
from PIL import Image
from support.bad_images import BAD, ODD_BUT_GOOD

from simclr_dali.errors import UserError
from simclr_dali.pipelines.sources import load_source
from simclr_dali.pipelines.verify import Screening, check_image


def dali_decode(path: Path) -> np.ndarray | None:
    """The oracle: DALI's own CPU decoder as the training pipeline calls it (None: it fails)."""
    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def decode():
        return fn.decoders.image(fn.external_source(name="x", layout="B"), device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    pipe.feed_input("x", [np.fromfile(path, dtype=np.uint8)])
    try:
        return np.array(pipe.run()[0].at(0))
    except RuntimeError:
        return None


def test_check_image_agrees_with_dalis_decoder(bad_folder):
    for name in [*BAD, *ODD_BUT_GOOD, "cat/000.png", "cat/001.jpg"]:
        verdict, decoded = check_image(str(bad_folder / name)), dali_decode(bad_folder / name)
        assert (verdict is None) == (decoded is not None), (name, verdict)
        if name in BAD:
            assert verdict.startswith(BAD[name]), (name, verdict)
        else:  # CMYK, grayscale, 5x5, a PNG named .jpg: DALI's RGB is Pillow's, to the bit
            np.testing.assert_array_equal(decoded, np.asarray(Image.open(bad_folder / name).convert("RGB")))


@pytest.mark.slow
def test_verify_writes_the_list_that_training_reads(bad_folder, tmp_path):
    listing = tmp_path / "good.tsv"
    r = run_cli("-m", "simclr_dali.pipelines.verify", str(bad_folder), "--out", str(listing), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert f"{5 + 36 + len(ODD_BUT_GOOD)} images" in r.stdout and f"{len(BAD)} cannot be decoded" in r.stdout
    lines = listing.read_text().splitlines()
    assert lines[:3] == ["# simclr image list v1", f"# root: {bad_folder.resolve()}", "# classes: cat\tdog\tfox"]
    rows = dict(line.split("\t") for line in lines[3:])
    expected = {str(p.relative_to(bad_folder)) for p in bad_folder.rglob("*.*") if p.suffix != ".txt"} - set(BAD)
    assert set(rows) == expected and rows["fox/tiny.png"] == "2" and rows["cat/cmyk.jpg"] == "0"
    skipped = dict(line.split("\t") for line in Path(f"{listing}.skipped").read_text().splitlines())
    assert {Path(p).relative_to(bad_folder).as_posix() for p in skipped} == set(BAD)
    # the list gives the same split as the folder screened at start-up (same files, same held-out part)
    for split in ("train", "test"):
        listed, screened = load_source(str(listing), split), load_source(str(bad_folder), split, screen=Screening())
        assert listed.files == screened.files and listed.labels.tolist() == screened.labels.tolist()
    assert load_source(f"list:{listing}", "train").files == load_source(str(listing), "train").files


def test_image_list_problems_are_one_sentence(bad_folder, tmp_path):
    listing = tmp_path / "l.tsv"
    listing.write_text(f"# simclr image list v1\n# root: {bad_folder}\n# classes: cat\tdog\tfox\ncat/gone.jpg\t0\n")
    with pytest.raises(UserError, match="cat/gone.jpg, named in image list .* does not exist"):
        load_source(str(listing), "train")
    listing.write_text(f"# simclr image list v1\n# root: {bad_folder}\n# classes: cat\ncat/000.png\t7\n")
    with pytest.raises(UserError, match="line 4 of image list"):
        load_source(str(listing), "train")
    (tmp_path / "other.txt").write_text("hello\n")
    with pytest.raises(UserError, match="neither a folder of images nor an image list"):
        load_source(str(tmp_path / "other.txt"), "train")


@pytest.mark.slow
def test_training_skips_bad_images_and_names_them(bad_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_here("--data", str(bad_folder), "--epochs", "1", "--out", str(out)) == 0
    panel = panel_words(capsys.readouterr().out)
    assert (f"skipped {len(BAD)} that cannot be decoded: cat/empty.jpg, dog/half.jpg, dog/no_iend.png, ... "
            f"(all in skipped.txt)") in panel
    lines = (out / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(bad_folder / n) for n in sorted(BAD)]
    assert all(line.split("\t")[1].startswith(BAD[n]) for line, n in zip(lines, sorted(BAD)))
    cfg = json.loads((out / "config.json").read_text())
    good = 36 + len(ODD_BUT_GOOD)
    assert cfg["n_train"] == good - round(0.1 * good) and cfg["scan"]["skipped"] == len(BAD)
    assert cfg["scan"]["checked"] == good + len(BAD)


def test_on_bad_image_error_names_the_first_bad_file(bad_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_here("--data", str(bad_folder), "--on-bad-image", "error", "--out", str(tmp_path / "o"))
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: {bad_folder / 'cat/empty.jpg'} cannot be decoded: empty (0 bytes) (and {len(BAD) - 1} more); "
        f"remove it, or pass --on-bad-image skip to train without it")


def test_pack_leaves_out_what_training_would_skip(bad_folder, tmp_path, capsys):
    from simclr_dali.pipelines import pack

    out = tmp_path / "shards"
    assert pack.main([str(bad_folder), str(out), "--shard-size", "10", "--workers", "1"]) == 0
    lines = (out / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(bad_folder / n) for n in sorted(BAD)]
    good = 36 + len(ODD_BUT_GOOD)
    pattern = f"wds:{out / 'shard-*.tar'}"
    test = load_source(pattern, "test")  # a tenth of each class of 14: one each
    assert len(load_source(pattern, "train", pattern)) == good - 3 and len(test) == 3
    assert len(list(out.glob("*.tar"))) == 5
    assert (f"wrote {good - 3} samples in 4 shard(s) and 3 test samples (0.1 of each class) in 1 test shard(s) "
            f"to {out}; {len(BAD)} that cannot be decoded left out") in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        pack.main([str(bad_folder), str(tmp_path / "refused"), "--on-bad-image", "error", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith(f"error: {bad_folder / 'cat/empty.jpg'} cannot be decoded: ")
    assert not (tmp_path / "refused").exists()  # refused before anything was written
