"""Layout of the feature cache file.

Datasets (one row per image, rows in sample order):
    features/L0 .. features/L4   [N, C] pooled stage outputs (float16 or float32)
    labels                       [N] int64 class index
    split                        [N] "train" | "val" | "test"
    paths                        [N] path relative to the dataset root
    sha256                       [N] SHA-256 of the image file
    written                      [N] bool, True once the row holds features

Attributes are listed in ``REQUIRED_ATTRS``; ``classes``, ``stages``, ``normalization`` and
``weights`` are JSON strings.
"""

SCHEMA_VERSION = 1
FORMAT_NAME = "emo-vision feature cache"
REQUIRED_ATTRS = (
    "format", "schema_version", "classes", "stages", "arch", "weights", "image_size", "resize_size",
    "normalization", "pooling", "dtype", "precision", "fingerprint", "complete", "emo_version",
)
POOLING = "global average pooling over H and W of each stage output"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"


def split_csv_path(cache_path):
    """Return the path of the split CSV written next to a cache: ``NAME.split.csv``."""
    return cache_path.with_name(cache_path.stem + ".split.csv")
