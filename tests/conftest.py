"""Shared fixtures. Fine-tuning fixtures carry the prefix ``ft_``."""

import shutil
from pathlib import Path

import pytest

from emo.demo import make_sample_images

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
