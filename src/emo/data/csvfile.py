"""Reading CSV files with a header row, with errors that name the file and the columns."""

import csv
from pathlib import Path

from emo.errors import DataError


def read_csv_rows(csv_path: Path, required: list[str]) -> list[dict]:
    """Read a CSV with a header row, checking that the required columns exist."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            columns = reader.fieldnames or []
            missing = [name for name in required if name not in columns]
            if missing:
                raise DataError(f"{csv_path} has no column {missing[0]!r}; its columns are {columns}. "
                                "Choose the columns with --path-column / --label-column")
            return [row for row in reader if any((value or "").strip() for value in row.values())]
    except FileNotFoundError as error:
        raise DataError(f"CSV file {csv_path} not found") from error
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{csv_path} is not a readable UTF-8 CSV file: {error}") from error
