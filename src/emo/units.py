"""Parsing sizes in bytes written the way people write them: ``2GB``, ``512MiB``, ``1e9``."""

import re

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_bytes(text: str) -> int:
    """Return the number of bytes that ``text`` names.

    KB, MB, GB and TB are powers of 1000; KiB, MiB, GiB and TiB powers of 1024; the unit is
    case-insensitive and a bare number is bytes.

    Raises:
        ValueError: if ``text`` is not a positive number with one of those units.

    Example:
        >>> parse_bytes("2GB"), parse_bytes("1.5KiB"), parse_bytes("100")
        (2000000000, 1536, 100)
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"size {text!r} is not a number with an optional unit such as 512MB or 2GiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"size {text!r} must be at least 1 byte")
    return size
