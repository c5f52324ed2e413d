"""Hostile and odd input files: each is used correctly or reported with its path, before heavy work starts."""

from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from emo.cache.reader import FeatureCache
from emo.cli import main
from emo.data.images import BadImageError, load_rgb
from emo.data.scan import LINKED_FOLDER, scan_dataset
from emo.errors import DataError
from emo.extract import extract
from tests.hostile import (jpeg_bytes, small_dataset, tiny_extract_config, write_cmyk_jpeg, write_exif_rotated_jpeg,
                     write_grayscale_jpeg, write_heic_as_jpeg, write_png, write_split_file, write_text_as_image,
                     write_truncated_jpeg, write_zero_bytes)

GOOD_IMAGES = 24  # small_dataset: 3 classes of 8

BAD_FILES = {
    "truncated.jpg": (write_truncated_jpeg, "truncated"),
    "truncated-progressive.jpg": (partial(write_truncated_jpeg, progressive=True), "truncated"),
    "truncated-header.jpg": (partial(write_truncated_jpeg, fraction=0.05), "truncated"),
    "empty.jpg": (write_zero_bytes, "zero bytes"),
    "iphone.jpg": (write_heic_as_jpeg, "not an image Pillow can read"),
    "notes.png": (write_text_as_image, "not an image Pillow can read"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_reported_with_path(tmp_path, name):
    data = small_dataset(tmp_path)
    builder, reason = BAD_FILES[name]
    bad = builder(data / "joy" / name)
    with pytest.raises(DataError) as error:
        scan_dataset(data)
    assert f"{bad}: {reason}" in str(error.value)
    assert "--skip-bad" in str(error.value)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_left_out_with_skip_bad(tmp_path, name):
    data = small_dataset(tmp_path)
    builder, _ = BAD_FILES[name]
    bad = builder(data / "joy" / name)
    dataset = scan_dataset(data, skip_bad=True)
    assert len(dataset.samples) == GOOD_IMAGES
    assert [error.path for error in dataset.bad] == [bad]


@pytest.mark.parametrize("size", [(40, 32), (64, 48)], ids=["warning-range", "error-range"])
def test_decompression_bomb(tmp_path, monkeypatch, size):
    """Pillow warns between MAX_IMAGE_PIXELS and twice that and raises above; both count as bombs."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    bomb = write_png(tmp_path / "bomb.png", size)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_rgb(bomb)


def test_decompression_bomb_in_scan(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    bomb = write_png(data / "joy" / "bomb.png", (200, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(DataError, match=f"{bomb}: decompression bomb"):
        scan_dataset(data)


def odd_images(folder: Path) -> dict[str, Path]:
    """Write the unusual but valid images, one per kind, into ``folder``."""
    return {
        "cmyk": write_cmyk_jpeg(folder / "cmyk.jpg"),
        "grayscale": write_grayscale_jpeg(folder / "gray.jpg"),
        "exif-rotated": write_exif_rotated_jpeg(folder / "rotated.jpg"),
        "1x1": write_png(folder / "dot.png", (1, 1)),
        "10000x40": write_png(folder / "strip.png", (10000, 40)),
        "rgba": write_png(folder / "alpha.png", (30, 20), mode="RGBA"),
        "palette": write_png(folder / "palette.png", (30, 20), mode="P"),
        "16-bit": write_png(folder / "deep.png", (30, 20), mode="I;16"),
    }


@pytest.mark.parametrize("kind", ["cmyk", "grayscale", "exif-rotated", "1x1", "10000x40", "rgba", "palette",
                                  "16-bit"])
def test_odd_image_loads_as_rgb(tmp_path, kind):
    path = odd_images(tmp_path)[kind]
    for draft_size in (None, 37):
        image = load_rgb(path, draft_size=draft_size)
        assert image.mode == "RGB"


def test_cmyk_colour_kept(tmp_path):
    image = load_rgb(write_cmyk_jpeg(tmp_path / "cmyk.jpg", rgb=(200, 40, 40)))
    red, green, blue = np.asarray(image)[10, 10].astype(int)
    assert abs(red - 200) <= 20
    assert abs(green - 40) <= 20
    assert abs(blue - 40) <= 20


def test_grayscale_becomes_equal_channels(tmp_path):
    pixel = np.asarray(load_rgb(write_grayscale_jpeg(tmp_path / "gray.jpg", value=90)))[5, 5].astype(int)
    assert pixel[0] == pixel[1] == pixel[2]
    assert abs(pixel[0] - 90) <= 3


@pytest.mark.parametrize("draft_size", [None, 16])
def test_exif_orientation_applied(tmp_path, draft_size):
    """Stored 60x30 with red left, blue right; orientation 6 shows it 30x60 with red on top."""
    image = load_rgb(write_exif_rotated_jpeg(tmp_path / "rotated.jpg", size=(60, 30)), draft_size=draft_size)
    pixels = np.asarray(image).astype(int)
    height, width = pixels.shape[:2]
    assert height > width
    top, bottom = pixels[height // 4, width // 2], pixels[3 * height // 4, width // 2]
    assert top[0] > 200
    assert top[2] < 60
    assert bottom[2] > 200
    assert bottom[0] < 60


def test_odd_images_extracted_end_to_end(tmp_path):
    data = small_dataset(tmp_path)
    odd = odd_images(data / "joy")
    relpaths = sorted(path.relative_to(data).as_posix() for path in data.rglob("*") if path.is_file())
    write_split_file(tmp_path / "split.csv", relpaths, [relpath.split("/")[0] for relpath in relpaths])
    extract(tiny_extract_config(data, tmp_path / "cache.h5"))
    with FeatureCache(tmp_path / "cache.h5") as cache:
        assert len(cache) == GOOD_IMAGES + len(odd)
        assert {f"joy/{path.name}" for path in odd.values()} <= set(cache.paths())


def test_hidden_files_and_folders_ignored(tmp_path):
    data = small_dataset(tmp_path)
    (data / "joy" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (data / "joy" / "._joy_000.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (data / "joy" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (data / "joy" / "README.txt").write_text("notes, not an image\n")
    for hidden in (data / ".ipynb_checkpoints", data / "__MACOSX", data / "joy" / ".cache"):
        hidden.mkdir()
        write_text_as_image(hidden / "fake.jpg")
    dataset = scan_dataset(data)
    assert len(dataset.samples) == GOOD_IMAGES
    assert dataset.classes == ["fear", "joy", "sadness"]


def test_empty_class_folder_rejected(tmp_path):
    data = small_dataset(tmp_path)
    (data / "neutral").mkdir()
    with pytest.raises(DataError, match=f"class folder {data / 'neutral'} contains no images"):
        scan_dataset(data)


def test_empty_subfolders_ignored(tmp_path):
    data = small_dataset(tmp_path)
    (data / "joy" / "empty" / "deeper").mkdir(parents=True)
    (data / ".empty-hidden").mkdir()
    assert len(scan_dataset(data).samples) == GOOD_IMAGES


def symlinked_dataset(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Write small_dataset plus one link of each kind; return the data folder and the links by kind."""
    data = small_dataset(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_bytes())
    links = {
        "inside": data / "joy" / "link-inside.jpg",
        "outside": data / "joy" / "link-outside.jpg",
        "broken": data / "joy" / "broken.jpg",
        "loop": data / "joy" / "loop.jpg",
        "folder-loop": data / "joy" / "again",
        "class-outside": data / "stolen",
    }
    links["inside"].symlink_to(data / "fear" / "fear_000.jpg")
    links["outside"].symlink_to(outside / "secret.jpg")
    links["broken"].symlink_to(tmp_path / "missing.jpg")
    links["loop"].symlink_to(links["loop"])
    links["folder-loop"].symlink_to(data / "joy", target_is_directory=True)
    links["class-outside"].symlink_to(outside, target_is_directory=True)
    return data, links


def test_symlinks_reported(tmp_path):
    data, links = symlinked_dataset(tmp_path)
    with pytest.raises(DataError) as error:
        scan_dataset(data)
    message = str(error.value)
    assert f"{links['outside']}: symlink points outside the dataset" in message
    assert f"{links['broken']}: broken symlink or symlink loop" in message
    assert f"{links['loop']}: broken symlink or symlink loop" in message
    assert f"{links['folder-loop']}: {LINKED_FOLDER}" in message
    assert f"{links['class-outside']}: {LINKED_FOLDER}" in message
    assert str(links["inside"]) not in message


def test_symlinks_with_skip_bad(tmp_path):
    data, links = symlinked_dataset(tmp_path)
    dataset = scan_dataset(data, skip_bad=True)
    relpaths = {sample.relpath for sample in dataset.samples}
    assert "joy/link-inside.jpg" in relpaths
    assert len(relpaths) == GOOD_IMAGES + 1
    assert dataset.classes == ["fear", "joy", "sadness"]
    assert {error.path for error in dataset.bad} == {path for kind, path in links.items() if kind != "inside"}


def write_manifest(folder: Path, text: str) -> Path:
    manifest = folder / "labels.csv"
    manifest.write_text(text)
    return manifest


@pytest.mark.parametrize("text, message", [
    ("file,emotion\njoy/joy_000.jpg,joy\n", "has no column 'path'; its columns are ['file', 'emotion']"),
    ("path\njoy/joy_000.jpg\n", "has no column 'label'"),
    ("path,label\njoy/joy_000.jpg,joy\n./joy/joy_000.jpg,joy\n", "line 3: duplicate path 'joy/joy_000.jpg' "
                                                                  "(first on line 2)"),
    ("path,label\n/etc/passwd,joy\n", "path '/etc/passwd' must be relative to the dataset root"),
    ("path,label\n../outside/secret.jpg,joy\n", "must be relative to the dataset root, without '..'"),
    ("path,label\njoy/joy_000.jpg,\n", "line 2: empty label for 'joy/joy_000.jpg'"),
    ("path,label\njoy/joy_000.jpg\n", "line 2: empty label for 'joy/joy_000.jpg'"),
    ("path,label\njoy/joy_000.jpg,joy,extra\n", "line 2: more fields than the header has columns"),
    ("path,label\n,joy\n", "line 2: empty path"),
    ("path,label\n\n\n", "has no rows"),
])
def test_manifest_errors(tmp_path, text, message):
    data = small_dataset(tmp_path)
    with pytest.raises(DataError) as error:
        scan_dataset(write_manifest(data, text))
    assert message in str(error.value)


def test_manifest_missing_file(tmp_path):
    data = small_dataset(tmp_path)
    manifest = write_manifest(data, "path,label\njoy/joy_000.jpg,joy\njoy/gone.jpg,joy\n")
    with pytest.raises(DataError, match=f"{data / 'joy' / 'gone.jpg'}: file not found"):
        scan_dataset(manifest)


def test_manifest_path_through_linked_folder(tmp_path):
    data = small_dataset(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_bytes())
    (data / "door").symlink_to(outside, target_is_directory=True)
    manifest = write_manifest(data, "path,label\njoy/joy_000.jpg,joy\ndoor/secret.jpg,joy\n")
    with pytest.raises(DataError, match="door/secret.jpg: symlink points outside the dataset"):
        scan_dataset(manifest)


def test_split_file_label_conflict(tmp_path):
    data = small_dataset(tmp_path)
    split = (tmp_path / "split.csv").read_text().replace("joy/joy_003.jpg,joy,", "joy/joy_003.jpg,fear,")
    (tmp_path / "split.csv").write_text(split)
    with pytest.raises(DataError, match="'joy/joy_003.jpg' has label 'fear', but the dataset labels it 'joy'"):
        extract(tiny_extract_config(data, tmp_path / "cache.h5"))


def test_split_file_label_not_in_classes(tmp_path):
    data = small_dataset(tmp_path)
    split = (tmp_path / "split.csv").read_text().replace("joy/joy_003.jpg,joy,", "joy/joy_003.jpg,contempt,")
    (tmp_path / "split.csv").write_text(split)
    with pytest.raises(DataError, match="has label 'contempt', but the dataset labels it 'joy'"):
        extract(tiny_extract_config(data, tmp_path / "cache.h5"))


def test_split_file_missing_sample(tmp_path):
    data = small_dataset(tmp_path)
    lines = (tmp_path / "split.csv").read_text().splitlines(keepends=True)
    (tmp_path / "split.csv").write_text("".join(line for line in lines if "sadness_007" not in line))
    with pytest.raises(DataError, match="has no row for 1 sample"):
        extract(tiny_extract_config(data, tmp_path / "cache.h5"))


def truncate_after_scan(monkeypatch, victim: Path) -> None:
    """Let the scan pass, then truncate ``victim``, as a file changed by another program would be."""
    from emo.extract import run as extract_run

    real_scan = extract_run.scan_dataset

    def scan_then_truncate(*args, **kwargs):
        dataset = real_scan(*args, **kwargs)
        victim.write_bytes(victim.read_bytes()[:200])
        return dataset

    monkeypatch.setattr(extract_run, "scan_dataset", scan_then_truncate)


@pytest.mark.parametrize("workers", [0, 2])
def test_file_damaged_after_scan(tmp_path, monkeypatch, workers):
    data = small_dataset(tmp_path)
    victim = data / "sadness" / "sadness_007.jpg"  # the last row, so earlier batches get written
    truncate_after_scan(monkeypatch, victim)
    out = tmp_path / "cache.h5"
    with pytest.raises(DataError) as error:
        extract(tiny_extract_config(data, out, workers=workers, batch_size=4))
    assert f"{victim}: truncated" in str(error.value)
    assert "passed the scan but failed during extraction" in str(error.value)
    with h5py.File(f"{out}.partial", "r") as partial:
        assert np.count_nonzero(partial["written"][:]) == GOOD_IMAGES - 4  # all batches but the victim's


def test_hostile_folder_with_skip_bad_in_cli(tmp_path):
    """Every kind of bad and odd file at once: with --skip-bad the run finishes and names what it left out."""
    data = small_dataset(tmp_path)
    for name, (builder, _) in BAD_FILES.items():
        builder(data / "fear" / name)
    odd = odd_images(data / "joy")
    (data / "sadness" / "outside.jpg").symlink_to(tmp_path / "split.csv")
    relpaths = sorted(path.relative_to(data).as_posix() for path in data.rglob("*") if path.is_file())
    write_split_file(tmp_path / "split.csv", relpaths, [relpath.split("/")[0] for relpath in relpaths])
    out = tmp_path / "cache.h5"
    result = CliRunner().invoke(main, ["extract", str(data), "--out", str(out), "--split-file",
                                       str(tmp_path / "split.csv"), "--weights", "random", "--arch", "resnet18",
                                       "--image-size", "32", "--workers", "0", "--dtype", "float32", "--skip-bad"])
    assert result.exit_code == 0, result.output
    with FeatureCache(out) as cache:
        assert len(cache) == GOOD_IMAGES + len(odd)


def test_file_deleted_after_scan(tmp_path, monkeypatch):
    from emo.extract import run as extract_run

    data = small_dataset(tmp_path)
    victim = data / "sadness" / "sadness_007.jpg"
    real_scan = extract_run.scan_dataset

    def scan_then_delete(*args, **kwargs):
        dataset = real_scan(*args, **kwargs)
        victim.unlink()
        return dataset

    monkeypatch.setattr(extract_run, "scan_dataset", scan_then_delete)
    with pytest.raises(DataError, match=f"{victim}: cannot read \\(No such file or directory\\)"):
        extract(tiny_extract_config(data, tmp_path / "cache.h5"))


def test_class_folder_of_only_bad_files(tmp_path):
    data = small_dataset(tmp_path)
    (data / "neutral").mkdir()
    bad = write_zero_bytes(data / "neutral" / "empty.jpg")
    with pytest.raises(DataError, match=f"{bad}: zero bytes"):
        scan_dataset(data)


@pytest.mark.parametrize("relpath, message", [
    ("joy/nul\x00.jpg", "contains a NUL character"),
    ("joy/" + "x" * 300 + ".jpg", "cannot access (File name too long)"),
])
def test_manifest_path_the_os_rejects(tmp_path, relpath, message):
    data = small_dataset(tmp_path)
    manifest = data / "labels.csv"
    manifest.write_bytes(f"path,label\njoy/joy_000.jpg,joy\n{relpath},joy\n".encode())
    with pytest.raises(DataError) as error:
        scan_dataset(manifest)
    assert message in str(error.value)


def test_labels_csv_is_a_folder(tmp_path):
    data = small_dataset(tmp_path)
    with pytest.raises(DataError, match="is not a readable UTF-8 CSV file"):
        scan_dataset(data, labels_csv=data / "joy")


def test_split_file_duplicate_path(tmp_path):
    data = small_dataset(tmp_path)
    with open(tmp_path / "split.csv", "a") as split:
        split.write("joy/joy_000.jpg,joy,test\n")
    with pytest.raises(DataError, match="duplicate path 'joy/joy_000.jpg'"):
        extract(tiny_extract_config(data, tmp_path / "cache.h5"))
