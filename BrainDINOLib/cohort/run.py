"""`embed_cohort`: every volume of a cohort through a `FeatureSession` into a `FeatureStore`, in one process or
split across the processes torchrun starts (one per GPU, or several on a CPU, on one node or many), resumable.

Rank 0 holds the store for the whole run (`FeatureStore.filling`: a second run on it is refused at once) and plans
the run (`plan_run`): it folds the journals of an earlier run into the index and lists the volumes still missing
(never done, skipped before, or changed since). Every process then takes every world-size-th of them, in the
cohort's order: a fixed split, and which process embeds a volume does not change its features. In each process,
DataLoader workers read the volumes and build their `SliceStack`s on the CPU while the device embeds the one before
(`FeatureSession.features`, the engine's one way to features), and every finished volume is written to the store and
then recorded in the process's journal. A volume that cannot be read is recorded as skipped, with the reason, and
the run goes on. Rank 0 shows the progress of the whole cohort (from every process's journal), waits for the others
and writes the index.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..atomic import remove_stale_temp_files
from ..checkpoints import Checkpoint
from ..distributed import Distributed
from ..embedding import default_preprocessing
from ..errors import BrainDINOError, CancelledError
from ..resolution import ResolutionPolicy
from ..session import FeatureSession, segmentation_layers
from ..slices import PreprocessConfig, SliceStack, check_resolution
from ..volume import Volume, read_volume
from .items import Cohort, fingerprint
from .store import FeatureStore, Journal, StoreIdentity, VolumeRecord

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (volumes finished in this run, volumes to embed in this run)
PROGRESS_INTERVAL_S = 0.5  # how often rank 0 reads the journals for progress
PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent dies (<linux/prctl.h>)


def cohort_identity(checkpoint: Checkpoint, precision: str, policy: ResolutionPolicy,
                    layers: Sequence[int] | None = None,
                    preprocessing: PreprocessConfig | None = None) -> StoreIdentity:
    """The identity of a store filled with `checkpoint`'s model at `precision` (resolved: "int8", not "auto"; no
    model is built): `layers` None keeps the blocks segmentation reads, `preprocessing` None the model's own.
    Blocks and resolution are checked against the model here, once, rather than failing volume after volume."""
    depth = checkpoint.architecture.depth
    layers = segmentation_layers(depth) if layers is None else tuple(sorted(set(layers)))
    if any(not 0 <= i < depth for i in layers):
        raise BrainDINOError(f"layers {','.join(map(str, layers))}",
                             f"out of range for {checkpoint.model_id}, a {depth}-block model (use 0 to {depth - 1})")
    check_resolution(policy, checkpoint.architecture.patch_size)
    return StoreIdentity(checkpoint.model_id, precision, preprocessing or default_preprocessing(checkpoint), policy,
                         layers)


@dataclass
class RunPlan:
    """What a run starts from: the store, what it held, and the volumes (paths) still to embed."""

    store: FeatureStore
    records: dict[str, VolumeRecord]
    pending: list[str]


def plan_run(store: FeatureStore, cohort: Cohort) -> RunPlan:
    """Fold an earlier run's journals into the index of `store` (held: `FeatureStore.filling`), and list the
    cohort's volumes that are not done with the file as it is now. Rank 0's job (or the launcher's)."""
    # What writers killed mid-write left behind, however recent: this run holds the store and none of its writers
    # has started yet, and a complete feature file that a killed rank had not yet renamed would otherwise stay in
    # the store as debris.
    remove_stale_temp_files(store.root, older_than_s=0)
    records, _ = store.compact(cohort)
    pending = []
    for path in map(str, cohort.volumes):
        record = records.get(path)
        if record is None or not record.done or record.fingerprint != fingerprint(Path(path)):
            pending.append(path)
    return RunPlan(store, records, pending)


# ---- reading and preprocessing in DataLoader workers ---------------------------------------------------------------

@dataclass
class Prepared:
    """A volume read and made model-ready by a worker, or the one-line reason why it could not be."""

    path: str
    fingerprint: str
    volume: Volume | None = None
    stack: SliceStack | None = None
    reason: str = ""
    seconds: float = 0.0


class ReadAndPreprocess(Dataset):
    """Volume i of `paths` -> `Prepared`: read (SimpleITK) and its SliceStack built, as the session would."""

    def __init__(self, paths: Sequence[str], patch_size: int, preprocessing: PreprocessConfig,
                 policy: ResolutionPolicy):
        self.paths, self.patch_size, self.preprocessing, self.policy = list(paths), patch_size, preprocessing, policy

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Prepared:
        path = self.paths[i]
        started = time.perf_counter()
        stamp = fingerprint(Path(path))
        try:
            volume = read_volume(path)
            stack = SliceStack.from_volume(volume, self.patch_size, self.preprocessing, self.policy)
        except BrainDINOError as error:
            return Prepared(path, stamp, reason=error.problem if error.source == path else str(error))
        except Exception as error:  # noqa: BLE001 - a file no check foresaw must not stop a cohort: skip it, say why
            log.warning("unexpected error reading %s", path, exc_info=True)
            return Prepared(path, stamp, reason=f"unexpected {type(error).__name__}: {' '.join(str(error).split())}")
        return Prepared(path, stamp, volume, stack, seconds=time.perf_counter() - started)


def _as_is(item: Prepared) -> Prepared:
    return item


def die_with_parent(parent: int) -> None:
    """Make this process die (SIGKILL) when its parent `parent` does (Linux). A rank whose torchrun was killed
    would otherwise wait for ever and later write into a store another run is filling; a reading worker whose
    rank was killed hangs for ever at exit, flushing a volume into a queue no one reads."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _worker_dies_with_parent(_worker_id: int, parent: int) -> None:
    die_with_parent(parent)


def default_workers(processes_per_node: int) -> int:
    """DataLoader workers per process: the node's cores shared out, one left for the process itself, 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 2) // max(1, processes_per_node) - 1))


# ---- embedding ----------------------------------------------------------------------------------------------------

def embed_prepared(prepared: Prepared, session: FeatureSession, layers: Sequence[int], store: FeatureStore,
                   rank: int = 0, cancel: Callable[[], bool] | None = None) -> VolumeRecord:
    """Embed one prepared volume into the store (through the session, whose cache is the store's files)."""
    skipped = VolumeRecord(prepared.path, prepared.fingerprint, "skipped", reason=prepared.reason, rank=rank,
                           read_seconds=prepared.seconds)
    if prepared.reason:
        return skipped
    started = time.perf_counter()
    try:
        features = session.features(prepared.volume, layers, cancel=cancel, stack=prepared.stack)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return VolumeRecord(**{**skipped.to_dict(), "reason": f"out of memory on {session.encoder.device} "
                                                              f"({len(prepared.stack)} slices); lower --batch-size"})
    file = store.files.path_for(session.cache_key(prepared.volume), features.policy, tuple(features.layers))
    return VolumeRecord(prepared.path, prepared.fingerprint, "done", file=str(file.relative_to(store.root)),
                        slices=features.num_slices, read_seconds=prepared.seconds,
                        embed_seconds=time.perf_counter() - started, rank=rank)


class JournalWatcher:
    """Rank 0's view of the whole run: counts the records in every process's journal (a thread reading only what
    was appended since), reports them to `progress`, and tells when all `total` volumes are in."""

    def __init__(self, store: FeatureStore, total: int, progress: Progress | None = None):
        self.store, self.total, self.progress = store, total, progress
        self.finished = 0
        self._offsets: dict[Path, int] = {}
        self._stop = threading.Event()
        self._all_in = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-watcher", daemon=True)

    def _poll(self) -> None:
        for path in self.store.journal_files():
            with open(path, "rb") as handle:
                handle.seek(self._offsets.get(path, 0))
                data = handle.read()
            complete = data.rfind(b"\n") + 1
            self.finished += data[:complete].count(b"\n")
            self._offsets[path] = self._offsets.get(path, 0) + complete
        if self.progress:
            self.progress(min(self.finished, self.total), self.total)
        if self.finished >= self.total:
            self._all_in.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(PROGRESS_INTERVAL_S)

    def wait_for_all(self) -> None:
        """Block until every process has recorded its share (a process that dies makes torchrun stop this one)."""
        self._all_in.wait()

    def __enter__(self) -> JournalWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class CohortSummary:
    """What a run did, for the final lines a user reads."""

    store: Path
    images: int  # cohort entries (an image of a row)
    embedded: int  # volumes embedded by this run
    already: int  # volumes that were in the store before
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason) of every entry not embedded
    slices: int = 0  # embedded by this run
    seconds: float = 0.0
    processes: int = 1
    read_seconds: float = 0.0  # summed over volumes (in workers, overlapping the embedding)
    embed_seconds: float = 0.0

    @property
    def volumes_per_minute(self) -> float:
        return 60 * self.embedded / self.seconds if self.seconds else 0.0

    @property
    def slices_per_second(self) -> float:
        return self.slices / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        lines = []
        if self.embedded:
            per_volume = (f"; per volume {self.read_seconds / self.embedded:.2f} s reading in workers, "
                          f"{self.embed_seconds / self.embedded:.2f} s embedding")
            lines.append(f"embedded {self.embedded} volumes ({self.slices} slices) in {self.seconds:.1f} s with "
                         f"{self.processes} process(es): {self.volumes_per_minute:.1f} volumes/min, "
                         f"{self.slices_per_second:.1f} slices/s{per_volume}")
        else:
            lines.append(f"nothing to embed ({self.seconds:.1f} s)")
        lines.append(f"{self.already} volume(s) were already in the store; {len(self.skipped)} of {self.images} "
                     f"image(s) skipped")
        lines += [f"  skipped {where}: {reason}" for where, reason in self.skipped]
        lines.append(f"index: {self.store / 'index.json'}")
        return "\n".join(lines)


