import pickle

import numpy as np
import pytest
from conftest import make_folder, write_cifar

from simclr_dali.errors import UserError
from simclr_dali.pipelines.sources import HOLDOUT_FRACTION, load_source


def test_folder_labels_follow_class_folders(image_folder):
    src = load_source(str(image_folder), "train", str(image_folder))  # whole folder
    assert len(src) == 24 and src.classes == ["cat", "dog", "fox"]
    for f, y in zip(src.files, src.labels):
        assert f.split("/")[-2] == src.classes[y]


def test_single_folder_holds_out_a_deterministic_test_split(image_folder):
    train, test = load_source(str(image_folder), "train"), load_source(str(image_folder), "test")
    assert len(test) == round(HOLDOUT_FRACTION * 24) and len(train) + len(test) == 24
    assert not set(train.files) & set(test.files)
    assert load_source(str(image_folder), "test").files == test.files


def test_flat_folder_is_unlabeled(tmp_path):
    make_folder(tmp_path / "x", classes=("only",), per_class=5)
    flat = tmp_path / "x" / "only"
    src = load_source(str(flat), "train", str(flat))
    assert len(src) == 5 and (src.labels == -1).all()


def test_digits_is_32px_rgb_with_fixed_split():
    train, test = load_source("digits", "train"), load_source("digits", "test")
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert set(np.unique(test.labels)) == set(range(10))
    np.testing.assert_array_equal(load_source("digits", "test").labels, test.labels)


@pytest.mark.parametrize("kind,n_train", [("cifar10", 100), ("cifar100", 20)])
def test_cifar_pickles_load(tmp_path, kind, n_train):
    root = write_cifar(tmp_path / kind, kind)
    train, test = load_source(f"{kind}:{root}", "train"), load_source(f"{kind}:{root}", "test")
    assert train.images.shape == (n_train, 32, 32, 3) and len(test) == 20
    # pixel layout: CIFAR rows are 1024 R, then G, then B values
    raw = pickle.loads((root / ("test_batch" if kind == "cifar10" else "test")).read_bytes())
    np.testing.assert_array_equal(test.images[3, :, :, 1].ravel(), raw[b"data"][3, 1024:2048])
    assert test.labels[3] == raw[b"labels" if kind == "cifar10" else b"fine_labels"][3]


class Boom:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    root = write_cifar(tmp_path / "c", "cifar10")
    (root / "test_batch").write_bytes(pickle.dumps({b"data": Boom(), b"labels": [0]}))
    with pytest.raises(UserError, match="refusing"):
        load_source(f"cifar10:{root}", "test")
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "is empty"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("hi")), "holds no images"),
])
def test_bad_folders_get_one_sentence(tmp_path, setup, match):
    path = tmp_path / "data"
    setup(path)
    with pytest.raises(UserError, match=match):
        load_source(str(path), "train")
