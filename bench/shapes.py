"""A labelled set harder than digits, generated: ten shapes, each drawn in a random colour at a random
size, position and rotation on a random textured background (stripes, checks or noise of other
colours), 32 px, as class sub-folders of PNG files that train.py, evaluate.py and bench/peer.py read.

    python -m bench.shapes runs/shapes --per-class 500
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "ring", "crescent", "arrow")
DRAW = 96  # drawn large, then reduced to `size` with antialiasing


def polygon(sides: int, radius: float, turn: float, star: bool = False) -> list[tuple[float, float]]:
    points = []
    for k in range(sides * (2 if star else 1)):
        r = radius * (0.45 if star and k % 2 else 1.0)
        a = turn + 2 * math.pi * k / (sides * (2 if star else 1))
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def outline(name: str, radius: float, turn: float) -> list[list[tuple[float, float]]]:
    """The shape as polygons around (0, 0) (several: drawn in turn; 'ring' and 'crescent' cut the second)."""
    if name in ("circle", "ring", "crescent"):
        circle = polygon(48, radius, 0)
        if name == "circle":
            return [circle]
        if name == "ring":
            return [circle, polygon(48, radius * 0.55, 0)]
        dx, dy = radius * 0.45 * math.cos(turn), radius * 0.45 * math.sin(turn)  # the bite out of the crescent
        return [circle, [(x + dx, y + dy) for x, y in polygon(48, radius * 0.85, 0)]]
    if name in ("square", "triangle", "pentagon", "hexagon"):
        return [polygon({"square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6}[name], radius, turn)]
    if name == "star":
        return [polygon(5, radius, turn, star=True)]

    def rotate(pts):
        return [(x * math.cos(turn) - y * math.sin(turn), x * math.sin(turn) + y * math.cos(turn)) for x, y in pts]

    w = radius * 0.35
    if name == "cross":
        return [rotate([(-radius, -w), (radius, -w), (radius, w), (-radius, w)]),
                rotate([(-w, -radius), (w, -radius), (w, radius), (-w, radius)])]
    return [rotate([(-radius, -w), (0.1 * radius, -w), (0.1 * radius, -2.2 * w), (radius, 0),  # arrow
                    (0.1 * radius, 2.2 * w), (0.1 * radius, w), (-radius, w)])]


def background(rng: np.random.Generator) -> Image.Image:
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    kind, period = rng.integers(3), rng.integers(6, 24)
    yy, xx = np.mgrid[:DRAW, :DRAW]
    if kind == 0:  # stripes at a random angle
        angle = rng.uniform(0, math.pi)
        mask = (np.floor((xx * math.cos(angle) + yy * math.sin(angle)) / period) % 2).astype(bool)
    elif kind == 1:  # checks
        mask = ((xx // period + yy // period) % 2).astype(bool)
    else:  # blotchy noise, upsampled
        mask = np.kron(rng.random((DRAW // 8, DRAW // 8)) > 0.5, np.ones((8, 8))).astype(bool)
    pixels = np.where(mask[..., None], a, b).astype(np.float64) + rng.normal(0, 12, (DRAW, DRAW, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw(name: str, rng: np.random.Generator, size: int) -> Image.Image:
    image = background(rng)
    pen = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.42) * DRAW
    cx, cy = rng.uniform(radius, DRAW - radius, 2)
    colour, cut = tuple(int(c) for c in rng.integers(0, 256, 3)), None
    for k, poly in enumerate(outline(name, radius, rng.uniform(0, 2 * math.pi))):
        fill = colour if k == 0 or name == "cross" else cut
        if fill is None:  # ring and crescent: cut the second polygon out with the background behind it
            mask = Image.new("L", image.size, 0)
            ImageDraw.Draw(mask).polygon([(cx + x, cy + y) for x, y in poly], fill=255)
            image.paste(background(rng), (0, 0), mask)
            continue
        pen.polygon([(cx + x, cy + y) for x, y in poly], fill=fill)
    return image.resize((size, size), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for name in CLASSES:
        folder = Path(args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            draw(name, rng, args.size).save(folder / f"{i:04d}.png")
    print(f"{len(CLASSES) * args.per_class} images in {len(CLASSES)} classes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
