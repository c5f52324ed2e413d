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
