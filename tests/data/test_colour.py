"""Colour jitter against torchvision. The default path, one colour map per view (colour.coloured): against the
steps composed exactly (no clip between them) in every order, within the final rounding; against torchvision's
adjust_* in the drawn order over the recipes' factor ranges, on dark, mid-grey and bright images, within a bound
derived from the clips it drops (measured and printed); its draws per view. The step-by-step path (jitter_clip=1):
each op against torchvision.transforms.functional.adjust_* on the same uint8 images with the same factors, the order
drawn per image, each order against torchvision's ops in that sequence, the hue op's difference and what running
saturation and hue as one op changes, measured. The graph is also traced with the GPU placement (no GPU needed).

Run with `-s` to see the measured differences (grey levels of 0..255; 2 levels = 2/255)."""
import numpy as np
import nvidia.dali.fn as fn
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import dali_device_id
from nvidia.dali.pipeline import do_not_convert, pipeline_def
from PIL import Image

from simclr_dali.pipelines import colour
from simclr_dali.pipelines.augment import Augment
from simclr_dali.pipelines.colour import ORDERS, YIQ

MEANS = {"dark": 41, "mid-grey": 128, "bright": 210}  # the mean grey level each generated image is built around
FACTORS = np.linspace(0.2, 1.8, 9)  # the paper's range at s = 1: 1 -+ 0.8


def generated(mean: int, n: int = 6, side: int = 40, seed: int = 0) -> np.ndarray:
    """(n, side, side, 3) uint8: smooth random colours (a bilinear 4x4 field, +-60 levels) with noise (sd 8) around
    `mean`, clipped, so that bright images hold saturated pixels and dark ones pixels at 0."""
    rng = np.random.default_rng([seed, mean])
    out = []
    for _ in range(n):
        coarse = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR), np.float64) / 255
        img = mean + 120 * (field - field.mean()) + rng.normal(0, 8, field.shape)
        out.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return np.stack(out)


@do_not_convert
def batch_of(values):
    """An external_source callback giving `values`, one entry per sample, every iteration."""
    return lambda: [np.asarray(v) for v in values]


def through_dali(graph, images: np.ndarray, *per_image, device: str = "cpu") -> np.ndarray:
    """graph(image node, *argument nodes) on one batch, each image with its own arguments (per_image: one sequence
    per argument, an entry per image), the images on `device` as the training pipeline places them."""
    @pipeline_def(batch_size=len(images), num_threads=1, device_id=dali_device_id(device), seed=0,
                  enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=batch_of(images), batch=True, layout="HWC")
        args = [fn.external_source(source=batch_of(values), batch=True) for values in per_image]
        return graph(x.gpu() if device == "cuda" else x, *args)

    p = pipe()
    p.build()
    (out,) = p.run()
    out = out.as_cpu() if device == "cuda" else out
    return np.stack([np.asarray(out[i]) for i in range(len(images))])


def torchvision_op(op: str, image: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's own op on a uint8 HWC image (as a uint8 CHW tensor, its tensor path)."""
    f = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation,
         "hue": TF.adjust_hue}[op]
    return f(torch.from_numpy(image).permute(2, 0, 1), factor).permute(1, 2, 0).numpy()


def summary(diff: np.ndarray) -> str:
    return f"mean |d| {np.abs(diff).mean():.3f}, max |d| {np.abs(diff).max()}, d in [{diff.min()}, {diff.max()}]"


# -- the colour map ------------------------------------------------------------------------------------
STEPS = ("brightness", "contrast", "saturation", "hue")
RECIPES = {"imagenet": Augment(), "small, moco": Augment(jitter_strength=0.5),
           "byol": Augment(jitter_strength=0.5, jitter_saturation=0.4)}  # the recipes' and methods' jitter ranges
LUMA_601 = np.array([0.299, 0.587, 0.114])


def hue_turn(x: np.ndarray, radians: float) -> np.ndarray:
    """DALI's hue in float: (I, Q) of YIQ turned by `radians` (I' = I cos + Q sin), luma kept."""
    yiq = x @ YIQ.T
    i, q = yiq[..., 1].copy(), yiq[..., 2].copy()
    yiq[..., 1], yiq[..., 2] = i * np.cos(radians) + q * np.sin(radians), q * np.cos(radians) - i * np.sin(radians)
    return yiq @ np.linalg.inv(YIQ).T


