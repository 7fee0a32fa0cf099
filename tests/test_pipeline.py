"""The DALI pipelines, checked against NumPy oracles: on the CPU (device_id=None) and, for the tests
taking `device` where there is a GPU, on it (mixed decoder, augmentations on the GPU; conftest.py)."""
import numpy as np
import pytest
import torch
from conftest import dali_device_id, make_folder

from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, Augment
from pipelines.loader import Shard, eval_loader, shard_order, train_loader
from pipelines.sources import Source, load_source

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
IDENTITY = Augment(crop_min_area=1.0, crop_min_ratio=1.0, crop_max_ratio=1.0, flip_p=0.0, jitter_p=0.0,
                   gray_p=0.0, blur_p=0.0)


def arrays(n=40, size=32, seed=0) -> Source:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return Source("arrays", np.arange(n, dtype=np.int64), images=images)


def first_epoch(source, aug=Augment(), batch_size=8, seed=0, epoch=0, shard=Shard(), size=32, device="cpu",
                channels_last=False):
    """Every batch of one epoch, copied to the CPU (DALI reuses its output buffers)."""
    loader = train_loader(source, batch_size=batch_size, size=size, aug=aug, shard=shard, seed=seed,
                          epoch=epoch, workers=1, device_id=dali_device_id(device), channels_last=channels_last)
    return [tuple(t.cpu().clone() for t in batch) for batch in loader]


def pixels(view: torch.Tensor) -> torch.Tensor:
    """Undo normalisation: (N, 3, S, S) float -> 0..255 NHWC."""
    return (view * STD + MEAN).permute(0, 2, 3, 1)


def test_shapes_dtype_and_range(device):
    batches = first_epoch(arrays(), device=device)
    assert len(batches) == 5
    v1, v2, y = batches[0]
    assert v1.shape == v2.shape == (8, 3, 32, 32) and v1.dtype == torch.float32
    low = (0 - MEAN) / STD
    high = (255 - MEAN) / STD
    assert (v1 >= low - 1e-4).all() and (v1 <= high + 1e-4).all()
    assert y.dtype == torch.int64 and y.shape[0] == 8
    assert not torch.allclose(v1, v2), "the two views must be augmented independently"


def test_identity_settings_reproduce_the_image_and_its_label(device):
    src = arrays()
    for v1, v2, y in first_epoch(src, IDENTITY, device=device):
        expected = torch.from_numpy(src.images[y.view(-1).numpy()]).float()
        torch.testing.assert_close(pixels(v1), expected, atol=0.01, rtol=0)
        torch.testing.assert_close(v1, v2)


def test_flip_always_mirrors(device):
    src = arrays()
    v1, _, y = first_epoch(src, Augment(**{**IDENTITY.__dict__, "flip_p": 1.0}), device=device)[0]
    expected = torch.from_numpy(src.images[y.view(-1).numpy()][:, :, ::-1].copy()).float()
    torch.testing.assert_close(pixels(v1), expected, atol=0.01, rtol=0)


def test_grayscale_makes_channels_equal(device):
    v1, _, _ = first_epoch(arrays(), Augment(**{**IDENTITY.__dict__, "gray_p": 1.0}), device=device)[0]
    p = pixels(v1)
    assert (p[..., 0] - p[..., 1]).abs().max() < 1.01 and (p[..., 1] - p[..., 2]).abs().max() < 1.01
    assert p.std() > 10  # not a blank image


def test_jitter_ranges_and_blur_window_follow_the_paper():
    r = Augment().jitter_ranges()
    assert r["brightness"] == r["contrast"] == r["saturation"] == pytest.approx((0.2, 1.8))
    assert r["hue"] == pytest.approx((-72.0, 72.0))  # 0.2 of a turn, in degrees as DALI wants
    assert Augment(jitter_strength=0.5).jitter_ranges()["hue"] == pytest.approx((-36.0, 36.0))
    assert Augment().blur_window(224) == 23 and Augment().blur_window(32) == 3


