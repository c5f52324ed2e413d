"""Shared fixtures: tiny image datasets, a tiny feature cache and a head run built from it.

Fixtures of the ablation and report tests carry the ``ab_`` prefix, fine-tuning fixtures ``ft_``.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emo.demo import make_sample_images
from emo.extract import ExtractConfig, extract
from emo.heads import FitHeadsConfig, fit_heads
from tests.images import write_image_folder

EMOTION6 = Path(__file__).resolve().parents[2] / "shared" / "data" / "emotion6"

# Two cores are all CI has; more threads only add contention between tests.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """An ImageFolder of 3 classes x 20 JPEGs of 40x30 pixels (read-only for tests)."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "data")


def tiny_extract_config(data: Path, out: Path, **overrides) -> ExtractConfig:
    """An ExtractConfig for fast tests: resnet18, random weights, 32-pixel crops, no workers, fp32."""
    options = dict(data=data, out=out, weights="random", arch="resnet18", image_size=32, batch_size=8,
                   workers=0, device="cpu", dtype="float32", precision="fp32")
    options.update(overrides)
    return ExtractConfig(**options)


@pytest.fixture(scope="session")
def tiny_cache(image_folder, tmp_path_factory) -> Path:
    """A finished cache of ``image_folder`` (read-only for tests)."""
    out = tmp_path_factory.mktemp("cache") / "tiny.h5"
    extract(tiny_extract_config(image_folder, out))
    return out


@pytest.fixture(scope="session")
def head_run(tiny_cache, tmp_path_factory) -> Path:
    """A finished head run on ``tiny_cache`` with all five stages (read-only for tests)."""
    out = tmp_path_factory.mktemp("runs") / "heads"
    fit_heads(FitHeadsConfig(cache=tiny_cache, out=out, epochs=5, stack_epochs=3))
    return out


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
    return extract(tiny_extract_config(images, root / "features.h5")).cache


# 20 images per class is the smallest set the stratified 80/5/15 split accepts:
# 16 train, 1 val and 3 test images per class.
FT_IMAGES_PER_CLASS = 20


@pytest.fixture(scope="session")
def ft_images(tmp_path_factory) -> Path:
    """A generated ImageFolder of 3 classes x 20 JPEGs of 96x72 pixels; do not modify it."""
    return make_sample_images(tmp_path_factory.mktemp("ft") / "images", per_class=FT_IMAGES_PER_CLASS)


@pytest.fixture
def ft_images_copy(ft_images, tmp_path) -> Path:
    """A private copy of :func:`ft_images` that a test may change."""
    return Path(shutil.copytree(ft_images, tmp_path / "images"))
