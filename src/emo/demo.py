"""``emo demo``: the whole main job on a generated sample set, offline and in about a minute.

The sample images are synthetic: each class has its own colour palette and texture, so the
pipeline has something learnable. They are not photos, so the numbers tell nothing about emotion
recognition. They show that extract, fit-heads, evaluate and predict work on this machine.
"""

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from emo.errors import EmoError
from emo.evaluate.run import evaluate_run
from emo.extract import ExtractConfig, extract
from emo.heads import FitHeadsConfig, fit_heads
from emo.predict import predict

logger = logging.getLogger(__name__)

DEMO_MARKER = ".emo-demo"
# Class name -> (base RGB colour, stripe period in pixels); each class differs in hue and texture.
DEMO_CLASSES = {
    "joy": ((235, 190, 60), 0),
    "sadness": ((50, 70, 140), 12),
    "fear": ((40, 30, 40), 5),
}


@dataclass(frozen=True)
class DemoResult:
    """Output locations of a demo run and its test metrics."""

    out: Path
    cache: Path
    run: Path
    predictions: Path
    metrics: dict


def make_sample_images(folder: Path, *, per_class: int = 24, size: tuple[int, int] = (96, 72),
                       seed: int = 0) -> Path:
    """Write a small ImageFolder of synthetic JPEGs, one sub-folder per class in ``DEMO_CLASSES``."""
    rng = np.random.default_rng(seed)
    for name, (colour, period) in DEMO_CLASSES.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = _sample_pixels(rng, colour, period, size)
            Image.fromarray(pixels).save(folder / name / f"{name}_{index:03d}.jpg", quality=90)
    return folder


def _sample_pixels(rng: np.random.Generator, colour: tuple, period: int, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    base = np.asarray(colour, dtype=float) * rng.uniform(0.7, 1.2)
    pixels = np.broadcast_to(base, (height, width, 3)).copy()
    if period:
        stripes = (np.arange(width) // period) % 2 == 0
        pixels[:, stripes] *= 0.5
    pixels += rng.normal(0.0, 18.0, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def run_demo(out: Path, *, weights: str = "random", arch: str = "resnet101", image_size: int = 112,
             epochs: int = 30, workers: int = 0, device: str = "auto") -> DemoResult:
    """Run extract, fit-heads, evaluate and predict on a generated sample set under ``out``.

    Features are stored as float32 because a randomly initialised ResNet-101's deeper stages
    exceed the float16 range.

    ``out`` must not exist, or must be the folder of an earlier demo, which is replaced.
    """
    out = _prepare_output(Path(out))
    data = make_sample_images(out / "data")
    cache = out / "features.h5"
    run = out / "heads"

    extract(ExtractConfig(data=data, out=cache, weights=weights, arch=arch, image_size=image_size,
                          batch_size=16, workers=workers, device=device, dtype="float32"))
    fit_heads(FitHeadsConfig(cache=cache, out=run, epochs=epochs))
    metrics = evaluate_run(run, split="test", device=device)

    images = sorted((data / name / f"{name}_000.jpg") for name in DEMO_CLASSES)
    predictions = out / "predictions.json"
    predictions.write_text(json.dumps(predict(run, images, device=device), indent=2) + "\n")
    return DemoResult(out, cache, run, predictions, metrics)


def _prepare_output(out: Path) -> Path:
    if out.exists():
        if not (out / DEMO_MARKER).exists():
            raise EmoError(f"{out} exists and is not an earlier demo folder; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("created by `emo demo`; the next demo run replaces this folder\n")
    return out