def test_crop_area_and_aspect_ratio_follow_the_settings(device):
    # pixels that encode their own coordinates (R = 2x, G = 2y on a 128 px image) reveal each crop
    side = 128
    ramp = np.arange(side, dtype=np.uint8) * 2
    image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.zeros((side, side), np.uint8)), -1)
    src = Source("coords", np.arange(64, dtype=np.int64), images=np.repeat(image[None], 64, axis=0))
    crop_only = Augment(**{**IDENTITY.__dict__, "crop_min_area": 0.08, "crop_min_ratio": 3 / 4,
                           "crop_max_ratio": 4 / 3})
    views = pixels(torch.cat([v for v, _, _ in first_epoch(src, crop_only, size=32, device=device)]))
    # first to last output pixel centre spans the crop less one output pixel (31/32 of it)
    width = (views[..., 0].amax((1, 2)) - views[..., 0].amin((1, 2))) / 2 * 32 / 31  # source pixels
    height = (views[..., 1].amax((1, 2)) - views[..., 1].amin((1, 2))) / 2 * 32 / 31
    area, ratio = width * height / side ** 2, width / height
    assert area.min() > 0.08 * 0.85 and area.max() <= 1.0 + 1e-6
    assert ratio.min() > 0.75 * 0.9 and ratio.max() < 4 / 3 / 0.9
    assert area.min() < 0.25 and area.max() > 0.8  # the whole range is drawn from, not one scale
    whole = pixels(first_epoch(src, IDENTITY, size=32, device=device)[0][0])
    assert ((whole[..., 0].amax((1, 2)) - whole[..., 0].amin((1, 2))) / 2 * 32 / 31).min() > side - 1


def test_fixed_seed_reproduces_and_epochs_differ(device):
    src = arrays()
    a, b = first_epoch(src, seed=3, device=device), first_epoch(src, seed=3, device=device)
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            torch.testing.assert_close(s, t, atol=0, rtol=0)
    c = first_epoch(src, seed=3, epoch=1, device=device)
    assert not torch.equal(a[0][0], c[0][0])


