"""Safe file output: every output is complete, readable by the user's group, and never replaces an input.

`atomic_path` hands a writer a temporary file beside the target and renames it over the target only once
the write is known to be complete: the file is flushed to disk (`fsync`, which also surfaces a full disk on
file systems that report it late) and passes the writer's own check (`verify`, e.g. re-reading the voxel data:
ITK reports a short NIfTI write only as a warning). A failed or interrupted write leaves the previous file,
if any, untouched and nothing at the final path. Disk errors (full disk, read-only location, no permission)
become one `BrainDINOError` naming the output.

Outputs get the permissions a new file would get under the user's umask (a temporary file is created 0600),
or keep those of the file they replace.

Inputs are protected twice: readers `register_input` what they read, and `atomic_path` refuses a target that
is a registered input (the same path, a symlink or a hard link to it: same device and inode). The command line
checks its outputs against its inputs before any work (`refuse_output_over_input`).

Temporary files are named `.<stem>.braindino-tmp-<pid>-<random><suffix>`, so `remove_stale_temp_files` can
tell them apart from anything else and clean up after a killed writer.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil

from .errors import BrainDINOError, CancelledError

log = logging.getLogger(__name__)

TEMP_MARKER = ".braindino-tmp-"
STALE_TEMP_AGE_S = 3600.0  # a temporary file untouched this long, whose writer is gone, is debris
FULL_DISK_BYTES = 1 << 20  # after a failed write, less free space than this means the disk filled up

# (device, inode) of every file read as an input in this process -> the path it was read as.
_inputs: dict[tuple[int, int], str] = {}


# ---- inputs are never outputs -----------------------------------------------------------------------------------

def register_input(path: str | Path) -> None:
    """Remember that `path` is an input, so that no output written in this process may replace it."""
    with contextlib.suppress(OSError):
        info = os.stat(path)
        _inputs.setdefault((info.st_dev, info.st_ino), str(path))


def _input_behind(target: Path) -> str | None:
    """The registered input that `target` resolves to (same file, symlink or hard link), if any."""
    try:
        info = os.stat(target)
    except OSError:
        return None
    return _inputs.get((info.st_dev, info.st_ino))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_output_over_input(outputs: Iterable[str | Path], inputs: Iterable[str | Path]) -> None:
    """Raise if an output path resolves to one of `inputs` (the same path, a symlink or a hard link to it)."""
    inputs = [Path(p) for p in inputs]
    for output in (Path(p) for p in outputs):
        for source in inputs:
            if _same_file(output, source):
                raise BrainDINOError(output, _overwrite_problem(source))


def _overwrite_problem(source: str | Path) -> str:
    return (f"is the same file as the input {source}; BrainDINO never overwrites its inputs, "
            "choose another output path")


def check_writable(target: str | Path) -> None:
    """Raise (before any work) if `target` cannot be written: a read-only location, no permission, or a file
    where the path needs a folder. Looks at the folder that would receive it, or its nearest existing ancestor."""
    target = Path(target)
    if target.exists():
        place = target if target.is_dir() else target.parent
    else:
        place = next((p for p in target.parents if p.exists()), Path("."))
        if not place.is_dir():
            raise BrainDINOError(target, _write_problem(OSError(errno.ENOTDIR, "not a folder")))
    problem = None
    with contextlib.suppress(OSError, AttributeError):  # no statvfs on Windows
        if os.statvfs(place).f_flag & os.ST_RDONLY:
            problem = errno.EROFS
    if problem is None and not os.access(place, os.W_OK):
        problem = errno.EACCES
    if problem is not None:
        raise BrainDINOError(target, _write_problem(OSError(problem, os.strerror(problem))))


# ---- atomic, verified writes -----------------------------------------------------------------------------------

class IncompleteWriteError(Exception):
    """Raised by a `verify` check of `atomic_path`: the temporary file does not hold the whole output."""


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (`/proc/self/status`)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    """The permission bits of the file being replaced, else those of a new file under the umask."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(target).st_mode)
    return 0o666 & ~_umask()


