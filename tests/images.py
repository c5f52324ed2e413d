"""Generators of small test images and datasets."""

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("calm", "fear", "joy")


def write_image(path: Path, *, size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (128, 64, 32),
                mode: str = "RGB", seed: int = 0, fmt: str = "JPEG", **save_options) -> Path:
    """Write a noisy image of one dominant colour; returns ``path``."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 20, size=(height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **save_options)
    return path


def write_image_folder(root: Path, *, per_class: int = 20, classes=CLASSES) -> Path:
    """Write an ImageFolder tree with ``per_class`` distinguishable JPEGs per class."""
    palette = [(200, 60, 40), (40, 60, 200), (60, 200, 60), (200, 200, 40)]
    for class_index, name in enumerate(classes):
        for index in range(per_class):
            write_image(root / name / f"{index:03d}.jpg", colour=palette[class_index % len(palette)],
                        seed=100 * class_index + index)
    return root
