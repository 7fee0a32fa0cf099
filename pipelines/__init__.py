"""Everything DALI: sources, the two-view graph, the loader, sharding, verify, pack."""

# what counts as an image, by extension: in a folder (sources) and inside a tar shard (webdataset)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm", ".pgm"}

# The usual evaluation view keeps the central 87.5%: the shorter side resized to S / 0.875, then a centre
# crop of S (256 -> 224: timm's crop_pct, SimCLR's CROP_PROPORTION, its appendix B.5).
EVAL_CROP = 0.875
