"""Reading CSV files with a header row, with errors that name the file, the line and the columns."""

import csv
from pathlib import Path

from emo.errors import DataError


def read_csv_records(csv_path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV with a header row into ``(line, row)`` pairs, skipping blank rows.

    ``line`` is the file line on which the row ends. Missing trailing fields read as "".

    Raises:
        DataError: if the file is missing or unreadable, lacks a required column, or a row has
            more non-empty fields than the header.

    Example:
        >>> read_csv_records(Path("labels.csv"), ["path", "label"])[0]  # doctest: +SKIP
        (2, {'path': 'joy/1.jpg', 'label': 'joy'})
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file, restval="")
            columns = reader.fieldnames or []
            missing = [name for name in required if name not in columns]
            if missing:
                raise DataError(f"{csv_path} has no column {missing[0]!r}; its columns are {columns}. "
                                "Choose the columns with --path-column / --label-column")
            return [(reader.line_num, row) for row in reader if _is_data_row(csv_path, reader.line_num, row)]
    except FileNotFoundError as error:
        raise DataError(f"CSV file {csv_path} not found") from error
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{csv_path} is not a readable UTF-8 CSV file: {error}") from error


def read_csv_rows(csv_path: Path, required: list[str]) -> list[dict[str, str]]:
    """Read a CSV with a header row, checking that the required columns exist (see :func:`read_csv_records`)."""
    return [row for _, row in read_csv_records(csv_path, required)]


def _is_data_row(csv_path: Path, line: int, row: dict) -> bool:
    # DictReader files surplus fields under the key None.
    surplus = [value for value in row.pop(None, []) if value.strip()]
    if surplus:
        raise DataError(f"{csv_path}, line {line}: more fields than the header has columns (extra {surplus[0]!r}); "
                        "quote fields that contain commas")
    return any(value.strip() for value in row.values())
