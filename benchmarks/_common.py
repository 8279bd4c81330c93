"""Helpers the benchmarks share (not a benchmark itself: the smoke test skips files starting with "_")."""
from __future__ import annotations

import functools
import json
from dataclasses import replace
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import Tensor

from BrainDINOLib import Architecture, PreprocessConfig, SliceStack, Volume, read_volume
from BrainDINOLib.atlas import COLIN27_T1
from BrainDINOLib.atomic import write_text_atomic
from BrainDINOLib.encoder import Encoder
from BrainDINOLib.resolution import LEGACY, ResolutionPolicy
from BrainDINOLib.checkpoints import ModelCard, save_safetensors

VIT_S16 = Architecture(family="dinov3", embed_dim=384, depth=12, num_heads=6, patch_size=16)
VIT_B16 = Architecture(family="dinov3", embed_dim=768, depth=12, num_heads=12, patch_size=16)
TINY = Architecture(family="dinov3", embed_dim=64, depth=2, num_heads=1, patch_size=16)  # for --smoke


def machine_line() -> str:
    """Threads and load: figures from a busy machine are only comparable within one run."""
    return (f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads "
            f"({torch.backends.cpu.get_cpu_capability()}), load average {os.getloadavg()[0]:.1f}")


def random_checkpoint(architecture: Architecture, path: Path, seed: int = 0) -> Path:
    """A safetensors checkpoint of `architecture` with random weights and LayerScale drawn from [0.1, 1]
    (timm initialises it at 1e-5, which would make every block an identity and any precision look exact)."""
    torch.manual_seed(seed)
    model = architecture.build()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")):
                parameter.uniform_(0.1, 1.0)
    name = f"dinov3-{architecture.embed_dim}x{architecture.depth}-random"
    return save_safetensors(model, ModelCard(name, architecture), path, dtype=torch.float32)


def gflops(product: Callable[[], object], flops: float, seconds: float = 0.5) -> float:
    """Achieved GFLOP/s of `product` (which does `flops` operations), timed for about `seconds` after a
    warm-up call (a slow kernel, like bf16 on a CPU without bf16 instructions, is timed once)."""
    repeats = max(1, min(20, int(seconds / timed(product))))
    return flops * repeats / sum(timed(product) for _ in range(repeats)) / 1e9


def matmul_gflops(dtype: torch.dtype, size: int = 1024) -> float:
    """Achieved GFLOP/s of one square matmul in `dtype` on the CPU."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    return gflops(lambda: a @ b, 2 * size**3)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved_medians(functions: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each function over `rounds` rounds that call them in turn (A B C A B C ...), so a
    change in machine load falls on all of them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            seconds[name].append(timed(function))
    return {name: statistics.median(values) for name, values in seconds.items()}


def patch_cosine(tokens: Tensor, reference: Tensor) -> tuple[float, float]:
    """Mean and 1st percentile over patches of the cosine similarity of [..., D] tokens to a reference."""
    cosine = F.cosine_similarity(tokens.float(), reference.float(), dim=-1).flatten()
    return float(cosine.mean()), float(torch.quantile(cosine, 0.01))


def write_json(path: Path | None, data: object) -> None:
    if path is not None:
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")


def read_resampled(path: Path, spacing: float, labels: bool = False) -> Volume:
    """A volume resampled to isotropic `spacing` mm (nearest neighbour for label maps)."""
    image = sitk.ReadImage(str(path), sitk.sitkUInt8 if labels else sitk.sitkFloat32)
    if spacing != 1.0:
        size = [int(round(n / spacing)) for n in image.GetSize()]
        image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                              image.GetOrigin(), [spacing] * 3, image.GetDirection())
    return Volume.from_image(image, str(path))


def fixed_size(image_size: int) -> ResolutionPolicy:
    """Every axial slice at one input size (the old default at 224 px): what speed per slice is measured on."""
    return replace(LEGACY, image_size=image_size)


@functools.cache
def _colin27_stack(image_size: int, patch_size: int) -> SliceStack:
    return SliceStack.from_volume(read_volume(COLIN27_T1), patch_size, PreprocessConfig(), fixed_size(image_size))


def colin27_slices(encoder: Encoder, image_size: int, count: int) -> Tensor:
    """`count` axial slices of the bundled Colin27 T1 spread over the head, ready for `encoder` at `image_size`."""
    stack = _colin27_stack(image_size, encoder.patch_size)
    channels = encoder.architecture.in_chans
    picks = np.linspace(len(stack) * 0.2, len(stack) * 0.8, count).round().astype(int)
    return torch.cat([stack.batch(int(k), int(k) + 1, channels) for k in picks])
