"""The DALI pipelines, checked against NumPy oracles: on the CPU (device_id=None) and, for the tests
taking `device` where there is a GPU, on it (mixed decoder, augmentations on the GPU; conftest.py)."""
import numpy as np
import pytest
import torch
from conftest import dali_device_id, make_folder, state_after
from support.error_bounds import gamma, unit_roundoff

from simclr_dali.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, Augment
from simclr_dali.pipelines.loader import Shard, eval_loader, shard_order, train_loader
from simclr_dali.pipelines.sources import Source, load_source

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
IDENTITY = Augment(crop_min_area=1.0, crop_min_ratio=1.0, crop_max_ratio=1.0, flip_p=0.0, jitter_p=0.0,
                   gray_p=0.0, blur_p=0.0)

U = unit_roundoff(torch.float32)
M, S = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
# crop_mirror_normalize makes (x - m) / s of a uint8 x in float32, from float32 copies of m and s: (x - m) * (1 / s) on
# the CPU, fma(x, 1 / s, -m / s) on the GPU; at most 5 roundings, each of a term no larger than (x + m) / s.
NORMALISE = gamma(5, U) * (255 + M) / S  # per channel, x <= 255
# pixels() undoes that in float32 (* s, + m: 3 more roundings, of terms up to x + m), so a view that left the pipeline
# as uint8 x comes back within ROUND_TRIP of x: 1.8e-4 of a grey level, where a wrong pixel is off by one or more.
ROUND_TRIP = gamma(8, U) * (255 + M.max())


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


def off_grid(got, exact, delta: float) -> np.ndarray:
    """How far `got` lies from the uint8 values that rounding `exact`, computed to within `delta`, can give: either
    neighbour where `exact` is within `delta` of a half, else the nearest integer (clipped to 0..255)."""
    got, exact = np.asarray(got, np.float64), np.asarray(exact, np.float64)
    low, high = np.clip(np.rint(exact - delta), 0, 255), np.clip(np.rint(exact + delta), 0, 255)
    return np.maximum(np.maximum(low - got, got - high), 0)


def resized_ramp(anchor: np.ndarray, extent: np.ndarray, side: int, out: int) -> np.ndarray:
    """The ramp 2i over source pixels i (centres at i + 1/2) of a `side`-pixel image, cropped to [anchor, anchor +
    extent) and resized to `out` pixels as DALI's resize does: a triangle of radius max(1, extent / out) (antialiased
    when shrinking) at each output centre, weights normalised, edge pixels repeated. (C,) windows -> (C, out)."""
    anchor, extent = np.asarray(anchor, float)[:, None, None], np.asarray(extent, float)[:, None, None]
    centre = anchor + (np.arange(out)[:, None] + 0.5) * extent / out  # (C, out, 1), in source pixels
    radius = np.maximum(1, extent / out)
    i = np.arange(int((anchor - radius).min()) - 1, int((anchor + extent + radius).max()) + 1)  # every tap, and beyond
    taps = np.maximum(0, 1 - np.abs(i + 0.5 - centre) / radius)
    return (taps * 2.0 * np.clip(i, 0, side - 1)).sum(-1) / taps.sum(-1)


def crop_window(ramp: np.ndarray, side: int, delta: float) -> tuple[int, int, float]:
    """(anchor, extent, misfit) of the whole-pixel window whose resized ramp rounds to `ramp` (out, out; the ramp runs
    along the last axis), searched around the window that its end values suggest; misfit is off_grid's largest."""
    out = ramp.shape[-1]
    extent = (ramp.max() - ramp.min()) / 2 * out / (out - 1)  # first to last output centre: (out - 1) / out of it
    anchor = ramp.min() / 2 + 0.5 - extent / (2 * out)
    windows = np.array([(a, e) for a in range(round(anchor) - 2, round(anchor) + 3)
                        for e in range(round(extent) - 2, round(extent) + 3)])
    misfit = off_grid(ramp[None], resized_ramp(windows[:, 0], windows[:, 1], side, out)[:, None, :], delta).max((1, 2))
    best = misfit.argmin()
    return int(windows[best, 0]), int(windows[best, 1]), float(misfit[best])


def test_shapes_dtype_and_range(device):
    batches = first_epoch(arrays(), device=device)
    assert len(batches) == 5
    v1, v2, y = batches[0]
    assert v1.shape == v2.shape == (8, 3, 32, 32) and v1.dtype == torch.float32
    # every augmentation ends in uint8 (colour twist and blur saturate), so each view is a normalised 0..255
    low, high = [torch.from_numpy(b).view(1, 3, 1, 1) for b in (-M / S - NORMALISE, (255 - M) / S + NORMALISE)]
    assert (v1.double() >= low).all() and (v1.double() <= high).all()
    assert y.dtype == torch.int64 and y.shape[0] == 8
    # the same operators with the same draws on the same image give the same bits (the identity test): a view equal
    # to its pair would be a repeated draw
    assert not any(torch.equal(a, b) for a, b in zip(v1, v2)), "the two views must be augmented independently"


def test_identity_settings_reproduce_the_image_and_its_label(device):
    src = arrays()
    for v1, v2, y in first_epoch(src, IDENTITY, device=device):
        expected = torch.from_numpy(src.images[y.view(-1).numpy()]).float()
        # the whole image at its own size, and no jitter or grayscale (their conditional branches are skipped): only
        # the round trip
        torch.testing.assert_close(pixels(v1), expected, atol=ROUND_TRIP, rtol=0)
        torch.testing.assert_close(v1, v2, atol=0, rtol=0)  # the same operators on the same image: bit for bit


def test_flip_always_mirrors(device):
    src = arrays()
    v1, _, y = first_epoch(src, Augment(**{**IDENTITY.__dict__, "flip_p": 1.0}), device=device)[0]
    expected = torch.from_numpy(src.images[y.view(-1).numpy()][:, :, ::-1].copy()).float()
    torch.testing.assert_close(pixels(v1), expected, atol=ROUND_TRIP, rtol=0)  # a flip moves uint8s, rounds nothing


def test_grayscale_makes_channels_equal(device):
    v1, _, _ = first_epoch(arrays(), Augment(**{**IDENTITY.__dict__, "gray_p": 1.0}), device=device)[0]
    p = pixels(v1).double()
    assert (p - p.round()).abs().max() <= ROUND_TRIP  # uint8 values, through the round trip
    # grayscale is luma copied into the three channels (RGB -> GRAY -> RGB), so they are equal exactly
    q = p.round()
    assert (q.amax(-1) - q.amin(-1)).max() == 0
    assert p.std() > 10  # not blank: the luma of uniform random pixels has a std of 255 / 12 ** 0.5 * 0.67 = 49


def test_jitter_ranges_and_blur_window_follow_the_paper():
    # 1 -+ 0.8 s and -+0.2 s * 360 in float64: two roundings and the decimal constant's own, each within u of the
    # largest magnitude involved (1.8; 72 s degrees)
    u = unit_roundoff(torch.float64)
    r = Augment().jitter_ranges()
    factors = pytest.approx((0.2, 1.8), rel=0, abs=gamma(3, u) * 1.8)
    assert r["brightness"] == r["contrast"] == r["saturation"] == factors
    assert r["hue"] == pytest.approx((-72.0, 72.0), rel=0, abs=gamma(3, u) * 72)  # 0.2 of a turn, in degrees for DALI
    half = Augment(jitter_strength=0.5).jitter_ranges()["hue"]
    assert half == pytest.approx((-36.0, 36.0), rel=0, abs=gamma(3, u) * 36)
    assert Augment().blur_window(224) == 23 and Augment().blur_window(32) == 3