@pytest.mark.parametrize("n,batch", [(43, 2), (40, 4), (17, 1)])
def test_an_epoch_is_the_same_global_batches_on_any_number_of_processes(n, batch):
    """Global batch j holds the same images whether 1, 2 or 4 processes split it, so an epoch resumed
    after `done` steps on another number of processes reads every remaining image once."""
    def epoch(world: int, skip: int = 0) -> list[set]:
        parts = [shard_order(n, Shard(i, world), batch * 4 // world, shuffle=True, drop_last=True, seed=1,
                             epoch=2, skip=skip).reshape(-1, batch * 4 // world) for i in range(world)]
        return [set(np.concatenate(row).tolist()) for row in zip(*parts)]

    one = epoch(1)
    assert len(one) == n // (4 * batch) and all(len(b) == 4 * batch for b in one)
    assert epoch(2) == one == epoch(4)
    for done in range(len(one)):
        assert epoch(1, done) == epoch(2, done) == epoch(4, done) == one[done:]


def test_shards_are_disjoint_and_equal():
    src = arrays(n=43)
    seen = []
    for index in range(2):
        labels = torch.cat([y.view(-1) for _, _, y in first_epoch(src, shard=Shard(index, 2), batch_size=7)])
        assert len(labels) == 21  # 43 // 2 = 21 per shard, 3 full batches of 7
        seen.append(set(labels.tolist()))
    assert not seen[0] & seen[1]


def test_file_reader_reads_this_epochs_shard_in_order(tmp_path):
    folder = make_folder(tmp_path / "images", per_class=10)  # 30 files
    src = Source("files", np.arange(30, dtype=np.int64), files=sorted(str(p) for p in folder.rglob("*.*")))
    seen = []
    for index in range(2):
        shard = Shard(index, 2)
        labels = torch.cat([y.view(-1) for _, _, y in first_epoch(src, batch_size=4, epoch=3, shard=shard)])
        order = shard_order(30, shard, 4, shuffle=True, drop_last=True, seed=0, epoch=3)
        assert labels.tolist() == order.tolist() and len(order) == 12  # 3 global batches of 2 x 4
        seen += labels.tolist()
    assert len(set(seen)) == 24 and seen != sorted(seen)


@pytest.mark.parametrize("kind", ["arrays", "jpegs"])
def test_channels_last_views_equal_the_chw_ones(kind, device, image_folder):
    src = arrays() if kind == "arrays" else load_source(str(image_folder), "train", str(image_folder))
    chw = first_epoch(src, seed=1, device=device)
    loader = train_loader(src, batch_size=8, size=32, aug=Augment(), shard=Shard(), seed=1, epoch=0, workers=1,
                          device_id=dali_device_id(device), channels_last=True)
    for (a1, a2, ay), (b1, b2, by) in zip(chw, loader):
        for a, b in ((a1, b1), (a2, b2)):
            assert b.shape == a.shape and b.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(b.cpu(), a, atol=0, rtol=0)
        assert torch.equal(ay, by.cpu())
    view, _ = next(iter(eval_loader(src, batch_size=5, size=24, workers=1, device_id=dali_device_id(device),
                                    channels_last=True)))
    assert view.shape == (5, 3, 24, 24) and view.is_contiguous(memory_format=torch.channels_last)


def test_eval_loader_reads_every_image_once_in_order(image_folder, device):
    src = load_source(str(image_folder), "train", str(image_folder))
    loader = eval_loader(src, batch_size=5, size=24, workers=1, device_id=dali_device_id(device))
    views, labels = zip(*[(v.cpu().clone(), y.cpu().clone()) for v, y in loader])
    assert torch.cat(views).shape == (24, 3, 24, 24)
    np.testing.assert_array_equal(torch.cat(labels).view(-1).numpy(), src.labels)


def test_folder_images_decode_in_both_formats(image_folder, device):
    src = load_source(str(image_folder), "train", str(image_folder))
    assert {f.rsplit(".", 1)[1] for f in src.files} == {"jpg", "png"}
    batches = first_epoch(src, batch_size=6, size=24, device=device)
    assert len(batches) == 4 and batches[0][0].shape == (6, 3, 24, 24)
    assert sorted(torch.cat([y.view(-1) for _, _, y in batches]).tolist()) == sorted(src.labels.tolist())


@pytest.mark.parametrize("sigma,size", [(2.0, 32), (1.0, 64)])
def test_blur_matches_a_separable_gaussian_oracle(sigma, size, device):
    from scipy.ndimage import correlate1d

    src = arrays(n=8, size=size)
    aug = Augment(**{**IDENTITY.__dict__, "blur_p": 1.0, "blur_sigma_min": sigma, "blur_sigma_max": sigma})
    v1, _, y = first_epoch(src, aug, size=size, device=device)[0]
    window = min(2 * int(np.ceil(3 * sigma)) + 1, aug.blur_window(size))  # 3 at 32 px, 7 at 64 px
    x = np.arange(window) - window // 2
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    img = src.images[y.view(-1).numpy()].astype(np.float64)
    expected = correlate1d(correlate1d(img, w, axis=1, mode="mirror"), w, axis=2, mode="mirror")
    got = pixels(v1).numpy()
    assert np.abs(got - expected).max() <= 1.01  # uint8 rounding in between
    assert np.abs(got - img).mean() > 5  # and it did blur


@pytest.mark.parametrize("kind", ["arrays", "jpegs"])
def test_checkpoint_mid_epoch_resumes_the_rest_bitwise(kind, device, tmp_path):
    """Loader.state() after some batches, given to a new pipeline, yields the rest of the epoch bit for
    bit: the reader or feeder position and every random operator's state (what train.py's mid-epoch
    resume rests on), for decoded arrays and for JPEGs through the decoder."""
    src = arrays(n=48) if kind == "arrays" else \
        load_source(str(make_folder(tmp_path / "images", per_class=16)), "train", str(tmp_path / "images"))
    kwargs = dict(batch_size=8, size=24, aug=Augment(), shard=Shard(), seed=5, epoch=1, workers=1,
                  device_id=dali_device_id(device))
    straight = first_epoch(src, batch_size=8, seed=5, epoch=1, size=24, device=device)
    loader = train_loader(src, **kwargs)
    batches = iter(loader)
    for _ in range(2):
        next(batches)
    state = loader.state()
    del batches, loader
    rest = train_loader(src, **kwargs, state=state, done=2)
    assert len(rest) == len(straight) - 2 == 4
    got = [tuple(t.cpu().clone() for t in batch) for batch in rest]
    assert len(got) == 4
    for x, y in zip(got, straight[2:]):
        for s, t in zip(x, y):
            torch.testing.assert_close(s, t, atol=0, rtol=0)
    assert not torch.equal(got[0][0], straight[1][0])  # the rest, not the start again
