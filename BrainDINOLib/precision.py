"""The numeric precisions an encoder can run at, by name (what each means: `inference.py`). Torch-free, so
the command line lists them without importing torch."""
from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["auto", "fp32", "int8", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