def exact_step(x: np.ndarray, step: str, f: float) -> np.ndarray:
    """One jitter step in float64, nothing clipped or rounded: the definitions the colour map composes."""
    if step == "brightness":
        return x * f
    if step == "contrast":
        return f * x + (1 - f) * (x @ LUMA_601).mean()
    if step == "saturation":
        return f * x + (1 - f) * (x @ LUMA_601)[..., None]
    return hue_turn(x, f)


def exact_path(x: np.ndarray, factors: dict, order, clip: bool = False) -> list[np.ndarray]:
    """The float images after each step of `order` (clipped to 0..255 after each with clip=True)."""
    out, x = [], x.astype(np.float64)
    for step in order:
        x = exact_step(x, step, factors[step])
        x = np.clip(x, 0, 255) if clip else x
        out.append(x)
    return out


def random_factors(aug: Augment, rng: np.random.Generator) -> dict:
    """One view's jitter factors, uniform in aug's ranges, hue in radians."""
    f = {k: float(rng.uniform(low, high)) for k, (low, high) in aug.jitter_ranges().items()}
    return {**f, "hue": np.radians(f["hue"])}


def mapped(images: np.ndarray, factors: list[dict], jitter=None, gray=None, device="cpu") -> np.ndarray:
    """colour.coloured on one view per image, each with its own factors (and coins, where given)."""
    args = [np.array([[f[k]] for f in factors], np.float32) for k in STEPS]
    coins = [np.array([[v] for v in c], np.uint8) for c in (jitter, gray) if c is not None]

    def graph(x, b, c, s, h, *coin):
        coin = list(coin)
        factors = {"brightness": b, "contrast": c, "saturation": s, "hue": h}
        return colour.coloured([x], factors, coin.pop(0) if jitter is not None else None,
                                coin.pop(0) if gray is not None else None)[0]

    return through_dali(graph, images, *args, *coins, device=device)


def test_the_colour_map_is_the_steps_composed_in_any_order(device):
    """Each image with its own factors (from a range wider than any recipe's) and its own order of the four steps:
    the one map against the steps composed in float64 with nothing clipped, the same in every order (the steps
    commute where nothing clips). DALI rounds and saturates once, in float32: within half a level and the float32
    error of a 3x4 matrix product of magnitude <= 3 x 255 x 3.2 (3e-4 of a level)."""
    rng = np.random.default_rng(0)
    wide = Augment(jitter_strength=1.0, jitter_brightness=0.9, jitter_contrast=0.9, jitter_saturation=0.9,
                   jitter_hue=0.5)
    for name, mean in MEANS.items():
        images = generated(mean, n=24)
        factors = [random_factors(wide, rng) for _ in images]
        orders = [tuple(np.array(STEPS)[rng.permutation(4)]) for _ in images]
        got = mapped(images, factors, device=device).astype(np.float64)
        want = np.clip(np.stack([exact_path(x, f, o)[-1] for x, f, o in zip(images, factors, orders)]), 0, 255)
        assert np.abs(got - want).max() <= 0.5 + 1e-3, (name, np.abs(got - want).max())
        other = np.clip(np.stack([exact_path(x, f, o[::-1])[-1] for x, f, o in zip(images, factors, orders)]), 0, 255)
        np.testing.assert_allclose(other, want, atol=1e-9)  # the reverse order: the same map


def test_the_coins_and_grayscale_in_the_map(device):
    """Where the jitter coin is 0 the view is the input, bit for bit; where the gray coin is 1 its three channels are
    the luma of the jittered view (the map's grey rows are one row), within half a level."""
    rng = np.random.default_rng(1)
    images = np.concatenate([generated(mean, n=4) for mean in MEANS.values()])
    factors = [random_factors(Augment(), rng) for _ in images]
    jitter, gray = rng.integers(0, 2, len(images)), rng.integers(0, 2, len(images))
    got = mapped(images, factors, jitter=jitter, gray=gray, device=device).astype(np.float64)
    for x, f, j, g, y in zip(images, factors, jitter, gray, got):
        want = exact_path(x, f, STEPS)[-1] if j else x.astype(np.float64)
        if g:
            want = np.repeat((want @ LUMA_601)[..., None], 3, -1)
            assert (y == y[..., :1]).all()
        assert np.abs(y - np.clip(want, 0, 255)).max() <= 0.5 + 1e-3, (j, g)
        if not j and not g:
            np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("coins", ["jitter and gray", "jitter", "gray"])
