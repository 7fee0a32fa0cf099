"""The step-by-step colour jitter (jitter_clip=1) against torchvision: each op against
torchvision.transforms.functional.adjust_* on the same uint8 images with the same factors, the order drawn per
image, each order against torchvision's ops in that sequence, the hue op's difference and what running saturation
and hue as one op changes, measured. The training graph is also traced with the GPU placement, for both colour
paths (no GPU needed). The default path, one colour map per view, is in test_colour_map.py.

Run with `-s` to see the measured differences (grey levels of 0..255; 2 levels = 2/255)."""
import numpy as np
import nvidia.dali.fn as fn
import pytest
from nvidia.dali.pipeline import pipeline_def
from support.colour_images import MEANS, generated, summary, through_dali, torchvision_op

from simclr_dali.pipelines import colour
from simclr_dali.pipelines.augment import Augment
from simclr_dali.pipelines.colour import ORDERS

FACTORS = np.linspace(0.2, 1.8, 9)  # the paper's range at s = 1: 1 -+ 0.8


# -- each op against torchvision -------------------------------------------------------------------
def saturation(images, factor):
    return colour.saturation_and_hue(images, factor, 0.0)


def hue(images, degrees):
    return colour.saturation_and_hue(images, 1.0, degrees)


OURS = {"brightness": colour.brightness, "contrast": colour.contrast, "saturation": saturation,
        "contrast_blend": colour.contrast_blend}  # contrast_blend: contrast as the GPU computes it


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "contrast_blend"])
def test_each_op_matches_torchvision(op, device):
    for name, mean in MEANS.items():
        images = generated(mean)
        batch = np.concatenate([images] * len(FACTORS))  # every image with every factor
        factors = np.repeat(FACTORS, len(images)).astype(np.float32)
        got = through_dali(OURS[op], batch, factors, device=device).astype(int)
        want = np.stack([torchvision_op(op.split("_")[0], x, float(f)) for x, f in zip(batch, factors)]).astype(int)
        diff = got - want
        print(f"\n{op:10s} {name:8s} (mean {images.mean():5.1f}), factors 0.2..1.8: {summary(diff)}")
        # torchvision's uint8 path truncates where DALI rounds: `.to(uint8)` after each blend (out = trunc(v) where we
        # round(v): 0 or +1), and in rgb_to_grayscale, so the grey it blends toward sits 0-1 level lower (times
        # |1 - f| <= 0.8). Brightness is only the first (the same float32 product f * x on both sides): d is 0 or 1.
        # Contrast (brightness_contrast's centre on the host, arithmetic and a cast on the GPU: the same float32 blend
        # rounded once): DALI's mean of greys rounded to uint8 against torchvision's of truncated greys, 0-1 higher;
        # round(a) - trunc(a - (1 - f) delta) with delta in [0, 1) lies in [-1, 2]. Saturation: DALI scales chroma in
        # YIQ, a blend with luma 0.299 r + 0.587 g + 0.114 b times its Yiq2Rgb's first column (0.9996..1.0028, so up to
        # 0.72 of a level at 255) where torchvision blends with trunc(0.2989 r + 0.587 g + 0.114 b): the grey differs by
        # -0.1..1.74 levels, times |1 - f| <= 0.8, and round against trunc again: d in [-1, 2].
        assert np.abs(diff).max() <= 2
        if op == "brightness":
            assert diff.min() >= 0 and diff.max() <= 1
    if op == "contrast":  # what this replaces: DALI's own contrast blends toward 128, so a dark image brightens
        dark = generated(MEANS["dark"])
        fixed = through_dali(lambda x, f: fn.brightness_contrast(x, contrast=f), dark,
                             np.full(len(dark), 0.2, np.float32), device=device)
        want = np.stack([torchvision_op("contrast", x, 0.2) for x in dark])
        ours = through_dali(colour.contrast, dark, np.full(len(dark), 0.2, np.float32), device=device)
        print(f"DALI's contrast 0.2 toward 128 on the dark images: mean {fixed.mean():.1f}, torchvision's "
              f"{want.mean():.1f}, ours {ours.mean():.1f}")
        assert fixed.mean() - want.mean() > 50  # (1 - 0.2) * (128 - 41) = 70 levels brighter


