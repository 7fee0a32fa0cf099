"""plots.py and pipelines/preview.py: every PNG decodes at its layout's size; the preview's views
belong to the images beside them. No training needed: features and metrics are generated."""
import json

import numpy as np
import pytest
from conftest import make_folder
from PIL import Image

from simclr_dali.evaluation import plots
from simclr_dali.pipelines.augment import Augment
from simclr_dali.pipelines.sources import Source, load_folder
from simclr_dali.tools import preview
from simclr_dali.tools.preview import CELL as PREVIEW_CELL
from simclr_dali.tools.preview import augmented_pairs

IDENTITY = Augment(crop_min_area=1.0, crop_min_ratio=1.0, crop_max_ratio=1.0, flip_p=0.0, jitter_p=0.0,
                   gray_p=0.0, blur_p=0.0)


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # decodes every byte
        # something is drawn: a canvas of one colour has a std of exactly 0 (integer pixels, their mean exact), and
        # a std says no more than that (empty axes have 20, the embedding maps here 15)
        assert np.asarray(im.convert("L")).std() > 0
        return im.size


def pixels(w: float, h: float, dpi: int = plots.DPI) -> tuple[int, int]:
    return int(w * dpi), int(h * dpi)


def write_metrics(run, knn: bool):
    run.mkdir(parents=True, exist_ok=True)
    records = []
    for epoch in (1, 2, 3):
        for s in (1, 2):
            step = 2 * (epoch - 1) + s
            records.append({"kind": "step", "epoch": epoch, "step": step, "loss": 5 - 0.1 * step, "lr": 0.1 * step,
                            "images_per_s": 100 + step})
        records.append({"kind": "epoch", "epoch": epoch, "step": 2 * epoch, "loss": 5 - 0.2 * epoch, "lr": 0.2,
                        "images_per_s": 100.0})
        if knn:
            records.append({"kind": "knn", "epoch": epoch, "step": 2 * epoch, "knn_top1": 0.2 * epoch})
    third = next(i for i, r in enumerate(records) if r["kind"] == "step" and r["step"] == 3)
    records.insert(third + 1, {**records[third], "loss": 99.0})  # a resumed run logged step 3 again: the later wins
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run / "metrics.jsonl"


def arrays(n=30, classes=3, seed=0) -> Source:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return Source("arrays", np.arange(n) % classes, images=images, classes=[f"c{i}" for i in range(classes)])


@pytest.mark.parametrize("knn", [False, True])
def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path, knn):
    kinds = plots.read_metrics(write_metrics(tmp_path, knn=knn))
    assert [r["step"] for r in kinds["step"]] == [1, 2, 3, 4, 5, 6]
    # the later record of step 3 (JSON writes a float's shortest repr, which reads back to the same double)
    assert kinds["step"][2]["loss"] == 99.0 and kinds["step"][3]["loss"] == 5 - 0.1 * 4
    assert len(kinds.get("knn", [])) == (3 if knn else 0)


@pytest.mark.parametrize("knn,panels", [(False, 3), (True, 4)])
def test_training_curves(tmp_path, knn, panels):
    out = plots.training_curves(write_metrics(tmp_path, knn), tmp_path / "curves.png")
    assert png_size(out) == pixels(plots.CURVE_PANEL[0] * panels, plots.CURVE_PANEL[1])


def test_plots_cli_draws_curves_and_refuses_a_folder_without_metrics(tmp_path, capsys):
    write_metrics(tmp_path / "run", knn=False)
    assert plots.main(["--run", str(tmp_path / "run")]) == 0  # as `python plots.py --run RUN` calls it
    assert png_size(tmp_path / "run" / "training_curves.png") == pixels(plots.CURVE_PANEL[0] * 3, plots.CURVE_PANEL[1])
    one_sentence(lambda: plots.main(["--run", str(tmp_path)]), "has no metrics.jsonl", capsys)


