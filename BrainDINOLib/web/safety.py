"""What a page served by `braindino serve` may do: who may connect, which files it may read, where it may write.

- Connecting: the server listens on loopback unless told otherwise. Any other address needs a token, given or
  generated and printed at start; the page presents it (`?secret=...` in its URL) and the server checks it on
  connect (`server.TokenGate`). A token too short to resist guessing is refused before the server starts.
- Reading: only files and DICOM folders under the data folder, named relative to it; `..`, absolute names and
  symlinks that lead out of the folder are refused.
- Writing: only plain file names inside the output folder.
"""
from __future__ import annotations

import ipaddress
import secrets
import socket
from pathlib import Path

from ..errors import BrainDINOError
from ..volume import READABLE_SUFFIXES

MIN_TOKEN_LENGTH = 16
MODEL_SUFFIXES = (".pth", ".pt", ".safetensors")
MAX_LISTED = 2000  # names offered in the page's lists (a data folder may hold a whole archive)


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def connection_token(host: str, token: str | None) -> str | None:
    """The token every page must present: `token` if given, a new random one when `host` is not loopback,
    else None (loopback without a token: anyone on this machine may connect, as with Jupyter's default)."""
    if token is not None:
        if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
            raise BrainDINOError("--token", f"must be at least {MIN_TOKEN_LENGTH} printable characters without "
                                            "spaces (leave it out to get a random one)")
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(child.suffix.lower() == ".dcm" for child in path.iterdir())


class DataFolder:
    """The only folder the page may read from. Names are relative to it and must resolve inside it."""

    def __init__(self, root: str | Path):
        try:
            self.root = Path(root).resolve(strict=True)
        except OSError:
            raise BrainDINOError(root, "no such data folder") from None
        if not self.root.is_dir():
            raise BrainDINOError(root, "is not a folder; --data takes the folder the page may open files from")

    def resolve(self, name: str) -> Path:
        """The real path of `name`; BrainDINOError when it does not exist or leads out of the folder."""
        try:
            path = (self.root / name).resolve(strict=True)  # follows '..' and symlinks
        except (OSError, RuntimeError, ValueError):
            raise BrainDINOError(name, "no such file in the data folder") from None
        if not name or path == self.root:
            raise BrainDINOError(name or "''", "names no file in the data folder")
        if not path.is_relative_to(self.root) or Path(name).is_absolute():
            raise BrainDINOError(name, "is outside the data folder; the page opens files under --data only")
        return path

    def _listed(self, keep) -> list[str]:
        names = []
        for path in sorted(self.root.rglob("*")):
            name = path.relative_to(self.root).as_posix()
            if any(part.startswith(".") for part in Path(name).parts) or not keep(path, name.lower()):
                continue
            try:
                self.resolve(name)
            except BrainDINOError:
                continue  # a symlink leading out: not offered
            names.append(name)
            if len(names) == MAX_LISTED:
                break
        return names

    def volumes(self) -> list[str]:
        """Volume files and DICOM series folders, as names relative to the folder."""
        return self._listed(lambda path, name: name.endswith(READABLE_SUFFIXES) and path.is_file()
                            or _is_dicom_folder(path))

    def model_files(self) -> list[str]:
        """Checkpoint and head files (`.pth`, `.pt`, `.safetensors`)."""
        return self._listed(lambda path, name: name.endswith(MODEL_SUFFIXES) and path.is_file())


class OutputFolder:
    """The only folder the page writes to, created on first use; outputs are plain file names inside it."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        if self.root.exists() and not self.root.is_dir():
            raise BrainDINOError(root, "exists and is not a folder; --out takes the folder the page saves into")

    def path(self, name: str) -> Path:
        """Where the output `name` goes; BrainDINOError for names with folders, hidden names, or a symlink there."""
        if not name or Path(name).name != name or name.startswith(".") or "\\" in name:
            raise BrainDINOError(name, "is not a plain file name; outputs go straight into the output folder")
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / name
        if target.is_symlink() or not target.resolve().is_relative_to(self.root.resolve()):
            raise BrainDINOError(target, "is a symlink; the page writes only real files inside the output folder")
        return target
