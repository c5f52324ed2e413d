"""Findings of a new-user test of the pipeline: each test reproduces one finding on real files."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from emo.cache.schema import split_csv_path
from emo.cli import main
from emo.errors import CacheError, DataError, RunError, TrainingError, WeightsError
from emo.extract import extract
from tests.conftest import tiny_extract_config


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def partial_of(cache: Path) -> Path:
    return cache.with_name(cache.name + ".partial")


def edited_split_file(tiny_cache: Path, out: Path, edit) -> Path:
    """Copy the split file of ``tiny_cache`` to ``out`` with ``edit`` applied to each row dict."""
    with open(split_csv_path(tiny_cache), newline="") as file:
        rows = list(csv.DictReader(file))
    rows = [edited for row in rows if (edited := edit(dict(row))) is not None]
    with open(out, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["path", "label", "split", "sha256"])
        writer.writeheader()
        writer.writerows(rows)
    return out


# --split-file ----------------------------------------------------------------------------------

def move_split(source: str, target: str):
    return lambda row: {**row, "split": target if row["split"] == source else row["split"]}


def replace_first_sha256(row: dict) -> dict:
    return {**row, "sha256": "0" * 64} if row["path"] == "calm/000.jpg" else row


@pytest.mark.parametrize("edit, message", [
    (move_split("val", "train"), "no image of class 'calm' in the val split"),
    (move_split("test", "train"), "no image of class 'calm' in the test split"),
    (replace_first_sha256, "calm/000.jpg has SHA-256"),
])
def test_split_file_checked_before_forward_passes(image_folder, tiny_cache, tmp_path, edit, message):
    split_file = edited_split_file(tiny_cache, tmp_path / "split.csv", edit)
    out = tmp_path / "c.h5"
    with pytest.raises(DataError, match=message):
        extract(tiny_extract_config(image_folder, out, split_file=split_file))
    assert not partial_of(out).exists()


def test_split_file_row_for_missing_file_named(image_folder, tiny_cache, tmp_path):
    split_file = edited_split_file(tiny_cache, tmp_path / "split.csv", lambda row: row)
    with open(split_file, "a") as file:
        file.write("joy/not-there.jpg,joy,train,\n")
    with pytest.raises(DataError, match="line 62: 'joy/not-there.jpg' does not exist"):
        extract(tiny_extract_config(image_folder, tmp_path / "c.h5", split_file=split_file))
