"""Everything DALI: sources, the two-view graph, the loader, sharding, verify, pack."""

# what counts as an image, by extension: in a folder (sources) and inside a tar shard (webdataset)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm", ".pgm"}
