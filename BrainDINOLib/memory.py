"""Will a model's weights fit on a device? Asked before anything is allocated, so a 7B-class backbone is refused
with one line instead of running a machine into swap."""
from __future__ import annotations

from pathlib import Path

import psutil
import torch

from .errors import BrainDINOError

GIB = 1 << 30
# Beyond the weights themselves: activations of inference batches and allocator slack.
WORKSPACE_FRACTION = 0.1
MIN_WORKSPACE_BYTES = 256 << 20


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated on `device` now without swapping: free CUDA memory on a GPU, available
    RAM otherwise (CPU, and Apple MPS, whose memory is the system's)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def required_memory(parameters: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes needed to hold `parameters` weights of `dtype` and run them."""
    weights = parameters * torch.empty((), dtype=dtype).element_size()
    return weights + max(int(weights * WORKSPACE_FRACTION), MIN_WORKSPACE_BYTES)


def ensure_fits(source: str | Path | None, what: str, parameters: int, device: torch.device,
                dtype: torch.dtype = torch.float32, available: int | None = None) -> None:
    """Raise a one-line `BrainDINOError` when `parameters` weights of `dtype` (plus working room) would not fit
    in the memory available on `device` (measured now unless `available` is given, in bytes)."""
    needed = required_memory(parameters, dtype)
    available = available_memory(device) if available is None else available
    if needed > available:
        count = f"{parameters / 1e9:.2f} B" if parameters >= 1e8 else f"{parameters / 1e6:.1f} M"
        raise BrainDINOError(source, f"{what} has {count} parameters and needs about "
                                     f"{needed / GIB:.1f} GiB in {str(dtype).removeprefix('torch.')} on {device}, "
                                     f"but only {available / GIB:.1f} GiB is available there; "
                                     "use a device with more free memory or a smaller model")