# -- the order ---------------------------------------------------------------------------------------
def test_each_image_draws_one_of_the_6_orders_and_a_seed_reproduces_them():
    from scipy.stats import binom

    batch, runs = 240, 10

    def draws(seed: int) -> np.ndarray:
        @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=seed)
        def pipe():
            return (*colour.random_order(), *colour.random_order())  # the two views' draws: two pairs of operators

        p = pipe()
        p.build()
        out = []
        for _ in range(runs):
            position, first, position2, first2 = (np.stack([np.asarray(o[i]) for i in range(batch)]) for o in p.run())
            out.append(np.stack([position * 2 + (1 - first), position2 * 2 + (1 - first2)]))
        return np.stack(out)  # (runs, 2 views, batch): the order's number, 2 * position + (brightness not first)

    orders = draws(seed=7)
    assert set(np.unique(orders)) <= set(range(6))
    counts = np.bincount(orders.reshape(-1), minlength=6)  # 4,800 draws
    n = orders.size
    # Each count is Binomial(4800, 1/6): mean 800, sd 26. All 6 within [650, 950], so none missing, fails by chance
    # with probability at most 6 * P(|X - 800| > 150), computed here.
    low, high = 650, 950
    false_failure = 6 * (binom.cdf(low - 1, n, 1 / 6) + binom.sf(high, n, 1 / 6))
    assert false_failure < 1e-6
    assert counts.min() >= low and counts.max() <= high, counts
    # The two views draw independently: equal orders in 1/6 of the pairs (expected 400 of 2,400), not all.
    same = (orders[:, 0] == orders[:, 1]).mean()
    assert same < 0.25  # P(Binomial(2400, 1/6) >= 600) < 1e-20
    np.testing.assert_array_equal(draws(seed=7), orders)  # a fixed seed draws the same orders
    assert not np.array_equal(draws(seed=8), orders)


def test_jitter_factors_are_uniform_in_the_papers_ranges():
    aug, n = Augment(), 4000

    names = list(aug.jitter_ranges())

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=3)
    def pipe():
        drawn = colour.jitter_factors(aug)
        return tuple(drawn[name] for name in names)

    p = pipe()
    p.build()
    factors = np.stack([np.array([np.asarray(o[i]) for i in range(n)]) for o in p.run()], 1).astype(np.float64)
    for j, name in enumerate(names):
        low, high = aug.jitter_ranges()[name]
        f = factors[:, j]
        assert f.min() >= low and f.max() <= high  # DALI draws in [low, high)
        # uniform: the mean of n draws has sd (high - low) / sqrt(12 n); 6 sd fails by chance with probability 2e-9,
        # and the first and last tenths of the range are both reached (missed with probability 2 * 0.9^4000)
        assert abs(f.mean() - (low + high) / 2) < 6 * (high - low) / np.sqrt(12 * n)
        assert f.min() < low + (high - low) / 10 and f.max() > high - (high - low) / 10
    assert abs(np.corrcoef(factors.T)[np.triu_indices(4, 1)]).max() < 6 / np.sqrt(n)  # independent draws


def lipschitz(step: str, f: float) -> float:
    """How much a step can grow a difference between two inputs (max norm): brightness f; contrast and saturation
    (the colour step, with hue 0) f + |1 - f| (a blend of the pixel, weight f, with a grey that is a weighted mean
    of pixels, weight 1 - f). Clipping to 0..255 only shrinks differences."""
    return f if step == "brightness" else f + abs(1 - f)


def jitter_with(images, b, c, s, h, position, brightness_first):
    """color_jitter with each image's own factors and order (through_dali's per-image arguments)."""
    factors = dict(brightness=b, contrast=c, saturation=s, hue=h)
    return colour.color_jitter(images, factors, (position, brightness_first))


@pytest.mark.parametrize("factors", [dict(brightness=1.6, contrast=1.6, saturation=0.2),
                                     dict(brightness=1.5, contrast=0.5, saturation=1.6)])
