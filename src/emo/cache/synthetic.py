"""Synthetic feature caches with class-dependent structure, for tests and benchmarks.

Each class has its own random mean vector per stage. Rows are that mean plus Gaussian noise,
so a linear head can learn the classes and accuracy is meaningful.
"""

from pathlib import Path

import numpy as np

from emo.backbone import IMAGENET_MEAN, IMAGENET_STD
from emo.cache.writer import CacheWriter
from emo.data.split import make_split
from emo.data.transforms import resize_size
from emo.stages import stage_infos


def write_synthetic_cache(path: Path, *, rows: int, classes: list[str], arch: str = "resnet101",
                          dtype: str = "float16", separation: float = 0.5, seed: int = 0,
                          chunk_rows: int = 4096) -> Path:
    """Write a complete cache of ``rows`` synthetic rows, labels drawn uniformly from ``classes``.

    Args:
        path: the cache file to create.
        rows: number of rows (images).
        classes: class names.
        arch: decides the stage widths.
        dtype: storage type of the features.
        separation: distance between class means relative to the noise; larger is easier.
        seed: seed of labels, means and noise.
        chunk_rows: rows generated and written at a time, which bounds memory use.

    Example:
        >>> write_synthetic_cache(Path("fi-like.h5"), rows=23185, classes=list("abcdefgh"))  # doctest: +SKIP
    """
    rng = np.random.default_rng(seed)
    names = [f"{index:07d}.jpg" for index in range(rows)]
    labels = rng.integers(0, len(classes), size=rows)
    label_names = [classes[i] for i in labels]
    stages = {info.name: info.channels for info in stage_infos(arch)}
    means = {name: rng.normal(0.0, separation, size=(len(classes), width)) for name, width in stages.items()}
    header = {
        "classes": list(classes), "arch": arch, "image_size": 224, "resize_size": resize_size(224),
        "precision": "fp32", "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "weights": {"spec": "synthetic", "source": f"synthetic features, seed {seed}", "sha256": "", "seed": seed},
        "dataset_root": "", "label_column": "label", "fingerprint": f"synthetic-{seed}-{rows}",
    }
    columns = {"labels": labels, "split": make_split(label_names, seed=seed),
               "paths": [f"{label}/{name}" for label, name in zip(label_names, names)], "sha256": [""] * rows}

    with CacheWriter(Path(path), header=header, columns=columns, stages=stages, dtype=dtype, overwrite=True) as writer:
        for start in range(0, rows, chunk_rows):
            block = np.arange(start, min(start + chunk_rows, rows))
            # ReLU-like non-negative features, as pooled ResNet activations are.
            pooled = {name: np.abs(mean[labels[block]] + rng.normal(size=(len(block), mean.shape[1])))
                      for name, mean in means.items()}
            writer.write(block, pooled)
        writer.finish()
    return Path(path)