def test_crop_area_and_aspect_ratio_follow_the_settings(device):
    # pixels that encode their own coordinates (R = 2x, G = 2y on a 128 px image) reveal each crop
    side = 128
    ramp = np.arange(side, dtype=np.uint8) * 2
    image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.zeros((side, side), np.uint8)), -1)
    src = Source("coords", np.arange(64, dtype=np.int64), images=np.repeat(image[None], 64, axis=0))
    crop_only = Augment(**{**IDENTITY.__dict__, "crop_min_area": 0.08, "crop_min_ratio": 3 / 4,
                           "crop_max_ratio": 4 / 3})
    out = 32
    # DALI resizes in float32, rows then columns, and rounds to uint8 once. An output sums K <= 2 ceil(side / out) + 2
    # taps of values <= 254 a pass: K roundings, K + 1 normalising the weights, 5 evaluating them. Its source
    # coordinate (<= side) carries 3 roundings, and a shift moves an output by at most 18 grey levels a pixel (2 rho + 1
    # taps of slope 1 / rho over values within 4 rho, weights summing to >= 2 rho / 3, for a triangle of radius rho).
    taps = 2 * -(-side // out) + 2
    resize = 2 * gamma(2 * taps + 6, U) * 254 + 18 * gamma(3, U) * side

    def windows(aug, batches=8):  # (x0, width, y0, height) of each view's crop, in whole source pixels
        views = pixels(torch.cat([v for v, _, _ in first_epoch(src, aug, size=out, device=device)[:batches]])).numpy()
        found = [crop_window(v[..., 0], side, resize) + crop_window(v[..., 1].T, side, resize) for v in views]
        assert max(max(f[2], f[5]) for f in found) <= ROUND_TRIP  # each view is its window's resized ramp
        return np.array([(f[0], f[1], f[3], f[4]) for f in found])

    x0, w, y0, h = windows(crop_only).T
    assert (x0 >= 0).all() and (x0 + w <= side).all() and (y0 >= 0).all() and (y0 + h <= side).all()  # so area <= 1
    assert (4 * w >= 3 * h).all() and (3 * w <= 4 * h).all()  # DALI keeps a rounded window only if w / h is in range
    # w and h are the drawn sqrt(A r) and sqrt(A / r) rounded to whole pixels, each off by 1/2 at most (float32's share
    # of that is below the 1/4 left out): w h >= A - (sqrt(A 4/3) + sqrt(A 3/4)) / 2 at the smallest area A drawn
    a = 0.08 * side ** 2
    assert (w * h >= a - (np.sqrt(a * 4 / 3) + np.sqrt(a * 3 / 4)) / 2).all()
    # the whole range is drawn from, not one scale: 21% of DALI's windows have area < 0.25 and 22% > 0.7 (fewer large
    # ones than drawn: it draws again where a rounded window does not fit), so 64 views miss either with odds of 2e-7
    area = w * h / side ** 2
    assert area.min() < 0.25 and area.max() > 0.7
    assert (windows(IDENTITY, batches=1) == (0, side, 0, side)).all()


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
    # DALI blurs in float32 (rows, then columns, a float32 image in between) and rounds to uint8 once, at the end.
    # Its taps (float32 exp, their sum, its reciprocal) are each within gamma(window + 6) of the oracle's, and a pass
    # sums `window` of them times values <= 255: within gamma(window) + gamma(window + 6) of 255 a pass.
    blur = 2 * gamma(2 * window + 6, U) * 255
    assert off_grid(pixels(v1).numpy(), expected, blur).max() <= ROUND_TRIP
    assert off_grid(img, expected, blur).max() > ROUND_TRIP  # and it did blur: the image itself is off the oracle


@pytest.mark.parametrize("size,sigma", [(48, 0.3), (96, 1.0), (224, 2.0)])
def test_a_random_sigma_blurs_with_a_window_per_sample_at_every_size(size, sigma, device):
    """A sigma drawn per image gives a window per image (a DataNode), 2 ceil(3 sigma) + 1 capped at a tenth of the
    side: 3 taps at 48 px, 9 at 96, 15 at 224. The range [sigma, sigma + 1e-4] keeps sigma known to the oracle, and a
    draw still happens (a range of one value is a plain number, the path the test above takes)."""
    from scipy.ndimage import correlate1d

    spread = 1e-4
    src = arrays(n=4, size=size)
    aug = Augment(**{**IDENTITY.__dict__, "blur_p": 1.0, "blur_sigma_min": sigma, "blur_sigma_max": sigma + spread})
    v1, _, y = first_epoch(src, aug, batch_size=4, size=size, device=device)[0]
    window = min(2 * int(np.ceil(3 * (sigma + spread))) + 1, aug.blur_window(size))
    x = np.arange(window) - window // 2
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    img = src.images[y.view(-1).numpy()].astype(np.float64)
    expected = correlate1d(correlate1d(img, w, axis=1, mode="mirror"), w, axis=2, mode="mirror")
    # as above, plus the drawn sigma's distance from 1: normalised taps move by at most 2 spread / sigma in all (the
    # derivative of a normalised Gaussian in sigma sums to at most 2 / sigma in absolute value), per pass of 255 levels
    blur = 2 * gamma(2 * window + 6, U) * 255 + 2 * 255 * 2 * spread / sigma
    assert off_grid(pixels(v1).numpy(), expected, blur).max() <= ROUND_TRIP
    assert off_grid(img, expected, blur).max() > ROUND_TRIP


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
    state = state_after(train_loader(src, **kwargs), 2)
    rest = train_loader(src, **kwargs, state=state, done=2)
    assert len(rest) == len(straight) - 2 == 4
    got = [tuple(t.cpu().clone() for t in batch) for batch in rest]
    assert len(got) == 4
    for x, y in zip(got, straight[2:]):
        for s, t in zip(x, y):
            torch.testing.assert_close(s, t, atol=0, rtol=0)
    assert not torch.equal(got[0][0], straight[1][0])  # the rest, not the start again
