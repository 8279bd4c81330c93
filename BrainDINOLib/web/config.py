"""What `braindino serve` was asked for: a plain dataclass, so the command line can build it without loading the
web stack."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..atlas import COLIN27_T1


@dataclass(frozen=True)
class ServeConfig:
    """Options of one server. `policy(device_type)` gives the resolution the command line asked for (the
    device's default unless `--resolution`, `--patch-mm`, ... were given); `cache_dir` None with `use_cache`
    is the default feature cache; `volume` is opened at start (relative to `data`, or the bundled sample)."""

    data: Path
    out: Path
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    model: str = "demo"
    device: str | None = None
    precision: str = "auto"  # inference.py
    policy: Callable[[str], object] | None = None
    use_cache: bool = True
    cache_dir: Path | None = None
    batch_size: int | None = None
    volume: str | None = None
    sample: Path = COLIN27_T1
