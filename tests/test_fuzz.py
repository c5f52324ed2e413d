"""Fuzzing the image loader and the CSV parsers: only the documented exceptions may escape.

``decode_rgb`` and ``check_image`` document BadImageError; ``find_samples`` (manifest parsing)
and ``read_split_csv`` document DataError. About 6,000 generated cases in total.
"""

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from emo.data.images import BadImageError, check_image, decode_rgb
from emo.data.scan import find_samples
from emo.data.split import read_split_csv
from emo.errors import DataError
from tests.hostile import valid_image_bytes

SEEDS = valid_image_bytes()
FUZZ_PATH = Path("fuzzed.jpg")
# Pixel limit while fuzzing: a mutated header may claim a huge image, and decoding it would spend
# seconds allocating memory without testing anything new. 4096 pixels is 64 x 64.
FUZZ_MAX_PIXELS = 4096


def decode_or_reject(data: bytes) -> None:
    """Decode ``data``; a BadImageError is an accepted outcome, any other exception fails the test."""
    try:
        image = decode_rgb(data, FUZZ_PATH, draft_size=32)
    except BadImageError as error:
        event("rejected")
        assert error.path == FUZZ_PATH
        assert error.reason
        return
    event("decoded")
    assert image.mode == "RGB"


@st.composite
def mutated_images(draw) -> bytes:
    """Draw a valid small image of some format and damage it: flipped bytes, a cut, an insertion."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(max_size=16))
    return bytes(data)


class LowPixelLimit:
    """Lower Pillow's decompression-bomb limit inside a ``with`` block (hypothesis runs many examples per test)."""

    def __enter__(self):
        self.previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = FUZZ_MAX_PIXELS

    def __exit__(self, *exc):
        Image.MAX_IMAGE_PIXELS = self.previous


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_random_bytes(data):
    with LowPixelLimit():
        decode_or_reject(data)


@settings(max_examples=2500, deadline=None)
@given(mutated_images())
def test_decode_mutated_images(data):
    with LowPixelLimit():
        decode_or_reject(data)


@settings(max_examples=300, deadline=None)
@given(mutated_images())
def test_check_image_mutated_files(data):
    with LowPixelLimit(), tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "image.png"
        path.write_bytes(data)
        try:
            digest = check_image(path)
        except BadImageError as error:
            assert error.path == path
            return
        assert len(digest) == 64


# Text that CSV files and paths find hard: separators, quotes, line breaks, NUL, dots and slashes,
# a BOM, non-ASCII letters and the names of the files that exist in the fuzzed dataset.
CSV_ALPHABET = st.sampled_from([",", '"', "\n", "\r", "\x00", ".", "..", "/", "\\", " ", "\ufeff", "é", "😀",
                                "a", "b", "joy", "path", "label", "split", "train", "test", "val", "x.jpg",
                                "joy/a.jpg", "sad/b.png", "~", "*", "%", "\t"])
CSV_TEXT = st.lists(CSV_ALPHABET, max_size=40).map("".join)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Return a folder with two small images for the fuzzed manifests to point at."""
    folder = tmp_path_factory.mktemp("fuzz")
    for relpath in ("joy/a.jpg", "sad/b.png"):
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_bytes(SEEDS["JPEG"] if relpath.endswith(".jpg") else SEEDS["PNG"])
    return folder


@st.composite
def manifests(draw) -> bytes:
    """Draw a manifest: a header (usually with the expected columns) and rows of awkward text."""
    header = draw(st.sampled_from(["path,label", "label,path", "path", "path,label,extra", ""]) | CSV_TEXT)
    rows = draw(st.lists(st.lists(CSV_TEXT, max_size=4).map(",".join), max_size=8))
    text = "\n".join([header, *rows])
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    return text.encode(encoding, errors="replace")


def write_manifest(root: Path, data: bytes) -> Path:
    path = root / "manifest.csv"
    path.write_bytes(data)
    return path


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests() | st.binary(max_size=512))
def test_manifest_parser(root, data):
    manifest = write_manifest(root, data)
    try:
        _, samples, bad = find_samples(manifest)
    except DataError as error:
        assert str(error)
        return
    for sample in samples:
        assert (root / sample.relpath).resolve().is_relative_to(root.resolve())
    for problem in bad:
        assert problem.reason


@settings(max_examples=700, deadline=None)
@given(manifests() | st.binary(max_size=512), st.lists(st.sampled_from(["joy/a.jpg", "sad/b.png"]), unique=True))
def test_split_file_parser(root, data, relpaths):
    split_file = write_manifest(root, data)
    try:
        split = read_split_csv(split_file, relpaths, labels=[relpath.split("/")[0] for relpath in relpaths])
    except DataError as error:
        assert str(error)
        return
    assert len(split) == len(relpaths)
    assert set(split) <= {"train", "val", "test"}
