"""Shared fixtures: tiny image datasets, a tiny feature cache and a head run built from it."""

from pathlib import Path

import pytest
import torch

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
