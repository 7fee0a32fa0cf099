"""Everything DALI: sources, the two-view graph, the loader, sharding, verify, pack."""
import os
from pathlib import Path

# what counts as an image, by extension: in a folder (sources) and inside a tar shard (webdataset)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm", ".pgm"}

# The usual evaluation view keeps the central 87.5%: the shorter side resized to S / 0.875, then a centre
# crop of S (256 -> 224: timm's crop_pct, SimCLR's CROP_PROPORTION, its appendix B.5). At 32 px and below
# (CIFAR) the view is the whole image, as google-research/simclr turns test cropping off there
# (`test_crop = FLAGS.image_size > 32`), so that scores compare with published ones.
EVAL_CROP = 0.875
WHOLE_IMAGE_MAX_SIZE = 32


def eval_crop(image_size: int) -> float:
    """The evaluation view's central fraction at this view size: 1 (the whole image) up to WHOLE_IMAGE_MAX_SIZE px,
    else EVAL_CROP."""
    return 1.0 if image_size <= WHOLE_IMAGE_MAX_SIZE else EVAL_CROP


def cache_home() -> Path:
    """This machine's cache for what is worked out once per data set (shard indexes, image verdicts):
    $XDG_CACHE_HOME/simclr-dali, else ~/.cache/simclr-dali."""
    home = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(home) if os.path.isabs(home) else Path.home() / ".cache") / "simclr-dali"
