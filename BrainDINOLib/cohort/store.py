"""`FeatureStore`: a cohort's features, one file per volume, and an index that says which row is which file.

A store folder holds:

    index.json              what the store is (model, preprocessing, resolution policy, encoder blocks), what
                            happened to every volume it has seen (done: its feature file; skipped: the one-line
                            reason), and one entry per image of the cohort it was last filled from
    features/ab/<key>/...   the feature files, in the feature cache's format and layout (`cache.FeatureCache`):
                            content-addressed by the volume's voxels, model and preprocessing, checksummed
    journal/rank-<n>.jsonl  while a run goes on, or after one was killed: one line per finished volume per process

Nothing half-written is ever listed: a feature file is written atomically before the line that lists it is
appended to its process's journal and flushed to disk, and the index is replaced atomically by one built from
the previous index and the journals (`compact`). A reader merges the index and any journals the same way, so a
store can be used while it is being filled or after a killed run. A store holds one model, preprocessing,
resolution policy and set of blocks (`StoreIdentity`); a store made with others is refused in one line.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from ..atomic import TEMP_MARKER, write_text_atomic
from ..cache import FeatureCache
from ..errors import BrainDINOError
from ..features import VolumeFeatures
from ..resolution import ResolutionPolicy
from ..slices import PreprocessConfig
from .items import Cohort, CohortEntry, file_path, fingerprint

if TYPE_CHECKING:
    from ..session import FeatureSession

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FEATURES_FOLDER = "features"
JOURNAL_FOLDER = "journal"
WRITER_LOCK = "writer.lock"  # held by the run that fills the store (`FeatureStore.filling`)
STORE_FORMAT = "braindino-feature-store"
STORE_VERSION = 1


@dataclass(frozen=True)
class StoreIdentity:
    """What fixes every feature file of a store: the model (name + file hash), the precision it ran at, its
    preprocessing, the resolution policy and the encoder blocks kept besides the final tokens."""

    model_id: str
    precision: str
    preprocessing: PreprocessConfig
    policy: ResolutionPolicy
    layers: tuple[int, ...]

    @classmethod
    def of_session(cls, session: FeatureSession, layers: Sequence[int]) -> StoreIdentity:
        return cls(session.encoder.model_id, session.encoder.precision, session.preprocessing, session.policy,
                   tuple(sorted(set(layers))))

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "precision": self.precision, "preprocessing": self.preprocessing.to_dict(),
                "policy": self.policy.to_dict(), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict) -> StoreIdentity:
        return cls(data["model_id"], data["precision"], PreprocessConfig.from_dict(data["preprocessing"]),
                   ResolutionPolicy.from_dict(data["policy"]), tuple(data["layers"]))

    def mismatch(self, wanted: StoreIdentity, reading: bool = False) -> str:
        """Why features of this identity cannot serve `wanted` ("" if they can). Filling a store needs the same
        blocks and precision (its files stay alike); `reading` needs at least the wanted blocks, at any precision
        (features of two precisions of one model are close, as heads accept them)."""
        if self.model_id != wanted.model_id:
            return (f"was made with the model {self.model_id}, not {wanted.model_id}; pass the store's model with "
                    "--model, or use another store")
        if self.preprocessing != wanted.preprocessing:
            return (f"was made with other preprocessing ({self.preprocessing.to_dict()}, not "
                    f"{wanted.preprocessing.to_dict()})")
        if self.policy != wanted.policy:
            return (f"was made at another resolution ({self.policy.describe()}; this command asks for "
                    f"{wanted.policy.describe()}); leave the resolution options out to use the store's")
        if not reading and self.precision != wanted.precision:
            return (f"was made at {self.precision} precision, not {wanted.precision}; pass --precision "
                    f"{self.precision}, or use another store")
        missing = sorted(set(wanted.layers) - set(self.layers))
        if missing or (not reading and set(wanted.layers) != set(self.layers)):
            held = ",".join(map(str, self.layers)) or "none"
            asked = ",".join(map(str, wanted.layers)) or "none"
            return f"holds encoder blocks {held}, not {asked}; embed the cohort again into another store"
        return ""


@dataclass(frozen=True)
class VolumeRecord:
    """What happened to one volume (one image path): done, with its feature file, or skipped, with the reason."""

    path: str  # absolute, symlinks resolved (`items.file_path`)
    fingerprint: str  # of the file when it was read (`items.fingerprint`)
    status: str  # "done" or "skipped"
    reason: str = ""
    file: str = ""  # the feature file, relative to the store
    slices: int = 0
    read_seconds: float = 0.0  # reading + preprocessing, in a DataLoader worker
    embed_seconds: float = 0.0
    rank: int = 0

    @property
    def done(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VolumeRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class StoreFiles(FeatureCache):
    """The store's feature files: the cache's format and layout, but a write that fails is an error (a store
    that silently lacks a volume would be a lie), and stale temporary files are removed once per run
    (`FeatureStore.open_for_writing`), not on every write."""

    def put(self, key: str, features: VolumeFeatures) -> Path:
        return features.save(self.path_for(key, features.policy, tuple(features.layers)))


class Journal:
    """One process's record of finished volumes: one JSON line each, flushed to disk before the next volume, so
    that a kill loses at most the volume in progress (a torn last line is ignored when read)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def add(self, record: VolumeRecord) -> None:
        self._file.write(json.dumps(record.to_dict()) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_journal(path: Path) -> list[VolumeRecord]:
    """The complete records of a journal file (a line cut short by a kill is left out)."""
    records = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(VolumeRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError):
                log.info("%s: left out an incomplete line (its writer was killed)", path)
    return records


class FeatureStore:
    """A store folder: `open` to read one (heads), `open_for_writing` to fill one (`embed_cohort`), `filling` to be
    the one run that fills it."""

    def __init__(self, root: str | Path, identity: StoreIdentity, index: dict | None = None):
        self.root = Path(root)
        self.identity = identity
        self.files = StoreFiles(self.root / FEATURES_FOLDER)
        self._index = index or {}
        self._records: dict[str, VolumeRecord] | None = None

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    @property
    def journal_folder(self) -> Path:
        return self.root / JOURNAL_FOLDER

    # ---- opening ------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path) -> FeatureStore:
        """An existing store, refused in one line when the folder is not one."""
        root = Path(root)
        if not root.is_dir():
            raise BrainDINOError(root, "no such feature store (a folder made by braindino embed-cohort)")
        index_path = root / INDEX_NAME
        if not index_path.is_file():
            raise BrainDINOError(root, f"is not a BrainDINO feature store (no {INDEX_NAME}); make one with "
                                       "braindino embed-cohort")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            if index.get("format") != STORE_FORMAT:
                raise ValueError(f"format {index.get('format')!r}")
            if index.get("version") != STORE_VERSION:
                raise BrainDINOError(index_path, f"store version {index.get('version')} is not {STORE_VERSION}; "
                                                 "embed the cohort again into a new store")
            identity = StoreIdentity.from_dict(index["identity"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise BrainDINOError(index_path, f"is not a valid feature-store index ({type(error).__name__}: "
                                             f"{error})") from None
        return cls(root, identity, index)

    @classmethod
    def open_for_writing(cls, root: str | Path, identity: StoreIdentity) -> FeatureStore:
        """The store at `root` to fill with features of `identity`: a new or empty folder becomes one, an existing
        store must have been made with the same identity."""
        root = Path(root)
        if (root / INDEX_NAME).exists():
            store = cls.open(root)
            problem = store.identity.mismatch(identity)
            if problem:
                raise BrainDINOError(root, problem)
        else:
            others = [p.name for p in root.iterdir() if TEMP_MARKER not in p.name] if root.is_dir() else []
            if others:
                raise BrainDINOError(root, f"is a folder of other files ({others[0]}, ...), not a BrainDINO feature "
                                           "store; give a new or empty folder")
            store = cls(root, identity)
            store.write_index(None, {})
        return store

    @classmethod
    @contextlib.contextmanager
    def filling(cls, root: str | Path, identity: StoreIdentity) -> Iterator[FeatureStore]:
        """The store at `root` opened for writing (`open_for_writing`), held by this process alone while the block
        runs. A second run on the same store is refused at once, instead of racing the first on the index and
        removing its temporary files. The lock is the operating system's (flock), so a killed run holds nothing;
        its file is made only in a folder that is already a store."""
        store = cls.open_for_writing(root, identity)
        lock = FileLock(store.root / WRITER_LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise BrainDINOError(store.root, "another run is filling this store now; wait for it to end, or give "
                                             "another folder") from None
        try:
            yield store
        finally:
            lock.release()

    # ---- records ------------------------------------------------------------------------------------------------

    def journal(self, rank: int) -> Journal:
        return Journal(self.journal_folder / f"rank-{rank:05d}.jsonl")

    def journal_files(self) -> list[Path]:
        return sorted(self.journal_folder.glob("rank-*.jsonl"))

    def indexed_records(self) -> dict[str, VolumeRecord]:
        return {r["path"]: VolumeRecord.from_dict(r) for r in self._index.get("volumes", [])}

    def records(self) -> dict[str, VolumeRecord]:
        """Every volume the store knows, by path: the index, updated by the journals (read once per object)."""
        if self._records is None:
            records = self.indexed_records()
            for path in self.journal_files():
                records.update((r.path, r) for r in read_journal(path))
            self._records = records
        return self._records

    def compact(self, cohort: Cohort | None) -> tuple[dict[str, VolumeRecord], list[VolumeRecord]]:
        """Fold the journals into a new index (entries for `cohort`, or the previous cohort's) and remove them.
        Returns every record and those the journals added. Only one process of a run may call this."""
        records = self.indexed_records()
        added = [r for path in self.journal_files() for r in read_journal(path)]
        records.update((r.path, r) for r in added)
        self.write_index(cohort, records)
        for path in self.journal_files():
            path.unlink()
        with contextlib.suppress(OSError):
            self.journal_folder.rmdir()
        self._records = records
        return records, added

    def write_index(self, cohort: Cohort | None, records: dict[str, VolumeRecord]) -> None:
        """Replace index.json (atomically). Entries list the cohort's images in order with their status; volumes
        hold every record, also of images no longer in the cohort (their files stay usable)."""
        if cohort is not None:
            source, entries = str(cohort.source), [self._entry(e, records) for e in cohort.entries]
        else:
            source, entries = self._index.get("cohort", ""), self._index.get("entries", [])
        index = {"format": STORE_FORMAT, "version": STORE_VERSION, "identity": self.identity.to_dict(),
                 "cohort": source, "entries": entries,
                 "volumes": [records[path].to_dict() for path in sorted(records)]}
        write_text_atomic(self.index_path, json.dumps(index, indent=1) + "\n")
        self._index = index

    @staticmethod
    def _entry(entry: CohortEntry, records: dict[str, VolumeRecord]) -> dict:
        row = {"case": entry.case, "where": entry.where, "column": entry.column, "image": entry.image,
               "path": str(entry.path or "")}
        record = records.get(str(entry.path)) if entry.path is not None else None
        if entry.skip_reason:
            return {**row, "status": "skipped", "reason": entry.skip_reason, "file": ""}
        if record is None:
            return {**row, "status": "pending", "reason": "", "file": ""}
        return {**row, "status": record.status, "reason": record.reason, "file": record.file}

    def entries(self) -> list[dict]:
        """The index's entries for the cohort it was last filled from (as of the last index write)."""
        return list(self._index.get("entries", []))

    # ---- reading features -----------------------------------------------------------------------------------------

    def check_serves(self, session: FeatureSession, layers: Sequence[int]) -> None:
        """Raise unless this store holds features of `session`'s model, preprocessing and resolution, with at
        least the blocks `layers`."""
        problem = self.identity.mismatch(StoreIdentity.of_session(session, layers), reading=True)
        if problem:
            raise BrainDINOError(self.root, problem)

    def features(self, image: str | Path, layers: Sequence[int] = ()) -> VolumeFeatures:
        """The stored features of the volume at `image`, refused in one line when the store has none, skipped it,
        or the file has changed since it was embedded."""
        path = file_path(Path(image))
        record = self.records().get(str(path))
        if record is None:
            raise BrainDINOError(self.root, f"has no features of {image}; embed it into this store with braindino "
                                            "embed-cohort")
        if not record.done:
            raise BrainDINOError(self.root, f"could not embed {image} when it was filled: {record.reason}")
        if fingerprint(path) != record.fingerprint:
            raise BrainDINOError(self.root, f"holds features of an earlier version of {image} (the file has changed "
                                            "since); run braindino embed-cohort again to update the store")
        features = VolumeFeatures.load(self.root / record.file)
        missing = sorted(set(layers) - set(features.layers))
        if missing:
            raise BrainDINOError(self.root / record.file, f"lacks encoder block(s) {missing}")
        return features
