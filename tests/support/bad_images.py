"""A folder with images DALI cannot decode (BAD, each with the start of the reason the screening gives)
and odd ones it can (ODD_BUT_GOOD), beside good ones."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from conftest import write_image
from PIL import Image

BAD = {  # relative path -> start of the reason pipelines.verify gives
    "cat/empty.jpg": "empty",
    "dog/half.jpg": "JPEG that cannot be decoded",
    "dog/no_iend.png": "truncated PNG",
    "fox/notes.jpg": "not an image",
    "fox/anim.jpg": "not an image",  # a GIF: Pillow reads it, DALI does not
}
ODD_BUT_GOOD = ["cat/cmyk.jpg", "dog/gray.jpg", "dog/gray.png", "fox/tiny.png", "fox/tiny.jpg", "cat/png_named.jpg"]


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def add_odd_files(root: Path, seed: int = 1) -> Path:
    """The BAD files, the ODD_BUT_GOOD ones and a .txt (not an image suffix: never listed)."""
    rng = np.random.default_rng(seed)
    for name, mode, size in [("cat/cmyk.jpg", "CMYK", (40, 32)), ("dog/gray.jpg", "L", (40, 32)),
                             ("dog/gray.png", "L", (40, 32)), ("fox/tiny.png", "RGB", (5, 5)),
                             ("fox/tiny.jpg", "RGB", (5, 5))]:
        write_image(root / name, rng, size=size, mode=mode)
    picture = Image.open(root / "cat" / "001.jpg").convert("RGB")
    jpeg, png = encoded(picture, "JPEG"), encoded(picture, "PNG")
    for name, data in [("cat/png_named.jpg", png), ("cat/empty.jpg", b""), ("dog/half.jpg", jpeg[:len(jpeg) // 2]),
                       ("dog/no_iend.png", png[:-12]),  # Pillow alone would accept it
                       ("fox/notes.jpg", b"this is not a picture\n" * 10), ("fox/anim.jpg", encoded(picture, "GIF")),
                       ("fox/readme.txt", b"ignored by its suffix")]:
        (root / name).write_bytes(data)
    return root