def one_sentence(command, sentence: str, capsys) -> None:
    """The command stops with exit status 2 and `sentence` in one line on stderr."""
    with pytest.raises(SystemExit) as stop:
        command()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and sentence in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("n", [2, 6, 30])  # a row, PCA, t-SNE
def test_embedding_map(tmp_path, n):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    features = {"SimCLR": rng.normal(size=(n, 16)) + 3 * labels[:, None], "random init": rng.normal(size=(n, 16))}
    out = plots.embedding_map(features, labels, ["a", "b", "c"], tmp_path / "map.png",
                              scores={"SimCLR": 0.9, "random init": 0.3})
    assert png_size(out) == pixels(*plots.MAP_SIZE)


def test_an_embedding_map_of_collapsed_features_says_so(tmp_path):
    """A dead network (every image the same features) or a diverged one (NaN) has no map to draw; t-SNE
    on it divided by zero and crashed the process (SIGSEGV) where evaluate.py drew random-init regnetx."""
    labels = np.arange(40) % 4
    same = np.tile(np.random.default_rng(0).normal(size=16), (40, 1)) * np.linspace(1, 2, 40)[:, None]  # one direction
    broken = np.random.default_rng(1).normal(size=(40, 16))
    broken[3, 5] = np.nan
    assert plots.project_2d(same)[1] == "all features equal"
    assert plots.project_2d(broken)[1] == "non-finite features"
    out = plots.embedding_map({"collapsed": same, "diverged": broken}, labels, list("abcd"), tmp_path / "map.png")
    assert png_size(out) == pixels(*plots.MAP_SIZE)


@pytest.mark.parametrize("kind", ["arrays", "folder"])
def test_retrieval_grid_shows_images_from_either_kind_of_source(tmp_path, kind):
    if kind == "arrays":
        source = arrays()
    else:
        source = load_folder(str(make_folder(tmp_path / "images", per_class=10, size=(48, 36))), "all")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(source), 8))
    queries = np.arange(0, len(source), 3)
    out = plots.retrieval_grid(x[queries], source.labels[queries], x, source.labels, source.subset(queries), source,
                               tmp_path / "grid.png")
    rows = 6  # three classes, at least six queries
    assert png_size(out) == pixels(plots.CELL * (plots.NEIGHBOURS + 1.25) + 0.3, plots.CELL * rows + 0.6)


def test_retrieval_queries_cover_the_classes():
    labels = np.repeat([0, 1, 2], [10, 2, 5])
    picked = plots.pick_queries(labels, 6, seed=0)
    assert len(set(picked)) == 6 and set(labels[picked]) == {0, 1, 2}
    assert np.array_equal(picked, plots.pick_queries(labels, 6, seed=0))


# -- pipelines.preview -----------------------------------------------------------------------------
def test_preview_views_line_up_with_their_originals():
    source = arrays(n=6)
    (a, b), = augmented_pairs(source, IDENTITY, size=32, seed=3, pairs=1, device_id=None)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    for view in (a, b):  # an identity crop gives the image back, in the source's order
        # the float32 normalise / de-normalise round trip leaves each uint8 within gamma(8, u) (255 + mean) = 1.8e-4
        # of itself (test_pipeline.ROUND_TRIP), and preview.pixels rounds to the nearest: exactly the image again
        np.testing.assert_array_equal(view, source.images)


def test_preview_cli_writes_the_grid(tmp_path, capsys):
    folder = make_folder(tmp_path / "images", per_class=4, size=(48, 36))
    out = tmp_path / "views.png"
    assert preview.main(["--data", str(folder), "--out", str(out), "--n", "5", "--pairs", "2",  # python -m ...
                         "--image-size", "32", "--blur-p", "0", "--seed", "1"]) == 0
    rows = 1 + 2 * 2  # original + two pairs of views
    assert png_size(out) == pixels(PREVIEW_CELL * 5 + 0.9, PREVIEW_CELL * rows + 0.7)
    one_sentence(lambda: preview.main(["--data", str(folder), "--out", str(out), "--n", "500"]),
                 "--n 500 is more than the", capsys)
