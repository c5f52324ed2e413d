"""The stratified train/val/test hold-out split and its CSV file.

The split file lists every sample with its label, split and SHA-256, so a run can be reproduced
and a changed file detected.
"""

import csv
import math
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from emo.data.csvfile import read_csv_rows
from emo.errors import DataError

SPLITS = ("train", "val", "test")
FRACTIONS = {"train": 0.80, "val": 0.05, "test": 0.15}
# The smallest split (val, 5 %) gets at least one image of a class only from 20 images on.
MIN_PER_CLASS = math.ceil(1 / min(FRACTIONS.values()))
SPLIT_COLUMNS = ("path", "label", "split", "sha256")


def make_split(labels: list[str], *, seed: int) -> list[str]:
    """Assign each sample to train, val or test, 80/5/15 and stratified by label.

    Args:
        labels: the label of each sample.
        seed: seed of the shuffle; the same labels and seed give the same split.

    Returns:
        One of ``"train"``, ``"val"``, ``"test"`` per sample.

    Raises:
        DataError: if a class has fewer than ``MIN_PER_CLASS`` samples.

    Example:
        >>> split = make_split(["a"] * 20 + ["b"] * 20, seed=0)
        >>> sorted(Counter(split).items())
        [('test', 6), ('train', 32), ('val', 2)]
    """
    _check_class_sizes(labels)
    indices = np.arange(len(labels))
    holdout_fraction = FRACTIONS["val"] + FRACTIONS["test"]

    # Two stratified cuts: train vs hold-out, then the hold-out into val (1/4) and test (3/4).
    train, holdout = train_test_split(indices, test_size=holdout_fraction, stratify=labels, random_state=seed)
    holdout_labels = [labels[i] for i in holdout]
    val, test = train_test_split(holdout, test_size=FRACTIONS["test"] / holdout_fraction,
                                 stratify=holdout_labels, random_state=seed)

    assignment = np.empty(len(labels), dtype=object)
    assignment[train], assignment[val], assignment[test] = "train", "val", "test"
    result = assignment.tolist()
    _check_every_class_in_every_split(labels, result)
    return result


def _check_class_sizes(labels: list[str]) -> None:
    for name, count in sorted(Counter(labels).items()):
        if count < MIN_PER_CLASS:
            raise DataError(f"class {name!r} has {count} image(s); a stratified 80/5/15 split needs at least "
                            f"{MIN_PER_CLASS} per class. Add images, drop the class, or pass --split-file")


def _check_every_class_in_every_split(labels: list[str], split: list[str]) -> None:
    present = {(label, part) for label, part in zip(labels, split)}
    for name in sorted(set(labels)):
        for part in SPLITS:
            if (name, part) not in present:
                raise DataError(f"class {name!r} has no image in the {part} split; pass --split-file "
                                f"or add images (at least {MIN_PER_CLASS} per class)")


def write_split_csv(path: Path, *, relpaths: list[str], labels: list[str], split: list[str],
                    sha256: list[str]) -> None:
    """Write the split file: one row per sample with path, label, split and SHA-256."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows(zip(relpaths, labels, split, sha256))


def read_split_csv(path: Path, relpaths: list[str]) -> list[str]:
    """Read a split file and return the split of each of ``relpaths``, in their order.

    Raises:
        DataError: if the file lacks a column, names an unknown split, or does not cover exactly
            the given samples.
    """
    rows = read_csv_rows(Path(path), ["path", "split"])
    given = {}
    for line, row in enumerate(rows, start=2):
        name = row["split"].strip()
        if name not in SPLITS:
            raise DataError(f"{path}, line {line}: split {name!r} is not one of {', '.join(SPLITS)}")
        given[row["path"].strip()] = name
    missing = [relpath for relpath in relpaths if relpath not in given]
    if missing:
        raise DataError(f"split file {path} has no row for {len(missing)} sample(s), e.g. {missing[0]!r}; "
                        "regenerate it or drop --split-file")
    return [given[relpath] for relpath in relpaths]
