"""Image loading as the labellers saw the photo, and the checks that find unusable files."""

import hashlib
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# Errors that loading a bad file can raise; each becomes a BadImage reason in the scan.
IMAGE_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning,
                SyntaxError, ValueError)


class BadImageError(Exception):
    """A file that cannot be used as an image; ``reason`` says why in a few words."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def load_rgb(path: Path | str, *, draft_size: int | None = None) -> Image.Image:
    """Load an image upright and in RGB.

    EXIF orientation is applied and CMYK, grayscale and palette images are converted to RGB.
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
    """Decode ``data`` (the bytes of ``path``) into an upright RGB image, or raise BadImageError."""
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
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(path, f"decompression bomb ({error})") from error
    except UnidentifiedImageError as error:
        raise BadImageError(path, "not an image Pillow can read") from error
    except (OSError, SyntaxError, ValueError) as error:
        reason = "truncated" if "truncated" in str(error).lower() else f"unreadable ({error})"
        raise BadImageError(path, reason) from error


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
