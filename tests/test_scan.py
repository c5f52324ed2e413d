import csv
import os
from pathlib import Path

import pytest

from emo.data.scan import find_samples, scan_dataset
from emo.errors import DataError
from tests.images import write_image, write_image_folder


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows(rows)
    return path


def test_image_folder_classes_and_samples(tmp_path):
    write_image_folder(tmp_path, per_class=2)
    dataset = scan_dataset(tmp_path, workers=1)
    assert dataset.classes == ["calm", "fear", "joy"]
    assert [s.relpath for s in dataset.samples][:2] == ["calm/000.jpg", "calm/001.jpg"]
    assert dataset.label_indices() == [0, 0, 1, 1, 2, 2]
    assert len(dataset.sha256) == 6
    assert all(len(digest) == 64 for digest in dataset.sha256)


def test_hidden_files_and_folders_are_ignored(tmp_path):
    write_image_folder(tmp_path, per_class=1)
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "joy" / "Thumbs.db").write_bytes(b"\0")
    write_image(tmp_path / ".ipynb_checkpoints" / "x.jpg")
    write_image(tmp_path / "joy" / ".ipynb_checkpoints" / "x-checkpoint.jpg")
    write_image(tmp_path / "joy" / "._resource.jpg")
    dataset = scan_dataset(tmp_path, workers=1)
    assert dataset.classes == ["calm", "fear", "joy"]
    assert len(dataset.samples) == 3


def test_nested_folders_inside_a_class(tmp_path):
    write_image(tmp_path / "joy" / "2019" / "a.jpg")
    write_image(tmp_path / "sad" / "b.png", fmt="PNG")
    dataset = scan_dataset(tmp_path, workers=1)
    assert [s.relpath for s in dataset.samples] == ["joy/2019/a.jpg", "sad/b.png"]


def test_empty_class_folder_is_named(tmp_path):
    write_image_folder(tmp_path, per_class=1)
    (tmp_path / "surprise").mkdir()
    with pytest.raises(DataError, match="surprise contains no images"):
        scan_dataset(tmp_path)


def test_no_class_folders(tmp_path):
    write_image(tmp_path / "loose.jpg")
    with pytest.raises(DataError, match="no class folders"):
        scan_dataset(tmp_path)


def test_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_bad_files_are_all_listed_before_heavy_work(tmp_path):
    write_image_folder(tmp_path, per_class=2)
    (tmp_path / "joy" / "empty.jpg").write_bytes(b"")
    (tmp_path / "joy" / "text.jpg").write_text("not an image")
    data = (tmp_path / "calm" / "000.jpg").read_bytes()
    (tmp_path / "fear" / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        scan_dataset(tmp_path, workers=2)
    message = str(info.value)
    assert "3 unusable file(s)" in message
    assert f"{tmp_path / 'joy' / 'empty.jpg'}: zero bytes" in message
    assert f"{tmp_path / 'joy' / 'text.jpg'}: not an image" in message
    assert f"{tmp_path / 'fear' / 'cut.jpg'}: truncated" in message
    assert "--skip-bad" in message


def test_skip_bad_excludes_and_records(tmp_path):
    write_image_folder(tmp_path, per_class=2)
    (tmp_path / "joy" / "empty.jpg").write_bytes(b"")
    dataset = scan_dataset(tmp_path, skip_bad=True, workers=1)
    assert len(dataset.samples) == 6
    assert [error.reason for error in dataset.bad] == ["zero bytes"]


def test_decompression_bomb_is_reported(tmp_path, monkeypatch):
    from PIL import Image

    write_image_folder(tmp_path, per_class=1)
    write_image(tmp_path / "joy" / "big.jpg", size=(200, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(DataError, match="big.jpg: decompression bomb"):
        scan_dataset(tmp_path, workers=1)


def test_symlink_outside_dataset_is_reported(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=1)
    outside = write_image(tmp_path / "elsewhere.jpg")
    os.symlink(outside, root / "joy" / "link.jpg")
    with pytest.raises(DataError, match="symlink points outside the dataset"):
        scan_dataset(root, workers=1)


def test_labels_csv_overrides_folder_labels(tmp_path):
    write_image_folder(tmp_path, per_class=1)
    labels = _write_csv(tmp_path / "labels.csv", [["path", "mood"], ["calm/000.jpg", "a"], ["joy/000.jpg", "b"]])
    root, samples, bad = find_samples(tmp_path, labels_csv=labels, label_column="mood")
    assert root == tmp_path
    assert [(s.relpath, s.label) for s in samples] == [("calm/000.jpg", "a"), ("joy/000.jpg", "b")]
    assert bad == []


def test_manifest_paths_are_relative_to_its_folder(tmp_path):
    write_image(tmp_path / "imgs" / "x.jpg")
    manifest = _write_csv(tmp_path / "m.csv", [["path", "label"], ["imgs/x.jpg", "joy"]])
    dataset = scan_dataset(manifest, workers=1)
    assert dataset.root == tmp_path
    assert dataset.classes == ["joy"]


def test_manifest_missing_column_lists_columns(tmp_path):
    manifest = _write_csv(tmp_path / "m.csv", [["file", "label"], ["x.jpg", "joy"]])
    with pytest.raises(DataError, match=r"no column 'path'; its columns are \['file', 'label'\]"):
        scan_dataset(manifest)


def test_manifest_duplicate_path(tmp_path):
    write_image(tmp_path / "x.jpg")
    manifest = _write_csv(tmp_path / "m.csv", [["path", "label"], ["x.jpg", "a"], ["x.jpg", "b"]])
    with pytest.raises(DataError, match="line 3: duplicate path 'x.jpg' \\(first on line 2\\)"):
        scan_dataset(manifest)


def test_manifest_missing_file_is_reported(tmp_path):
    write_image(tmp_path / "x.jpg")
    manifest = _write_csv(tmp_path / "m.csv", [["path", "label"], ["x.jpg", "a"], ["gone.jpg", "a"]])
    with pytest.raises(DataError, match="gone.jpg: file not found"):
        scan_dataset(manifest)


def test_manifest_rejects_parent_paths(tmp_path):
    manifest = _write_csv(tmp_path / "m.csv", [["path", "label"], ["../x.jpg", "a"]])
    with pytest.raises(DataError, match="without '..'"):
        scan_dataset(manifest)


def test_manifest_empty_label(tmp_path):
    manifest = _write_csv(tmp_path / "m.csv", [["path", "label"], ["x.jpg", " "]])
    with pytest.raises(DataError, match="empty label"):
        scan_dataset(manifest)


def test_data_file_that_is_not_csv(tmp_path):
    path = write_image(tmp_path / "x.jpg")
    with pytest.raises(DataError, match="not a .csv manifest"):
        scan_dataset(path)
