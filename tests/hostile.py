"""Builders of test datasets, odd and hostile image files, and a runner for the ``emo`` CLI.

Every file is generated at test time; nothing here reads real photos.
"""

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import emo
from emo.demo import DEMO_CLASSES, make_sample_images
from emo.extract import ExtractConfig, extract
from emo.heads import FitHeadsConfig, fit_heads

SOURCE_ROOT = Path(emo.__file__).resolve().parents[1]
CLASSES = sorted(DEMO_CLASSES)
# EXIF tag 0x0112 (Orientation); value 6 means "rotate 90 degrees clockwise to display".
EXIF_ORIENTATION_TAG = 0x0112


def sample_folder(root: Path, *, per_class: int = 20, size: tuple[int, int] = (40, 32), seed: int = 0) -> Path:
    """Write an ImageFolder of synthetic JPEGs (three classes, ``per_class`` each) and return its root."""
    return make_sample_images(Path(root), per_class=per_class, size=size, seed=seed)


def write_split_file(path: Path, relpaths: list[str], labels: list[str]) -> Path:
    """Write a split CSV that puts the i-th image of each class in train, val, test, train, ... order.

    Lets tests use datasets smaller than the automatic stratified split accepts.
    """
    order = ("train", "val", "test")
    seen: dict[str, int] = {}
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "split"])
        for relpath, label in zip(relpaths, labels):
            position = seen.get(label, 0)
            seen[label] = position + 1
            writer.writerow([relpath, label, order[position % 3]])
    return path


def folder_split_file(root: Path, path: Path) -> Path:
    """Write a split CSV for every image of an ImageFolder made by :func:`sample_folder`."""
    relpaths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    return write_split_file(path, relpaths, [relpath.split("/")[0] for relpath in relpaths])


def emo_command(*args: str) -> list[str]:
    """Return the command line that runs ``emo ARGS`` with this checkout's package."""
    return [sys.executable, "-m", "emo.cli", *map(str, args)]


def subprocess_env() -> dict:
    """Return an environment whose PYTHONPATH puts this checkout's package first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), env.get("PYTHONPATH", "")])
    return env


def run_emo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``emo ARGS`` in a subprocess and return the completed process (text output)."""
    return subprocess.run(emo_command(*args), cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def tiny_extract_config(data: Path, out: Path, **changes) -> ExtractConfig:
    """Return the config of a fast extraction (resnet18, random weights, 32 px) of a folder made by
    :func:`small_dataset`."""
    options = dict(data=data, out=out, split_file=data.parent / "split.csv", weights="random", arch="resnet18",
                   image_size=32, batch_size=8, workers=0, dtype="float32")
    options.update(changes)
    return ExtractConfig(**options)


def small_dataset(folder: Path, *, per_class: int = 8) -> Path:
    """Write ``folder/data`` (3 classes of ``per_class`` tiny JPEGs) and ``folder/split.csv``; return the data folder."""
    data = sample_folder(folder / "data", per_class=per_class)
    folder_split_file(data, folder / "split.csv")
    return data


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """A finished cache of 24 tiny images; tests that change it must work on a copy."""
    folder = tmp_path_factory.mktemp("cache")
    cache = folder / "cache.h5"
    extract(tiny_extract_config(small_dataset(folder), cache))
    return cache


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_cache) -> Path:
    """A finished fit-heads run on ``tiny_cache``; tests that evaluate it or change it must work on a copy."""
    run = tmp_path_factory.mktemp("run") / "heads"
    fit_heads(FitHeadsConfig(cache=tiny_cache, out=run, epochs=2, stack_epochs=1, batch_size=4))
    return run


# Image files -----------------------------------------------------------------------------------

def noise_pixels(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Return random RGB pixels [height, width, 3] for an image of ``size`` = (width, height)."""
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def jpeg_bytes(size: tuple[int, int] = (64, 48), *, seed: int = 0, progressive: bool = False) -> bytes:
    """Return a noisy RGB JPEG of ``size`` as bytes."""
    buffer = io.BytesIO()
    Image.fromarray(noise_pixels(size, seed)).save(buffer, "JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def write_truncated_jpeg(path: Path, *, fraction: float = 0.6, progressive: bool = False) -> Path:
    """Write the first ``fraction`` of a valid JPEG's bytes, as an interrupted download leaves it."""
    data = jpeg_bytes(progressive=progressive)
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def write_zero_bytes(path: Path) -> Path:
    """Write an empty file."""
    path.write_bytes(b"")
    return path


def heic_header() -> bytes:
    """Return the start of an HEIC file (an ISO-BMFF ``ftyp`` box with brand ``heic``), which Pillow cannot read."""
    brands = b"heic" + b"\x00\x00\x00\x00" + b"mif1heic"
    ftyp = (8 + len(brands)).to_bytes(4, "big") + b"ftyp" + brands
    meta = (16).to_bytes(4, "big") + b"meta" + b"\x00" * 8
    return ftyp + meta


def write_heic_as_jpeg(path: Path) -> Path:
    """Write HEIC bytes under an image extension such as ``.jpg``."""
    path.write_bytes(heic_header())
    return path


def write_text_as_image(path: Path) -> Path:
    """Write a text file under an image extension."""
    path.write_text("this is not an image\n")
    return path


def write_cmyk_jpeg(path: Path, rgb: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (48, 40)) -> Path:
    """Write a CMYK JPEG of one colour (converted from ``rgb`` by Pillow)."""
    Image.new("RGB", size, rgb).convert("CMYK").save(path, "JPEG", quality=95)
    return path


def write_grayscale_jpeg(path: Path, value: int = 90, size: tuple[int, int] = (48, 40)) -> Path:
    """Write a single-channel (mode L) JPEG of one grey level."""
    Image.new("L", size, value).save(path, "JPEG", quality=95)
    return path


def write_exif_rotated_jpeg(path: Path, *, orientation: int = 6, size: tuple[int, int] = (60, 30)) -> Path:
    """Write a JPEG stored ``size`` wide whose EXIF orientation tag asks to rotate it for display.

    The stored pixels are red in the left half and blue in the right half, so after
    orientation 6 (90 degrees clockwise) the displayed image is red on top and blue below.
    """
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def write_png(path: Path, size: tuple[int, int], *, seed: int = 0, mode: str = "RGB") -> Path:
    """Write a noisy PNG of ``size`` = (width, height), converted to ``mode`` (RGBA, P, I;16, ...)."""
    image = Image.fromarray(noise_pixels(size, seed))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, "PNG")
    return path


def valid_image_bytes() -> dict[str, bytes]:
    """Return one small valid image per format Pillow writes here: seeds for the fuzzer."""
    image = Image.fromarray(noise_pixels((12, 9), seed=1))
    seeds = {}
    for name, options in {"JPEG": {"quality": 80}, "PNG": {}, "GIF": {}, "BMP": {}, "TIFF": {},
                          "WEBP": {"quality": 80}, "PPM": {}}.items():
        buffer = io.BytesIO()
        image.save(buffer, name, **options)
        seeds[name] = buffer.getvalue()
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80, progressive=True, exif=_rotated_exif(image))
    seeds["JPEG-progressive-exif"] = buffer.getvalue()
    return seeds


def _rotated_exif(image: Image.Image) -> bytes:
    exif = image.getexif()
    exif[EXIF_ORIENTATION_TAG] = 6
    return exif.tobytes()
