"""CSV tables as the public datasets ship them, plain or gzipped (``name.csv`` or ``name.csv.gz``)."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator, Sequence
from pathlib import Path


def find_table(directory: Path, name: str) -> Path | None:
    """``directory/name``, else ``directory/name.gz``, else None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def open_table(path: Path):
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def read_rows(path: Path) -> list[dict]:
    """Every row as a dict (`csv.DictReader`: a short row's missing cells are None)."""
    with open_table(path) as handle:
        return list(csv.DictReader(handle))


def csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a table whose rows must all be complete: a row of another width is a ValueError
    naming the line. Column names are stripped (SIIM-ACR's is ' EncodedPixels'); blank lines are skipped."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**30))  # full-resolution RLE cells exceed the 128 KiB default
    with open_table(path) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        for values in reader:
            if not values:  # blank line
                continue
            if len(values) != len(header):
                raise ValueError(f"{path}, line {reader.line_num}: {len(values)} fields but {len(header)} columns")
            yield reader.line_num, dict(zip(header, values, strict=True))


def require_columns(path: Path, row: dict, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; columns are {list(row)}")