def _fsync(path: Path) -> None:
    """Flush a file to disk: a full disk that the write did not report surfaces here."""
    fd = os.open(path, os.O_RDWR)  # Windows flushes only handles open for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    """Make a rename durable (POSIX); Windows cannot open folders for this and needs no such step."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        with contextlib.suppress(OSError):  # some file systems cannot sync folders; the data itself is synced
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_problem(error: OSError) -> str:
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the location is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EISDIR: "it is a folder",
               errno.ENOTDIR: "a part of the path is not a folder", errno.EEXIST: "a part of the path is not a folder",
               errno.EFBIG: "the file would be too large"}
    reason = reasons.get(error.errno, error.strerror or str(error))
    return f"cannot be written: {reason}; nothing was written"


def _disk_is_full(folder: Path) -> bool:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    return False


def _create_temp(target: Path) -> Path:
    if target.is_dir():
        raise BrainDINOError(target, "is a folder; give a file name for this output")
    source = _input_behind(target)
    if source is not None:
        raise BrainDINOError(target, _overwrite_problem(source))
    suffix = "".join(target.suffixes) or ".tmp"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}{TEMP_MARKER}{os.getpid()}-",
                                    suffix=suffix, dir=target.parent)
    except OSError as error:
        raise BrainDINOError(target, _write_problem(error)) from None
    os.close(fd)
    return Path(name)


def _complete(tmp: Path, target: Path, verify: Callable[[Path], None] | None) -> None:
    """Check the finished temporary file and rename it over `target`."""
    _fsync(tmp)
    if verify is not None:
        verify(tmp)
    os.chmod(tmp, _mode_for(target))
    os.replace(tmp, target)
    _fsync_folder(target.parent)


@contextlib.contextmanager
def atomic_path(target: str | Path, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; when the block succeeds, check it and rename it to `target`.

    The temporary name keeps the target's full suffix (e.g. `.nii.gz`), so writers that choose a format from
    the file name (SimpleITK, matplotlib) pick the right one. `verify(tmp)` may raise `BrainDINOError` when the
    written file is incomplete. Raises `BrainDINOError` when `target` is an input or a folder, or the disk
    refuses the write; on any failure nothing is left at `target` (an older file there stays as it was).
    """
    target = Path(target)
    tmp = _create_temp(target)
    try:
        yield tmp
        _complete(tmp, target, verify)
    except OSError as error:
        raise BrainDINOError(target, _write_problem(error)) from None
    except (BrainDINOError, CancelledError):
        raise
    except Exception as error:
        # Writers report a full disk in their own words (safetensors, torch.save) or not at all (ITK's NIfTI
        # writer), so look at the disk itself.
        if _disk_is_full(target.parent):
            raise BrainDINOError(target, _write_problem(OSError(errno.ENOSPC, "full"))) from None
        if isinstance(error, IncompleteWriteError):
            raise BrainDINOError(target, f"was not written completely ({error}); nothing was written") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def expect_size(size: int) -> Callable[[Path], None]:
    """A `verify` for `atomic_path`: the file holds exactly `size` bytes."""
    def verify(tmp: Path) -> None:
        written = tmp.stat().st_size
        if written != size:
            raise IncompleteWriteError(f"{written} of {size} bytes")
    return verify


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    with atomic_path(target, verify=expect_size(len(data))) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


# ---- debris of killed writers ----------------------------------------------------------------------------------

def is_temporary(name: str) -> bool:
    """Whether a file name is one of `atomic_path`'s temporary names (never a finished output, however complete)."""
    return name.startswith(".") and TEMP_MARKER in name


def remove_stale_temp_files(folder: str | Path, older_than_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Delete BrainDINO's temporary files under `folder` left by killed writers; return what was removed.

    Only files named by `atomic_path` are considered, and only those untouched for `older_than_s` whose writer
    process no longer runs on this machine, so a write in progress (here or, on a shared folder, on another
    machine) is never disturbed.
    """
    removed = []
    now = time.time()
    for root, _, names in os.walk(folder):
        for name in names:
            if not is_temporary(name):
                continue
            pid_text = name.split(TEMP_MARKER, 1)[1].split("-", 1)[0]
            path = Path(root) / name
            try:
                old = now - path.lstat().st_mtime > older_than_s
                if old and pid_text.isdigit() and not psutil.pid_exists(int(pid_text)):
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue  # gone already, or not ours to remove
    if removed:
        log.info("removed %d stale temporary file(s) under %s", len(removed), folder)
    return removed
