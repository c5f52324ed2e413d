"""The stratified train/val/test hold-out split and its CSV file.

The split file lists every sample with its label, split and SHA-256, so a run can be reproduced
and a changed file detected.
"""

import csv
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from emo.data.csvfile import read_csv_records
from emo.errors import DataError

SPLITS = ("train", "val", "test")
FRACTIONS = {"train": 0.80, "val": 0.05, "test": 0.15}
# The smallest split (val, 5 %) gets at least one image of a class only from 20 images on.
MIN_PER_CLASS = math.ceil(1 / min(FRACTIONS.values()))
# scikit-learn and NumPy accept seeds in 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
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


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is a valid ``--seed`` (0 to 2**32 - 1), else raise ValueError naming the option."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def _check_class_sizes(labels: list[str]) -> None:
    for name, count in sorted(Counter(labels).items()):
        if count < MIN_PER_CLASS:
            raise DataError(f"class {name!r} has {count} image(s); a stratified 80/5/15 split needs at least "
                            f"{MIN_PER_CLASS} per class. Add images, leave the class out (move its folder out of "
                            "the dataset, or delete its rows from the manifest), or pass --split-file")


def _check_every_class_in_every_split(labels: list[str], split: list[str], *, split_file: Path | None = None) -> None:
    """Raise DataError unless every class has samples in train, val and test.

    fit-heads trains on train, picks the best epoch on val and reports test, per class.
    """
    present = {(label, part) for label, part in zip(labels, split)}
    for name in sorted(set(labels)):
        for part in SPLITS:
            if (name, part) in present:
                continue
            if split_file is not None:
                raise DataError(f"split file {split_file} puts no image of class {name!r} in the {part} split; "
                                "fit-heads needs every class in train, val and test, so assign some of its "
                                "images to it")
            raise DataError(f"class {name!r} has no image in the {part} split; pass --split-file "
                            f"or add images (at least {MIN_PER_CLASS} per class)")


def write_split_csv(path: Path, *, relpaths: list[str], labels: list[str], split: list[str],
                    sha256: list[str]) -> None:
    """Write the split file: one row per sample with path, label, split and SHA-256."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows(zip(relpaths, labels, split, sha256))


def read_split_csv(path: Path, relpaths: list[str], *, labels: list[str] | None = None,
                   sha256: list[str] | None = None, root: Path | None = None) -> list[str]:
    """Read a split file and return the split of each of ``relpaths``, in their order.

    Rows for paths that exist under ``root`` but are not among ``relpaths`` are ignored (for
    example files left out with --skip-bad, or images a manifest does not list). Paths are
    compared in normal form, so ``./a/b.jpg`` and ``a//b.jpg`` name ``a/b.jpg``.

    Args:
        path: a CSV with columns ``path`` and ``split``, and optionally ``label`` and ``sha256``.
        relpaths: the dataset-relative paths of the samples.
        labels: the label of each sample. When given, the file's ``label`` column must agree
            with it and every class must have samples in train, val and test.
        sha256: the SHA-256 of each sample's file. When given, a non-empty ``sha256`` in the
            file must equal it.
        root: the dataset root. When given, a row whose file does not exist is an error.

    Raises:
        DataError: naming the file and line. The file may lack a column, name an unknown split,
            repeat a path or lack a sample. A row may list a file that does not exist, or give a
            sample another label or SHA-256. A class may be missing from a split.

    Example:
        >>> read_split_csv(Path("e6.split.csv"), ["joy/1.jpg"], labels=["joy"])  # doctest: +SKIP
        ['train']
    """
    rows = _read_split_rows(Path(path))
    missing = [relpath for relpath in relpaths if relpath not in rows]
    if missing:
        raise DataError(f"split file {path} has no row for {len(missing)} sample(s), e.g. {missing[0]!r}; "
                        "regenerate it or drop --split-file")
    if root is not None:
        _check_rows_exist(path, rows, set(relpaths), Path(root))
    if labels is not None:
        _check_split_labels(path, relpaths, labels, rows)
    if sha256 is not None:
        _check_split_digests(path, relpaths, sha256, rows, root)
    split = [rows[relpath].split for relpath in relpaths]
    if labels is not None:
        _check_every_class_in_every_split(labels, split, split_file=path)
    return split


@dataclass(frozen=True)
class SplitRow:
    """A row of a split file: its line, split, and label and SHA-256 ("" when the file has none)."""

    line: int
    split: str
    label: str
    sha256: str


def _read_split_rows(path: Path) -> dict[str, SplitRow]:
    """Return the rows of a split file by normalized path, rejecting unknown splits and repeated paths."""
    rows: dict[str, SplitRow] = {}
    for line, row in read_csv_records(path, ["path", "split"]):
        relpath, name = Path(row["path"].strip()).as_posix(), row["split"].strip()
        if name not in SPLITS:
            raise DataError(f"{path}, line {line}: split {name!r} is not one of {', '.join(SPLITS)}")
        if relpath in rows:
            raise DataError(f"{path}, line {line}: duplicate path {relpath!r} (first on line {rows[relpath].line})")
        rows[relpath] = SplitRow(line, name, (row.get("label") or "").strip(), (row.get("sha256") or "").strip())
    return rows


def _check_rows_exist(path: Path, rows: dict[str, SplitRow], samples: set[str], root: Path) -> None:
    for relpath, row in rows.items():
        if relpath not in samples and not (root / relpath).exists():
            raise DataError(f"{path}, line {row.line}: {relpath!r} does not exist in {root}; the file was moved "
                            "or deleted since the split was made. Remove the row or regenerate the split file")


def _check_split_digests(path: Path, relpaths: list[str], digests: list[str], rows: dict[str, SplitRow],
                         root: Path | None) -> None:
    """Raise DataError if a file's SHA-256 differs from the one its split row records."""
    for relpath, digest in zip(relpaths, digests):
        recorded = rows[relpath].sha256
        if recorded and recorded.lower() != digest:
            file = Path(root) / relpath if root is not None else relpath
            raise DataError(f"{path}, line {rows[relpath].line}: {file} has SHA-256 {digest[:12]}..., but the "
                            f"split file records {recorded[:12]}...; the file changed since the split was made. "
                            "Restore it, or regenerate the split file (drop --split-file)")


def _check_split_labels(path: Path, relpaths: list[str], labels: list[str], rows: dict[str, SplitRow]) -> None:
    """Raise DataError if the split file gives a sample a label other than the dataset's.

    A split stratified for other labels would no longer be stratified, and a label outside the
    dataset's classes means the file belongs to another dataset.
    """
    for relpath, label in zip(relpaths, labels):
        other = rows[relpath].label
        if other and other != label:
            raise DataError(f"{path}, line {rows[relpath].line}: {relpath!r} has label {other!r}, but the dataset "
                            f"labels it {label!r}; regenerate the split file for this dataset or drop --split-file")