def test_each_order_reproduces_torchvisions_sequence(factors, device):
    """Each of the 6 orders on each image, through color_jitter, against torchvision's adjust_* applied one after
    another in that order. Hue is 0 here (DALI's rotation by 0 is the identity after rounding; its difference from
    torchvision's HSV shift is measured below), so the order of brightness, contrast and saturation is what shows."""
    step_op = {"brightness": "brightness", "contrast": "contrast", "colour": "saturation"}
    f = {step: factors[op] for step, op in step_op.items()}

    def torchvision_in(order, x):
        for step in order:
            x = torchvision_op(step_op[step], x, f[step])
        return x.astype(int)

    for name, mean in MEANS.items():
        keys = [key for key in ORDERS for _ in range(2)]  # each image in each order
        images = np.concatenate([generated(mean, n=2)] * len(ORDERS))
        per_image = [np.full(len(images), factors[op], np.float32) for op in ("brightness", "contrast", "saturation")]
        got = through_dali(jitter_with, images, *per_image, np.zeros(len(images), np.float32),
                           np.array([p for p, _ in keys], np.int32), np.array([b for _, b in keys]),
                           device=device).astype(int)
        diffs, apart = [], []
        for x, key, g in zip(images, keys, got):
            order = ORDERS[key]
            # A difference carried into a step grows by its Lipschitz constant, and each blend adds at most 2 levels
            # of its own (test_each_op_matches_torchvision's bound).
            bound = 0.0
            for step in order:
                bound = lipschitz(step, f[step]) * bound + 2
            want = torchvision_in(order, x)
            diffs.append(g - want)
            assert np.abs(diffs[-1]).max() <= bound, (order, np.abs(diffs[-1]).max(), bound)
            # where torchvision's reverse order lands further than twice the bound from this one, only the order
            # given can be within the bound: the check above then tells the orders apart
            apart.append(np.abs(torchvision_in(order[::-1], x) - want).max() > 2 * bound)
        print(f"\nsequence {factors} {name:8s}: {summary(np.stack(diffs))}; the reverse order is told apart on "
              f"{np.mean(apart):.0%} of the images")
        assert np.mean(apart) >= 0.9  # these factors clip: the three blends commute where nothing clips


@pytest.mark.parametrize("saturation_factor", [0.5, 1.8])
def test_saturation_and_hue_in_one_op_against_two(saturation_factor, device):
    """The colour step scales and rotates the chroma in one op, where torchvision runs saturation, clips, and shifts
    the hue later (its own step). Scaling and rotating the chroma commute exactly, so one op drops only the clip
    (and the uint8 rounding) in between. At saturation 0.5 nothing clips there (a blend of the pixel with its grey):
    one op is two within the roundings, 2 levels. At 1.8 the clip matters, and what it changes is measured here
    against the hue op's own difference from torchvision's HSV shift at the same angle, which it must stay under."""
    for degrees in (36, -72):
        images = np.concatenate([generated(mean) for mean in MEANS.values()])
        n = len(images)
        s_f, h_f = np.full(n, saturation_factor, np.float32), np.full(n, degrees, np.float32)
        one = through_dali(colour.saturation_and_hue, images, s_f, h_f, device=device).astype(int)
        two = through_dali(lambda x, s, h: hue(saturation(x, s), h), images, s_f, h_f, device=device).astype(int)
        d = one - two
        sat = np.stack([torchvision_op("saturation", x, saturation_factor) for x in images])
        hue_gap = through_dali(hue, sat, h_f, device=device).astype(int) - np.stack(
            [torchvision_op("hue", x, degrees / 360) for x in sat]).astype(int)
        print(f"\nsaturation {saturation_factor} then hue {degrees:+d}: one op against two, {summary(d)}; the hue op "
              f"against torchvision's: mean |d| {np.abs(hue_gap).mean():.2f}")
        if saturation_factor <= 1:
            assert np.abs(d).max() <= 2
        assert np.abs(d).mean() < np.abs(hue_gap).mean() / 2


# -- hue: DALI's rotation against torchvision's HSV shift, measured --------------------------------
def hsv(images: np.ndarray):
    """(hue in degrees, saturation, value) of uint8 RGB pixels, as torchvision (and PIL) define HSV."""
    x = images.astype(np.float64) / 255
    mx, mn = x.max(-1), x.min(-1)
    c = mx - mn
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4)) * 60
        s = np.where(mx > 0, c / mx, 0)
    return h, s, mx * 255


