from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emo.data.images import BadImageError, load_rgb
from tests.images import write_image


def test_grayscale_and_cmyk_become_rgb(tmp_path):
    for mode in ("L", "CMYK", "P"):
        image = load_rgb(write_image(tmp_path / f"{mode}.jpg" if mode != "P" else tmp_path / "p.png", mode=mode,
                                     fmt="JPEG" if mode != "P" else "PNG"))
        assert image.mode == "RGB", mode


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    write_image(path, size=(40, 20), exif=exif.tobytes())
    assert load_rgb(path).size == (20, 40)


def test_draft_decoding_keeps_requested_size(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(800, 600))
    image = load_rgb(path, draft_size=100)
    assert min(image.size) >= 100
    assert image.size[0] < 800


def test_draft_is_close_to_full_decode(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(512, 512), colour=(90, 140, 200))
    full = np.asarray(load_rgb(path).resize((64, 64)), dtype=float)
    draft = np.asarray(load_rgb(path, draft_size=64).resize((64, 64)), dtype=float)
    assert np.abs(full - draft).mean() < 8


def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(BadImageError, match="zero bytes"):
        load_rgb(path)


def write_gray16(path: Path, value: int, *, byte_order: str = "<") -> Path:
    """Write a 16-bit grayscale image of one value; the format follows the suffix (PNG, TIFF, PGM)."""
    Image.fromarray(np.full((6, 8), value, dtype=f"{byte_order}u2")).save(path)
    return path


@pytest.mark.parametrize("name, byte_order, mode", [
    ("gray16.png", "<", "I;16"),
    ("gray16.tif", ">", "I;16B"),
    ("gray16.pgm", "<", "I"),
])
def test_16_bit_grayscale_scaled_to_8_bit(tmp_path, name, byte_order, mode):
    path = write_gray16(tmp_path / name, 40000, byte_order=byte_order)
    with Image.open(path) as opened:
        assert opened.mode == mode
    assert load_rgb(path).getpixel((0, 0)) == (156, 156, 156)  # round(40000 / 257)


def test_16_bit_extremes_keep_black_and_white(tmp_path):
    assert load_rgb(write_gray16(tmp_path / "black.png", 0)).getpixel((0, 0)) == (0, 0, 0)
    assert load_rgb(write_gray16(tmp_path / "white.png", 65535)).getpixel((0, 0)) == (255, 255, 255)


def test_transparent_rgba_becomes_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (8, 6), (0, 0, 0, 0)).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_half_transparent_red_over_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (8, 6), (255, 0, 0, 128)).save(path)
    red, green, blue = load_rgb(path).getpixel((0, 0))
    assert red == 255
    assert abs(green - 127) <= 1
    assert green == blue


def test_opaque_rgba_keeps_colour(tmp_path):
    path = tmp_path / "opaque.png"
    Image.new("RGBA", (8, 6), (10, 20, 30, 255)).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (10, 20, 30)


def test_transparent_grayscale_alpha_becomes_white(tmp_path):
    path = tmp_path / "la.png"
    Image.new("LA", (8, 6), (0, 0)).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(tmp_path, fmt):
    image = Image.new("P", (8, 6), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)
    image.putpixel((1, 1), 1)
    path = tmp_path / f"palette.{fmt.lower()}"
    image.save(path, format=fmt, transparency=0)
    loaded = load_rgb(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 1)) == (200, 30, 30)
