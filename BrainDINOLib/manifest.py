"""`Manifest`: the CSV table of cases that heads are fitted on and evaluated on, read and checked strictly.

One row per case (subject). Columns (names configurable): `image` (or several `image_<modality>` columns for
multi-modal subjects), and per task `label` (a label volume for segmentation, a class name for classification
and kNN), `target` (a number, regression), `time` and `event` (survival); optionally `split` (`train` /
`test`: test rows are never used for fitting) and `case`. Relative paths are relative to the manifest's folder.

Every value a head would learn from is checked before any work: a missing label, a target that is not a
finite number, an event that is not 0 or 1, a split that is neither train nor test, an image that does not
exist. The error names the line (as a spreadsheet or text editor numbers it) and the value. A file that is not
UTF-8 or that separates its columns with `;` is refused with the reason. An image used for both training and
testing is reported as a warning (the test metrics are then not independent).
"""
from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import register_input
from .errors import BrainDINOError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
# Cells that spreadsheets and pandas write for "no value": never a class name or a number.
MISSING_VALUES = {"", "nan", "na", "n/a", "null", "#n/a"}


def read_utf8(path: Path) -> str:
    """The text of a small input file (a manifest, a class list), refused with a reason when it is not UTF-8."""
    register_input(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise BrainDINOError(path, f"is not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}: Latin-1 or a "
                                   "Windows code page?); save it as UTF-8 (\"CSV UTF-8\" in a spreadsheet)") from None


@dataclass
class Manifest:
    path: Path
    rows: list[dict[str, str]]

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if not path.is_file():
            raise BrainDINOError(path, "no such manifest file")
        text = read_utf8(path)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [name.strip() for name in reader.fieldnames or []]
        if not header:
            raise BrainDINOError(path, "manifest is empty (no header row)")
        first_line = text.splitlines()[0]
        for separator, name in ((";", "semicolons"), ("\t", "tabs")):
            if len(header) == 1 and separator in first_line:
                raise BrainDINOError(path, f"columns are separated by {name} (header {first_line!r}); BrainDINO "
                                           "reads comma-separated manifests: save it as CSV with ',' separators")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise BrainDINOError(path, f"column(s) {', '.join(repeated)} appear more than once in the header")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
        if not rows:
            raise BrainDINOError(path, "manifest has no rows")
        return cls(path, rows)

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0])

    def require(self, *columns: str) -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise BrainDINOError(self.path, f"missing column(s) {', '.join(missing)} (columns: "
                                            f"{', '.join(self.columns)})")

    def image_columns(self, explicit: Sequence[str] | None = None) -> list[str]:
        """`explicit` if given, else `image`, else every `image_*` column in order."""
        columns = list(explicit) if explicit else (["image"] if "image" in self.columns else
                                                   [c for c in self.columns if c.startswith("image_")])
        if not columns:
            raise BrainDINOError(self.path, "no image column (name it `image`, or `image_<modality>` per modality)")
        self.require(*columns)
        return columns

    def resolve(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.path.parent / path

    def case_id(self, index: int) -> str:
        return self.rows[index].get("case") or f"row{index + 1}"

    def where(self, index: int) -> str:
        """A row as a person finds it: its line in the file (the header is line 1) and its case name."""
        case = self.rows[index].get("case")
        return f"line {index + 2}" + (f" ({case})" if case else "")

    # ---- which rows ----------------------------------------------------------------------------------------

    def select(self, split: str | None) -> list[int]:
        """Row indices: `split=None` -> all; `"train"` -> every row not marked test; else that split."""
        if split is None or "split" not in self.columns:
            return list(range(len(self.rows)))
        if split == "train":
            return [i for i, r in enumerate(self.rows) if r["split"].lower() != "test"]
        return [i for i, r in enumerate(self.rows) if r["split"].lower() == split]

    def training_rows(self) -> list[int]:
        """The rows a head is fitted on: every row not marked test. Refuses split values other than train and
        test (a typo would otherwise put a test case into training) and a manifest without training rows."""
        if "split" in self.columns:
            for i, row in enumerate(self.rows):
                if row["split"].lower() not in SPLITS:
                    raise BrainDINOError(self.path, f"{self.where(i)}: split {row['split']!r} is neither train nor "
                                                    "test (fitting holds out its own validation part: "
                                                    "--val-fraction)")
        rows = self.select("train")
        if not rows:
            raise BrainDINOError(self.path, f"has no training rows (all {len(self.rows)} rows have split=test)")
        return rows

    def rows_of_split(self, split: str | None) -> list[int]:
        """The rows of `split` for evaluation (all rows for None, or when there is no split column)."""
        rows = self.select(split)
        if not rows:
            present = sorted({r["split"] for r in self.rows})
            raise BrainDINOError(self.path, f"no row has split {split!r} (splits in this manifest: "
                                            f"{', '.join(repr(s) for s in present)})")
        return rows

    # ---- values ---------------------------------------------------------------------------------------------

    def image_paths(self, rows: Sequence[int], columns: Sequence[str]) -> list[list[Path]]:
        """The image files of `rows` (one per column), each checked to exist."""
        paths = []
        for i in rows:
            row_paths = []
            for column in columns:
                value = self.rows[i][column]
                path = self.resolve(value)
                if not value or not path.exists():
                    raise BrainDINOError(self.path, f"{self.where(i)}: {column} {value!r} does not exist"
                                                    + (f" ({path})" if value else ""))
                row_paths.append(path)
            paths.append(row_paths)
        return paths

    def warn_shared_images(self, columns: Sequence[str]) -> None:
        """Warn when one image file serves a training row and a test row (same file, links included)."""
        if "split" not in self.columns:
            return
        training = {}
        for i in self.select("train"):
            for path in self.image_paths([i], columns)[0]:
                training[_file_identity(path)] = i
        for i in self.select("test"):
            for path in self.image_paths([i], columns)[0]:
                if (j := training.get(_file_identity(path))) is not None:
                    log.warning("%s: %s is used for training (%s) and for testing (%s); the test metrics are not "
                                "independent", self.path, path, self.where(j), self.where(i))

    def class_labels(self, rows: Sequence[int], column: str) -> list[str]:
        """The class names in `column` of `rows`; a missing value (empty, NaN, NA, ...) is refused."""
        self.require(column)
        labels = []
        for i in rows:
            value = self.rows[i][column]
            if value.lower() in MISSING_VALUES:
                raise BrainDINOError(self.path, f"{self.where(i)}: {column} is missing ({value!r})")
            labels.append(value)
        return labels

    def numbers(self, rows: Sequence[int], column: str, minimum: float | None = None) -> np.ndarray:
        """The finite numbers in `column` of `rows` (at least `minimum`, if given)."""
        self.require(column)
        values = []
        for i in rows:
            text = self.rows[i][column]
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not np.isfinite(value):
                raise BrainDINOError(self.path, f"{self.where(i)}: {column} {text!r} is not a finite number")
            if minimum is not None and value < minimum:
                raise BrainDINOError(self.path, f"{self.where(i)}: {column} {text!r} is below {minimum:g}")
            values.append(value)
        return np.asarray(values)

    def events(self, rows: Sequence[int], column: str) -> np.ndarray:
        """Survival events in `column` of `rows`: 1 (observed) or 0 (censored)."""
        values = self.numbers(rows, column)
        for i, value in zip(rows, values):
            if value not in (0, 1):
                raise BrainDINOError(self.path, f"{self.where(i)}: {column} {self.rows[i][column]!r} is neither "
                                                "0 (censored) nor 1 (event observed)")
        return values.astype(int)


def _file_identity(path: Path) -> tuple:
    """(device, inode) of an existing file, so that links and different spellings of one path compare equal."""
    info = os.stat(path)
    return info.st_dev, info.st_ino
