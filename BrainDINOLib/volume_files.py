"""Which volumes a user means: files, folders searched recursively (volume files and DICOM series folders) and CSV
lists of paths. The inputs of `prepare-slices` and of a cohort given as a folder."""
from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from .errors import BrainDINOError
from .volume import READABLE_SUFFIXES


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(READABLE_SUFFIXES)


def _from_csv(path: Path) -> list[Path]:
    """Paths in the `path` column (or the first column) of a CSV, relative to the CSV's folder."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise BrainDINOError(path, "the CSV is empty")
    header = [c.strip().lower() for c in rows[0]]
    column = header.index("path") if "path" in header else 0
    body = rows[1:] if "path" in header else rows
    return [(path.parent / row[column].strip()) for row in body if row and row[column].strip()]


def find_volumes(inputs: Iterable[str | Path]) -> list[Path]:
    """Volume files and DICOM folders from files, folders (searched recursively) and CSV lists."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise BrainDINOError(item, "no such file or folder")
        if item.is_file() and item.suffix.lower() == ".csv":
            found.extend(_from_csv(item))
        elif item.is_file():
            found.append(item)
        else:
            found.extend(sorted(p for p in item.rglob("*") if _is_volume_file(p)))
            found.extend(sorted({p.parent for p in item.rglob("*.dcm")}))
    return found