def test_skipping_the_identity_maps_changes_no_pixel(coins, device):
    """With `skip` (views of SKIP_FROM px and more) a view whose coins are all 0 skips its map through a conditional
    branch: the same pixels as with the map applied to every view, and the input where the coins are 0."""
    rng = np.random.default_rng(4)
    images = np.concatenate([generated(mean, n=8) for mean in MEANS.values()])
    factors = [random_factors(Augment(), rng) for _ in images]
    jitter = rng.integers(0, 2, len(images)) if "jitter" in coins else None
    gray = rng.integers(0, 2, len(images)) if "gray" in coins else None
    got = {}
    for skip in (True, False):
        args = [np.array([[f[k]] for f in factors], np.float32) for k in STEPS]
        given = [np.array([[v] for v in c], np.uint8) for c in (jitter, gray) if c is not None]

        def graph(x, b, c, s, h, *coin, skip=skip):
            coin = list(coin)
            return colour.coloured([x], {"brightness": b, "contrast": c, "saturation": s, "hue": h} if jitter is not
                                   None else None, coin.pop(0) if jitter is not None else None,
                                   coin.pop(0) if gray is not None else None, skip=skip)[0]

        got[skip] = through_dali(graph, images, *args, *given, device=device)
    np.testing.assert_array_equal(got[True], got[False])
    off = np.ones(len(images), bool)
    for c in (jitter, gray):
        off &= True if c is None else c == 0
    np.testing.assert_array_equal(got[True][off], images[off])
    assert off.any() and (got[True][~off] != images[~off]).any()


def test_the_maps_hue_turns_as_dalis_hue_op(device):
    """Hue alone: the map against DALI's own hsv op at the same angle (the step-by-step path's hue), in degrees of
    both signs: within 1 level (each rounds once, from float32)."""
    images = np.concatenate([generated(mean, n=4) for mean in MEANS.values()])
    for degrees in (-72, -20, 30, 72):
        n = len(images)
        factors = [{"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": np.radians(degrees)}] * n
        got = mapped(images, factors, device=device).astype(int)
        want = through_dali(hue, images, np.full(n, degrees, np.float32), device=device).astype(int)
        assert np.abs(got - want).max() <= 1, degrees


def lipschitz_max(step: str, f: float) -> float:
    """How much a step can grow a difference between two images, in the max norm over the image: brightness f;
    contrast and saturation f + |1 - f| (a blend with a grey that moves by at most as much); the hue turn, the
    largest absolute row sum of its matrix."""
    if step == "brightness":
        return f
    if step != "hue":
        return f + abs(1 - f)
    turn = hue_turn(np.eye(3), f).T  # rows: the output channels
    return float(np.abs(turn).sum(1).max())


def torchvision_step(x: np.ndarray, step: str, f: float) -> np.ndarray:
    """torchvision's adjust_* on uint8 (hue: DALI's turn, clipped and rounded as a step of its own)."""
    if step == "hue":
        return np.clip(np.rint(hue_turn(x.astype(np.float64), f)), 0, 255).astype(np.uint8)
    return torchvision_op(step, x, f)