@pytest.mark.parametrize("degrees", [10, 36, 72])
def test_hue_rotation_against_torchvisions_hsv_shift(degrees, device):
    """Not a match, a measurement: DALI rotates the chroma plane (YIQ) by the angle, torchvision adds the angle to H
    in HSV. Measured (this test's images, both signs): the mean hue shift is the angle to within 3.5 degrees, but a
    pixel's hue moves by the angle +- 3 degrees on average at 10 degrees (at most 9), +- 9.5 at 36 (at most 20),
    +- 13 at 72 (at most 30, the paper's largest); and the rotation keeps luma where HSV keeps V (max(r, g, b)),
    so V moves by up to 5 levels on average. In pixels: mean |d| 3, 9 and 13 levels, max about 20, 60 and 90."""
    rows = []
    for name, mean in MEANS.items():
        images = generated(mean)
        for angle in (degrees, -degrees):
            got = through_dali(hue, images, np.full(len(images), angle, np.float32), device=device)
            want = np.stack([torchvision_op("hue", x, angle / 360) for x in images])
            opposite = np.stack([torchvision_op("hue", x, -angle / 360) for x in images])
            h0, s0, v0 = hsv(images)
            (h1, s1, v1), (_, _, v2) = hsv(got), hsv(want)
            coloured = (s0 > 0.2) & (v0 > 50) & (s1 > 0.05)  # pixels whose hue is well defined before and after
            error = ((h1 - h0 - angle + 180) % 360 - 180)[coloured]  # DALI's hue shift minus the angle, degrees
            d = got.astype(int) - want.astype(int)
            rows.append((name, angle, np.abs(d).mean(), np.abs(d).max(), error.mean(), np.abs(error).mean(),
                         np.abs(error).max(), (v1 - v0).mean()))
            # the sign convention matches: DALI's +angle is much nearer torchvision's +angle than its -angle
            assert np.abs(d).mean() < 0.6 * np.abs(got.astype(int) - opposite.astype(int)).mean()
            assert abs(error.mean()) < degrees / 4  # on average the hue moves by the angle
            # torchvision itself keeps V: its HSV shift moves V by its uint8 truncation only (under one level)
            assert np.abs(v2 - v0).max() <= 1
    print(f"\nhue {degrees} degrees: DALI's YIQ rotation against torchvision's HSV shift")
    for name, angle, dmean, dmax, emean, eabs, emax, dv in rows:
        print(f"  {name:8s} {angle:+4d}: pixels mean |d| {dmean:5.2f}, max {dmax:3d}; hue shift - angle: mean "
              f"{emean:+5.2f}, mean |.| {eabs:5.2f}, max |.| {emax:5.1f} degrees; V moves {dv:+5.2f} levels on average")
    identity = through_dali(hue, generated(128), np.zeros(6, np.float32), device=device)
    np.testing.assert_array_equal(identity, generated(128))  # Yiq2Rgb @ Rgb2Yiq = I to ~1e-4 of a level: rounds away


# -- the graph with the GPU placement -----------------------------------------------------------------
@pytest.mark.parametrize("kind,clip,size", [("arrays", 0, 32), ("jpegs", 0, 32), ("arrays", 1, 32), ("arrays", 0, 224)])
def test_the_gpu_placement_traces_with_operators_that_dali_has_on_the_gpu(kind, clip, size, tmp_path):
    """The training graph defined for a GPU (device_id 0, mixed decoder): DALI checks while tracing that every
    argument input is on the host (the reason contrast's mean is a data input, blended by arithmetic), and every
    operator placed on the GPU must have a GPU implementation in this DALI. Tracing needs no GPU; building would."""
    import nvidia.dali.backend as backend
    from conftest import make_folder

    from simclr_dali.pipelines.loader import Shard, make_input, two_view_pipeline
    from simclr_dali.pipelines.sources import Source, load_source

    rng = np.random.default_rng(0)
    source = Source("arrays", np.arange(16), images=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)) \
        if kind == "arrays" else load_source(str(make_folder(tmp_path / "images")), "train", str(tmp_path / "images"))
    feeder = make_input(source, 8, Shard(), shuffle=True, drop_last=True, seed=0, epoch=0)
    pipe = two_view_pipeline(feeder, size, Augment(jitter_clip=clip), True, "CHW", batch_size=8, num_threads=1,
                             device_id=0, seed=1,
                             enable_checkpointing=True)
    pipe._build_graph()  # DALI's own Python-side graph: what build() would hand to the backend
    placed = {(op._op.schema.Name(), op._op.device) for op in pipe._ops}
    registered = {"cpu": backend.RegisteredCPUOps(), "gpu": backend.RegisteredGPUOps(),
                  "mixed": backend.RegisteredMixedOps()}
    assert all(name in registered[dev] for name, dev in placed), sorted(placed)
    on_gpu = {name for name, dev in placed if dev == "gpu"}
    colour_ops = {"BrightnessContrast", "ColorSpaceConversion", "Hsv"} if clip else {"CoordTransform"}
    blur = {"Filter"} if size < 35 else {"GaussianBlur"}  # the 3x3 blur below 35 px, gaussian_blur above
    assert colour_ops | blur | {"reductions__Mean", "_ArithmeticGenericOp", "Cast"} <= on_gpu
    assert not {"BrightnessContrast", "Hsv"} & on_gpu if not clip else "CoordTransform" not in on_gpu
    assert (("decoders__Image", "mixed") in placed) == (kind == "jpegs")
