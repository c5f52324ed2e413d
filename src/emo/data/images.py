"""Image loading as the labellers saw the photo, and the checks that find unusable files."""

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Exceptions Pillow raises for a damaged or hostile file, besides UnidentifiedImageError and the
# decompression-bomb error and warning. Pillow's own fuzz tests (Tests/test_fuzzers.py) accept
# exactly these from decoding. decode_rgb turns each into a BadImageError.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, MemoryError, NotImplementedError, OverflowError)
# Pillow modes of 16-bit grayscale: PNG and TIFF open as I;16 (or I;16B), 16-bit PGM as I.
# convert("RGB") clips these to 255 instead of scaling them.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes with an alpha channel; palette, grayscale and RGB images can also carry a transparent colour.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Transparent pixels are shown over white, as browsers and image viewers show them on a white page.
BACKGROUND = (255, 255, 255)


class BadImageError(Exception):
    """A file that cannot be used as an image; ``reason`` says why in a few words."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def load_rgb(path: Path | str, *, draft_size: int | None = None) -> Image.Image:
    """Load an image upright and in RGB.

    EXIF orientation is applied and CMYK, grayscale and palette images are converted to RGB.
    16-bit grayscale is scaled to 8 bits, and transparent pixels are composited over white.
    Images over Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``) raise BadImageError.

    Args:
        path: the image file.
        draft_size: if given, JPEGs are decoded at the smallest DCT scale that keeps both sides
            at least this many pixels, which is much faster for large photos.

    Example:
        >>> image = load_rgb("photo.jpg")  # doctest: +SKIP
        >>> image.mode
        'RGB'
    """
    with open(path, "rb") as file:
        return decode_rgb(file.read(), Path(path), draft_size=draft_size)


def decode_rgb(data: bytes, path: Path, *, draft_size: int | None = None) -> Image.Image:
    """Decode ``data`` (the bytes of ``path``) into an upright RGB image.

    Raises:
        BadImageError: for empty data, a format Pillow cannot identify, a decompression bomb, or
            any decoding failure in ``IMAGE_ERRORS``. tests/test_fuzz.py checks on a few thousand
            damaged inputs that no other exception escapes.
    """
    if not data:
        raise BadImageError(path, "zero bytes")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both as bombs.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(path, f"decompression bomb ({error})") from error
    except UnidentifiedImageError as error:
        raise BadImageError(path, "not an image Pillow can read") from error
    except IMAGE_ERRORS as error:
        reason = "truncated" if "truncated" in str(error).lower() else f"unreadable ({type(error).__name__}: {error})"
        raise BadImageError(path, reason) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert ``image`` to 8-bit RGB as a viewer shows it.

    16-bit grayscale (0..65535) is divided by 257 to 0..255. Transparent pixels are composited
    over a white background before the alpha channel is dropped.

    Example:
        >>> to_rgb(Image.new("I;16", (1, 1), 65535)).getpixel((0, 0))
        (255, 255, 255)
    """
    if image.mode in SIXTEEN_BIT_MODES:
        # NOTE: mode I can also hold 32-bit values (some TIFFs); values above 65535 become white.
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    return image.convert("RGB")


def check_image(path: Path) -> str:
    """Decode ``path`` once, cheaply, and return the SHA-256 of its bytes; raise BadImageError if unusable.

    JPEGs are decoded at a reduced DCT scale, which still reads every entropy-coded segment
    and so still detects truncation.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadImageError(path, f"cannot read ({error.strerror or error})") from error
    decode_rgb(data, path, draft_size=32)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