def clip_bound(x: np.ndarray, factors: dict, order) -> float:
    """A bound on max |map - torchvision's steps| over one image, derived: let y_k be torchvision's image after step
    k and z_k the exact float path with nothing clipped. Then |y_k - z_k| <= L_k |y_(k-1) - z_(k-1)| + e_k + o_k,
    where L_k is the step's Lipschitz constant (max norm), o_k how far z_k leaves 0..255 (what the clip there takes
    off), and e_k what torchvision's uint8 step adds of its own: the truncation (< 1 level), and for contrast and
    saturation its grey (truncated, weights 0.2989/0.587/0.114) within 1.03 levels of ours, times |1 - f|; the hue
    step rounds (0.5). The map rounds the clipped z_4 (0.5, and clipping only brings it nearer y_4, which is in
    range)."""
    e = 0.0
    for step, z in zip(order, exact_path(x, factors, order)):
        f = factors[step]
        own = {"brightness": 1.0, "hue": 0.5}.get(step, 1.0 + 1.03 * abs(1 - f))
        overshoot = max(float(z.max()) - 255, -float(z.min()), 0.0)
        e = lipschitz_max(step, f) * e + own + overshoot
    return e + 0.5 + 1e-3


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_map_against_torchvision_over_the_recipes_ranges(recipe, device):
    """The map against torchvision's steps in a drawn order (hue as DALI turns it, a clipped step of its own), with
    factors drawn from the recipe's ranges, 48 images each dark, mid-grey and bright: every image within
    clip_bound, and the mean and largest differences printed. Measured: mean |d| 1.9-2.4 levels at imagenet's
    ranges, 1.5-2.1 at small/moco's and byol's, of which 1.1-1.5 is torchvision truncating after each step (it sits
    that much darker than the exact steps clipped in float: images on which no step clips differ by at most 5); the
    rest is the clips the map drops, on the images where a step clips (27-92% of these): 0.02-5% of the values differ
    by more than 8 levels, the most on bright images at imagenet's ranges (largest 207 levels, on a few pixels)."""
    rng = np.random.default_rng(2)
    aug, rows = RECIPES[recipe], []
    for name, mean in MEANS.items():
        images = generated(mean, n=48)
        factors = [random_factors(aug, rng) for _ in images]
        orders = [tuple(np.array(STEPS)[rng.permutation(4)]) for _ in images]
        got = mapped(images, factors, device=device).astype(int)
        for x, f, order, y in zip(images, factors, orders, got):
            want = x
            for step in order:
                want = torchvision_step(want, step, f[step])
            d = np.abs(y - want.astype(int))
            bound = clip_bound(x, f, order)
            assert d.max() <= bound, (name, f, order, d.max(), bound)
            clipped = any(float(z.max()) > 255 or float(z.min()) < 0 for z in exact_path(x, f, order))
            rows.append((name, d.mean(), d.max(), bound, clipped, (d > 8).mean()))
    print(f"\ncolour map against torchvision's steps, {recipe} ranges {RECIPES[recipe].jitter_amounts()}:")
    for name in MEANS:
        r = [row for row in rows if row[0] == name]
        mean_d, max_d, bound, clipped, far = (np.array([row[i] for row in r]) for i in range(1, 6))
        print(f"  {name:8s}: mean |d| {mean_d.mean():.2f}, max |d| {max_d.max()}, median bound {np.median(bound):.1f}; "
              f"a step clips on {clipped.mean():.0%} of the images, whose max |d| is {max_d[clipped].max(initial=0)}, "
              f"the others' {max_d[~clipped].max(initial=0)}; {far.mean():.2%} of the values differ by more than 8")
    assert np.mean([row[1] for row in rows]) < 3  # a regression guard over the measured 1.5-2.5


def test_the_draws_per_view_follow_each_views_settings():
    """view_uniform and view_coin: one vector per image holding each view's draw, each view in its own range and
    with its own probability, the views independent (where their settings differ and where they are shared)."""
    n = 4000

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=5)
    def pipe():
        return (colour.view_uniform([(0.2, 1.8), (0.2, 1.8)]), colour.view_uniform([(0.6, 1.4), (-0.5, 0.5)]),
                colour.view_coin([0.8, 0.8]), colour.view_coin([0.8, 0.1]))

    p = pipe()
    p.build()
    shared, split, coins, split_coins = (np.stack([np.asarray(o[i]) for i in range(n)]).astype(np.float64)
                                         for o in p.run())
    for draws, ranges in ((shared, [(0.2, 1.8)] * 2), (split, [(0.6, 1.4), (-0.5, 0.5)])):
        for v, (low, high) in enumerate(ranges):
            d = draws[:, v]
            assert d.min() >= low and d.max() <= high
            # the mean of n uniform draws has sd (high - low) / sqrt(12 n): 6 sd fails by chance with probability 2e-9
            assert abs(d.mean() - (low + high) / 2) < 6 * (high - low) / np.sqrt(12 * n)
        assert abs(np.corrcoef(draws.T)[0, 1]) < 6 / np.sqrt(n)  # the two views draw independently
    for draws, ps in ((coins, [0.8, 0.8]), (split_coins, [0.8, 0.1])):
        assert set(np.unique(draws)) <= {0, 1}
        for v, prob in enumerate(ps):  # a Binomial(n, p) count within 6 sd
            assert abs(draws[:, v].mean() - prob) < 6 * np.sqrt(prob * (1 - prob) / n)
        assert abs(np.corrcoef(draws.T)[0, 1]) < 6 / np.sqrt(n)


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
            (h1, s1, v1), (h2, s2, v2) = hsv(got), hsv(want)
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
