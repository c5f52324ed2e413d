"""Photo-sized JPEGs for the benchmark scripts, generated so that no data set is needed."""

from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_SIZE = (500, 375)  # width, height: about the size of a photo of the FI data set


def write_photos(folder: Path, count: int, *, seed: int = 0) -> list[Path]:
    """Write ``count`` photo-like JPEGs: smooth colour fields with fine grain, about 75 kB each.

    Example:
        >>> paths = write_photos(Path("/tmp/photos"), 2)  # doctest: +SKIP
        >>> [path.name for path in paths]  # doctest: +SKIP
        ['000000.jpg', '000001.jpg']
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = PHOTO_SIZE
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 12, size=(height, width, 3)).astype(np.int16)
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths
