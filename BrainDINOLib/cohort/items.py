"""What a cohort is made of: every image of every manifest row (or every volume under a folder), listed in a
fixed order, with the file each one names and a cheap fingerprint that tells whether the file has changed.

A manifest is read (and refused, in one line) exactly as `fit-head` reads it (`BrainDINOLib.manifest`); for a
cohort, though, an image that is missing or unreadable is not a reason to refuse the manifest: it is skipped and
reported, and the others are embedded. A folder is searched the way `prepare-slices` searches one (volume files
and DICOM series folders).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import BrainDINOError
from ..manifest import Manifest
from ..volume_files import find_volumes


@dataclass(frozen=True)
class CohortEntry:
    """One image of one manifest row, or one volume of a folder. `path` is None for an empty manifest cell."""

    case: str
    where: str  # how a person finds it: "line 5 (case-3)" in a manifest, the relative path in a folder
    column: str  # the manifest's image column ("" for a folder)
    image: str  # the value as the manifest writes it (relative to the folder for a folder)
    path: Path | None  # absolute, symlinks resolved: the key under which the store finds its features

    @property
    def skip_reason(self) -> str:
        """Why this entry cannot be embedded before anything is read ("" if it can be tried)."""
        return "" if self.path is not None else f"no image in column {self.column}"


@dataclass(frozen=True)
class Cohort:
    """The entries of a manifest or folder in their order, and the distinct volumes they name (the work)."""

    source: Path
    entries: tuple[CohortEntry, ...]

    @property
    def volumes(self) -> list[Path]:
        """Distinct image paths in order of first appearance: an image shared by two rows is embedded once."""
        return list(dict.fromkeys(e.path for e in self.entries if e.path is not None))


def file_path(path: Path) -> Path:
    """The absolute path of `path` with symlinks resolved, so that two spellings of one file agree."""
    return Path(os.path.realpath(path))


def fingerprint(path: Path) -> str:
    """Size and modification time of a file (or of every file of a DICOM folder): changes when the file does,
    at the cost of a `stat`. "" when there is nothing at `path`."""
    try:
        if path.is_dir():
            infos = [entry.stat() for entry in os.scandir(path) if entry.is_file()]
        else:
            infos = [path.stat()]
    except OSError:
        return ""
    return f"{sum(i.st_size for i in infos)}:{max((i.st_mtime_ns for i in infos), default=0)}:{len(infos)}"


def read_cohort(source: str | Path, image_columns: Sequence[str] = ()) -> Cohort:
    """The cohort of a CSV manifest (every row, `image_columns` or every image column) or of a folder."""
    source = Path(source)
    if source.is_dir():
        return _folder_cohort(source)
    if not source.is_file():
        raise BrainDINOError(source, "no such manifest file or folder")
    manifest = Manifest.read(source)
    columns = manifest.image_columns(image_columns)
    entries = []
    for row, values in enumerate(manifest.rows):
        for column in columns:
            value = values[column]
            entries.append(CohortEntry(manifest.case_id(row), manifest.where(row), column, value,
                                       file_path(manifest.resolve(value)) if value else None))
    return Cohort(file_path(source), tuple(entries))


def _folder_cohort(folder: Path) -> Cohort:
    volumes = find_volumes([folder])
    if not volumes:
        raise BrainDINOError(folder, "holds no volumes (NIfTI, NRRD, MHA/MHD files or DICOM series folders)")
    entries = []
    for path in volumes:
        name = str(path.relative_to(folder))
        entries.append(CohortEntry(name, name, "", name, file_path(path)))
    return Cohort(file_path(folder), tuple(entries))