def summarise(plan: RunPlan, added: Sequence[VolumeRecord], seconds: float, processes: int) -> CohortSummary:
    """The summary of a run from its plan, the records it added, and the store's index after it."""
    done = [r for r in added if r.done]
    already = sum(1 for path in plan.records if path not in plan.pending and plan.records[path].done)
    skipped = [(e["where"] if e["image"] == e["where"] else f"{e['where']}, {e['column']} {e['image']!r}", e["reason"])
               for e in plan.store.entries() if e["status"] == "skipped"]
    return CohortSummary(plan.store.root, len(plan.store.entries()), len(done), already, skipped,
                         sum(r.slices for r in done), seconds, processes, sum(r.read_seconds for r in done),
                         sum(r.embed_seconds for r in done))


def embed_cohort(cohort: Cohort, store_root: str | Path, session: FeatureSession,
                 layers: Sequence[int] | None = None, distributed: Distributed | None = None, workers: int = 1,
                 progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> CohortSummary | None:
    """Embed every volume of `cohort` missing from the store at `store_root` (made if new) with `session`'s model,
    preprocessing and resolution, keeping blocks `layers` (None: those segmentation reads).

    Call it on every process of a torchrun job with the same arguments (`distributed` from
    `distributed.setup_distributed`); without one, it runs as a single process. `workers` DataLoader
    workers read and preprocess per process. Rank 0 reports `progress(finished, total)` for the whole run and
    returns the summary; the other ranks return None. A store made with another model, preprocessing,
    resolution or blocks is refused (`BrainDINOError`) before any work.
    """
    started = time.perf_counter()
    distributed = distributed or Distributed(0, 1, 0, session.encoder.device)
    identity = cohort_identity(session.encoder.checkpoint, session.encoder.precision, session.policy, layers,
                               session.preprocessing)
    with contextlib.ExitStack() as held:  # rank 0 holds the store for the whole run
        plan = plan_run(held.enter_context(FeatureStore.filling(store_root, identity)), cohort) \
            if distributed.is_main else None
        pending: list[str] = distributed.broadcast(plan.pending if plan else None)
        store = plan.store if plan else FeatureStore.open_for_writing(store_root, identity)
        # The store is this session's cache: a volume whose file a killed run wrote but did not record is read back.
        embedding = FeatureSession(session.encoder, session.policy, session.preprocessing, store.files,
                                   session.batch_size, memory_volumes=0)
        share = pending[distributed.rank::distributed.world_size]
        log.info("rank %d: %d of %d volumes to embed", distributed.rank, len(share), len(pending))
        loader = DataLoader(ReadAndPreprocess(share, session.encoder.patch_size, session.preprocessing,
                                              session.policy),
                            batch_size=None, num_workers=workers if share else 0, collate_fn=_as_is,
                            worker_init_fn=functools.partial(_worker_dies_with_parent, parent=os.getpid()))
        prepared_volumes = iter(loader)  # the workers start here, before rank 0's watcher thread
        watcher = JournalWatcher(store, len(pending), progress) if distributed.is_main else None
        with store.journal(distributed.rank) as journal, watcher or contextlib.nullcontext():
            _embed_share(prepared_volumes, embedding, identity.layers, store, journal, distributed.rank, cancel)
            if watcher is not None:
                watcher.wait_for_all()
        if not distributed.is_main:
            return None
        _, added = store.compact(cohort)
        return summarise(plan, added, time.perf_counter() - started, distributed.world_size)


def _embed_share(prepared_volumes, session: FeatureSession, layers: Sequence[int], store: FeatureStore,
                 journal: Journal, rank: int, cancel: Callable[[], bool] | None) -> None:
    for prepared in prepared_volumes:
        if cancel is not None and cancel():
            raise CancelledError("embedding the cohort cancelled")
        record = embed_prepared(prepared, session, layers, store, rank, cancel)
        if not record.done:
            log.info("skipped %s: %s", record.path, record.reason)
        journal.add(record)


