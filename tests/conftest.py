"""Shared fixtures. Fixtures of the ablation and report tests carry the ``ab_`` prefix."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emo.extract import ExtractConfig, extract

AB_CLASSES = ("calm", "fear", "joy")


def ab_write_images(folder: Path, *, per_class: int = 20, size: int = 32, seed: int = 0) -> Path:
    """Write an ImageFolder of noise images whose brightness differs a little by class.

    The signal is weak on purpose, so head accuracy depends on the seed. 20 images per class
    is the least the stratified 80/5/15 split accepts.
    """
    rng = np.random.default_rng(seed)
    for index, name in enumerate(AB_CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            pixels = rng.normal(110 + 15 * index, 50, size=(size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name / f"{number:02d}.png")
    return folder


@pytest.fixture(scope="session")
def ab_cache(tmp_path_factory) -> Path:
    """A finished feature cache of 60 noise images: resnet18, random weights, 32 px, float32."""
    root = tmp_path_factory.mktemp("ab_cache")
    images = ab_write_images(root / "images")
    config = ExtractConfig(data=images, out=root / "features.h5", weights="random", arch="resnet18", image_size=32,
                           dtype="float32", workers=0, device="cpu")
    return extract(config).cache
