"""Findings of a new-user test of the pipeline: each test reproduces one finding on real files."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from emo.backbone import build_resnet
from emo.cache.reader import FeatureCache
from emo.cache.schema import split_csv_path
from emo.cli import main
from emo.errors import CacheError, DataError, RunError, TrainingError, WeightsError
from emo.evaluate.run import evaluate_run
from emo.extract import extract
from emo.heads import FitHeadsConfig, fit_heads
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


# evaluate checks the cache against the run ---------------------------------------------------------

@pytest.fixture(scope="module")
def matched_run(image_folder, tmp_path_factory) -> tuple[Path, Path]:
    """A cache of ``image_folder`` and a short head run on it (read-only for tests)."""
    folder = tmp_path_factory.mktemp("matched")
    cache = extract(tiny_extract_config(image_folder, folder / "c.h5")).cache
    run = folder / "run"
    fit_heads(FitHeadsConfig(cache=cache, out=run, epochs=2, stack_epochs=1, stages=("L3", "L4")))
    return cache, run


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("changes, named", [
    ({"image_size": 40}, "image size 40 instead of 32"),
    ({"seed": 9}, "weights random initialisation, seed 9"),
])
def test_evaluate_rejects_cache_of_other_backbone(matched_run, image_folder, tmp_path, changes, named):
    _, run = matched_run
    other = extract(tiny_extract_config(image_folder, tmp_path / "other.h5", **changes)).cache
    run = copy_run(run, tmp_path)
    with pytest.raises(CacheError) as error:
        evaluate_run(run, cache=other)
    assert f"cache {other} does not match run {run}" in str(error.value)
    assert named in str(error.value)


def test_evaluate_rejects_cache_of_other_arch(matched_run, tmp_path):
    cache, run = matched_run
    run = copy_run(run, tmp_path)
    settings = json.loads((run / "config.json").read_text())
    settings["backbone"]["arch"] = "resnet34"  # the same stage widths as resnet18, so the heads still load
    (run / "config.json").write_text(json.dumps(settings))
    with pytest.raises(CacheError, match="differs in arch resnet18 instead of resnet34"):
        evaluate_run(run, cache=cache)


def test_evaluate_rejects_cache_with_other_split(matched_run, image_folder, tmp_path):
    cache, run = matched_run
    swapped = {}

    def swap_one_train_and_test(row):
        # Move one image of class calm from test to train and one from train to test.
        if row["label"] == "calm" and row["split"] in ("train", "test") and row["split"] not in swapped:
            swapped[row["split"]] = row["path"]
            return {**row, "split": "test" if row["split"] == "train" else "train"}
        return row

    split_file = edited_split_file(cache, tmp_path / "split.csv", swap_one_train_and_test)
    other = extract(tiny_extract_config(image_folder, tmp_path / "other.h5", split_file=split_file)).cache
    with pytest.raises(CacheError, match="differs in split assignment"):
        evaluate_run(copy_run(run, tmp_path), cache=other)


def test_evaluate_overwritten_cache_leaves_metrics(matched_run, image_folder, tmp_path):
    cache, run = matched_run
    run = copy_run(run, tmp_path)
    own = Path(shutil.copy(cache, tmp_path / "own.h5"))
    settings = json.loads((run / "config.json").read_text())
    settings["config"]["cache"] = str(own)
    (run / "config.json").write_text(json.dumps(settings))
    before = (run / "metrics.json").read_bytes()
    extract(tiny_extract_config(image_folder, own, image_size=40, seed=9, overwrite=True))
    result = invoke("evaluate", run)
    assert result.exit_code == 1
    assert "differs in image size 40 instead of 32" in result.output
    assert (run / "metrics.json").read_bytes() == before


def test_evaluate_accepts_identical_reextraction(matched_run, image_folder, tmp_path):
    cache, run = matched_run
    again = extract(tiny_extract_config(image_folder, tmp_path / "again.h5", batch_size=5, dtype="float16")).cache
    recorded = json.loads((run / "metrics.json").read_text())
    metrics = evaluate_run(copy_run(run, tmp_path), cache=again)
    stacked = recorded["primary"]
    assert metrics["models"][stacked]["accuracy"] == pytest.approx(recorded["models"][stacked]["accuracy"])


def test_run_records_cache_fingerprint_and_split(matched_run):
    cache, run = matched_run
    settings = json.loads((run / "config.json").read_text())
    with FeatureCache(cache) as features:
        assert settings["cache"]["fingerprint"] == features.attrs["fingerprint"]
        assert settings["cache"]["split_sha256"] == features.split_sha256()
    assert settings["cache"]["path"] == str(cache.resolve())


# Runs work from any folder ----------------------------------------------------------------------

def test_relative_paths_recorded_absolute(image_folder, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "w").mkdir(parents=True)
    model, _ = build_resnet("resnet18", "random", seed=3)
    torch.save(model.state_dict(), work / "w" / "tmpw.pt")
    monkeypatch.chdir(work)
    extract(tiny_extract_config(image_folder, Path("c.h5"), weights="w/tmpw.pt"))
    fit_heads(FitHeadsConfig(cache=Path("c.h5"), out=Path("runs/r1"), epochs=1, stack_epochs=0, stages=("L4",)))
    monkeypatch.chdir(tmp_path)
    settings = json.loads((work / "runs" / "r1" / "config.json").read_text())
    assert settings["config"]["cache"] == str(work / "c.h5")
    assert settings["backbone"]["weights"]["spec"] == str(work / "w" / "tmpw.pt")
    assert invoke("evaluate", work / "runs" / "r1").exit_code == 0
    result = invoke("predict", work / "runs" / "r1", image_folder / "joy" / "000.jpg")
    assert result.exit_code == 0, result.output


def test_missing_run_cache_says_pass_cache(matched_run, tmp_path):
    _, run = matched_run
    run = copy_run(run, tmp_path)
    settings = json.loads((run / "config.json").read_text())
    settings["config"]["cache"] = str(tmp_path / "moved.h5")
    (run / "config.json").write_text(json.dumps(settings))
    result = invoke("evaluate", run)
    assert result.exit_code == 1
    assert f"the run's cache {tmp_path / 'moved.h5'}" in result.output
    assert "pass --cache" in result.output


def test_missing_run_weights_says_pass_weights(matched_run, image_folder, tmp_path):
    _, run = matched_run
    run = copy_run(run, tmp_path)
    settings = json.loads((run / "config.json").read_text())
    settings["backbone"]["weights"]["spec"] = str(tmp_path / "moved.pt")
    (run / "config.json").write_text(json.dumps(settings))
    result = invoke("predict", run, image_folder / "joy" / "000.jpg")
    assert result.exit_code == 1
    assert f"the run's backbone weights {tmp_path / 'moved.pt'}" in result.output
    assert "pass --weights" in result.output
